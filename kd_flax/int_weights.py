"""Integer weights: the fake-quantized weights a student trained with, stored as integers.

* ``pack_bits`` / ``unpack_bits``  int4 and int2 codes packed into bytes (first code lowest).
* ``export_quantized``  params + `kd_flax.quant` rules -> ``QuantizedParams`` (codes, scales,
  zero points per tensor); ``exported_nbytes`` is the real size that would ship.
* ``dequantize``  back to float, bit for bit the fake-quant forward's weights.
* ``save_quantized`` / ``load_quantized``  a safetensors file with the layout in its metadata.

The quantizer itself (codes, scales, rules) is `kd_flax.quant`; this module only stores it.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from kd_flax.quant import (QuantRule, _check_rules, _check_weight_bits, _codes, _find_rule, _from_codes,
                           _is_quantizable, _key_parts)
from kd_flax.tree_paths import path_str

_FORMAT = "kd_flax.quant/1"


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Packs integer codes (signed or unsigned, fitting in ``bits``) into a flat uint8 array,
    ``8 // bits`` codes per byte, first code in the lowest bits. 8-bit codes are returned
    as is (int8/uint8), flattened."""
    bits = _check_weight_bits(bits)
    q = np.asarray(q).reshape(-1)
    if bits == 8:
        return q.copy()
    per = 8 // bits
    u = (q.astype(np.int16) & ((1 << bits) - 1)).astype(np.uint8)  # two's complement field
    u = np.concatenate([u, np.zeros((-len(u)) % per, np.uint8)]).reshape(-1, per)
    out = np.zeros(len(u), np.uint8)
    for i in range(per):
        out |= u[:, i] << np.uint8(i * bits)
    return out


def unpack_bits(packed: np.ndarray, bits: int, size: int, *, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``size`` codes as int8 (``signed``) or uint8."""
    bits = _check_weight_bits(bits)
    packed = np.asarray(packed).reshape(-1)
    if bits == 8:
        return packed[:size].astype(np.int8 if signed else np.uint8)
    per, mask = 8 // bits, (1 << bits) - 1
    p = packed.astype(np.uint8)
    fields = np.stack([(p >> np.uint8(i * bits)) & np.uint8(mask) for i in range(per)], axis=1)
    v = fields.reshape(-1)[:size].astype(np.int8)
    if signed:
        half = 1 << (bits - 1)
        v = ((v ^ half) - half).astype(np.int8)  # sign-extend the field
        return v
    return v.astype(np.uint8)


# ----------------------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """One exported weight: ``codes`` (int8 for 8-bit symmetric, uint8 for 8-bit
    asymmetric, packed uint8 for 4/2 bits), float32 ``scale`` (keepdims shape, broadcasts
    against ``shape``), uint8 ``zero_point`` (asymmetric only), the original ``shape`` and
    ``dtype`` name, ``bits``, ``mode``, ``axis``."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    shape: tuple[int, ...]
    dtype: str
    bits: int
    mode: str
    axis: Any

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.scale.nbytes
                   + (0 if self.zero_point is None else self.zero_point.nbytes))

    def int_codes(self) -> np.ndarray:
        """Unpacked integer codes with the original shape."""
        size = int(np.prod(self.shape, dtype=np.int64))
        signed = self.mode != "asymmetric"
        return unpack_bits(self.codes, self.bits, size, signed=signed).reshape(self.shape)


class QuantizedParams(collections.abc.Mapping):
    """Result of :func:`export_quantized`: a mapping ``path -> QuantizedTensor | np.ndarray``
    (unquantized leaves kept as they are), in leaf order, plus each path's key structure
    (so :func:`dequantize` can rebuild the nested tree)."""

    def __init__(self, tensors: dict, key_parts: dict):
        self.tensors = dict(tensors)
        self.key_parts = {p: [tuple(k) for k in ks] for p, ks in key_parts.items()}

    def __getitem__(self, path):
        return self.tensors[path]

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self):
        return len(self.tensors)

    def __repr__(self):
        nq = sum(isinstance(v, QuantizedTensor) for v in self.tensors.values())
        return (f"QuantizedParams({len(self)} leaves, {nq} quantized, "
                f"{exported_nbytes(self)} bytes)")


def _dtype_name(dt) -> str:
    return jnp.dtype(dt).name


def export_quantized(params, rules: Iterable[QuantRule]) -> QuantizedParams:
    """Integer export: each leaf matched by ``rules`` becomes a :class:`QuantizedTensor`
    (int8 / packed int4 / packed int2 codes + scales); the rest is kept as NumPy arrays.
    ``dequantize`` of the result equals ``quantize_params(params, rules)`` bit for bit.
    Arrays are fetched to the host (single-process)."""
    rules = _check_rules(rules)
    tensors, keys = {}, {}
    for kp, leaf in jax.tree_util.tree_leaves_with_path(params):
        p = path_str(kp)
        if p in tensors:
            raise ValueError(f"two parameters map to the same path {p!r}")
        keys[p] = _key_parts(kp)
        r = _find_rule(p, rules)
        if r is None or not _is_quantizable(leaf):
            tensors[p] = np.asarray(leaf)
            continue
        x = jnp.asarray(leaf)
        try:
            q, scale, zp = _codes(x, r.bits, r.axis, r.mode)
        except ValueError as e:
            raise ValueError(f"parameter {p!r} (shape {tuple(x.shape)}), rule "
                             f"{r.pattern!r}: {e}") from None
        signed = r.mode != "asymmetric"
        qi = np.asarray(q).astype(np.int8 if signed else np.uint8)
        tensors[p] = QuantizedTensor(
            codes=pack_bits(qi, r.bits),
            scale=np.asarray(scale, np.float32),
            zero_point=None if zp is None else np.asarray(zp).astype(np.uint8),
            shape=tuple(x.shape), dtype=_dtype_name(x.dtype), bits=r.bits, mode=r.mode,
            axis=r.axis)
    return QuantizedParams(tensors, keys)


