"""`BartConfig`: the configuration of the BART family (BART, mBART, Marian/OPUS-MT) and its
round trip to a Hugging Face `config.json`; `tiny_config` for tests and demos. The modules
that the config describes are in `kd_flax.models.bart`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax.numpy as jnp

from kd_flax.models import hf, layers

# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

MODEL_TYPES = ("bart", "mbart", "marian")

# HF config keys that BartConfig models explicitly; everything else from config.json is
# kept verbatim in `hf_extra` so `to_hf()` gives back what `from_hf()` received.
_HF_KEYS = (
    "model_type", "vocab_size", "decoder_vocab_size", "d_model", "encoder_layers",
    "decoder_layers", "encoder_attention_heads", "decoder_attention_heads", "encoder_ffn_dim",
    "decoder_ffn_dim", "max_position_embeddings", "activation_function", "scale_embedding",
    "share_encoder_decoder_embeddings", "tie_word_embeddings", "pad_token_id", "bos_token_id",
    "eos_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id",
    "dropout", "attention_dropout", "activation_dropout", "init_std",
)
# HF keys that describe the torch runtime, not the model: dropped on load.
_HF_DROP = ("transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache",
            "output_attentions", "output_hidden_states", "return_dict")


def _dtype_name(x) -> str:
    return jnp.dtype(x).name


@dataclasses.dataclass(frozen=True)
class BartConfig(hf.ConfigMixin):
    """Hyper-parameters of a BART / mBART / Marian model (HF names and defaults).

    The architecture switches are derived from `model_type` (properties below), as in
    transformers. `dtype` is the compute dtype, `param_dtype` the storage dtype.
    `remat` is False/True or a `jax.checkpoint_policies` name; `scan_layers` stacks the
    per-layer parameters with a leading `layers` axis and runs the stack with `nnx.scan`.
    """

    model_type: str = "bart"
    vocab_size: int = 50265
    d_model: int = 1024
    encoder_layers: int = 12
    decoder_layers: int = 12
    encoder_attention_heads: int = 16
    decoder_attention_heads: int = 16
    encoder_ffn_dim: int = 4096
    decoder_ffn_dim: int = 4096
    max_position_embeddings: int = 1024
    activation_function: str = "gelu"
    scale_embedding: bool = False
    decoder_vocab_size: int | None = None  # Marian with separate decoder vocabulary
    share_encoder_decoder_embeddings: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int = 2
    decoder_start_token_id: int | None = 2
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = 2
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    dtype: str = "float32"
    param_dtype: str = "float32"
    act_quant_bits: int | None = None
    act_quant_granularity: str = "tensor"  # "row": per-token scales (scheme ctranslate2_int8)
    remat: bool | str = False
    scan_layers: bool = False
    # Unmodelled HF config entries as sorted (key, json) pairs (hashable: the config is
    # static data of the NNX graph).
    hf_extra: tuple = ()

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"BartConfig.model_type={self.model_type!r}; allowed: {MODEL_TYPES}")
        if self.activation_function not in layers.ACTIVATIONS:
            raise ValueError(f"BartConfig.activation_function={self.activation_function!r}; "
                             f"allowed: {sorted(layers.ACTIVATIONS)}")
        for name, heads in (("encoder_attention_heads", self.encoder_attention_heads),
                            ("decoder_attention_heads", self.decoder_attention_heads)):
            if heads <= 0 or self.d_model % heads:
                raise ValueError(f"BartConfig.{name}={heads} must divide d_model={self.d_model}")
        if self.act_quant_bits not in (None, 8):
            raise ValueError(f"BartConfig.act_quant_bits={self.act_quant_bits!r}; allowed: None, 8")
        layers.check_act_granularity(self.act_quant_granularity, "BartConfig")
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype))
        if self.decoder_vocab_size is None:
            object.__setattr__(self, "decoder_vocab_size", self.vocab_size)
        if self.decoder_start_token_id is None:
            # Marian starts decoding from <pad>; mBART from </s> (the target language code
            # is then forced as the first generated token through `forced_bos_token_id`).
            start = self.pad_token_id if self.model_type == "marian" else self.eos_token_id
            object.__setattr__(self, "decoder_start_token_id", start)

    # -- architecture switches (fixed per model_type, as in transformers) --
    @property
    def normalize_before(self) -> bool:
        return self.model_type == "mbart"

    @property
    def add_final_layer_norm(self) -> bool:
        return self.model_type == "mbart"

    @property
    def layernorm_embedding(self) -> bool:
        return self.model_type in ("bart", "mbart")

    @property
    def sinusoidal_positions(self) -> bool:
        return self.model_type == "marian"

    @property
    def position_offset(self) -> int:
        # BART/mBART reserve the first two rows of the learned table (fairseq legacy).
        return 0 if self.sinusoidal_positions else 2

    @property
    def hf_has_shared(self) -> bool:
        """Whether the HF model has `model.shared` (all but Marian with two vocabularies)."""
        return self.model_type != "marian" or self.share_encoder_decoder_embeddings

    @property
    def shared_embeddings(self) -> bool:
        """One token table for encoder, decoder (and the tied head). transformers 5 ties
        nothing at all when `tie_word_embeddings=False`: the encoder and decoder then have
        their own tables (and `model.shared` is unused)."""
        return self.tie_word_embeddings and self.hf_has_shared

    @property
    def target_vocab_size(self) -> int:
        return self.vocab_size if self.hf_has_shared else self.decoder_vocab_size

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.d_model) if self.scale_embedding else 1.0

    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> "BartConfig":
        """Build from a transformers `config.json` dict (`overrides` win)."""
        hf = dict(hf)
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config.json model_type={model_type!r} is not a BART-family "
                             f"model; allowed: {MODEL_TYPES}")
        kw = {k: hf[k] for k in _HF_KEYS if k in hf}
        # transformers allows lists of EOS ids; the decoder engine wants one id.
        for k in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(kw.get(k), list):
                kw[k] = kw[k][0] if kw[k] else None
        extra = {k: v for k, v in hf.items() if k not in _HF_KEYS and k not in _HF_DROP}
        kw["hf_extra"] = tuple(sorted((k, json.dumps(v)) for k, v in extra.items()))
        if "decoder_start_token_id" not in hf:
            kw["decoder_start_token_id"] = None
        if model_type == "marian":
            # Marian's HF defaults differ from BART's for the sharing flags.
            kw.setdefault("share_encoder_decoder_embeddings", True)
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict:
        """The transformers `config.json` dict for this config."""
        out = {k: json.loads(v) for k, v in self.hf_extra}
        for k in _HF_KEYS:
            out[k] = getattr(self, k)
        if self.model_type != "marian":
            out.pop("share_encoder_decoder_embeddings")
            out.pop("decoder_vocab_size")
        out["architectures"] = [{"bart": "BartForConditionalGeneration",
                                 "mbart": "MBartForConditionalGeneration",
                                 "marian": "MarianMTModel"}[self.model_type]]
        out["is_encoder_decoder"] = True
        out["dtype"] = self.param_dtype  # the storage dtype, as transformers 5 writes it
        return out


def tiny_config(model_type: str = "bart", **overrides) -> BartConfig:
    """A tiny random-init config for tests and demos (vocab 99, d_model 32, 2+2 layers)."""
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r}; allowed: {MODEL_TYPES}")
    kw: dict[str, Any] = dict(
        model_type=model_type, vocab_size=99, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0)
    if model_type == "marian":
        # Marian: pad is the last id and doubles as decoder start; EOS is 0.
        kw.update(activation_function="swish", scale_embedding=True, pad_token_id=98,
                  eos_token_id=0, bos_token_id=None, decoder_start_token_id=98,
                  forced_eos_token_id=0)
    if model_type == "mbart":
        kw.update(scale_embedding=True, decoder_start_token_id=2)
    kw.update(overrides)
    return BartConfig(**kw)
