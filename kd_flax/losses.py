"""Loss functions for knowledge distillation: pure functions on arrays.

Conventions shared by every loss here
-------------------------------------
* Inputs are ``[..., T, V]`` logits (any float dtype); the math runs in float32.
* ``mask`` is ``[..., T]``: bool, int (e.g. an HF ``attention_mask``) or float weights;
  ``None`` means every token has weight 1.
* The result is ``(loss_sum, weight_sum)``, two float32 scalars, so that the mean stays
  right across devices, hosts and gradient accumulation (sum both, divide once with
  :func:`mean`). With ``reduce=False`` the result is the per-token loss ``[..., T]``
  (already multiplied by the weight; exactly 0 where the weight is 0).
* Arguments named ``teacher_*`` are constants: they pass through ``stop_gradient``.
* Robustness: rows whose weight is 0 are replaced by zeros before any math, so garbage
  there (even all ``-inf`` rows) never reaches the result or the gradients. ``-inf``
  logits inside live rows (masked vocabulary entries) get probability 0 and the
  convention ``0 * log 0 = 0``, implemented with ``jnp.where`` on both the values and
  the logs so that no ``0 * (-inf)`` appears in the forward or backward pass.
  A divergence is genuinely ``+inf`` only when the target distribution puts mass on an
  entry that the other distribution gives ``-inf``.
* Label ids: negative ids (HF's ``-100``) are ignored (weight 0). Ids ``>= V`` raise a
  ``ValueError`` when the labels are concrete; under ``jit`` they cannot be checked, so
  such tokens yield a NaN loss (loud, rather than a silently wrong target).
* Bad arguments raise ``ValueError`` naming the argument and the allowed values.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32
_NEG_INF = -jnp.inf

__all__ = [
    "cross_entropy",
    "kd_kl",
    "interpolated_kl",
    "reverse_kl",
    "generalized_jsd",
    "topk_kd",
    "hidden_mse",
    "attention_mse",
    "mean",
]


# ----------------------------------------------------------------------------- checks


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _readable(x) -> bool:
    """True when ``x``'s values can be read here: not traced, and (for a global array
    spread over several hosts) fully addressable from this process."""
    return not _is_traced(x) and getattr(x, "is_fully_addressable", True)


def _scalar_value(x, name: str):
    """Python float of a scalar hyper-parameter, or None when it is traced (unchecked)."""
    if _is_traced(x):
        return None
    if isinstance(x, numbers.Number):
        return float(x)
    arr = np.asarray(x)
    if arr.shape != ():
        raise ValueError(f"{name} must be a scalar, got an array of shape {arr.shape}")
    return float(arr)


def _check_interval(x, name: str, lo: float, hi: float, lo_closed: bool, hi_closed: bool):
    v = _scalar_value(x, name)
    if v is None:
        return
    ok_lo = v >= lo if lo_closed else v > lo
    ok_hi = v <= hi if hi_closed else v < hi
    if not (ok_lo and ok_hi and math.isfinite(v)):
        interval = ("[" if lo_closed else "(") + f"{lo:g}, {hi:g}" + ("]" if hi_closed else ")")
        raise ValueError(f"{name} must be in {interval}, got {v}")


def _check_temperature(temperature):
    v = _scalar_value(temperature, "temperature")
    if v is not None and not (v > 0 and math.isfinite(v)):
        raise ValueError(f"temperature must be a finite number > 0, got {v}")


def _float_array(x, name: str, min_ndim: int = 1):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {x.shape}")
    return x


def _weights(mask, shape, name: str, what: str):
    """Float32 token weights of the given shape from a bool/int/float mask (None = ones)."""
    if mask is None:
        return jnp.ones(shape, _F32)
    mask = jnp.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} has shape {mask.shape} but must have shape {tuple(shape)} ({what})")
    return mask.astype(_F32)


def _check_labels(labels, shape, vocab: int, name: str = "labels"):
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of token ids, got dtype {labels.dtype}")
    if labels.shape != tuple(shape):
        raise ValueError(
            f"{name} has shape {labels.shape} but must have shape {tuple(shape)} "
            "(the logits' shape without the vocab axis)"
        )
    if _readable(labels) and labels.size:
        top = int(np.asarray(labels).max())
        if top >= vocab:
            raise ValueError(
                f"{name} must be in [0, {vocab}) (the vocab size of the logits), or negative "
                f"to ignore a token; found id {top}"
            )
    return labels


def _check_same_vocab(s_vocab: int, t_vocab: int, s_name: str, t_name: str):
    if s_vocab != t_vocab:
        raise ValueError(
            f"{s_name} has vocab size {s_vocab} but {t_name} has {t_vocab}: word-level KD "
            "needs a shared vocabulary (sequence-level KD does not: train the student with "
            "cross_entropy on the teacher's generated outputs instead)"
        )


def _student_teacher_logits(student_logits, teacher_logits):
    s = _float_array(student_logits, "student_logits")
    t = _float_array(teacher_logits, "teacher_logits")
    _check_same_vocab(s.shape[-1], t.shape[-1], "student_logits", "teacher_logits")
    if s.shape != t.shape:
        raise ValueError(
            f"student_logits has shape {s.shape} but teacher_logits has shape {t.shape}; "
            "they must be equal"
        )
    return s, t


# ----------------------------------------------------------------------------- math helpers


def _live_rows(x, w):
    """float32 copy of ``x`` [..., T, X] with dead rows (weight 0) replaced by zeros."""
    return jnp.where((w != 0)[..., None], x.astype(_F32), 0.0)


def _scaled(x, temperature):
    """``x / T``, and ``x`` itself at T = 1 (so XLA can share it with CE's log-softmax)."""
    return x if isinstance(temperature, numbers.Number) and temperature == 1 else x / temperature


def _log_softmax(x):
    # logsumexp copes with -inf entries (as long as one entry per row is finite).
    return x - jax.nn.logsumexp(x, axis=-1, keepdims=True)


def _kl_terms(log_p, log_q):
    """sum_v p_v (log p_v - log q_v) over the last axis with 0 log 0 = 0.

    Entries with p_v = 0 (log p_v = -inf) are switched off on both logs before any
    product, so neither the value nor any gradient sees 0 * (-inf).
    """
    live = log_p > _NEG_INF
    lp = jnp.where(live, log_p, 0.0)
    lq = jnp.where(live, log_q, 0.0)
    return jnp.sum(jnp.where(live, jnp.exp(lp) * (lp - lq), 0.0), axis=-1)


def _finish(per_token, w, reduce: bool):
    per_token = jnp.where(w != 0, per_token, 0.0) * w
    if not reduce:
        return per_token
    return jnp.sum(per_token, dtype=_F32), jnp.sum(w, dtype=_F32)


def _tempered_log_probs(s, t, w, temperature):
    """Student and (constant) teacher log-probs at temperature T, dead rows zeroed."""
    s = _live_rows(s, w) / temperature
    t = _live_rows(jax.lax.stop_gradient(t), w) / temperature
    return _log_softmax(s), _log_softmax(t)


# ----------------------------------------------------------------------------- losses


def cross_entropy(logits, labels, mask=None, *, label_smoothing=0.0, smoothing="fairseq", reduce=True):
    """Token cross-entropy with optional label smoothing.

    Two smoothing conventions are in common use; pick one with ``smoothing``:

    * ``"fairseq"`` (fairseq's ``label_smoothed_cross_entropy``): per token
      ``(1 - eps - eps_i) * nll + eps_i * sum_v(-log p_v)`` with ``eps_i = eps / (V - 1)``,
      i.e. target mass ``1 - eps`` on the label and ``eps / (V - 1)`` on every other entry.
    * ``"uniform"`` (T5X / optax / ``torch.nn.functional.cross_entropy(label_smoothing=)``):
      target ``(1 - eps) * onehot + eps / V``, i.e.
      ``(1 - eps) * nll + eps / V * sum_v(-log p_v)``.

    Masked vocabulary: ``-log p_v`` is +inf on ``-inf`` logits, so the smoothing mass is
    spread over the *finite* entries of each row only: ``V`` above becomes ``V'``, the
    number of finite logits in that row (``eps_i = eps / max(V' - 1, 1)`` for fairseq).
    Without ``-inf`` logits this is exactly the textbook formula.

    Args:
      logits: ``[..., T, V]`` float logits.
      labels: ``[..., T]`` int ids in ``[0, V)``; negative ids (HF's -100) are ignored.
      mask: optional ``[..., T]`` bool/float weights, multiplied with the label mask.
      label_smoothing: ``eps`` in ``[0, 1)``.
      smoothing: ``"fairseq"`` or ``"uniform"``.
      reduce: ``True`` -> ``(loss_sum, weight_sum)``; ``False`` -> per-token ``[..., T]``.
    """
    logits = _float_array(logits, "logits")
    vocab = logits.shape[-1]
    labels = _check_labels(labels, logits.shape[:-1], vocab)
    _check_interval(label_smoothing, "label_smoothing", 0.0, 1.0, True, False)
    if smoothing not in ("fairseq", "uniform"):
        raise ValueError(f"smoothing must be 'fairseq' or 'uniform', got {smoothing!r}")
    w = _weights(mask, labels.shape, "mask", "the logits' shape without the vocab axis")
    w = w * (labels >= 0)
    x = _live_rows(logits, w)
    log_p = _log_softmax(x)
    ids = jnp.clip(labels, 0, vocab - 1)
    nll = -jnp.take_along_axis(log_p, ids[..., None], axis=-1)[..., 0]
    nll = jnp.where(labels < vocab, nll, jnp.nan)  # only reachable under jit (see module doc)
    if _scalar_value(label_smoothing, "label_smoothing") == 0.0:
        return _finish(nll, w, reduce)
    eps = jnp.asarray(label_smoothing, _F32)
    finite = x > _NEG_INF
    n_finite = jnp.sum(finite, axis=-1).astype(_F32)
    smooth = jnp.sum(jnp.where(finite, -log_p, 0.0), axis=-1)
    if smoothing == "fairseq":
        eps_i = eps / jnp.maximum(n_finite - 1.0, 1.0)
        loss = (1.0 - eps - eps_i) * nll + eps_i * smooth
    else:
        loss = (1.0 - eps) * nll + eps / n_finite * smooth
    return _finish(loss, w, reduce)


def kd_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduce=True):
    """Word-level KD (Hinton et al.): ``T^2 * KL(softmax(t/T) || softmax(s/T))`` per token.

    The ``T^2`` factor keeps the gradient scale independent of the temperature.
    Student and teacher must share the vocabulary (same ``V``).
    """
    s, t = _student_teacher_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    w = _weights(mask, s.shape[:-1], "mask", "the logits' shape without the vocab axis")
    log_q, log_p = _tempered_log_probs(s, t, w, temperature)
    return _finish(temperature**2 * _kl_terms(log_p, log_q), w, reduce)


