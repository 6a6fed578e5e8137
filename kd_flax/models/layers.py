"""Shared Flax NNX building blocks for the T5 and BART families.

Every parameter carries its logical axis names in the variable metadata key
``logical_axes`` (e.g. ``("embed", "mlp")``); :mod:`kd_flax.sharding` maps them to mesh
axes. We deliberately do not use Flax's ``out_sharding`` metadata: Flax would then try to
shard eagerly with the *logical* names as if they were mesh axes.

Attention keeps its KV cache as an explicit pytree passed in and returned, so decoding
loops can be written functionally (beam search reorders the cache on axis 0). Cache leaves
are heads-major ``[B, H, L, Dh]`` (cross-attention keys transposed, ``[B, H, Dh, S]``), so the
per-step attention dots need no transposes.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from kd_flax import sharding as _sharding

Array = jax.Array
LOGICAL_AXES = "logical_axes"  # variable metadata key


def param(rngs_or_key, init, shape, dtype, axes):
    """Create an ``nnx.Param`` with logical axis names in its metadata."""
    return nnx.Param(init(rngs_or_key, shape, dtype), **{LOGICAL_AXES: tuple(axes)})


def logical_axes_of(variable) -> tuple | None:
    """Logical axis names of an ``nnx.Variable`` (None when it has none)."""
    return variable.get_metadata().get(LOGICAL_AXES)


def normal_init(stddev: float):
    return jax.nn.initializers.normal(stddev)


# ----------------------------------------------------------------------------- activations

def gelu_new(x):
    """GELU, tanh approximation (HF ``gelu_new`` / ``gelu_pytorch_tanh``)."""
    return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": gelu_new,
    "gelu_pytorch_tanh": gelu_new,
    "gelu_fast": gelu_new,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def get_activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; allowed: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- layers

class Dense(nnx.Module):
    """``y = x @ kernel + bias`` with ``kernel`` [in, out] (the transpose of torch Linear).

    ``act_quant_bits`` fake-quantizes the *input* activation (dynamic, STE) with
    :func:`kd_flax.quant.fake_quant_activation`, one scale per tensor
    (``act_quant_granularity="tensor"``) or per row of the last axis (``"row"``: CTranslate2's
    int8 GEMM input); weights are quantized by path rules outside the model.
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 axes: Sequence[str | None] = ("embed", "mlp"), kernel_init=None,
                 dtype=jnp.float32, param_dtype=jnp.float32, act_quant_bits: int | None = None,
                 act_quant_granularity: str = "tensor", rngs: nnx.Rngs):
        kernel_init = kernel_init or jax.nn.initializers.lecun_normal()
        self.kernel = param(rngs.params(), kernel_init, (in_features, out_features), param_dtype, axes)
        self.bias = (param(rngs.params(), jax.nn.initializers.zeros, (out_features,), param_dtype,
                           (axes[-1],)) if use_bias else None)
        self.dtype = dtype
        self.act_quant_bits = act_quant_bits
        self.act_quant_granularity = act_quant_granularity

    def __call__(self, x: Array) -> Array:
        x = quantize_input(x, self.act_quant_bits, self.act_quant_granularity)
        y = dense_dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


@jax.custom_vjp
def dense_dot(x: Array, kernel: Array) -> Array:
    """``x @ kernel`` ([..., in] @ [in, out]) whose kernel gradient ``x^T @ g`` is computed as
    [in, out], the kernel's own layout, and kept there (the barrier): left to autodiff, XLA
    computed many of them as ``g^T @ x`` and transposed the result, and a T5-small top-k KD
    step took 1.17 instead of 1.13 s on a 2-core CPU (benchmarks/topk_speed.py)."""
    return jnp.dot(x, kernel)


def _dense_dot_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _dense_dot_bwd(res, g):
    x, kernel = res
    dx = jnp.dot(g, kernel.T).astype(x.dtype)
    dk = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), (((0,), (0,)), ((), ())))
    return dx, jax.lax.optimization_barrier(dk).astype(kernel.dtype)


dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)


def quantize_input(x: Array, bits: int | None, granularity: str = "tensor") -> Array:
    """A GEMM input fake-quantized as the model config asks (``bits=None``: unchanged)."""
    if bits is None:
        return x
    # Lazy import: quant.py is an independent module and only needed when quantizing.
    from kd_flax.quant import fake_quant_activation
    return fake_quant_activation(x, bits, granularity)


