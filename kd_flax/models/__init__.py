"""kd_flax models: T5 family (t5.py), BART family (bart.py), HF interop (hf.py).

Families register themselves into the :mod:`kd_flax.models.hf` registry on import;
``create_model`` / ``tiny_config`` / ``load_pretrained`` dispatch on ``model_type``.
"""

from __future__ import annotations

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


def tiny_config(model_type: str, **overrides):
    """Tiny config (d_model ≤ 32, 2 layers, vocab ~100) for tests and demos.

    ``model_type``: ``t5`` (v1.0; pass ``feed_forward_proj="gated-gelu"`` for v1.1), ``mt5``,
    ``bart``, ``mbart``, ``marian``; ``overrides`` are config fields.
    """
    return hf.get_family(model_type).tiny_config(model_type, **overrides)


__all__ = ["T5Config", "T5Model", "load_pretrained", "save_pretrained", "create_model",
           "tiny_config", "train_tokenizer", "load_tokenizer", "hf"]