def interpolated_kl(student_logits, teacher_logits, labels, mask=None, *, lam, temperature=1.0, reduce=True):
    """``T^2 * KL(lam * onehot(y) + (1 - lam) * softmax(t/T) || softmax(s/T))`` per token.

    Word-level KD interpolated with the gold label (Kim & Rush); ``lam = 1`` is plain MLE
    (cross-entropy), ``lam = 0`` is :func:`kd_kl`. ``0 log 0 = 0``. Negative label ids are
    ignored (weight 0).
    """
    s, t = _student_teacher_logits(student_logits, teacher_logits)
    vocab = s.shape[-1]
    labels = _check_labels(labels, s.shape[:-1], vocab)
    _check_interval(lam, "lam", 0.0, 1.0, True, True)
    _check_temperature(temperature)
    w = _weights(mask, labels.shape, "mask", "the logits' shape without the vocab axis")
    w = w * (labels >= 0)
    log_q, log_p = _tempered_log_probs(s, t, w, temperature)
    lam = jnp.asarray(lam, _F32)
    ids = jnp.clip(labels, 0, vocab - 1)
    is_label = jax.nn.one_hot(ids, vocab, dtype=jnp.bool_)
    p_label = jnp.exp(jnp.take_along_axis(log_p, ids[..., None], axis=-1))
    # log r in log space off the label (exact for tiny teacher probabilities).
    log_r = jnp.where(is_label, jnp.log(lam + (1.0 - lam) * p_label), jnp.log1p(-lam) + log_p)
    per = temperature**2 * _kl_terms(log_r, log_q)
    per = jnp.where(labels < vocab, per, jnp.nan)
    return _finish(per, w, reduce)


