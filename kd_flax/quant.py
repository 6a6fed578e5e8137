"""Fake quantization with a straight-through estimator, path rules, and integer export.

DQ-BART style distillation-aware quantization keeps the full-precision weights as the
trained parameters and recomputes their quantized copy every step; the forward pass sees
the quantized values, the backward pass sends the gradient straight through to the
full-precision weights (identity inside the clipping range, zero outside).

Everything here is a pure function on arrays / pytrees and is jittable:

* ``fake_quant``          uniform symmetric (narrow signed range) or asymmetric (zero point),
                          per tensor or per channel, dynamic range or fixed ``clip``.
* ``ternary_quant``       DQ-BART/TernaryBERT 2-bit mode: {-a, 0, a}, threshold 0.7 mean|w|.
* ``lsq_quant``           learned step size (Esser et al. 2020), step passed in by the caller.
* ``pact_quant``          learned clip for activations (Choi et al. 2018), clip passed in.
* ``fake_quant_activation``  what the model's Dense layers call on their input.
* ``QuantRule`` / ``default_rules`` / ``quantize_params``  weight quantization by path regex.
* ``rules_for``           the rules a student trains, is scored and is exported with.
* ``act_config``          the model-config fields (``act_quant_bits``, ``act_quant_granularity``)
                          a ``student.quant`` block asks for.

Schemes (``student.quant.scheme``): ``"default"`` is the rounding above; ``"ctranslate2_int8"``
is exactly what CTranslate2's int8 does (rule mode ``"ctranslate2"``, per-row activations):
weights per output row with ``s = fl32(127 / max|row|)`` (1 for an all-zero row),
``codes = rint(w * s)``, value ``codes / s`` (its converter, ``specs/model_spec.py``), for
linear layers and embeddings; biases, norms, position tables and T5's relative-attention bias
stay float. At run time each GEMM input is quantized per row (per token, over the last axis)
with ``s = 127 / max|row|`` (1 when 0) and round-to-nearest-even (``cpu/kernels.cc``
``quantize_s8_row``); the int32 product is scaled back by ``1 / s_a / s_w``.

The integer weights themselves (packing, export, files) are in `kd_flax.int_weights`.

Rounding is ``jnp.round`` (half to even), like torch's ``nearbyint``; values are scaled by
``x * (1 / scale)`` as torch's fake-quant kernels do, so per-tensor/per-channel results
match ``torch.fake_quantize_per_*_affine`` exactly given the same scale. The scale is
``absmax * fl32(1 / qmax)`` (not ``absmax / qmax``: XLA turns division by a constant into
that multiply anyway, and writing it explicitly makes it reproducible everywhere).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kd_flax.config_base import cfg_get
from kd_flax.tree_paths import path_str

WEIGHT_BITS = (2, 4, 8)
ACT_BITS = (8, None)
MODES = ("symmetric", "asymmetric", "ternary", "ctranslate2")
SCHEMES = ("default", "ctranslate2_int8")
ACT_GRANULARITIES = ("tensor", "row")
CT2_QMAX = np.float32(127.0)
TERNARY_THRESHOLD = 0.7  # Delta = 0.7 * mean|w| (TWN / TernaryBERT / DQ-BART)


# ----------------------------------------------------------------------------- helpers


def _check_weight_bits(bits, name: str = "bits") -> int:
    if isinstance(bits, bool) or bits not in WEIGHT_BITS:
        raise ValueError(f"{name} must be one of {WEIGHT_BITS} for weights, got {bits!r}")
    return int(bits)


def _check_act_bits(bits, name: str = "bits"):
    if isinstance(bits, bool) or bits not in ACT_BITS:
        raise ValueError(f"{name} must be one of {ACT_BITS} for activations, got {bits!r}")
    return bits


def _kept_axes(ndim: int, axis) -> tuple[int, ...]:
    """Normalises ``axis`` (None, int or tuple of ints) to the sorted axes that keep their
    own scale; all other axes are reduced over when computing the range."""
    if axis is None:
        return ()
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)) or not -ndim <= a < ndim:
            raise ValueError(
                f"axis must be None, an int or a tuple of ints in [{-ndim}, {ndim}) for an "
                f"array of rank {ndim}, got {axis!r}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis has repeated entries: {axis!r}")
    return tuple(sorted(out))


def _reduce_axes(ndim: int, kept: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(a for a in range(ndim) if a not in kept)


def _safe_scale(scale):
    # A zero (or denormal) range would give scale 0 and x / 0 = NaN; any finite scale
    # works there because every value of such a channel rounds to 0.
    return jnp.where(scale >= jnp.finfo(jnp.float32).tiny, scale, jnp.ones_like(scale))


def _recip(n: int):
    # XLA rewrites `a / broadcast(c)` as `a * (1 / c)`, so `absmax / qmax` is not
    # reproducible bit for bit; define the scale as `absmax * fl32(1 / qmax)` instead,
    # which every backend computes identically (one correctly rounded multiply).
    return np.float32(np.float32(1.0) / np.float32(n))


def _no_neg_zero(q):
    # round(-0.3) is -0.0; an exported integer 0 dequantizes to +0.0, so normalise here
    # to keep export -> dequantize bit-identical (torch also returns +0.0).
    return jnp.where(q == 0, jnp.zeros_like(q), q)


def _check_float(x, name: str = "x"):
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.asarray(x).dtype}")


# Straight-through estimators. custom_jvp keeps the forward value exactly `q` (the
# usual `x + stop_gradient(q - x)` trick changes the last bit, breaking exact export).


@jax.custom_jvp
def _ste(x, q):
    return q


@_ste.defjvp
def _ste_jvp(primals, tangents):
    _, q = primals
    tx, _ = tangents
    return q, tx.astype(q.dtype)


@jax.custom_jvp
def _ste_clip(x, q, lo, hi):
    return q


@_ste_clip.defjvp
def _ste_clip_jvp(primals, tangents):
    x, q, lo, hi = primals
    tx = tangents[0]
    inside = (x >= lo) & (x <= hi)  # closed interval: the clip value itself is representable
    return q, jnp.where(inside, tx, jnp.zeros_like(tx)).astype(q.dtype)


# ----------------------------------------------------------------------------- quantizers
# Each `_*_codes` returns (integer-valued float32 codes, scale, zero_point or None) so that
# the fake-quant value is `(codes - zp) * scale` (or `codes * scale`) and export stores the
# very same codes and scale: the two paths share every floating-point operation.


def _symmetric_codes(x32, bits, kept, clip):
    qmax = 2 ** (bits - 1) - 1
    if clip is None:
        amax = jnp.max(jnp.abs(x32), axis=_reduce_axes(x32.ndim, kept), keepdims=True)
    else:
        amax = jnp.asarray(clip, jnp.float32)
    scale = _safe_scale(amax * _recip(qmax))
    inv = jnp.float32(1.0) / scale
    q = jnp.clip(jnp.round(x32 * inv), -qmax, qmax)
    return _no_neg_zero(q), scale, None


def _asymmetric_codes(x32, bits, kept, clip):
    qmax = 2**bits - 1
    if clip is None:
        red = _reduce_axes(x32.ndim, kept)
        # The range always contains 0 so that 0 (padding, ReLU zeros) is exact.
        lo = jnp.minimum(jnp.min(x32, axis=red, keepdims=True), 0.0)
        hi = jnp.maximum(jnp.max(x32, axis=red, keepdims=True), 0.0)
    else:
        lo, hi = (jnp.asarray(c, jnp.float32) for c in clip)
    scale = _safe_scale((hi - lo) * _recip(qmax))
    zp = jnp.clip(jnp.round(-lo / scale), 0, qmax)
    inv = jnp.float32(1.0) / scale
    q = jnp.clip(jnp.round(x32 * inv) + zp, 0, qmax)
    return q, scale, zp


def _ct2_codes(x32, kept):
    # CTranslate2's converter: amax per kept axes (a row), 0 -> 127, s = fl32(127 / amax),
    # codes = rint(x * s); the value is codes / s. `scale` here is s (a multiplier), not a step.
    amax = jnp.max(jnp.abs(x32), axis=_reduce_axes(x32.ndim, kept), keepdims=True)
    amax = jnp.where(amax == 0, CT2_QMAX, amax)
    amax = jnp.maximum(amax, CT2_QMAX / np.finfo(np.float32).max)
    s = CT2_QMAX / amax
    q = jnp.clip(jnp.round(x32 * s), -127, 127)
    return _no_neg_zero(q), s, None


def _ternary_codes(x32, kept):
    red = _reduce_axes(x32.ndim, kept)
    a = jnp.abs(x32)
    delta = TERNARY_THRESHOLD * jnp.mean(a, axis=red, keepdims=True)
    mask = a > delta
    count = jnp.sum(mask, axis=red, keepdims=True).astype(jnp.float32)
    alpha = jnp.sum(jnp.where(mask, a, 0.0), axis=red, keepdims=True) / jnp.maximum(count, 1.0)
    t = jnp.where(mask, jnp.sign(x32), jnp.zeros_like(x32))
    return t, alpha, None


def _validate_clip(clip, symmetric):
    if clip is None:
        return None, None
    if symmetric:
        if isinstance(clip, (tuple, list)):
            raise ValueError("clip must be a positive scalar/array c (range [-c, c]) when "
                             f"symmetric=True, got {clip!r}")
        c = jnp.asarray(clip, jnp.float32)
        if not isinstance(c, jax.core.Tracer) and bool(jnp.any(c <= 0)):
            raise ValueError(f"clip must be > 0, got {clip!r}")
        return -c, c
    if not (isinstance(clip, (tuple, list)) and len(clip) == 2):
        raise ValueError(f"clip must be a (lo, hi) pair when symmetric=False, got {clip!r}")
    lo, hi = (jnp.asarray(c, jnp.float32) for c in clip)
    if not isinstance(lo, jax.core.Tracer) and not isinstance(hi, jax.core.Tracer):
        if bool(jnp.any(lo >= hi)):
            raise ValueError(f"clip must satisfy lo < hi, got {clip!r}")
    return lo, hi


def _codes(x, bits, axis, mode, clip=None):
    """(codes, scale, zero_point) in float32 for one tensor; the shared core of fake-quant
    and export."""
    x32 = jnp.asarray(x).astype(jnp.float32)
    kept = _kept_axes(x32.ndim, axis)
    if mode == "symmetric":
        return _symmetric_codes(x32, bits, kept, clip)
    if mode == "asymmetric":
        return _asymmetric_codes(x32, bits, kept, clip)
    if mode == "ternary":
        return _ternary_codes(x32, kept)
    if mode == "ctranslate2":
        if bits != 8:
            raise ValueError(f"mode 'ctranslate2' is int8 only, got bits={bits!r}")
        return _ct2_codes(x32, kept)
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _from_codes(q, scale, zp, mode: str = "symmetric"):
    if mode == "ctranslate2":  # CTranslate2 stores the multiplier s and divides by it
        return q / scale
    return (q - zp) * scale if zp is not None else q * scale


def fake_quant(x, bits: int, *, axis=None, symmetric: bool = True, clip=None):
    """Quantize-dequantize ``x`` to ``bits`` bits with a straight-through gradient.

    Args:
      x: floating array (any dtype; the math is float32, the result has ``x.dtype``).
      bits: 2, 4 or 8.
      axis: ``None`` = one scale per tensor; an int (or tuple of ints) = the axis whose
        entries each get their own scale, as torch's per-channel ``axis`` (``-1`` = output
        features of a Dense kernel ``[in, out]``; ``(0, -1)`` for scanned ``[L, in, out]``).
      symmetric: ``True`` = signed narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]`` with
        ``scale = absmax / (2^(b-1)-1)``; ``False`` = unsigned ``[0, 2^b-1]`` with a zero
        point, the range ``[min(x, 0), max(x, 0)]``.
      clip: fixed range instead of the dynamic one: ``c`` (symmetric: ``[-c, c]``, scalar or
        array broadcastable to the per-channel scale) or ``(lo, hi)`` (asymmetric).

    Gradient: identity for entries inside the clipping range (always, for the dynamic
    range), zero outside; no gradient flows to the scale.
    """
    bits = _check_weight_bits(bits)
    _check_float(x)
    x = jnp.asarray(x)
    lo, hi = _validate_clip(clip, symmetric)
    mode = "symmetric" if symmetric else "asymmetric"
    if clip is None:
        q, scale, zp = _codes(jax.lax.stop_gradient(x), bits, axis, mode)
        return _ste(x, _from_codes(q, scale, zp).astype(x.dtype))
    fixed = hi if symmetric else (lo, hi)
    q, scale, zp = _codes(jax.lax.stop_gradient(x), bits, axis, mode,
                          jax.lax.stop_gradient(fixed))
    out = _from_codes(q, scale, zp).astype(x.dtype)
    return _ste_clip(x, out, jax.lax.stop_gradient(lo).astype(x.dtype),
                     jax.lax.stop_gradient(hi).astype(x.dtype))


def ternary_quant(x, *, axis=None):
    """DQ-BART's 2-bit weights: ``{-a, 0, a}`` with threshold ``D = 0.7 * mean|x|`` and
    ``a = mean(|x| where |x| > D)``, per tensor (``axis=None``) or per channel. STE
    gradient (identity)."""
    _check_float(x)
    x = jnp.asarray(x)
    q, scale, _ = _codes(jax.lax.stop_gradient(x), 2, axis, "ternary")
    return _ste(x, (q * scale).astype(x.dtype))


def fake_quant_activation(x, bits, granularity: str = "tensor"):
    """Dynamic symmetric fake-quant of an activation (a Dense layer input), STE gradient.
    ``bits=None`` returns ``x`` unchanged; only 8 bits are supported otherwise.

    ``granularity="tensor"``: one scale for the whole tensor (``fake_quant``).
    ``granularity="row"``: CTranslate2's int8 GEMM input: one scale per row of the last axis
    (per token), ``s = 127 / max|row|`` (1 for a zero row), ``rint(x * s) / s``."""
    bits = _check_act_bits(bits)
    if bits is None:
        return x
    if granularity == "tensor":
        return fake_quant(x, bits, axis=None, symmetric=True)
    if granularity != "row":
        raise ValueError(f"granularity must be one of {ACT_GRANULARITIES}, got {granularity!r}")
    _check_float(x)
    x = jnp.asarray(x)
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    s = jnp.where(amax != 0, CT2_QMAX / jnp.where(amax != 0, amax, 1.0), jnp.float32(1.0))
    q = jnp.round(x32 * s)  # |x * s| <= 127 by construction
    return _ste(x, (q / s).astype(x.dtype))


# ----------------------------------------------------------------------------- LSQ / PACT


def _int_range(bits, signed):
    if signed:
        qp = 2 ** (bits - 1) - 1
        return -qp, qp  # narrow range, the same grid as `fake_quant` / int export
    return 0, 2**bits - 1


def lsq_init_step(x, bits: int, *, signed: bool = True):
    """LSQ's initial step ``2 * mean|x| / sqrt(Qp)`` (Esser et al. 2020, sec. 2.1)."""
    bits = _check_weight_bits(bits)
    _, qp = _int_range(bits, signed)
    return 2.0 * jnp.mean(jnp.abs(jnp.asarray(x, jnp.float32))) / np.sqrt(qp)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3, 4))
