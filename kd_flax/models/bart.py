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

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_flax import sharding
from kd_flax.models import hf, layers

from kd_flax.models.bart_config import MODEL_TYPES, BartConfig, tiny_config  # noqa: F401 (the family's API)


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


def _kw(c: BartConfig, rngs):
    return dict(dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype), rngs=rngs)


def _dense(c: BartConfig, din, dout, axes, rngs, use_bias=True):
    return layers.Dense(din, dout, use_bias=use_bias, axes=axes,
                        kernel_init=layers.normal_init(c.init_std),
                        **layers.act_kw(c), **_kw(c, rngs))


def _attention(c: BartConfig, heads, rngs):
    init = layers.normal_init(c.init_std)
    return layers.MultiHeadAttention(c.d_model, heads, c.d_model // heads, use_bias=True,
                                     q_init=init, kv_init=init, out_init=init,
                                     dropout_rate=c.attention_dropout, **layers.act_kw(c), **_kw(c, rngs))


def _layer_norm(c: BartConfig, rngs):
    return layers.LayerNorm(c.d_model, eps=1e-5, **_kw(c, rngs))


class _FFN:
    """The feed-forward sublayer shared by both layer kinds: ``fc2(drop(act(fc1(h))))``,
    then the output dropout (transformers' `activation_dropout` / `dropout`)."""

    def _init_ffn(self, c: BartConfig, dim: int, rngs):
        self.pre_ln = c.normalize_before
        self.activation = c.activation_function
        self.fc1 = _dense(c, c.d_model, dim, ("embed", "mlp"), rngs)
        self.fc2 = _dense(c, dim, c.d_model, ("mlp", "embed"), rngs)
        self.final_layer_norm = _layer_norm(c, rngs)
        self.dropout = c.dropout
        self.activation_dropout = c.activation_dropout

    def _ffn(self, x, drop):
        h = self.final_layer_norm(x) if self.pre_ln else x
        h = drop(layers.get_activation(self.activation)(self.fc1(h)), self.activation_dropout)
        x = x + drop(self.fc2(h), self.dropout)
        return x if self.pre_ln else self.final_layer_norm(x)


class EncoderLayer(_FFN, nnx.Module):
    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        c = config
        self.self_attn = _attention(c, c.encoder_attention_heads, rngs)
        self.self_attn_layer_norm = _layer_norm(c, rngs)
        self._init_ffn(c, c.encoder_ffn_dim, rngs)

    def __call__(self, x, mask, output_attentions=False, drop=layers.NO_DROPOUT):
        # Pre-LN (mBART) normalises each sublayer's input; post-LN (BART, Marian) the sum.
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, _, probs = self.self_attn(h, mask=mask, output_attentions=output_attentions, dropout=drop)
        x = x + drop(h, self.dropout)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        x = self._ffn(x, drop)
        return sharding.constrain(x, ("batch", "length", "embed")), probs


