"""The BART family in Flax NNX: BART, mBART and Marian/OPUS-MT, one module set by flags.

The three Hugging Face architectures share one skeleton (embeddings → N attention
layers → tied LM head + `final_logits_bias`) and differ only in a few places, all
decided by `model_type` exactly as transformers decides them:

| model_type | positions                  | layernorm_embedding | layer norm | final layer_norm |
| ---------- | -------------------------- | ------------------- | ---------- | ---------------- |
| bart       | learned, offset 2          | yes                 | post-LN    | no               |
| mbart      | learned, offset 2          | yes                 | pre-LN     | yes              |
| marian     | sinusoidal (not stored)    | no                  | post-LN    | no               |

Attribute names mirror the transformers modules (`self_attn/q_proj`, `fc1`,
`final_layer_norm`, ...) so the Hugging Face name table is mechanical
(see `hf_name_table`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_flax import sharding
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


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def _kw(c: BartConfig, rngs):
    return dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)


def _dense(c: BartConfig, din, dout, axes, rngs, use_bias=True):
    return layers.Dense(din, dout, use_bias=use_bias, axes=axes,
                        kernel_init=layers.normal_init(c.init_std),
                        act_quant_bits=c.act_quant_bits, **_kw(c, rngs))


def _attention(c: BartConfig, heads, rngs):
    init = layers.normal_init(c.init_std)
    return layers.MultiHeadAttention(c.d_model, heads, c.d_model // heads, use_bias=True,
                                     q_init=init, kv_init=init, out_init=init,
                                     act_quant_bits=c.act_quant_bits, **_kw(c, rngs))


def _layer_norm(c: BartConfig, rngs):
    return layers.LayerNorm(c.d_model, eps=1e-5, **_kw(c, rngs))


class EncoderLayer(nnx.Module):
    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        c = config
        self.pre_ln = c.normalize_before
        self.activation = c.activation_function
        self.self_attn = _attention(c, c.encoder_attention_heads, rngs)
        self.self_attn_layer_norm = _layer_norm(c, rngs)
        self.fc1 = _dense(c, c.d_model, c.encoder_ffn_dim, ("embed", "mlp"), rngs)
        self.fc2 = _dense(c, c.encoder_ffn_dim, c.d_model, ("mlp", "embed"), rngs)
        self.final_layer_norm = _layer_norm(c, rngs)

    def __call__(self, x, mask, output_attentions=False):
        # Pre-LN (mBART) normalises each sublayer's input; post-LN (BART, Marian) the sum.
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, _, probs = self.self_attn(h, mask=mask, output_attentions=output_attentions)
        x = x + h
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(layers.get_activation(self.activation)(self.fc1(h)))
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return sharding.constrain(x, ("batch", "length", "embed")), probs


class DecoderLayer(nnx.Module):
    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        c = config
        self.pre_ln = c.normalize_before
        self.activation = c.activation_function
        self.self_attn = _attention(c, c.decoder_attention_heads, rngs)
        self.self_attn_layer_norm = _layer_norm(c, rngs)
        self.encoder_attn = _attention(c, c.decoder_attention_heads, rngs)
        self.encoder_attn_layer_norm = _layer_norm(c, rngs)
        self.fc1 = _dense(c, c.d_model, c.decoder_ffn_dim, ("embed", "mlp"), rngs)
        self.fc2 = _dense(c, c.decoder_ffn_dim, c.d_model, ("mlp", "embed"), rngs)
        self.final_layer_norm = _layer_norm(c, rngs)

    def __call__(self, x, enc, self_mask, cross_mask, cache=None, index=None,
                 output_attentions=False):
        """`cache`: this layer's `{"self": {k, v} [B, H, L, Dh], "cross": {k, v}}` or None
        (then cross K/V are projected from `enc`). Returns (x, new cache, probs, cross probs)."""
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, new_self, probs = self.self_attn(
            h, mask=self_mask, cache=None if cache is None else cache["self"], cache_index=index,
            output_attentions=output_attentions)
        x = x + h
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.encoder_attn_layer_norm(x) if self.pre_ln else x
        h, _, cross_probs = self.encoder_attn(
            h, enc, kv=None if cache is None else cache["cross"], mask=cross_mask,
            output_attentions=output_attentions)
        x = x + h
        if not self.pre_ln:
            x = self.encoder_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_ln else x
        x = x + self.fc2(layers.get_activation(self.activation)(self.fc1(h)))
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        new_cache = None if cache is None else {"self": new_self, "cross": cache["cross"]}
        return sharding.constrain(x, ("batch", "length", "embed")), new_cache, probs, cross_probs


@functools.lru_cache(maxsize=8)
def sinusoidal_table(n_pos: int, dim: int) -> np.ndarray:
    """Marian's fixed position table, exactly as transformers'
    `MarianSinusoidalPositionalEmbedding`: angle pos / 10000^(2*(j//2)/dim) in float64,
    sin of the even columns in the first half, cos of the odd columns in the second."""
    j = np.arange(dim)
    angle = np.arange(n_pos)[:, None] / np.power(10000.0, 2 * (j // 2) / dim)[None, :]
    half = dim // 2 + dim % 2
    out = np.empty((n_pos, dim), np.float32)
    out[:, :half] = np.sin(angle[:, 0::2])
    out[:, half:] = np.cos(angle[:, 1::2])
    return out


class Stack(nnx.Module):
    """Encoder or decoder: own token embedding (Marian with separate vocabularies only),
    position embeddings, `layernorm_embedding`, the layers and the final `layer_norm`."""

    def __init__(self, config: BartConfig, *, decoder: bool, rngs: nnx.Rngs):
        c = config
        self.config = c
        vocab = c.target_vocab_size if decoder else c.vocab_size
        init = layers.normal_init(c.init_std)
        self.embed_tokens = (None if c.shared_embeddings else layers.Embed(
            vocab, c.d_model, embedding_init=init, **_kw(c, rngs)))
        # Sinusoidal tables are not parameters (transformers does not even save them).
        self.embed_positions = (None if c.sinusoidal_positions else layers.Embed(
            c.max_position_embeddings + c.position_offset, c.d_model, axes=(None, "embed"),
            embedding_init=init, **_kw(c, rngs)))
        self.layernorm_embedding = _layer_norm(c, rngs) if c.layernorm_embedding else None
        layer_cls = DecoderLayer if decoder else EncoderLayer
        self.layers = layers.make_layers(lambda r: layer_cls(c, rngs=r),
                                         c.decoder_layers if decoder else c.encoder_layers,
                                         scan=c.scan_layers, rngs=rngs)
        self.layer_norm = _layer_norm(c, rngs) if c.add_final_layer_norm else None

    def embed(self, token_embed: layers.Embed, ids, positions):
        """Input of layer 0: scaled token embeddings + positions (+ layernorm_embedding)."""
        c = self.config
        x = token_embed(ids)
        if c.scale_embedding:
            x = x * jnp.asarray(c.embed_scale, x.dtype)
        if self.embed_positions is not None:
            pos = self.embed_positions(positions + c.position_offset)
        else:
            table = jnp.asarray(sinusoidal_table(c.max_position_embeddings, c.d_model))
            pos = jnp.take(table, positions, axis=0).astype(x.dtype)
        x = x + pos
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return sharding.constrain(x, ("batch", "length", "embed"))

    def finish(self, x):
        return self.layer_norm(x) if self.layer_norm is not None else x


def _per_layer(ys, n, scan):
    """Per-layer outputs of `layers.apply_layers` → tuple of n arrays (or None)."""
    if scan:
        return None if ys is None else tuple(ys[i] for i in range(n))
    return None if ys[0] is None else tuple(ys)


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


class BartModel(layers.GenerationConfigMixin, nnx.Module):
    """BART / mBART / Marian encoder-decoder with LM head (HF `*ForConditionalGeneration`).

    Interface shared with `T5Model` (see docs/CONTRACTS.md): `encode`, `init_cache`,
    `decode`, `__call__`, `unembedding`, `generation_config`.
    """

    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        init = layers.normal_init(c.init_std)
        # One table for source, target and head (HF `model.shared`) when tied; otherwise
        # each stack has its own (see BartConfig.shared_embeddings).
        self.embed_tokens = (layers.Embed(c.vocab_size, c.d_model, embedding_init=init,
                                          **_kw(c, rngs)) if c.shared_embeddings else None)
        self.encoder = Stack(c, decoder=False, rngs=rngs)
        self.decoder = Stack(c, decoder=True, rngs=rngs)
        self.lm_head = (None if c.tie_word_embeddings else
                        _dense(c, c.d_model, c.target_vocab_size, ("embed", "vocab"), rngs,
                               use_bias=False))
        # A buffer in transformers, but the trained output bias of the original Marian
        # models; a Param here so layer copy, dtype changes and checkpoints carry it
        # like every other weight (and fine-tuning may adapt it).
        self.final_logits_bias = layers.param(rngs.params(), jax.nn.initializers.zeros,
                                              (c.target_vocab_size,), jnp.dtype(c.param_dtype),
                                              ("vocab",))
        # Stored as JSON text (layers.GenerationConfigMixin): static NNX attributes must be hashable.
        self.generation_config = generation_defaults(c)

    # -- embeddings / head --
    def _encoder_embed(self) -> layers.Embed:
        return self.embed_tokens if self.embed_tokens is not None else self.encoder.embed_tokens

    def _decoder_embed(self) -> layers.Embed:
        return self.embed_tokens if self.embed_tokens is not None else self.decoder.embed_tokens

    def unembedding(self):
        """(W [D, V], final_logits_bias [V]) with `logits = logits_hidden @ W + b`."""
        if self.lm_head is not None:
            w = self.lm_head.kernel[...]
        else:
            w = self._decoder_embed().embedding[...].T
        return w, self.final_logits_bias[...]

    def _logits(self, h, unembedding=None):
        logits = layers.unembed(h, *(unembedding or self.unembedding()), dtype=self.config.dtype)
        return sharding.constrain(logits, ("batch", "length", "vocab"))

    def _check_length(self, n, what):
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{what} has length {n} > max_position_embeddings="
                             f"{self.config.max_position_embeddings}")

    # -- encoder --
    def encode(self, input_ids, attention_mask, *, output_hidden_states=False,
               output_attentions=False) -> layers.EncoderOutput:
        """Encoder forward: `input_ids` [B, S] int, `attention_mask` [B, S] (1 = token)."""
        c = self.config
        self._check_length(input_ids.shape[1], "input_ids")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        x = self.encoder.embed(self._encoder_embed(), input_ids,
                               jnp.arange(input_ids.shape[1])[None, :])
        mask = layers.padding_mask(None, attention_mask)

        def body(layer, h, _):
            out, probs = layer(h, mask, output_attentions=output_attentions)
            return out, (h if output_hidden_states else None, probs)

        x, ys = layers.apply_layers(self.encoder.layers, body, x, None, scan=c.scan_layers,
                                    remat=c.remat)
        x = self.encoder.finish(x)
        hidden, attn = self._unpack(ys, c.encoder_layers, 2)
        if hidden is not None:
            hidden = hidden + (x,)  # HF: last entry is the final (normed) output
        return layers.EncoderOutput(last_hidden_state=x, hidden_states=hidden, attentions=attn)

    def _unpack(self, ys, n, k):
        scan = self.config.scan_layers
        if scan:
            return tuple(_per_layer(ys[j], n, True) for j in range(k))
        return tuple(_per_layer([y[j] for y in ys], n, False) for j in range(k))

    # -- decoder --
    def init_cache(self, batch_size: int, max_length: int, encoder_out, attention_mask=None):
        """Decoding cache: self-attention K/V [B, H, max_length, Dh] per layer (zeros) and the
        cross-attention K/V of `encoder_out` (keys transposed, [B, H, Dh, S]), computed once.
        Leaves are batch-first; with `scan_layers` they are stacked on axis 1."""
        del attention_mask  # the encoder mask is passed to every `decode` call instead
        c = self.config
        self._check_length(max_length, "init_cache max_length")
        enc = getattr(encoder_out, "last_hidden_state", encoder_out)
        if enc.shape[0] != batch_size:
            raise ValueError(f"init_cache: batch_size={batch_size} but encoder_out has batch "
                             f"{enc.shape[0]}")
        heads = c.decoder_attention_heads
        dt = jnp.dtype(c.dtype)

        def one(layer, carry, _):
            self_kv = layers.init_kv_cache(batch_size, max_length, heads, c.d_model // heads, dt)
            cross = jax.tree.map(lambda a: a.astype(dt), layer.encoder_attn.project_kv(enc))
            return carry, {"self": self_kv, "cross": cross}

        _, per_layer = layers.apply_layers(self.decoder.layers, one, None, None,
                                           scan=c.scan_layers)
        if c.scan_layers:
            per_layer = jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), per_layer)
        return {"index": jnp.zeros((), jnp.int32), "layers": per_layer}

    def decode(self, decoder_input_ids, encoder_out, attention_mask, *,
               decoder_attention_mask=None, cache=None, output_hidden_states=False,
               output_attentions=False, unembedding=None):
        """Decoder forward → `(logits [B, T, V] float32, cache)` (+ `DecoderExtras` when an
        output flag is set). `unembedding`: `(W [D, V], bias)` to use instead of
        :meth:`unembedding` (generation passes a copy laid out once, outside its loop).

        Without `cache`: teacher forcing over the full `decoder_input_ids` [B, T] with a
        causal mask and optional `decoder_attention_mask` [B, T]. With `cache`: the next
        tokens (usually [B, 1]) at positions `cache["index"]...`; the optional
        `decoder_attention_mask` then covers the whole cache, [B, max_length].
        """
        c = self.config
        enc = getattr(encoder_out, "last_hidden_state", encoder_out)
        t = decoder_input_ids.shape[1]
        if attention_mask is None:
            attention_mask = jnp.ones(enc.shape[:2], jnp.int32)
        cross_mask = layers.padding_mask(None, attention_mask)
        if cache is None:
            self._check_length(t, "decoder_input_ids")
            index = None
            positions = jnp.arange(t)
            self_mask = layers.causal_mask(positions, t)
            cache_layers = None
        else:
            index = cache["index"]
            cache_layers = cache["layers"]
            first = cache_layers if c.scan_layers else cache_layers[0]
            max_len = layers.kv_cache_length(first["self"], stacked=c.scan_layers)
            positions = index + jnp.arange(t)
            self_mask = layers.causal_mask(positions, max_len)
        if decoder_attention_mask is not None:
            self_mask = self_mask & layers.padding_mask(None, decoder_attention_mask)
        x = self.decoder.embed(self._decoder_embed(), decoder_input_ids, positions[None, :])

        def body(layer, h, lc):
            out, lc, probs, cprobs = layer(h, enc, self_mask, cross_mask, lc, index,
                                           output_attentions=output_attentions)
            return out, (lc, h if output_hidden_states else None, probs, cprobs)

        if c.scan_layers and cache_layers is not None:  # stacked [B, layers, ...], sliced per layer
            x, ys = layers.apply_layers_stacked_cache(self.decoder.layers, body, x, cache_layers,
                                                      remat=c.remat)
        else:
            x, ys = layers.apply_layers(self.decoder.layers, body, x, cache_layers,
                                        scan=c.scan_layers, remat=c.remat)
        h = self.decoder.finish(x)
        logits = self._logits(h, unembedding)
        new_cache = None
        if cache is not None:
            if c.scan_layers:
                new_layers = ys[0]
            else:
                new_layers = [y[0] for y in ys]
            new_cache = {"index": index + t, "layers": new_layers}
        if not (output_hidden_states or output_attentions):
            return logits, new_cache
        if c.scan_layers:
            ys = ys[1:]
        else:
            ys = [y[1:] for y in ys]
        hidden, attn, cross = self._unpack(ys, c.decoder_layers, 3)
        if hidden is not None:
            hidden = hidden + (h,)
        extras = layers.DecoderExtras(hidden_states=hidden, attentions=attn,
                                      cross_attentions=cross, logits_hidden=h)
        return logits, new_cache, extras

    def __call__(self, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None):
        """Teacher-forced logits [B, T, V] float32."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (shift the labels right, "
                             "starting with config.decoder_start_token_id)")
        enc = self.encode(input_ids, attention_mask)
        logits, _ = self.decode(decoder_input_ids, enc, attention_mask,
                                decoder_attention_mask=decoder_attention_mask)
        return logits


def generation_defaults(c: BartConfig) -> dict:
    """HF generation defaults derivable from the model config (replaced by
    `generation_config.json` when a checkpoint is loaded). OPUS-MT configs also carry
    beam settings (`num_beams`, `max_length`, `bad_words_ids`) in `config.json`."""
    out = hf.generation_defaults(c)
    if c.bos_token_id is None:
        out.pop("bos_token_id", None)
    extra = {k: json.loads(v) for k, v in c.hf_extra}
    for k in ("num_beams", "max_length", "bad_words_ids", "length_penalty",
              "no_repeat_ngram_size", "early_stopping", "min_length"):
        if k in extra:
            out[k] = extra[k]
    return out


# ---------------------------------------------------------------------------
# Hugging Face name table
# ---------------------------------------------------------------------------


def _attn_entries(hf_prefix: str, path: str) -> list:
    out = []
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        out += hf.dense_entries(f"{hf_prefix}.{proj}", f"{path}/{proj}", bias=True)
    return out


def name_table(c: BartConfig) -> list:
    """HF tensor names ↔ kd_flax paths (`*ForConditionalGeneration` / `MarianMTModel`)."""
    e = []
    lm_alias = ("lm_head.weight",) if c.tie_word_embeddings else ()
    if c.shared_embeddings:
        # transformers 5 writes only `model.shared.weight`; older checkpoints also hold
        # the tied copies, accepted on load.
        e.append(hf.Entry("model.shared.weight", "embed_tokens/embedding",
                          aliases=("model.encoder.embed_tokens.weight",
                                   "model.decoder.embed_tokens.weight") + lm_alias))
    else:
        if c.hf_has_shared:
            # HF keeps an unused `model.shared` here; write the encoder table under that
            # name too so transformers reports no missing key. On load this entry comes
            # first, so the encoder's own tensor (next entry) is the one that stays.
            e.append(hf.Entry("model.shared.weight", "encoder/embed_tokens/embedding"))
        e.append(hf.Entry("model.encoder.embed_tokens.weight", "encoder/embed_tokens/embedding"))
        e.append(hf.Entry("model.decoder.embed_tokens.weight", "decoder/embed_tokens/embedding",
                          aliases=lm_alias))
    if not c.tie_word_embeddings:
        e.append(hf.Entry("lm_head.weight", "lm_head/kernel", "transpose"))
    e.append(hf.Entry("final_logits_bias", "final_logits_bias",
                      hf_shape=(1, c.target_vocab_size)))
    for side, n in (("encoder", c.encoder_layers), ("decoder", c.decoder_layers)):
        pre = f"model.{side}"
        if not c.sinusoidal_positions:
            e.append(hf.Entry(f"{pre}.embed_positions.weight", f"{side}/embed_positions/embedding"))
        if c.layernorm_embedding:
            e += hf.norm_entries(f"{pre}.layernorm_embedding", f"{side}/layernorm_embedding",
                                 bias=True)
        if c.add_final_layer_norm:
            e += hf.norm_entries(f"{pre}.layer_norm", f"{side}/layer_norm", bias=True)
        for i in range(n):
            lp, kp = f"{pre}.layers.{i}", f"{side}/layers/{i}"
            e += _attn_entries(f"{lp}.self_attn", f"{kp}/self_attn")
            e += hf.norm_entries(f"{lp}.self_attn_layer_norm", f"{kp}/self_attn_layer_norm",
                                 bias=True)
            if side == "decoder":
                e += _attn_entries(f"{lp}.encoder_attn", f"{kp}/encoder_attn")
                e += hf.norm_entries(f"{lp}.encoder_attn_layer_norm",
                                     f"{kp}/encoder_attn_layer_norm", bias=True)
            e += hf.dense_entries(f"{lp}.fc1", f"{kp}/fc1", bias=True)
            e += hf.dense_entries(f"{lp}.fc2", f"{kp}/fc2", bias=True)
            e += hf.norm_entries(f"{lp}.final_layer_norm", f"{kp}/final_layer_norm", bias=True)
    return e


hf.register_family(hf.ModelFamily(
    name="bart", model_types=MODEL_TYPES, config_cls=BartConfig, model_cls=BartModel,
    name_table=name_table, tiny_config=tiny_config,
    # Marian's sinusoidal tables (written by older transformers) are recomputed, not
    # loaded (BART's learned tables are in the name table, so never "unexpected");
    # fairseq-converted checkpoints carry `version` buffers.
    ignore_unexpected=(r"model\.(encoder|decoder)\.embed_positions\.weight",
                       r"model\.(encoder|decoder)\.version"),
))