def act_kw(config) -> dict:
    """The Dense / attention keywords of a family config's activation fake-quant fields."""
    return dict(act_quant_bits=config.act_quant_bits,
                act_quant_granularity=getattr(config, "act_quant_granularity", "tensor"))


def check_act_granularity(value, owner: str) -> None:
    if value not in ("tensor", "row"):
        raise ValueError(f"{owner}.act_quant_granularity={value!r}; allowed: ['row', 'tensor']")


def head_input(h: Array, config) -> Array:
    """The LM head's input: fake-quantized per row when ``act_quant_granularity="row"``
    (CTranslate2 runs the head as an int8 GEMM too); unchanged otherwise (the default
    scheme leaves the head's input float)."""
    if getattr(config, "act_quant_granularity", "tensor") != "row":
        return h
    return quantize_input(h, config.act_quant_bits, "row")


class Embed(nnx.Module):
    """Token embedding ``embedding`` [V, D] (a tied head's logits: ``unembed(h, embedding.T)``)."""

    def __init__(self, num_embeddings: int, features: int, *, axes=("vocab", "embed"),
                 embedding_init=None, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        embedding_init = embedding_init or normal_init(1.0)
        self.embedding = param(rngs.params(), embedding_init, (num_embeddings, features), param_dtype, axes)
        self.dtype = dtype

    def __call__(self, ids: Array) -> Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


def unembed(h: Array, w: Array, b: Array | None = None, *, dtype=jnp.float32,
            vocab_major: bool = False) -> Array:
    """LM head ``h @ w (+ b)`` with ``w`` [D, V], computed in ``dtype``, float32 logits.

    ``vocab_major=True``: ``w`` is [V, D] (a tied embedding, used as stored) and the logits are
    ``h @ w.T``; its gradient is then written straight in the embedding's [V, D] layout.
    """
    return _unembed(h, w, b, jnp.dtype(dtype).name, bool(vocab_major))


def _head_dot(h, w, vocab_major):
    """``h @ w`` ([D, V] w) or ``h @ w.T`` ([V, D] w), float32 results."""
    return jax.lax.dot_general(h, w, (((h.ndim - 1,), (1 if vocab_major else 0,)), ((), ())),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _unembed(h, w, b, dtype_name, vocab_major):
    dt = jnp.dtype(dtype_name)
    logits = _head_dot(h.astype(dt), w.astype(dt), vocab_major)
    return logits if b is None else logits + b.astype(jnp.float32)


def _unembed_fwd(h, w, b, dtype_name, vocab_major):
    return _unembed(h, w, b, dtype_name, vocab_major), (h, w, b)


def _unembed_bwd(dtype_name, vocab_major, res, g):
    # The same gradients as autodiff's, written out so that dW is computed in w's own layout:
    # h^T @ g [D, V], or g^T @ h [V, D] for a vocab-major (tied) w. Left to autodiff, a tied
    # head's [D, V] gradient was transposed into the [V, D] embedding, and XLA folded that
    # transpose into the dot by first writing the [tokens, V] cotangent transposed, fused with
    # the loss's backward, in a cache-hostile order: 50 of a 210 ms Multi30k student step on
    # CPU (benchmarks/multi30k_step.py). The barrier keeps a [D, V] dW from the same folding.
    h, w, b = res
    dt = jnp.dtype(dtype_name)
    gd = g.astype(dt)
    g2 = gd.reshape(-1, g.shape[-1])
    h2 = h.reshape(-1, h.shape[-1]).astype(dt)
    if vocab_major:
        dh = jnp.dot(gd, w.astype(dt), preferred_element_type=jnp.float32).astype(h.dtype)
        dw = jax.lax.dot_general(g2, h2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    else:
        dh = jnp.dot(gd, w.astype(dt).T, preferred_element_type=jnp.float32).astype(h.dtype)
        dw = jax.lax.dot_general(h2, g2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        dw = jax.lax.optimization_barrier(dw)
    db = None if b is None else jnp.sum(g.reshape(-1, g.shape[-1]), axis=0).astype(b.dtype)
    return dh, dw.astype(w.dtype), db


_unembed.defvjp(_unembed_fwd, _unembed_bwd)


class RMSNorm(nnx.Module):
    """T5 layer norm: no mean subtraction, no bias, variance in float32."""

    def __init__(self, features: int, *, eps: float = 1e-6, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs.params(), jax.nn.initializers.ones, (features,), param_dtype, ("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(xf), axis=-1, keepdims=True)
        y = (xf * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
        return self.scale[...].astype(self.dtype) * y


class LayerNorm(nnx.Module):
    """Standard layer norm with ``scale`` and ``bias``; statistics in float32."""

    def __init__(self, features: int, *, eps: float = 1e-5, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs.params(), jax.nn.initializers.ones, (features,), param_dtype, ("embed",))
        self.bias = param(rngs.params(), jax.nn.initializers.zeros, (features,), param_dtype, ("embed",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


# ----------------------------------------------------------------------------- attention

def relative_position_bucket(relative_position: Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Array:
    """T5 relative-position buckets, the same integer arithmetic as transformers.

    ``relative_position = key_position - query_position``.
    """
    rel = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # float32 log like torch; clamp to 1 so log(0) never appears (masked by is_small anyway)
    relf = jnp.maximum(rel, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(relf / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


NEG_INF = float(np.finfo(np.float32).min)

# Logical axes of a K/V cache leaf [B, H, L, Dh]: heads-major, batch first (the cache contract).
KV_CACHE_AXES = ("cache_batch", "heads", "length", "kv")
# Cross-attention keys are cached transposed, [B, H, Dh, S]: the decoding step's q.K dot is then a
# plain [1, Dh] x [Dh, S] product per (batch, head), which XLA CPU runs ~25 % faster than
# contracting both operands' minor axis. Self-attention keys stay [B, H, L, Dh]: each step writes
# one position, and a transposed cache turns that write into a strided one that cost more than
# the dot saved (T5-small greedy step: dots -0.9 ms, cache writes +0.8 ms).
K_CACHE_AXES = ("cache_batch", "heads", "kv", "length")


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with q/k/v/out projections ``q_proj, k_proj, v_proj, out_proj``.

    Kernels are 2-D ([D, H*Dh] and [H*Dh, D]) so quantization rules and HF name tables see
    plain matrices. Scores and softmax are float32.
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, *, use_bias: bool,
                 qk_scale: float | None = None, q_init=None, kv_init=None, out_init=None,
                 dtype=jnp.float32, param_dtype=jnp.float32, act_quant_bits: int | None = None,
                 act_quant_granularity: str = "tensor", dropout_rate: float = 0.0, rngs: nnx.Rngs):
        inner = num_heads * head_dim
        kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  act_quant_bits=act_quant_bits, act_quant_granularity=act_quant_granularity, rngs=rngs)
        self.q_proj = Dense(d_model, inner, axes=("embed", "heads"), kernel_init=q_init, **kw)
        self.k_proj = Dense(d_model, inner, axes=("embed", "heads"), kernel_init=kv_init, **kw)
        self.v_proj = Dense(d_model, inner, axes=("embed", "heads"), kernel_init=kv_init, **kw)
        self.out_proj = Dense(inner, d_model, axes=("heads", "embed"), kernel_init=out_init, **kw)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.qk_scale = head_dim ** -0.5 if qk_scale is None else qk_scale
        self.dtype = dtype
        self.dropout_rate = float(dropout_rate)  # on the attention probabilities, in training

    def _split(self, x: Array) -> Array:
        """[B, T, H*Dh] -> heads-major [B, H, T, Dh]."""
        x = x.reshape(x.shape[:-1] + (self.num_heads, self.head_dim))
        return jnp.swapaxes(x, 1, 2)

    def _keys_values(self, x: Array) -> tuple[Array, Array]:
        """Keys and values of ``x``, both [B, H, S, Dh]."""
        k = _sharding.constrain(self._split(self.k_proj(x)), KV_CACHE_AXES)
        v = _sharding.constrain(self._split(self.v_proj(x)), KV_CACHE_AXES)
        return k, v

    def project_kv(self, x: Array) -> dict:
        """Cross-attention cache of ``x``: ``{'k'}`` [B, H, Dh, S] (keys transposed, see
        ``K_CACHE_AXES``) and ``{'v'}`` [B, H, S, Dh]."""
        k, v = self._keys_values(x)
        return {"k": _sharding.constrain(jnp.swapaxes(k, 2, 3), K_CACHE_AXES), "v": v}

    def __call__(self, x: Array, kv_input: Array | None = None, *, kv: dict | None = None,
                 mask: Array | None = None, bias: Array | None = None, cache: dict | None = None,
                 cache_index: Array | None = None, output_attentions: bool = False,
                 dropout: Dropout | None = None):
        """Attend from ``x`` [B, T, D].

        Keys/values come from ``kv`` (precomputed by :meth:`project_kv`), else from
        ``kv_input`` (cross-attention), else from ``x`` (self-attention). With ``cache``
        (self-attention cache of :func:`init_kv_cache`, {'k','v'} [B, H, L, Dh]) the new
        keys/values are written at ``cache_index`` and the query attends over the whole cache.
        ``mask``: bool, broadcastable to [B, H, T, S], True = may attend.
        ``bias``: additive float, broadcastable to [B, H, T, S] (T5 position bias).
        ``dropout``: the layer's :class:`Dropout` stream; drops attention probabilities at
        ``dropout_rate`` (the returned weights are the probabilities before dropout).
        Returns ``(out [B, T, D], new_cache or None, weights [B, H, T, S] float32 or None)``.

        Everything is heads-major ([B, H, ., Dh]) so both attention dots have their batch
        dimensions (B, H) leading in every operand: XLA then runs them on the cache as stored.
        With a [B, L, H, Dh] cache it transposed every cached K/V on every decoding step.
        """
        q = self._split(self.q_proj(x))
        new_cache = None
        if kv is not None:  # cache layout: keys transposed
            k, v, keys = kv["k"], kv["v"], "bhds"
        else:
            k, v = self._keys_values(x if kv_input is None else kv_input)
            keys = "bhsd"
            if cache is not None:
                idx = jnp.asarray(cache_index, jnp.int32)
                k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, 0, idx, 0))
                v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, 0, idx, 0))
                new_cache = {"k": k, "v": v}
        scores = jnp.einsum(f"bhtd,{keys}->bhts", q.astype(self.dtype), k.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        if self.qk_scale != 1.0:
            scores = scores * self.qk_scale
        if bias is not None:
            scores = scores + bias.astype(jnp.float32)
        if mask is not None:
            scores = jnp.where(mask, scores, NEG_INF)
        weights = jax.nn.softmax(scores, axis=-1)
        probs = weights if dropout is None else dropout(weights, self.dropout_rate)
        out = jnp.einsum("bhts,bhsd->bhtd", probs.astype(self.dtype), v.astype(self.dtype))
        out = jnp.swapaxes(out, 1, 2)  # [B, T, H, Dh]; free for a single decoding step (T = 1)
        out = out.reshape(out.shape[:2] + (self.num_heads * self.head_dim,))
        out = _sharding.constrain(self.out_proj(out), ("batch", "length", "embed"))
        return out, new_cache, (weights if output_attentions else None)


def init_kv_cache(batch_size: int, max_length: int, num_heads: int, head_dim: int, dtype) -> dict:
    """Empty self-attention cache ``{'k','v'}`` [B, H, L, Dh] (heads-major, batch first)."""
    shape = (batch_size, num_heads, max_length, head_dim)
    return {"k": _sharding.constrain(jnp.zeros(shape, dtype), KV_CACHE_AXES),
            "v": _sharding.constrain(jnp.zeros(shape, dtype), KV_CACHE_AXES)}


def kv_cache_length(kv: dict, *, stacked: bool = False) -> int:
    """Key length L of a self-attention cache [B, H, L, Dh] (``stacked``: [B, layers, H, L, Dh])."""
    return kv["v"].shape[3 if stacked else 2]


# ----------------------------------------------------------------------------- dropout

class Dropout:
    """Inverted dropout from an explicit key: ``drop(x, rate)`` zeroes each element with
    probability ``rate`` and scales the others by ``1 / (1 - rate)``.

    ``Dropout(None)`` (and ``rate == 0``) is the identity, bit for bit: eval, generation and
    teachers pass no key. Call ``n`` through one object draws from ``fold_in(key, n)`` (a
    trace-time counter), so one key and one code path always give the same masks; the key
    comes from the train state (``kd_flax.train``), never from a stateful ``nnx.Rngs``.
    """

    def __init__(self, key=None):
        self.key = key
        self._n = 0

    @property
    def active(self) -> bool:
        return self.key is not None

    def next_key(self):
        self._n += 1
        return jax.random.fold_in(self.key, self._n)

    def __call__(self, x: Array, rate: float) -> Array:
        if self.key is None or not rate:
            return x
        keep = jax.random.bernoulli(self.next_key(), 1.0 - rate, x.shape)
        return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


NO_DROPOUT = Dropout()  # the identity (an inactive stream never advances its counter)


def dropout_for(rng, *rates) -> Dropout:
    """The model-level stream: active only with a key (the train step's) and a rate > 0."""
    return Dropout(rng if rng is not None and any(r > 0 for r in rates) else None)


def split_dropout_rng(rng):
    """``(encoder key, decoder key)`` of one forward's dropout key (``None`` → ``None, None``)."""
    if rng is None:
        return None, None
    return jax.random.fold_in(rng, 0), jax.random.fold_in(rng, 1)


def teacher_forced(model, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
                   dropout_rng=None):
    """Teacher-forced logits of ``model`` (its ``encode`` then ``decode``): the models' ``__call__``."""
    enc_rng, dec_rng = split_dropout_rng(dropout_rng)
    enc = model.encode(input_ids, attention_mask, dropout_rng=enc_rng)
    logits, _ = model.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask=decoder_attention_mask,
                             dropout_rng=dec_rng)
    return logits


# ----------------------------------------------------------------------------- masks

def padding_mask(query_valid: Array | None, key_valid: Array) -> Array:
    """[B, 1, T|1, S] bool mask from key padding ``key_valid`` [B, S] (1 = token)."""
    del query_valid  # padded queries are ignored by the callers; HF does not mask them either
    return key_valid.astype(bool)[:, None, None, :]


def causal_mask(query_positions: Array, key_length: int) -> Array:
    """[1, 1, T, S] bool: key position <= query position. ``query_positions`` [T]."""
    keys = jnp.arange(key_length)
    return (keys[None, :] <= query_positions[:, None])[None, None]


# ----------------------------------------------------------------------------- layer stacks

def remat_policy(remat) -> tuple[bool, Any]:
    """``remat`` option → (enabled, jax checkpoint policy).

    False/None/"none" → disabled; True/"full"/"nothing_saveable" → recompute everything;
    any other name of ``jax.checkpoint_policies`` (e.g. ``"dots_saveable"``,
    ``"dots_with_no_batch_dims_saveable"``) → that policy.
    """
    if remat in (False, None, "none", ""):
        return False, None
    if remat is True or remat == "full":
        return True, None
    if isinstance(remat, str) and hasattr(jax.checkpoint_policies, remat):
        return True, getattr(jax.checkpoint_policies, remat)
    allowed = ["none", "full"] + [n for n in dir(jax.checkpoint_policies) if n.endswith("saveable")]
    raise ValueError(f"remat={remat!r} is not supported; allowed: True/False or one of {allowed}")


def make_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *, scan: bool,
                rngs: nnx.Rngs):
    """Build a layer stack: ``nnx.List`` of layers, or (``scan``) one layer module whose
    params are stacked on a leading ``layers`` axis (logical name ``"layers"``)."""
    if not scan:
        return nnx.List([make_layer(rngs) for _ in range(num_layers)])

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
        return make_layer(r)

    stacked = make(rngs)
    for _, var in nnx.iter_graph(stacked):
        if isinstance(var, nnx.Variable):
            axes = logical_axes_of(var)
            if axes is not None:
                var.set_metadata(**{LOGICAL_AXES: ("layers",) + tuple(axes)})
    return stacked


def apply_layers(layers, fn: Callable, carry, xs, *, scan: bool, remat=False, dropout: Dropout | None = None):
    """Run ``fn(layer, carry, x) -> (carry, y)`` over a stack built by :func:`make_layers`.

    ``xs``/returned ``ys``: per-layer inputs/outputs; a Python list (one pytree per layer)
    when not scanning, a pytree stacked on axis 0 when scanning (``None`` allowed).
    ``remat`` is the option understood by :func:`remat_policy`.
    ``dropout``: given, ``fn`` is called as ``fn(layer, carry, x, drop)`` with each layer's own
    :class:`Dropout` stream (its key rides with ``xs``; inactive streams add nothing).
    """
    if dropout is not None:
        inner, n = fn, _num_layers(layers, scan)
        if not dropout.active:
            def fn(layer, c, x):
                return inner(layer, c, x, NO_DROPOUT)
        else:
            keys = jax.random.split(dropout.next_key(), n)
            xs = (xs, keys) if scan else [(None if xs is None else xs[i], keys[i]) for i in range(n)]

            def fn(layer, c, x):
                return inner(layer, c, x[0], Dropout(x[1]))
    enabled, policy = remat_policy(remat)
    if scan:
        graphdef, state = nnx.split(layers)

        def body(c, inp):
            st, x = inp
            return fn(nnx.merge(graphdef, st), c, x)

        if enabled:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        return jax.lax.scan(body, carry, (state, xs))

    ys = []
    for i, layer in enumerate(layers):
        x = None if xs is None else xs[i]
        if enabled:
            graphdef, state = nnx.split(layer)

            def call(st, c, x_, graphdef=graphdef):
                return fn(nnx.merge(graphdef, st), c, x_)

            carry, y = jax.checkpoint(call, policy=policy)(state, carry, x)
        else:
            carry, y = fn(layer, carry, x)
        ys.append(y)
    return carry, ys


def _num_layers(layers, scan: bool) -> int:
    if not scan:
        return len(layers)
    return jax.tree.leaves(nnx.state(layers))[0].shape[0]


def apply_layers_stacked_cache(layers, fn: Callable, carry, cache, *, remat=False):
    """One cached decoding step through a *scanned* stack whose cache leaves are batch-first
    ``[B, n_layers, ...]``: ``fn(layer, carry, layer_cache) -> (carry, (new_layer_cache, *ys))``.

    The stacked cache rides in the scan carry: layer ``i`` reads its slice on axis 1, and only
    the leaves ``fn`` rewrote (self-attention K/V; untouched ones are recognised by identity)
    are written back in place. Scanning over the cache as ``xs`` would need the layer axis in
    front, i.e. two transposes of the whole cache per decoding step.
    Leaves that no layer rewrote are returned as the very input arrays, so callers can tell
    them apart by identity (beam search then does not reorder them).
    Returns ``(carry, (new_cache, *ys))`` with ``ys`` stacked on axis 0 like :func:`apply_layers`.
    """
    leaves_in, treedef = jax.tree.flatten(cache)
    n = leaves_in[0].shape[1]
    written = [True] * len(leaves_in)  # set while tracing the body

    def body(layer, c, i):
        h, stacked = c
        sliced = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 1, keepdims=False), stacked)
        h, (new, *ys) = fn(layer, h, sliced)
        new_leaves = treedef.flatten_up_to(new)
        written[:] = [nw is not old for old, nw in zip(jax.tree.leaves(sliced), new_leaves)]
        out = [jax.lax.dynamic_update_index_in_dim(s, nw.astype(s.dtype), i, 1) if w else s
               for s, nw, w in zip(jax.tree.leaves(stacked), new_leaves, written)]
        return (h, jax.tree.unflatten(treedef, out)), tuple(ys)

    (carry, out), ys = apply_layers(layers, body, (carry, cache), jnp.arange(n), scan=True, remat=remat)
    out_leaves = [o if w else x for x, o, w in zip(leaves_in, jax.tree.leaves(out), written)]
    return carry, (jax.tree.unflatten(treedef, out_leaves),) + tuple(ys)


# ----------------------------------------------------------------------------- generation config


class GenerationConfigMixin:
    """``model.generation_config`` (a dict of HF generation defaults) stored as sorted JSON text.

    Non-variable attributes of an NNX module are static parts of its graphdef, and jit-cache
    keys (e.g. :mod:`kd_flax.decoding`'s) need the graphdef to hash; a dict attribute would not.
    Assign a new dict to change it (``m.generation_config = {**m.generation_config, ...}``);
    mutating the returned dict in place has no effect.
    """

    generation_config_json: str = "{}"

    @property
    def generation_config(self) -> dict:
        """HF generation defaults (``generation_config.json`` of a loaded checkpoint)."""
        return json.loads(self.generation_config_json)

    @generation_config.setter
    def generation_config(self, value: dict | None):
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"generation_config must be a dict (or None), got {type(value).__name__}")
        self.generation_config_json = json.dumps(dict(value or {}), sort_keys=True)


# ----------------------------------------------------------------------------- outputs


@struct.dataclass
class EncoderOutput:
    """``last_hidden_state`` [B, S, D]; ``hidden_states`` (embeddings, then each layer's
    output, the last one after the final norm where the family has one) and
    ``attentions`` ([B, H, S, S] per layer) when requested, else None."""

    last_hidden_state: jax.Array
    hidden_states: tuple | None = None
    attentions: tuple | None = None


@struct.dataclass
class DecoderExtras:
    """Optional decoder outputs; ``logits_hidden`` is ``h`` with ``logits = h @ W (+ b)``."""

    hidden_states: tuple | None = None
    attentions: tuple | None = None
    cross_attentions: tuple | None = None
    logits_hidden: jax.Array | None = None


def per_layer(ys, num_layers: int, scan: bool) -> tuple:
    """Outputs of :func:`apply_layers` as a tuple with one item per layer."""
    if scan:
        return tuple(jax.tree.map(lambda a: a[i], ys) for i in range(num_layers))
    return tuple(ys)