def _lsq(x, step, qn, qp, g):
    v = x / step
    return _no_neg_zero(jnp.round(jnp.clip(v, qn, qp))) * step


@_lsq.defjvp
def _lsq_jvp(qn, qp, g, primals, tangents):
    x, step = primals
    tx, ts = tangents
    v = x / step
    r = _no_neg_zero(jnp.round(jnp.clip(v, qn, qp)))
    below, above = v < qn, v > qp
    inside = ~(below | above)
    # d out / d step: round(v) - v inside, qn / qp where clipped (Esser et al., eq. 3),
    # scaled by g so the step's update is balanced against the weights'.
    ds = jnp.where(inside, r - v, jnp.where(below, jnp.float32(qn), jnp.float32(qp)))
    tout = jnp.where(inside, tx, jnp.zeros_like(tx)) + g * ds * ts
    return r * step, tout.astype(x.dtype)


def lsq_quant(x, step, bits: int, *, signed: bool = True, grad_scale=None):
    """Learned step size quantization: ``round(clip(x / step, Qn, Qp)) * step``.

    ``step`` is the learnable scale (a scalar, or an array broadcastable to ``x`` for per
    channel steps) that the caller stores as a parameter. Signed: ``[-Qp, Qp]`` with
    ``Qp = 2^(b-1)-1`` (narrow); unsigned: ``[0, 2^b-1]``. Gradients (Esser et al. 2020):
    ``d/dx = 1`` inside the range, 0 outside; ``d/dstep = g * (round(v) - v)`` inside,
    ``g * Qn`` / ``g * Qp`` below/above, with ``v = x / step`` and
    ``g = grad_scale or 1 / sqrt(N * Qp)``, ``N`` = number of entries per step.
    """
    bits = _check_weight_bits(bits)
    _check_float(x)
    x = jnp.asarray(x)
    step = jnp.asarray(step, x.dtype)
    qn, qp = _int_range(bits, signed)
    if grad_scale is None:
        n = max(x.size // max(step.size, 1), 1)
        grad_scale = 1.0 / float(np.sqrt(n * qp))
    return _lsq(x, step, qn, qp, float(grad_scale))


@functools.partial(jax.custom_jvp, nondiff_argnums=(2, 3))
def _pact(x, alpha, levels, signed):
    lo = -alpha if signed else jnp.zeros_like(alpha)
    y = jnp.clip(x, lo, alpha)
    scale = alpha / levels
    return _no_neg_zero(jnp.round(y / scale)) * scale


@_pact.defjvp
def _pact_jvp(levels, signed, primals, tangents):
    x, alpha = primals
    tx, ta = tangents
    out = _pact(x, alpha, levels, signed)
    lo = -alpha if signed else jnp.zeros_like(alpha)
    inside = (x > lo) & (x < alpha)
    # PACT: d/dx = 1 inside (lo, alpha); d/dalpha = 1 where x >= alpha (and -1 where
    # x <= -alpha in the signed variant), 0 inside (the rounding is straight-through).
    da = jnp.where(x >= alpha, 1.0, 0.0)
    if signed:
        da = da - jnp.where(x <= -alpha, 1.0, 0.0)
    tout = jnp.where(inside, tx, jnp.zeros_like(tx)) + da.astype(x.dtype) * ta
    return out, tout.astype(x.dtype)


def pact_quant(x, alpha, bits: int, *, signed: bool = False):
    """PACT activation quantization with a learned clip ``alpha`` (scalar, caller-stored).

    Unsigned (the paper, for ReLU outputs): ``y = clip(x, 0, alpha)`` on ``2^b - 1`` steps.
    ``signed=True`` (transformer activations): ``clip(x, -alpha, alpha)`` on the narrow
    signed grid ``2^(b-1) - 1`` steps per side. Gradients: ``d/dx = 1`` strictly inside the
    clip range, else 0; ``d/dalpha = 1`` where ``x >= alpha`` (``-1`` where ``x <= -alpha``
    when signed), else 0.
    """
    bits = _check_weight_bits(bits)
    _check_float(x)
    x = jnp.asarray(x)
    alpha = jnp.asarray(alpha, x.dtype)
    levels = float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    return _pact(x, alpha, levels, bool(signed))


# ----------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """Quantize the parameters whose ``/``-joined path **fully** matches ``pattern``
    (``re.fullmatch``; write ``.*`` where you mean "anything").

    ``bits``: 2, 4, 8, or ``None`` = keep this leaf in full precision (use it before a
    broader rule to exclude something). ``axis``: ``None`` (per tensor), an int or a tuple
    of ints (per channel, see :func:`fake_quant`). ``mode``: ``symmetric``, ``asymmetric``,
    ``ternary`` (2 bits only) or ``ctranslate2`` (8 bits only: CTranslate2's own arithmetic).
    """

    pattern: str
    bits: int | None = 8
    axis: Any = -1
    mode: str = "symmetric"

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except (re.error, TypeError) as e:
            raise ValueError(f"QuantRule pattern {self.pattern!r} is not a valid regex: {e}")
        if self.bits is not None:
            _check_weight_bits(self.bits, "QuantRule bits")
        if self.mode not in MODES:
            raise ValueError(f"QuantRule mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "ternary" and self.bits not in (2, None):
            raise ValueError(f"QuantRule mode 'ternary' needs bits=2, got bits={self.bits!r}")
        if self.mode == "ctranslate2" and self.bits not in (8, None):
            raise ValueError(f"QuantRule mode 'ctranslate2' needs bits=8, got bits={self.bits!r}")
        ax = self.axis
        ok = ax is None or (isinstance(ax, int) and not isinstance(ax, bool)) or (
            isinstance(ax, tuple) and all(isinstance(a, int) and not isinstance(a, bool) for a in ax))
        if not ok:
            raise ValueError(f"QuantRule axis must be None, an int or a tuple of ints, got {ax!r}")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.pattern, path) is not None


_KERNEL = r"(.*/)?kernel"
_EMBED = r"(.*/)?embed_tokens/embedding"
# Scanned stacks (`scan_layers=True`) have no integer after `layers/`: leaves are [L, ...].
_STACKED_KERNEL = r"(.*/)?layers/(?!\d+/)(.*/)?kernel"


def default_rules(bits: int = 8, *, granularity: str = "channel",
                  scan_layers: bool = False, scheme: str = "default") -> tuple[QuantRule, ...]:
    """Rules that quantize every Dense kernel (``.../kernel``, per output channel) and the
    token embeddings (``.../embed_tokens/embedding``, one scale per token row) and leave
    everything else (norms, biases, ``embed_positions``, ``relative_attention_bias``) in
    full precision. ``bits=2`` uses ternary weights. ``granularity``: ``"channel"`` or
    ``"tensor"``. With ``scan_layers=True`` stacked kernels get one scale per layer and
    output channel (axis ``(0, -1)``). ``scheme="ctranslate2_int8"``: the same leaves, int8
    per output row (channel) in CTranslate2's arithmetic (mode ``ctranslate2``).
    """
    bits = _check_weight_bits(bits)
    if granularity not in ("channel", "tensor"):
        raise ValueError(f"granularity must be one of ('channel', 'tensor'), got {granularity!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "ctranslate2_int8" and (bits != 8 or granularity != "channel"):
        raise ValueError(f"scheme 'ctranslate2_int8' is int8 per output row: needs bits=8 and "
                         f"granularity='channel', got bits={bits!r}, granularity={granularity!r}")
    mode = "ctranslate2" if scheme == "ctranslate2_int8" else "ternary" if bits == 2 else "symmetric"
    per_channel = granularity == "channel"
    rules = []
    if scan_layers:
        rules.append(QuantRule(_STACKED_KERNEL, bits, (0, -1) if per_channel else (0,), mode))
    rules.append(QuantRule(_KERNEL, bits, -1 if per_channel else None, mode))
    rules.append(QuantRule(_EMBED, bits, 0 if per_channel else None, mode))
    return tuple(rules)


def _key_parts(key_path) -> list[tuple[str, Any]]:
    """(kind, key) per path entry; kind 'k' = mapping key, 's' = sequence index, 'a' =
    attribute. nnx Variables add a trailing `.value` attribute, which is dropped."""
    parts = []
    for k in key_path:
        if isinstance(k, jax.tree_util.DictKey):
            key = k.key
            parts.append(("k", key if isinstance(key, (int, str)) else str(key)))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(("s", k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(("a", k.name))
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(("s", k.key))
        else:
            parts.append(("k", str(k)))
    if parts and parts[-1] == ("a", "value"):
        parts = parts[:-1]
    return parts


def rules_for(model, quant_cfg) -> tuple[QuantRule, ...] | None:
    """The weight fake-quant rules of ``model`` under a ``student.quant`` block
    (``weight_bits``, ``granularity``, ``scheme``): the one home of quantization rules — training, the
    dev evaluation, ``evaluate`` and ``export`` all call it, so a student is scored and
    exported with the scales it was trained with. ``scan_layers`` comes from the model's own
    config (stacked kernels get one scale per layer and channel). ``None`` when weights stay
    float (no block, ``weight_bits=0``)."""
    bits = int(cfg_get(quant_cfg, "weight_bits", 0) or 0)
    if not bits:
        return None
    scan = bool(getattr(getattr(model, "config", None), "scan_layers", False))
    return default_rules(bits, granularity=cfg_get(quant_cfg, "granularity", "channel") or "channel",
                         scan_layers=scan, scheme=cfg_get(quant_cfg, "scheme", "default") or "default")


def act_config(quant_cfg) -> dict:
    """The model-config fields a ``student.quant`` block asks for: ``{}`` when activations stay
    float (``act_bits=0``), else ``act_quant_bits`` and ``act_quant_granularity`` (``"row"``
    for ``scheme="ctranslate2_int8"``, ``"tensor"`` otherwise)."""
    bits = int(cfg_get(quant_cfg, "act_bits", 0) or 0)
    if not bits:
        return {}
    scheme = cfg_get(quant_cfg, "scheme", "default") or "default"
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    return {"act_quant_bits": bits,
            "act_quant_granularity": "row" if scheme == "ctranslate2_int8" else "tensor"}


def _find_rule(path: str, rules: Sequence[QuantRule]):
    for r in rules:
        if r.matches(path):
            return r if r.bits is not None else None
    return None


def _check_rules(rules):
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, QuantRule):
            raise ValueError(f"rules must be QuantRule instances, got {type(r).__name__}: {r!r}")
    return rules


def _is_quantizable(leaf) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.ndim >= 1


def ct2_quant(x, *, axis=None):
    """CTranslate2's int8 weight quantization (``rint(x * s) / s``, ``s = 127 / max|row|`` over
    the axes not in ``axis``), STE gradient (identity)."""
    _check_float(x)
    x = jnp.asarray(x)
    q, s, _ = _codes(jax.lax.stop_gradient(x), 8, axis, "ctranslate2")
    return _ste(x, _from_codes(q, s, None, "ctranslate2").astype(x.dtype))


def apply_rule(x, rule: QuantRule, path: str = "<leaf>"):
    """Fake-quantizes one leaf with ``rule`` (STE)."""
    try:
        if rule.mode == "ternary":
            return ternary_quant(x, axis=rule.axis)
        if rule.mode == "ctranslate2":
            return ct2_quant(x, axis=rule.axis)
        return fake_quant(x, rule.bits, axis=rule.axis, symmetric=rule.mode == "symmetric")
    except ValueError as e:
        raise ValueError(f"parameter {path!r} (shape {tuple(x.shape)}), rule "
                         f"{rule.pattern!r}: {e}") from None


def matched_paths(params, rules: Iterable[QuantRule]) -> dict[str, QuantRule]:
    """``{path: rule}`` for every floating leaf some rule quantizes (first match wins);
    works on abstract trees (``jax.eval_shape`` output) too."""
    rules = _check_rules(rules)
    out = {}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = path_str(kp)
        r = _find_rule(p, rules)
        if r is not None and _is_quantizable(leaf):
            out[p] = r
    return out


def quantize_params(params, rules: Iterable[QuantRule]):
    """Same pytree (dict, ``nnx.State``, ...) with every leaf matched by a rule replaced
    by its fake-quantized value (first matching rule wins). Gradients reach the
    full-precision leaves through the straight-through estimator."""
    rules = _check_rules(rules)

    def f(kp, leaf):
        p = path_str(kp)
        r = _find_rule(p, rules)
        if r is None or not _is_quantizable(leaf):
            return leaf
        return apply_rule(leaf, r, p)

    return jax.tree_util.tree_map_with_path(f, params)