def reverse_kl(student_logits, teacher_logits, mask=None, *, temperature=1.0, reduce=True):
    """Reverse (mode-seeking) KD: ``T^2 * KL(softmax(s/T) || softmax(t/T))`` per token.

    +inf where the student puts mass on an entry the teacher gives ``-inf``.
    """
    s, t = _student_teacher_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    w = _weights(mask, s.shape[:-1], "mask", "the logits' shape without the vocab axis")
    log_q, log_p = _tempered_log_probs(s, t, w, temperature)
    return _finish(temperature**2 * _kl_terms(log_q, log_p), w, reduce)


def generalized_jsd(student_logits, teacher_logits, mask=None, *, beta=0.5, temperature=1.0, reduce=True):
    """Generalized Jensen-Shannon divergence, ``T^2 * (beta KL(P||M) + (1-beta) KL(Q||M))``.

    P = teacher, Q = student (both at temperature T), ``M = beta P + (1 - beta) Q``.
    ``log M`` is computed in log space as ``logaddexp(log beta + log P, log(1-beta) + log Q)``
    (no probabilities are summed, so tiny masses keep full precision). As for the KL
    losses, the ``T^2`` factor keeps the gradient scale temperature-independent (it is 1
    at the default ``T = 1``). The value is bounded by ``T^2 * H(beta)`` and always finite.
    """
    s, t = _student_teacher_logits(student_logits, teacher_logits)
    _check_interval(beta, "beta", 0.0, 1.0, False, False)
    _check_temperature(temperature)
    w = _weights(mask, s.shape[:-1], "mask", "the logits' shape without the vocab axis")
    log_q, log_p = _tempered_log_probs(s, t, w, temperature)
    beta = jnp.asarray(beta, _F32)
    # Entries where both are -inf: feed finite dummies to logaddexp (its gradient would be
    # exp(-inf - (-inf)) = NaN there) and put -inf back afterwards.
    dead = (log_p == _NEG_INF) & (log_q == _NEG_INF)
    lp = jnp.where(dead, 0.0, log_p)
    lq = jnp.where(dead, 0.0, log_q)
    log_m = jnp.logaddexp(jnp.log(beta) + lp, jnp.log1p(-beta) + lq)
    log_m = jnp.where(dead, _NEG_INF, log_m)
    jsd = beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)
    return _finish(temperature**2 * jsd, w, reduce)