def exported_nbytes(exported: QuantizedParams) -> int:
    """Real storage size in bytes: packed codes + scales + zero points + float leaves."""
    total = 0
    for v in exported.values():
        total += v.nbytes if isinstance(v, QuantizedTensor) else int(np.asarray(v).nbytes)
    return total


def _dequantize_one(t: QuantizedTensor):
    q = jnp.asarray(t.int_codes()).astype(jnp.float32)
    scale = jnp.asarray(t.scale)
    zp = None if t.zero_point is None else jnp.asarray(t.zero_point).astype(jnp.float32)
    return _from_codes(q, scale, zp, t.mode).astype(t.dtype)


def dequantize(exported: QuantizedParams, like=None):
    """Float parameters back from an export: ``(codes - zero_point) * scale`` in float32,
    cast to the original dtype (the same operations as the fake-quant forward).

    Without ``like``: a nested dict following the original key structure (ints for
    sequence indices), usable with ``nnx.update`` / ``State.replace_by_pure_dict``.
    With ``like`` (e.g. the original ``nnx.State`` or params tree): a tree of that structure.
    """
    def value(p):
        v = exported[p]
        return _dequantize_one(v) if isinstance(v, QuantizedTensor) else jnp.asarray(v)

    if like is not None:
        def f(kp, _):
            p = path_str(kp)
            if p not in exported:
                raise ValueError(f"dequantize: parameter {p!r} of `like` is not in the export")
            return value(p)
        return jax.tree_util.tree_map_with_path(f, like)

    out: dict = {}
    for p in exported:
        parts = exported.key_parts[p]
        if not parts:
            return value(p)  # a single bare array was exported
        node = out
        for _, k in parts[:-1]:
            node = node.setdefault(k, {})
        node[parts[-1][1]] = value(p)
    return out


# ----------------------------------------------------------------------------- files


def _to_storable(a: np.ndarray) -> tuple[np.ndarray, str]:
    # safetensors.numpy has no bfloat16 (ml_dtypes): store its bits as uint16.
    name = _dtype_name(a.dtype)
    if name == "bfloat16":
        return np.ascontiguousarray(a).view(np.uint16), name
    return np.ascontiguousarray(a), name


def _from_storable(a: np.ndarray, name: str) -> np.ndarray:
    if name == "bfloat16":
        return a.view(jnp.bfloat16)
    return a.astype(name, copy=False)


def save_quantized(exported: QuantizedParams, path) -> None:
    """Writes an export to one ``.safetensors`` file (tensors ``<path>#codes``,
    ``#scale``, ``#zero_point`` or ``<path>`` for float leaves) with a JSON description in
    the header metadata. Atomic: temp file + ``os.replace``."""
    from safetensors.numpy import save as st_save

    from kd_flax import io_utils

    tensors, entries = {}, {}
    for p, v in exported.items():
        e = {"keys": [list(k) for k in exported.key_parts[p]]}
        if isinstance(v, QuantizedTensor):
            e.update(kind="quant", shape=list(v.shape), dtype=v.dtype, bits=v.bits, mode=v.mode,
                     axis=list(v.axis) if isinstance(v.axis, tuple) else v.axis)
            tensors[p + "#codes"] = np.ascontiguousarray(v.codes)
            tensors[p + "#scale"] = np.ascontiguousarray(v.scale)
            if v.zero_point is not None:
                tensors[p + "#zero_point"] = np.ascontiguousarray(v.zero_point)
        else:
            arr, name = _to_storable(np.asarray(v))
            e.update(kind="float", dtype=name)
            tensors[p] = arr
        entries[p] = e
    meta = {"format": _FORMAT, "entries": json.dumps(entries)}
    io_utils.atomic_write_bytes(path, st_save(tensors, metadata=meta))


def load_quantized(path) -> QuantizedParams:
    """Reads a file written by :func:`save_quantized`."""
    from safetensors.numpy import load as st_load

    from kd_flax import io_utils

    with io_utils.open_path(path, "rb") as f:
        data = f.read()
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    # the header metadata is not returned by `load`; parse it from the header itself
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: metadata format must be {_FORMAT!r}, got {meta.get('format')!r}")
    entries = json.loads(meta["entries"])
    out, keys = {}, {}
    for p, e in entries.items():
        keys[p] = [tuple(k) for k in e["keys"]]
        if e["kind"] == "float":
            out[p] = _from_storable(tensors[p], e["dtype"])
            continue
        zp = tensors.get(p + "#zero_point")
        axis = tuple(e["axis"]) if isinstance(e["axis"], list) else e["axis"]
        out[p] = QuantizedTensor(codes=tensors[p + "#codes"], scale=tensors[p + "#scale"],
                                 zero_point=zp, shape=tuple(e["shape"]), dtype=e["dtype"],
                                 bits=int(e["bits"]), mode=e["mode"], axis=axis)
    return QuantizedParams(out, keys)
