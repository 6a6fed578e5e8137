"""T5 family in Flax NNX: T5 v1.0, T5 v1.1 / Flan-T5, mT5.

Numerically the same as ``transformers.T5ForConditionalGeneration``:
- RMS norm (no mean subtraction, variance in float32), pre-norm residual blocks;
- no 1/sqrt(d) scaling of QK (T5 folds it into the init);
- relative position bias computed by the first layer's table and shared by the stack
  (bidirectional buckets in the encoder, unidirectional in the decoder); here the table
  lives on the stack (``encoder/relative_attention_bias``) so scanned layers stay uniform;
- v1.0: ReLU MLP, tied embedding head with ``d_model**-0.5`` rescale of the decoder output;
  v1.1 / mT5: gated GELU (tanh approximation), untied ``lm_head``, no rescale.
Dropout (``dropout_rate``) where transformers applies it: embeddings, attention probabilities,
after the activation in the MLP, each sublayer's output before the residual add, and the
final-norm output; only in a train step's forward (``dropout_rng``), never in eval or decoding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kd_flax import sharding as _sharding
from kd_flax.models import hf
from kd_flax.models import layers as L


@dataclasses.dataclass(frozen=True)
class T5Config(hf.ConfigMixin):
    model_type: str = "t5"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    encoder_layers: int = 6
    decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"          # "relu" (v1.0) | "gated-gelu" (v1.1, mT5) | "[gated-]ACT"
    tie_word_embeddings: bool = True         # head = shared embedding (else ``lm_head``)
    scale_decoder_outputs: bool = True       # multiply decoder output by d_model**-0.5 (v1.0)
    dropout_rate: float = 0.1                # applied only in training (a ``dropout_rng`` is passed)
    initializer_factor: float = 1.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    dtype: Any = "float32"
    param_dtype: Any = "float32"
    act_quant_bits: int | None = None
    act_quant_granularity: str = "tensor"    # "row": per-token scales (scheme ctranslate2_int8)
    remat: Any = False
    scan_layers: bool = False

    def __post_init__(self):
        if self.model_type not in ("t5", "mt5"):
            raise ValueError(f"T5Config.model_type={self.model_type!r}; allowed: ['mt5', 't5']")
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(f"T5Config.feed_forward_proj={self.feed_forward_proj!r}; allowed: "
                             "'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')")
        L.get_activation(self.activation)
        L.check_act_granularity(self.act_quant_granularity, "T5Config")
        L.remat_policy(self.remat)
        for k in ("dtype", "param_dtype"):  # canonical names keep configs comparable / JSON-able
            object.__setattr__(self, k, hf.canonical_dtype(getattr(self, k), f"T5Config.{k}"))

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # HF maps "gated-gelu" to the tanh approximation (gelu_new), for backward compatibility
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf(cls, d: dict) -> "T5Config":
        """From a HF ``config.json`` dict (T5Config / MT5Config); unknown keys are ignored."""
        num_layers = d.get("num_layers", 6)
        tie = d.get("tie_word_embeddings", True)
        # transformers ≥ 5 writes scale_decoder_outputs explicitly; older configs imply it by tying
        scale = d.get("scale_decoder_outputs", tie is not False)
        eos = d.get("eos_token_id", 1)
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = d.get("pad_token_id", 0)
        start = d.get("decoder_start_token_id")
        return cls(
            model_type=d.get("model_type", "t5"), vocab_size=d.get("vocab_size", 32128),
            d_model=d.get("d_model", 512), d_kv=d.get("d_kv", 64), d_ff=d.get("d_ff", 2048),
            encoder_layers=num_layers, decoder_layers=d.get("num_decoder_layers") or num_layers,
            num_heads=d.get("num_heads", 8),
            relative_attention_num_buckets=d.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=d.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-6),
            feed_forward_proj=d.get("feed_forward_proj", "relu"),
            tie_word_embeddings=bool(tie), scale_decoder_outputs=bool(scale),
            dropout_rate=d.get("dropout_rate", 0.1),
            initializer_factor=d.get("initializer_factor", 1.0),
            pad_token_id=pad, eos_token_id=eos,
            decoder_start_token_id=pad if start is None else start,
            forced_bos_token_id=d.get("forced_bos_token_id"),
            forced_eos_token_id=d.get("forced_eos_token_id"),
        )

    def to_hf(self) -> dict:
        arch = "MT5ForConditionalGeneration" if self.model_type == "mt5" else "T5ForConditionalGeneration"
        out = {
            "architectures": [arch], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "d_model": self.d_model, "d_kv": self.d_kv, "d_ff": self.d_ff,
            "num_layers": self.encoder_layers, "num_decoder_layers": self.decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": self.feed_forward_proj,
            "dense_act_fn": self.activation, "is_gated_act": self.is_gated,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "dropout_rate": self.dropout_rate, "initializer_factor": self.initializer_factor,
            "is_encoder_decoder": True, "use_cache": True,
            "pad_token_id": self.pad_token_id, "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "dtype": hf.dtype_name(self.param_dtype),
        }
        for k in ("forced_bos_token_id", "forced_eos_token_id"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out


def _common(config: T5Config) -> dict:
    return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


class T5MLP(nnx.Module):
    """``wo(act(wi(x)))`` or, gated, ``wo(act(wi_0(x)) * wi_1(x))``; no biases."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        f = config.initializer_factor
        kw = dict(use_bias=False, **L.act_kw(config), rngs=rngs, **_common(config))
        wi_init = L.normal_init(f * config.d_model ** -0.5)
        if config.is_gated:
            self.wi_0 = L.Dense(config.d_model, config.d_ff, axes=("embed", "mlp"), kernel_init=wi_init, **kw)
            self.wi_1 = L.Dense(config.d_model, config.d_ff, axes=("embed", "mlp"), kernel_init=wi_init, **kw)
        else:
            self.wi = L.Dense(config.d_model, config.d_ff, axes=("embed", "mlp"), kernel_init=wi_init, **kw)
        self.wo = L.Dense(config.d_ff, config.d_model, axes=("mlp", "embed"),
                          kernel_init=L.normal_init(f * config.d_ff ** -0.5), **kw)
        self.act = L.get_activation(config.activation)
        self.gated = config.is_gated
        self.dropout_rate = config.dropout_rate

    def __call__(self, x, drop: L.Dropout = L.NO_DROPOUT):
        if self.gated:
            h = self.act(self.wi_0(x)) * self.wi_1(x)
        else:
            h = self.act(self.wi(x))
        h = _sharding.constrain(drop(h, self.dropout_rate), ("batch", "length", "mlp"))
        return self.wo(h)