class DecoderLayer(_FFN, nnx.Module):
    def __init__(self, config: BartConfig, *, rngs: nnx.Rngs):
        c = config
        self.self_attn = _attention(c, c.decoder_attention_heads, rngs)
        self.self_attn_layer_norm = _layer_norm(c, rngs)
        self.encoder_attn = _attention(c, c.decoder_attention_heads, rngs)
        self.encoder_attn_layer_norm = _layer_norm(c, rngs)
        self._init_ffn(c, c.decoder_ffn_dim, rngs)

    def __call__(self, x, enc, self_mask, cross_mask, cache=None, index=None,
                 output_attentions=False, drop=layers.NO_DROPOUT):
        """`cache`: this layer's `{"self": {k, v} [B, H, L, Dh], "cross": {k, v}}` or None
        (then cross K/V are projected from `enc`). Returns (x, new cache, probs, cross probs)."""
        h = self.self_attn_layer_norm(x) if self.pre_ln else x
        h, new_self, probs = self.self_attn(
            h, mask=self_mask, cache=None if cache is None else cache["self"], cache_index=index,
            output_attentions=output_attentions, dropout=drop)
        x = x + drop(h, self.dropout)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        h = self.encoder_attn_layer_norm(x) if self.pre_ln else x
        h, _, cross_probs = self.encoder_attn(
            h, enc, kv=None if cache is None else cache["cross"], mask=cross_mask,
            output_attentions=output_attentions, dropout=drop)
        x = x + drop(h, self.dropout)
        if not self.pre_ln:
            x = self.encoder_attn_layer_norm(x)
        x = self._ffn(x, drop)
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

    def embed(self, token_embed: layers.Embed, ids, positions, drop=layers.NO_DROPOUT):
        """Input of layer 0: scaled token embeddings + positions (+ layernorm_embedding), dropped."""
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
        return sharding.constrain(drop(x, c.dropout), ("batch", "length", "embed"))

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
        x = layers.head_input(h, self.config)
        if unembedding is None and self.lm_head is None:  # tied: the [V, D] embedding as stored
            logits = layers.unembed(x, self._decoder_embed().embedding[...], self.final_logits_bias[...],
                                    dtype=self.config.dtype, vocab_major=True)
        else:
            logits = layers.unembed(x, *(unembedding or self.unembedding()), dtype=self.config.dtype)
        return sharding.constrain(logits, ("batch", "length", "vocab"))

    def _check_length(self, n, what):
        if n > self.config.max_position_embeddings:
            raise ValueError(f"{what} has length {n} > max_position_embeddings="
                             f"{self.config.max_position_embeddings}")

    def _dropout(self, rng) -> layers.Dropout:
        c = self.config
        return layers.dropout_for(rng, c.dropout, c.attention_dropout, c.activation_dropout)

    # -- encoder --
    def encode(self, input_ids, attention_mask, *, output_hidden_states=False,
               output_attentions=False, dropout_rng=None) -> layers.EncoderOutput:
        """Encoder forward: `input_ids` [B, S] int, `attention_mask` [B, S] (1 = token).
        `dropout_rng`: a key to train with dropout (None: deterministic)."""
        c = self.config
        self._check_length(input_ids.shape[1], "input_ids")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        drop = self._dropout(dropout_rng)
        x = self.encoder.embed(self._encoder_embed(), input_ids,
                               jnp.arange(input_ids.shape[1])[None, :], drop)
        mask = layers.padding_mask(None, attention_mask)

        def body(layer, h, _, d):
            out, probs = layer(h, mask, output_attentions=output_attentions, drop=d)
            return out, (h if output_hidden_states else None, probs)

        x, ys = layers.apply_layers(self.encoder.layers, body, x, None, scan=c.scan_layers,
                                    remat=c.remat, dropout=drop)
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
               output_attentions=False, unembedding=None, dropout_rng=None):
        """Decoder forward → `(logits [B, T, V] float32, cache)` (+ `DecoderExtras` when an
        output flag is set). `unembedding`: `(W [D, V], bias)` to use instead of
        :meth:`unembedding` (generation passes a copy laid out once, outside its loop).

        Without `cache`: teacher forcing over the full `decoder_input_ids` [B, T] with a
        causal mask and optional `decoder_attention_mask` [B, T]. With `cache`: the next
        tokens (usually [B, 1]) at positions `cache["index"]...`; the optional
        `decoder_attention_mask` then covers the whole cache, [B, max_length].
        `dropout_rng`: a key to train with dropout (None: deterministic; decoding passes none).
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
        drop = self._dropout(dropout_rng)
        x = self.decoder.embed(self._decoder_embed(), decoder_input_ids, positions[None, :], drop)

        def body(layer, h, lc, d=layers.NO_DROPOUT):
            out, lc, probs, cprobs = layer(h, enc, self_mask, cross_mask, lc, index,
                                           output_attentions=output_attentions, drop=d)
            return out, (lc, h if output_hidden_states else None, probs, cprobs)

        if c.scan_layers and cache_layers is not None:  # stacked [B, layers, ...], sliced per layer
            x, ys = layers.apply_layers_stacked_cache(self.decoder.layers, body, x, cache_layers,
                                                      remat=c.remat)
        else:
            x, ys = layers.apply_layers(self.decoder.layers, body, x, cache_layers,
                                        scan=c.scan_layers, remat=c.remat, dropout=drop)
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
                 decoder_attention_mask=None, dropout_rng=None):
        """Teacher-forced logits [B, T, V] float32 (`dropout_rng`: train with dropout)."""
        if decoder_input_ids is None:
            raise ValueError("decoder_input_ids is required (shift the labels right, "
                             "starting with config.decoder_start_token_id)")
        return layers.teacher_forced(self, input_ids, attention_mask, decoder_input_ids,
                                     decoder_attention_mask, dropout_rng)


def generation_defaults(c: BartConfig) -> dict:
    """HF generation defaults derivable from the model config (replaced by
    `generation_config.json` when a checkpoint is loaded). OPUS-MT configs also carry
    beam settings (`num_beams`, `max_length`, `bad_words_ids`) in `config.json`.
    Marian never generates `<pad>` unless the config says otherwise: OPUS-MT checkpoints carry
    `bad_words_ids=[[pad_token_id]]` (the `<pad>` row is transformers' addition, the decoder-start
    slot, not a Marian vocabulary entry), and CTranslate2 drops that row, so it cannot emit it."""
    out = hf.generation_defaults(c)
    if c.bos_token_id is None:
        out.pop("bos_token_id", None)
    if c.model_type == "marian":
        out["bad_words_ids"] = [[c.pad_token_id]]
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