def topk_kd(student_logits, teacher_topk_logprobs, teacher_topk_ids, mask=None, *, temperature=1.0, reduce=True):
    """KD against a sparse, cached teacher: its top-k log-probs and their ids.

    The teacher distribution is the top-k renormalised over its ids at temperature T,
    ``p_k = softmax_k(teacher_topk_logprobs / T)``; the student's log-probs are over the
    full vocabulary (``log_softmax(s / T)`` gathered at the ids). Per token:
    ``T^2 * sum_k p_k (log p_k - log q_{id_k})``. Padding slots may carry a ``-inf``
    log-prob (weight 0; their id is then not used). Ids must be distinct within a row.

    Args:
      student_logits: ``[..., T, V]``.
      teacher_topk_logprobs: ``[..., T, K]`` float (e.g. stored at generation time).
      teacher_topk_ids: ``[..., T, K]`` int ids in ``[0, V)`` where the log-prob is finite.
    """
    s = _float_array(student_logits, "student_logits")
    lp = _float_array(teacher_topk_logprobs, "teacher_topk_logprobs")
    ids = jnp.asarray(teacher_topk_ids)
    vocab = s.shape[-1]
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"teacher_topk_ids must be an integer array, got dtype {ids.dtype}")
    if ids.shape != lp.shape:
        raise ValueError(
            f"teacher_topk_ids has shape {ids.shape} but teacher_topk_logprobs has shape "
            f"{lp.shape}; they must be equal"
        )
    if lp.shape[:-1] != s.shape[:-1]:
        raise ValueError(
            f"teacher_topk_logprobs has shape {lp.shape} but must be {s.shape[:-1]} + (K,) "
            "(the student_logits' shape without the vocab axis, then K)"
        )
    _check_temperature(temperature)
    w = _weights(mask, s.shape[:-1], "mask", "the logits' shape without the vocab axis")
    out_of_range = (ids < 0) | (ids >= vocab)
    if _readable(ids) and _readable(lp) and _readable(w) and ids.size:
        bad = np.asarray(out_of_range & (lp > _NEG_INF) & (w != 0)[..., None])
        if bad.any():
            found = np.asarray(ids)[bad]
            raise ValueError(
                f"teacher_topk_ids must be in [0, {vocab}) (the vocab size of student_logits) "
                f"where teacher_topk_logprobs is finite; found id {int(found[0])}"
            )
    log_q = _log_softmax(_scaled(_live_rows(s, w), temperature))
    log_p = _log_softmax(_scaled(_live_rows(jax.lax.stop_gradient(lp), w), temperature))
    log_q_k = jnp.take_along_axis(log_q, jnp.clip(ids, 0, vocab - 1), axis=-1)
    per = temperature**2 * _kl_terms(log_p, log_q_k)
    per = jnp.where(jnp.any(out_of_range & (log_p > _NEG_INF), axis=-1), jnp.nan, per)
    return _finish(per, w, reduce)