def _attention(config: T5Config, rngs: nnx.Rngs) -> L.MultiHeadAttention:
    f, d, h, dk = config.initializer_factor, config.d_model, config.num_heads, config.d_kv
    return L.MultiHeadAttention(
        d, h, dk, use_bias=False, qk_scale=1.0, q_init=L.normal_init(f * (d * dk) ** -0.5),
        kv_init=L.normal_init(f * d ** -0.5), out_init=L.normal_init(f * (h * dk) ** -0.5),
        dropout_rate=config.dropout_rate, **L.act_kw(config), rngs=rngs, **_common(config))


def _norm(config: T5Config, rngs: nnx.Rngs) -> L.RMSNorm:
    return L.RMSNorm(config.d_model, eps=config.layer_norm_epsilon, rngs=rngs, **_common(config))


class T5EncoderLayer(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.self_attn_norm = _norm(config, rngs)
        self.self_attn = _attention(config, rngs)
        self.mlp_norm = _norm(config, rngs)
        self.mlp = T5MLP(config, rngs=rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(self, h, mask, bias, output_attentions: bool, drop: L.Dropout = L.NO_DROPOUT):
        a, _, w = self.self_attn(self.self_attn_norm(h), mask=mask, bias=bias,
                                 output_attentions=output_attentions, dropout=drop)
        h = h + drop(a, self.dropout_rate)
        h = h + drop(self.mlp(self.mlp_norm(h), drop), self.dropout_rate)
        return h, w


class T5DecoderLayer(nnx.Module):
    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.self_attn_norm = _norm(config, rngs)
        self.self_attn = _attention(config, rngs)
        self.cross_attn_norm = _norm(config, rngs)
        self.cross_attn = _attention(config, rngs)
        self.mlp_norm = _norm(config, rngs)
        self.mlp = T5MLP(config, rngs=rngs)
        self.dropout_rate = config.dropout_rate

    def __call__(self, h, *, self_mask, self_bias, enc, cross_mask, cache, cache_index,
                 output_attentions: bool, drop: L.Dropout = L.NO_DROPOUT):
        """``cache``: None or ``{'self': {'k','v'}, 'cross': {'k','v'}}`` of this layer."""
        a, new_self, w_self = self.self_attn(
            self.self_attn_norm(h), mask=self_mask, bias=self_bias,
            cache=None if cache is None else cache["self"], cache_index=cache_index,
            output_attentions=output_attentions, dropout=drop)
        h = h + drop(a, self.dropout_rate)
        a, _, w_cross = self.cross_attn(
            self.cross_attn_norm(h), enc, kv=None if cache is None else cache["cross"],
            mask=cross_mask, output_attentions=output_attentions, dropout=drop)
        h = h + drop(a, self.dropout_rate)
        h = h + drop(self.mlp(self.mlp_norm(h), drop), self.dropout_rate)
        new_cache = None if cache is None else {"self": new_self, "cross": cache["cross"]}
        return h, new_cache, w_self, w_cross


class T5Stack(nnx.Module):
    """Layers + shared relative-position table + final RMS norm."""

    def __init__(self, config: T5Config, *, decoder: bool, rngs: nnx.Rngs):
        n = config.decoder_layers if decoder else config.encoder_layers
        layer_cls = T5DecoderLayer if decoder else T5EncoderLayer
        self.layers = L.make_layers(lambda r: layer_cls(config, rngs=r), n, scan=config.scan_layers,
                                    rngs=rngs)
        self.relative_attention_bias = L.Embed(
            config.relative_attention_num_buckets, config.num_heads, axes=("rel_pos", "heads"),
            embedding_init=L.normal_init(config.initializer_factor * config.d_model ** -0.5),
            rngs=rngs, **_common(config))
        self.final_norm = _norm(config, rngs)
        self.num_layers = n
        self.decoder = decoder
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.scan = config.scan_layers
        self.remat = config.remat

    def position_bias(self, query_positions, key_positions):
        """[1, H, T, S] float32 bias from the relative-position table."""
        rel = key_positions[None, :] - query_positions[:, None]
        buckets = L.relative_position_bucket(rel, bidirectional=not self.decoder,
                                             num_buckets=self.num_buckets, max_distance=self.max_distance)
        values = jnp.take(self.relative_attention_bias.embedding[...], buckets, axis=0)  # [T, S, H]
        return jnp.transpose(values, (2, 0, 1))[None].astype(jnp.float32)


class T5Model(L.GenerationConfigMixin, nnx.Module):
    """T5 encoder-decoder with LM head (see module doc and docs/CONTRACTS.md)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.config = config
        c = _common(config)
        self.embed_tokens = L.Embed(config.vocab_size, config.d_model,
                                    embedding_init=L.normal_init(config.initializer_factor),
                                    rngs=rngs, **c)
        self.encoder = T5Stack(config, decoder=False, rngs=rngs)
        self.decoder = T5Stack(config, decoder=True, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = L.Dense(config.d_model, config.vocab_size, use_bias=False, axes=("embed", "vocab"),
                                   kernel_init=L.normal_init(config.initializer_factor * config.d_model ** -0.5),
                                   **L.act_kw(config), rngs=rngs, **c)
        else:
            self.lm_head = None
        self.generation_config = hf.generation_defaults(config)  # JSON text: keeps the graphdef hashable

    # ---------------------------------------------------------------- encoder
    def encode(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False,
               output_attentions: bool = False, dropout_rng=None) -> L.EncoderOutput:
        """Encode ``input_ids`` [B, S] (``attention_mask`` 1 = token, default all ones).
        ``hidden_states``: embeddings, each layer's input, then the final-norm output
        (like transformers); ``attentions``: [B, H, S, S] per layer. ``dropout_rng``: a key
        to train with dropout (None: deterministic)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        stack = self.encoder
        rate = self.config.dropout_rate
        drop = L.dropout_for(dropout_rng, rate)
        h = _sharding.constrain(drop(self.embed_tokens(input_ids), rate), ("batch", "length", "embed"))
        S = input_ids.shape[1]
        pos = jnp.arange(S)
        bias = stack.position_bias(pos, pos)
        mask = L.padding_mask(None, attention_mask)

        def fn(layer, h, _, d):
            h_out, w = layer(h, mask, bias, output_attentions, d)
            return h_out, (h if output_hidden_states else None, w)

        h, (hs, ws) = _unzip(L.apply_layers(stack.layers, fn, h, None, scan=stack.scan, remat=stack.remat,
                                            dropout=drop), stack.scan)
        h = drop(stack.final_norm(h), rate)
        hidden = L.per_layer(hs, stack.num_layers, stack.scan) + (h,) if output_hidden_states else None
        attns = L.per_layer(ws, stack.num_layers, stack.scan) if output_attentions else None
        return L.EncoderOutput(last_hidden_state=h, hidden_states=hidden, attentions=attns)

    # ---------------------------------------------------------------- cache
    def init_cache(self, batch_size: int, max_length: int, encoder_out, attention_mask=None) -> dict:
        """Self-attention K/V buffers of ``max_length`` and cross-attention K/V computed once.

        ``{'index': int32 scalar, 'layers': per-layer {'self': {'k','v'}, 'cross': {'k','v'}}}``
        with heads-major leaves [B, H, L, Dh], cross-attention keys transposed [B, H, Dh, S] (a list
        per layer; with ``scan_layers`` one dict whose leaves are stacked on axis 1: [B, n_layers, ...]).
        """
        del attention_mask  # the encoder mask is passed to every decode call
        enc = _hidden(encoder_out)
        cfg = self.config
        stack = self.decoder

        def one(layer):
            return {"self": L.init_kv_cache(batch_size, max_length, cfg.num_heads, cfg.d_kv,
                                            jnp.dtype(cfg.dtype)),
                    "cross": layer.cross_attn.project_kv(enc)}

        if stack.scan:
            graphdef, state = nnx.split(stack.layers)
            per = jax.vmap(lambda st: one(nnx.merge(graphdef, st)), out_axes=1)(state)
        else:
            per = [one(layer) for layer in stack.layers]
        return {"index": jnp.zeros((), jnp.int32), "layers": per}

    # ---------------------------------------------------------------- decoder
    def decode(self, decoder_input_ids, encoder_out, attention_mask=None, *, decoder_attention_mask=None,
               cache=None, output_hidden_states: bool = False, output_attentions: bool = False,
               unembedding=None, dropout_rng=None):
        """Decoder + LM head → ``(logits [B, T, V] float32, cache)``, plus ``DecoderExtras``
        when an output flag is set. ``unembedding``: ``(W [D, V], bias or None)`` to use instead
        of :meth:`unembedding` for a tied head (generation passes a copy laid out once, outside
        its loop); an untied ``lm_head`` is used as is.

        Without ``cache``: teacher-forced over the full ``decoder_input_ids`` [B, T] (causal),
        ``decoder_attention_mask`` [B, T] masks padded keys. With ``cache`` (from
        :meth:`init_cache`): ``decoder_input_ids`` are the next tokens [B, T≥1] written at
        ``cache['index']``; ``decoder_attention_mask``, if given, covers the whole cache
        [B, max_length]. ``encoder_out``: an ``EncoderOutput`` or its last hidden state;
        ``attention_mask``: the encoder padding mask [B, S]. ``dropout_rng``: a key to train
        with dropout (None: deterministic; decoding never passes one).
        """
        enc = _hidden(encoder_out)
        if attention_mask is None:
            attention_mask = jnp.ones(enc.shape[:2], jnp.int32)
        stack = self.decoder
        T = decoder_input_ids.shape[1]
        rate = self.config.dropout_rate
        drop = L.dropout_for(dropout_rng, rate)
        h = _sharding.constrain(drop(self.embed_tokens(decoder_input_ids), rate), ("batch", "length", "embed"))
        cross_mask = L.padding_mask(None, attention_mask)
        if cache is None:
            index = None
            positions = jnp.arange(T)
            key_len = T
        else:
            index = cache["index"]
            positions = index + jnp.arange(T)
            key_len = _cache_length(cache, stack.scan)
        self_mask = L.causal_mask(positions, key_len)
        if decoder_attention_mask is not None:
            self_mask = self_mask & L.padding_mask(None, decoder_attention_mask)
        bias = stack.position_bias(positions, jnp.arange(key_len))

        def fn(layer, h, layer_cache, d=L.NO_DROPOUT):
            h_out, new_cache, w_self, w_cross = layer(
                h, self_mask=self_mask, self_bias=bias, enc=enc, cross_mask=cross_mask,
                cache=layer_cache, cache_index=index, output_attentions=output_attentions, drop=d)
            return h_out, (new_cache, h if output_hidden_states else None, w_self, w_cross)

        if cache is not None and stack.scan:  # stacked cache [B, layers, ...] sliced per layer
            result = L.apply_layers_stacked_cache(stack.layers, fn, h, cache["layers"], remat=stack.remat)
        else:
            result = L.apply_layers(stack.layers, fn, h, None if cache is None else cache["layers"],
                                    scan=stack.scan, remat=stack.remat, dropout=drop)
        h, (new_layers, hs, ws, wc) = _unzip(result, stack.scan)
        h = drop(stack.final_norm(h), rate)
        hidden_out = h
        if self.config.scale_decoder_outputs:
            h = h * (self.config.d_model ** -0.5)
        logits = self._logits(h, unembedding)
        new_cache = None
        if cache is not None:
            new_cache = {"index": index + T, "layers": new_layers}
        if not (output_hidden_states or output_attentions):
            return logits, new_cache
        n = stack.num_layers
        extras = L.DecoderExtras(
            hidden_states=L.per_layer(hs, n, stack.scan) + (hidden_out,) if output_hidden_states else None,
            attentions=L.per_layer(ws, n, stack.scan) if output_attentions else None,
            cross_attentions=L.per_layer(wc, n, stack.scan) if output_attentions else None,
            logits_hidden=h)
        return logits, new_cache, extras

    def _logits(self, h, unembedding=None):
        if self.lm_head is not None:  # untied: already [D, V], and it may fake-quantize its input
            logits = self.lm_head(h).astype(jnp.float32)
        elif unembedding is not None:  # tied: the caller's copy laid out as [D, V]
            logits = L.unembed(L.head_input(h, self.config), *unembedding, dtype=self.config.dtype)
        else:  # tied: the [V, D] embedding as stored
            logits = L.unembed(L.head_input(h, self.config), self.embed_tokens.embedding[...],
                               dtype=self.config.dtype, vocab_major=True)
        return _sharding.constrain(logits, ("batch", "length", "vocab"))

    def unembedding(self):
        """``(W [D, V], None)`` with ``logits = logits_hidden @ W``."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T, None
        return self.lm_head.kernel[...], None

    def __call__(self, input_ids=None, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, dropout_rng=None):
        """Teacher-forced logits [B, T, V] (float32), keyword names as in transformers
        (``dropout_rng``: train with dropout)."""
        if input_ids is None or decoder_input_ids is None:
            raise ValueError("T5Model(...) needs input_ids= and decoder_input_ids=")
        return L.teacher_forced(self, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask,
                                dropout_rng)


def _hidden(encoder_out):
    return encoder_out.last_hidden_state if hasattr(encoder_out, "last_hidden_state") else encoder_out


def _cache_length(cache, scan: bool) -> int:
    first = cache["layers"] if scan else cache["layers"][0]
    return L.kv_cache_length(first["self"], stacked=scan)


def _unzip(result, scan: bool):
    """(carry, ys) of apply_layers → (carry, tuple of per-field ys)."""
    carry, ys = result
    if scan:
        return carry, ys
    return carry, tuple(list(field) for field in zip(*ys))


# ----------------------------------------------------------------------------- HF name table

def name_table(config: T5Config) -> list[hf.Entry]:
    """HF T5ForConditionalGeneration tensor names ↔ kd_flax paths."""
    aliases = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    if config.tie_word_embeddings:
        aliases += ("lm_head.weight",)
    t = [hf.Entry("shared.weight", "embed_tokens/embedding", aliases=aliases)]
    if not config.tie_word_embeddings:
        t.append(hf.Entry("lm_head.weight", "lm_head/kernel", "transpose"))
    for side, n in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        t.append(hf.Entry(f"{side}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          f"{side}/relative_attention_bias/embedding"))
        t += hf.norm_entries(f"{side}.final_layer_norm", f"{side}/final_norm", bias=False)
        for i in range(n):
            hp, kp = f"{side}.block.{i}.layer", f"{side}/layers/{i}"
            blocks = [("0.SelfAttention", "self_attn")]
            if side == "decoder":
                blocks.append(("1.EncDecAttention", "cross_attn"))
            for hname, kname in blocks:
                for a, b in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
                    t += hf.dense_entries(f"{hp}.{hname}.{a}", f"{kp}/{kname}/{b}", bias=False)
                t += hf.norm_entries(f"{hp}.{hname.split('.')[0]}.layer_norm", f"{kp}/{kname}_norm", bias=False)
            j = len(blocks)
            wis = ("wi_0", "wi_1") if config.is_gated else ("wi",)
            for w in wis + ("wo",):
                t += hf.dense_entries(f"{hp}.{j}.DenseReluDense.{w}", f"{kp}/mlp/{w}", bias=False)
            t += hf.norm_entries(f"{hp}.{j}.layer_norm", f"{kp}/mlp_norm", bias=False)
    return t


def tiny_config(model_type: str = "t5", **overrides) -> T5Config:
    """Tiny T5 (d_model 32, 2+2 layers, 4 heads, vocab 128) for tests and demos;
    ``mt5`` defaults to gated-gelu and an untied head like the real mT5."""
    base = dict(model_type=model_type, vocab_size=128, d_model=32, d_kv=8, d_ff=64, encoder_layers=2,
                decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=20, dropout_rate=0.0)
    if model_type == "mt5":
        base.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
    if overrides.get("feed_forward_proj", "").startswith("gated") and "scale_decoder_outputs" not in overrides:
        base.update(tie_word_embeddings=False, scale_decoder_outputs=False)  # v1.1 convention
    base.update(overrides)
    return T5Config(**base)


hf.register_family(hf.ModelFamily(
    name="t5", model_types=("t5", "mt5"), config_cls=T5Config, model_cls=T5Model,
    name_table=name_table, tiny_config=tiny_config,
    # HF never uses a cross-attention position table; old checkpoints may carry one
    ignore_unexpected=(r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",),
))
