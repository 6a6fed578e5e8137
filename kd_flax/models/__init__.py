"""kd_flax models: T5 family (t5.py), BART family (bart.py), HF interop (hf.py).

Families register themselves into the :mod:`kd_flax.models.hf` registry on import;
``create_model`` / ``tiny_config`` / ``load_pretrained`` dispatch on ``model_type``.
"""

from __future__ import annotations

import dataclasses
import importlib

from flax import nnx

from kd_flax.models import hf
from kd_flax.models.hf import load_pretrained, save_pretrained
from kd_flax.models.t5 import T5Config, T5Model
from kd_flax.models.tokenizer import load_tokenizer, train_tokenizer

# The BART family is optional at import time (written in parallel; keep the package usable).
try:
    _bart = importlib.import_module("kd_flax.models.bart")
except ImportError as _e:  # pragma: no cover - only while bart.py does not exist
    if "kd_flax.models.bart" not in str(_e):
        raise
    _bart = None
if _bart is not None:
    BartConfig = getattr(_bart, "BartConfig", None)
    BartModel = getattr(_bart, "BartModel", None)


def create_model(config, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Randomly initialised model of ``config``'s family (``rngs`` default ``nnx.Rngs(0)``)."""
    family = hf.get_family(config.model_type)
    return family.model_cls(config, rngs=rngs if rngs is not None else nnx.Rngs(0))


def with_config(model, **fields) -> nnx.Module:
    """The same weights (and their shardings) under `model`'s config with `fields` replaced,
    e.g. `dtype="float32"` to export in float32 compute, `act_quant_bits=None` for a float
    stage, a student's activation fake-quant for evaluation; `model` itself when nothing
    changes. Built abstractly (no random init), so only the fields' effect is new."""
    if all(getattr(model.config, k, None) == v for k, v in fields.items()):
        return model
    cfg = model.config.replace(**fields)
    new = nnx.eval_shape(lambda: create_model(cfg, nnx.Rngs(0)))
    nnx.update(new, nnx.state(model))
    if hasattr(model, "generation_config"):  # set by load_pretrained, not by the constructor
        new.generation_config = model.generation_config
    return new


def tiny_config(model_type: str, **overrides):
    """Tiny config (d_model ≤ 32, 2 layers, vocab ~100) for tests and demos.

    ``model_type``: ``t5`` (v1.0; pass ``feed_forward_proj="gated-gelu"`` for v1.1), ``mt5``,
    ``bart``, ``mbart``, ``marian``; ``overrides`` are config fields.
    """
    return hf.get_family(model_type).tiny_config(model_type, **overrides)


def config_from_dict(model_dict: dict, tokenizer, **extra):
    """A family config from an HF-style dict (`model_type` + fields); ids from the tokenizer."""
    d = dict(model_dict)
    if "model_type" not in d:
        raise ValueError(f"model config: missing 'model_type'; allowed: {hf.registered_model_types()}")
    if not d.get("vocab_size"):  # 0/None = the tokenizer's size
        d["vocab_size"] = len(tokenizer)
    for key, tok_attr in (("pad_token_id", "pad_token_id"), ("eos_token_id", "eos_token_id")):
        if getattr(tokenizer, tok_attr, None) is not None:
            d.setdefault(key, getattr(tokenizer, tok_attr))
    d.setdefault("decoder_start_token_id", d.get("pad_token_id", 0))
    cls = hf.get_family(d["model_type"]).config_cls
    # The BART family forces EOS at the length limit with HF's default id 2 (BART's </s>); a
    # model built for another tokenizer must force that tokenizer's EOS (2 is <unk> in ours).
    if "forced_eos_token_id" in {f.name for f in dataclasses.fields(cls)} and "eos_token_id" in d:
        d.setdefault("forced_eos_token_id", d["eos_token_id"])
    return cls.from_hf(d).replace(**extra)


__all__ = ["T5Config", "T5Model", "load_pretrained", "save_pretrained", "create_model", "with_config",
           "tiny_config", "config_from_dict", "train_tokenizer", "load_tokenizer", "hf"]