def hidden_mse(student_hidden, teacher_hidden, mask=None, *, reduce=True):
    """Masked hidden-state alignment (DistilBART / DQ-BART), ``[..., T, D]`` inputs.

    Normalisation: per token, the squared error averaged over the ``D`` features; the
    token's weight is the mask. So ``mean(hidden_mse(...))`` is the MSE over all live
    elements (DQ-BART's ``MSELoss`` with padding excluded). Student and teacher must have
    the same hidden size (project the student first otherwise).
    """
    s = _float_array(student_hidden, "student_hidden")
    t = _float_array(teacher_hidden, "teacher_hidden")
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"student_hidden has hidden size {s.shape[-1]} but teacher_hidden has "
            f"{t.shape[-1]}; they must be equal (project the student states first)"
        )
    if s.shape != t.shape:
        raise ValueError(
            f"student_hidden has shape {s.shape} but teacher_hidden has shape {t.shape}; "
            "they must be equal"
        )
    w = _weights(mask, s.shape[:-1], "mask", "the hidden states' shape without the feature axis")
    diff = _live_rows(s, w) - _live_rows(jax.lax.stop_gradient(t), w)
    return _finish(jnp.mean(jnp.square(diff), axis=-1), w, reduce)


def attention_mse(student_attn, teacher_attn, query_mask=None, key_mask=None, *, reduce=True):
    """Masked attention-map alignment over ``[..., H, Tq, Tk]`` attention probabilities.

    Normalisation: for each query position, the squared error is averaged over the live
    keys (weighted by ``key_mask``) and then over the ``H`` heads; the query position's
    weight is ``query_mask``. Per-token output (``reduce=False``) is ``[..., Tq]``.
    Entries at dead queries or keys are ignored (DQ-BART's version includes padding).

    Args:
      student_attn, teacher_attn: ``[..., H, Tq, Tk]``, same shape.
      query_mask: optional ``[..., Tq]`` weights (None = ones).
      key_mask: optional ``[..., Tk]`` weights (None = ones).
    """
    s = _float_array(student_attn, "student_attn", min_ndim=3)
    t = _float_array(teacher_attn, "teacher_attn", min_ndim=3)
    if s.shape != t.shape:
        raise ValueError(
            f"student_attn has shape {s.shape} but teacher_attn has shape {t.shape}; they "
            "must be equal ([..., heads, queries, keys])"
        )
    lead, (_, tq, tk) = s.shape[:-3], s.shape[-3:]
    qw = _weights(query_mask, lead + (tq,), "query_mask", "the attention's [..., Tq]")
    kw = _weights(key_mask, lead + (tk,), "key_mask", "the attention's [..., Tk]")
    live = (qw != 0)[..., None, :, None] & (kw != 0)[..., None, None, :]
    diff = jnp.where(live, s.astype(_F32), 0.0) - jnp.where(
        live, jax.lax.stop_gradient(t).astype(_F32), 0.0
    )
    key_sum = jnp.sum(jnp.square(diff) * kw[..., None, None, :], axis=-1)  # [..., H, Tq]
    key_total = jnp.sum(kw, axis=-1)[..., None, None]
    per_head = key_sum / jnp.maximum(key_total, jnp.finfo(_F32).tiny)
    return _finish(jnp.mean(per_head, axis=-2), qw, reduce)


def mean(pair):
    """Mean loss from a ``(loss_sum, weight_sum)`` pair: ``loss_sum / max(weight_sum, tiny)``.

    0/0 rule: when every token is masked, ``loss_sum`` is exactly 0 and the mean is 0
    (not NaN), with zero gradients. Sum the pairs over devices / micro-batches first and
    call ``mean`` once.
    """
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(
            "mean expects the (loss_sum, weight_sum) pair returned by a loss with "
            f"reduce=True, got {type(pair).__name__}"
        )
    total, count = pair
    return jnp.asarray(total, _F32) / jnp.maximum(jnp.asarray(count, _F32), jnp.finfo(_F32).tiny)
