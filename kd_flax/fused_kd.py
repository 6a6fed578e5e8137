"""Word-level KD without the [tokens, vocab] logits: the KL of `losses.kd_kl` computed from
the two models' last hidden states and LM heads, chunk by chunk over tokens, with a custom
VJP, so neither model's full logits (nor their gradients) are ever materialised. For large
vocabularies (T5's 32k, mBART's 250k) that is most of a distillation step's memory.

The same conventions as `kd_flax.losses` (float32 math, `(sum, count)` results, masks,
teacher arguments as constants); `fused_kd_kl` equals `losses.kd_kl` on the logits the heads
would give (tests/test_losses.py).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from kd_flax.losses import (_F32, _check_same_vocab, _check_temperature, _float_array, _kl_terms, _log_softmax, _weights)


def _chunk_loss(hs, ws, bs, ht, wt, bt, w, temperature):
    """Per-token weighted KD loss of one chunk, plus both log-prob matrices [C, V]."""
    s = jnp.dot(hs, ws, preferred_element_type=_F32) + bs
    t = jnp.dot(ht, wt, preferred_element_type=_F32) + bt
    log_q = _log_softmax(s / temperature)
    log_p = _log_softmax(t / temperature)
    per = jnp.where(w != 0, temperature**2 * _kl_terms(log_p, log_q), 0.0) * w
    return per, log_q, log_p


def _chunk_grads(hs, ws, bs, ht, wt, bt, w, scale, temperature):
    """Loss of one chunk and d(sum_n scale_n * loss_n) w.r.t. (hs, ws, bs).

    d loss_n / d s_nv = w_n * T * (q_nv - p_nv) for ``loss_n = w_n T^2 KL(p_n || q_n)``.
    """
    per, log_q, log_p = _chunk_loss(hs, ws, bs, ht, wt, bt, w, temperature)
    coef = jnp.where(w != 0, scale * w * temperature, 0.0)
    dlogits = coef[:, None] * (jnp.exp(log_q) - jnp.exp(log_p))
    dh = jnp.dot(dlogits, ws.T.astype(_F32))
    dw = jnp.dot(hs.T.astype(_F32), dlogits)
    return per, dh, dw, jnp.sum(dlogits, axis=0)


def _scan_loss(hs, ws, bs, ht, wt, bt, w, temperature):
    def body(_, xs):
        h_c, t_c, w_c = xs
        per, _, _ = _chunk_loss(h_c, ws, bs, t_c, wt, bt, w_c, temperature)
        return None, per

    return jax.lax.scan(body, None, (hs, ht, w))[1]  # [n_chunks, C]


def _scan_grads(hs, ws, bs, ht, wt, bt, w, scale, temperature):
    """Chunked loss and student gradients; dW/db accumulate in the scan carry."""

    def body(carry, xs):
        dw_acc, db_acc = carry
        h_c, t_c, w_c, g_c = xs
        per, dh, dw, db = _chunk_grads(h_c, ws, bs, t_c, wt, bt, w_c, g_c, temperature)
        return (dw_acc + dw, db_acc + db), (per, dh)

    init = (jnp.zeros(ws.shape, _F32), jnp.zeros(bs.shape, _F32))
    (dw, db), (per, dh) = jax.lax.scan(body, init, (hs, ht, w, scale))
    return per, dh, dw, db


def _zero_cotangents(ht, wt, bt, w, temperature):
    return tuple(jnp.zeros_like(x) for x in (ht, wt, bt, w, temperature))


# Summed loss: the gradient is computed *during the forward pass* (the cotangent of a
# scalar sum only rescales it), so the backward pass is a multiply and the logits are
# computed once, like the unfused loss: 4 big matmuls in all instead of 6 with remat.
@jax.custom_vjp
def _fused_sum(hs, ws, bs, ht, wt, bt, w, temperature):
    return jnp.sum(_scan_loss(hs, ws, bs, ht, wt, bt, w, temperature))


def _fused_sum_fwd(hs, ws, bs, ht, wt, bt, w, temperature):
    per, dh, dw, db = _scan_grads(hs, ws, bs, ht, wt, bt, w, jnp.ones_like(w), temperature)
    grads = (dh.astype(hs.dtype), dw.astype(ws.dtype), db.astype(bs.dtype))
    return jnp.sum(per), (grads, (ht, wt, bt, w, temperature))


def _fused_sum_bwd(res, g):
    grads, rest = res
    return tuple((g * x).astype(x.dtype) for x in grads) + _zero_cotangents(*rest)


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd)


# Per-token loss: the cotangent differs per token, so dW cannot be precomputed; the
# backward pass recomputes each chunk's logits instead (rematerialisation).
@jax.custom_vjp
def _fused_tokens(hs, ws, bs, ht, wt, bt, w, temperature):
    return _scan_loss(hs, ws, bs, ht, wt, bt, w, temperature)


def _fused_tokens_fwd(hs, ws, bs, ht, wt, bt, w, temperature):
    per = _scan_loss(hs, ws, bs, ht, wt, bt, w, temperature)
    return per, (hs, ws, bs, ht, wt, bt, w, temperature)


def _fused_tokens_bwd(res, g):
    hs, ws, bs, ht, wt, bt, w, temperature = res
    _, dh, dw, db = _scan_grads(hs, ws, bs, ht, wt, bt, w, g, temperature)
    return (dh.astype(hs.dtype), dw.astype(ws.dtype), db.astype(bs.dtype)) + _zero_cotangents(
        ht, wt, bt, w, temperature
    )


_fused_tokens.defvjp(_fused_tokens_fwd, _fused_tokens_bwd)


def _bias(bias, vocab: int, name: str, dtype):
    if bias is None:
        return jnp.zeros((vocab,), dtype)
    bias = _float_array(bias, name)
    if bias.shape != (vocab,):
        raise ValueError(f"{name} has shape {bias.shape} but must have shape ({vocab},) (the vocab size)")
    return bias


def fused_kd_kl(
    student_hidden,
    student_unembed,
    teacher_hidden,
    teacher_unembed,
    mask=None,
    *,
    temperature=1.0,
    chunk_size=512,
    student_bias=None,
    teacher_bias=None,
    reduce=True,
):
    """:func:`kd_kl` on ``hidden @ unembed (+ bias)`` without materialising the logits.

    Same value and gradients as
    ``kd_kl(hs @ Ws + bs, ht @ Wt + bt, mask, temperature=T)``, computed over chunks of
    ``chunk_size`` tokens in a ``lax.scan`` so that at most ``[chunk_size, V]`` logits of
    each model exist at a time, in the forward and in the backward pass (a
    ``jax.custom_vjp``). With ``reduce=True`` the student gradients are computed in the
    same pass as the loss (4 large matmuls, as for the unfused loss); with
    ``reduce=False`` the backward pass recomputes the chunk logits.

    Gradients flow to ``student_hidden``, ``student_unembed`` and ``student_bias``; the
    teacher inputs and ``mask`` are constants (zero cotangents). The logits matmuls
    accumulate in float32 whatever the input dtype. Chunk ``k`` holds tokens
    ``k, k + n_chunks, k + 2 n_chunks, ...`` so that a batch-sharded token axis stays
    sharded inside every chunk.

    Args:
      student_hidden: ``[..., T, Ds]``; teacher_hidden: ``[..., T, Dt]``.
      student_unembed: ``[Ds, V]``; teacher_unembed: ``[Dt, V]`` (same ``V``).
      mask: optional ``[..., T]`` weights.
      student_bias, teacher_bias: optional ``[V]`` (e.g. Marian's ``final_logits_bias``).
      chunk_size: tokens per chunk (> 0); smaller saves memory, larger amortises overhead.
        Temporary memory is about ``5 * chunk_size * V * 4`` bytes plus two ``[Ds, V]``
        float32 gradient accumulators (see benchmarks/kd_loss_memory.py).
    """
    hs = _float_array(student_hidden, "student_hidden")
    ht = _float_array(teacher_hidden, "teacher_hidden")
    ws = _float_array(student_unembed, "student_unembed", min_ndim=2)
    wt = _float_array(teacher_unembed, "teacher_unembed", min_ndim=2)
    if ws.ndim != 2 or wt.ndim != 2:
        raise ValueError(
            f"student_unembed and teacher_unembed must be [hidden, vocab] matrices, got "
            f"shapes {ws.shape} and {wt.shape}"
        )
    vocab = ws.shape[1]
    _check_same_vocab(vocab, wt.shape[1], "student_unembed", "teacher_unembed")
    if hs.shape[-1] != ws.shape[0]:
        raise ValueError(
            f"student_hidden has hidden size {hs.shape[-1]} but student_unembed is {ws.shape} "
            "([hidden, vocab]); they must agree"
        )
    if ht.shape[-1] != wt.shape[0]:
        raise ValueError(
            f"teacher_hidden has hidden size {ht.shape[-1]} but teacher_unembed is {wt.shape} "
            "([hidden, vocab]); they must agree"
        )
    if hs.shape[:-1] != ht.shape[:-1]:
        raise ValueError(
            f"student_hidden has shape {hs.shape} and teacher_hidden {ht.shape}: the token "
            "axes [..., T] must be equal"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_temperature(temperature)
    bs = _bias(student_bias, vocab, "student_bias", ws.dtype)
    bt = jax.lax.stop_gradient(_bias(teacher_bias, vocab, "teacher_bias", wt.dtype))
    ht = jax.lax.stop_gradient(ht)
    wt = jax.lax.stop_gradient(wt)

    lead = hs.shape[:-1]
    n_tokens = math.prod(lead)
    w = _weights(mask, lead, "mask", "the hidden states' shape without the feature axis")
    w_flat = w.reshape(n_tokens)
    chunk = max(1, min(int(chunk_size), n_tokens))
    n_chunks = -(-n_tokens // chunk)
    pad = n_chunks * chunk - n_tokens

    def to_chunks(x):  # [N, ...] -> [n_chunks, chunk, ...], token c * n_chunks + k in chunk k
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return jnp.swapaxes(x.reshape((chunk, n_chunks) + x.shape[1:]), 0, 1)

    live = (w_flat != 0)[:, None]
    hs_c = to_chunks(jnp.where(live, hs.reshape(n_tokens, -1), 0))
    ht_c = to_chunks(jnp.where(live, ht.reshape(n_tokens, -1), 0))
    w_c = to_chunks(w_flat)
    temp = jnp.asarray(temperature, _F32)
    weight_sum = jnp.sum(w_flat)
    if reduce:
        return _fused_sum(hs_c, ws, bs, ht_c, wt, bt, w_c, temp), weight_sum
    per = _fused_tokens(hs_c, ws, bs, ht_c, wt, bt, w_c, temp)
    return jnp.swapaxes(per, 0, 1).reshape(-1)[:n_tokens].reshape(lead)


__all__ = ["fused_kd_kl"]
