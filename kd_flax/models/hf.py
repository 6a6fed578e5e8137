"""Hugging Face checkpoint interop: ``config.json`` + safetensors in, and out.

Model families (t5.py, bart.py) register a :class:`ModelFamily` here: the HF
``model_type`` values they handle, their config class (``from_hf`` / ``to_hf``), their
model class, and a *name table*: a list of :class:`Entry` mapping each HF tensor name to
a kd_flax parameter path with a transform. Name tables always use unscanned paths
(``encoder/layers/3/...``); this module stacks/unstacks them when ``scan_layers`` is on.

Loading streams one tensor at a time from the safetensors file(s) and places it directly
into its target ``NamedSharding`` (``jax.make_array_from_callback``, so each host only
materialises the slices its devices hold); the model skeleton comes from
``nnx.eval_shape`` — no random init is ever materialised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_flax import io_utils
from kd_flax import sharding as _sharding
from kd_flax.models.tokenizer import save_tokenizer
from kd_flax.tree_paths import path_str

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TRANSFORMS = ("copy", "transpose")


# ----------------------------------------------------------------------------- protocol

@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor ↔ one kd_flax parameter.

    hf: HF tensor name (``encoder.block.0.layer.0.SelfAttention.q.weight``).
    path: kd_flax parameter path, ``/``-joined, with the integer layer index
        (``encoder/layers/0/self_attn/q_proj/kernel``), whatever ``scan_layers`` is.
    transform: ``"copy"`` or ``"transpose"`` (torch ``Linear.weight`` [out, in] ↔ kernel [in, out]).
    aliases: other HF names that hold the same (tied) tensor; accepted on load when ``hf``
        is absent, never written on save.
    hf_shape: HF shape when it differs from kd_flax's by a reshape only (e.g. Marian
        ``final_logits_bias`` [1, V] ↔ [V]).
    """

    hf: str
    path: str
    transform: str = "copy"
    aliases: tuple = ()
    hf_shape: tuple | None = None

    def __post_init__(self):
        if self.transform not in TRANSFORMS:
            raise ValueError(f"Entry({self.hf!r}): transform={self.transform!r}; allowed: {TRANSFORMS}")


def dense_entries(hf_prefix: str, path: str, *, bias: bool) -> list[Entry]:
    """Entries of a torch ``nn.Linear`` ↔ :class:`kd_flax.models.layers.Dense`."""
    out = [Entry(f"{hf_prefix}.weight", f"{path}/kernel", "transpose")]
    if bias:
        out.append(Entry(f"{hf_prefix}.bias", f"{path}/bias"))
    return out


def norm_entries(hf_prefix: str, path: str, *, bias: bool) -> list[Entry]:
    """Entries of a torch layer norm (``weight``/``bias``) ↔ ``scale``/``bias``."""
    out = [Entry(f"{hf_prefix}.weight", f"{path}/scale")]
    if bias:
        out.append(Entry(f"{hf_prefix}.bias", f"{path}/bias"))
    return out


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """What a family module registers (see docs/CONTRACTS.md)."""

    name: str
    model_types: tuple                      # HF ``model_type`` values handled
    config_cls: type                        # frozen dataclass with from_hf / to_hf / replace
    model_cls: type                         # model_cls(config, rngs=nnx.Rngs(...))
    name_table: Callable[[Any], list]       # config -> list[Entry]
    tiny_config: Callable[..., Any]         # tiny_config(model_type, **overrides) -> config
    ignore_unexpected: tuple = ()           # regexes of HF tensors silently ignored on load


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> None:
    for t in family.model_types:
        _FAMILIES[t] = family


def registered_model_types() -> list[str]:
    return sorted(_FAMILIES)


def get_family(model_type: str) -> ModelFamily:
    if model_type not in _FAMILIES:
        # the BART family may register later (import kd_flax.models triggers registration)
        import kd_flax.models  # noqa: F401
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; known: {registered_model_types()}")
    return _FAMILIES[model_type]


class ConfigMixin:
    """``replace`` with a helpful error, shared by family config dataclasses."""

    def replace(self, **kw):
        names = {f.name for f in dataclasses.fields(self)}
        bad = sorted(set(kw) - names)
        if bad:
            raise ValueError(f"{type(self).__name__} has no field(s) {bad}; allowed: {sorted(names)}")
        return dataclasses.replace(self, **kw)


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def canonical_dtype(dtype, what: str = "dtype") -> str:
    """Name of a float dtype (``jnp.bfloat16`` → ``"bfloat16"``); ValueError naming ``what``."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in ("float32", "bfloat16", "float16", "float64"):
        raise ValueError(f"{what}={dtype!r}; allowed: float32, bfloat16, float16, float64")
    return name


# ----------------------------------------------------------------------------- path helpers

_LAYER_RE = re.compile(r"^(.*?/layers)/(\d+)/(.*)$")


def _resolve(entry_path: str, scan: bool) -> tuple[str, int | None]:
    """Table path → (model state path, layer index when stacked)."""
    if scan:
        m = _LAYER_RE.match(entry_path)
        if m:
            return f"{m.group(1)}/{m.group(3)}", int(m.group(2))
    return entry_path, None


def _to_kd(arr: np.ndarray, entry: Entry, target_shape) -> np.ndarray:
    if entry.transform == "transpose":
        arr = arr.T
    if entry.hf_shape is not None and arr.shape != tuple(target_shape) and arr.size == np.prod(target_shape):
        arr = arr.reshape(target_shape)
    return arr


def _to_hf(arr: np.ndarray, entry: Entry) -> np.ndarray:
    if entry.transform == "transpose":
        arr = arr.T
    if entry.hf_shape is not None:
        arr = arr.reshape(entry.hf_shape)
    return np.ascontiguousarray(arr)


def _epath(path):
    from etils import epath
    return epath.Path(path)


def _is_local(path) -> bool:
    return "://" not in str(path)


def _read_json(p) -> dict:
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: invalid JSON (line {e.lineno}): {e.msg}") from None


# ----------------------------------------------------------------------------- loading

def _weight_files(root) -> tuple[list, dict | None]:
    """Safetensors files of a checkpoint dir and the name→file map of a sharded index."""
    single = root / WEIGHTS_NAME
    index = root / WEIGHTS_INDEX_NAME
    if single.exists():
        return [single], None
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing 'weight_map' dict")
        files = sorted(set(weight_map.values()))
        return [root / f for f in files], weight_map
    raise ValueError(f"{root}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} found "
                     "(only safetensors checkpoints are supported)")


class _LocalCopy:
    """A local filename for a (possibly remote, e.g. gs://) file, for ``safe_open``."""

    def __init__(self, p):
        self.p = p
        self.tmp = None

    def __enter__(self) -> str:
        if _is_local(self.p):
            return os.fspath(self.p)
        self.tmp = tempfile.NamedTemporaryFile(suffix=".safetensors", delete=False)
        with self.p.open("rb") as src:
            shutil.copyfileobj(src, self.tmp, length=16 << 20)
        self.tmp.close()
        return self.tmp.name

    def __exit__(self, *exc):
        if self.tmp is not None:
            os.unlink(self.tmp.name)


def _safetensors_names(p) -> list[str]:
    """Tensor names from a safetensors header (8-byte length + JSON); reads only the header,
    so listing a remote file does not download it."""
    import struct

    try:
        size = p.stat().length if hasattr(p.stat(), "length") else p.stat().st_size
        with p.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        if ends and 8 + n + max(ends) > size:
            raise ValueError(f"tensors end at byte {8 + n + max(ends)}, the file has {size}")
    except (struct.error, ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not a valid safetensors file (truncated or corrupted: {e}); "
                         f"restore or re-download it") from None
    return [k for k in header if k != "__metadata__"]


def _names_in(files, weight_map) -> dict[str, Any]:
    if weight_map is not None:
        return {name: files[0].parent / f for name, f in weight_map.items()}
    return {name: f for f in files for name in _safetensors_names(f)}


def _short(names, n=10) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" ... ({len(names)} in all)" if len(names) > n else "")


def _place(arr: np.ndarray, var, mesh, rules):
    if mesh is None:
        return jnp.asarray(arr)
    sh = _sharding.variable_sharding(var, mesh, rules)
    return jax.make_array_from_callback(arr.shape, sh, lambda idx: arr[idx])


def load_state_into(abstract_model: nnx.Module, root, family: ModelFamily, config, *,
                     mesh=None, rules=None) -> nnx.Module:
    """Fill an abstract (``nnx.eval_shape``) model from the safetensors files in ``root``."""
    from safetensors import safe_open

    graphdef, state = nnx.split(abstract_model)
    leaves = {path_str(p): v for p, v in nnx.to_flat_state(state)}
    scan = bool(getattr(config, "scan_layers", False))
    table = family.name_table(config)

    files, weight_map = _weight_files(root)
    available = _names_in(files, weight_map)

    # pick the source tensor of each entry; check missing / extra / unmapped
    chosen: dict[str, tuple[Entry, str, int | None]] = {}
    missing, consumed = [], set()
    for e in table:
        leaf_path, idx = _resolve(e.path, scan)
        if leaf_path not in leaves:
            raise ValueError(f"name table of {family.name} maps {e.hf!r} to {e.path!r}, "
                             f"which is not a parameter of the model")
        names = [n for n in (e.hf, *e.aliases) if n in available]
        if not names:
            missing.append(e.hf)
            continue
        chosen[names[0]] = (e, leaf_path, idx)
        consumed.update(n for n in (e.hf, *e.aliases) if n in available)
    if missing:
        raise ValueError(f"{root}: checkpoint is missing tensor(s) {_short(missing)}")
    ignore = [re.compile(r) for r in family.ignore_unexpected]
    extra = [n for n in available if n not in consumed and not any(r.fullmatch(n) for r in ignore)]
    if extra:
        raise ValueError(f"{root}: unexpected tensor(s) in checkpoint, not used by "
                         f"{family.name} config {config.model_type!r}: {_short(extra)}")
    mapped = {_resolve(e.path, scan)[0] for e in table}
    unmapped = sorted(set(leaves) - mapped)
    if unmapped:
        raise ValueError(f"kd_flax parameter(s) with no checkpoint entry in the {family.name} "
                         f"name table: {_short(unmapped)}")

    # stream: one tensor at a time; stacked (scanned) leaves gather their layers first
    pending: dict[str, tuple[np.ndarray, set]] = {}
    filled = set()
    by_file: dict[Any, list[str]] = {}
    for name in chosen:
        by_file.setdefault(available[name], []).append(name)
    for f, names in by_file.items():
        with _LocalCopy(f) as local, safe_open(local, framework="numpy") as st:
            for name in names:
                e, leaf_path, idx = chosen[name]
                var = leaves[leaf_path]
                full_shape = tuple(var.get_value().shape)
                target = full_shape[1:] if idx is not None else full_shape
                arr = _to_kd(st.get_tensor(name), e, target)
                if tuple(arr.shape) != target:
                    raise ValueError(f"tensor {name!r}: shape {tuple(st.get_slice(name).get_shape())} "
                                     f"does not match kd_flax parameter {e.path!r} of shape {target} "
                                     f"(after {e.transform})")
                arr = arr.astype(var.get_value().dtype)
                if idx is None:
                    var.set_value(_place(arr, var, mesh, rules))
                    filled.add(leaf_path)
                    continue
                buf, seen = pending.setdefault(leaf_path, (np.empty(full_shape, arr.dtype), set()))
                buf[idx] = arr
                seen.add(idx)
                if len(seen) == full_shape[0]:
                    var.set_value(_place(buf, var, mesh, rules))
                    filled.add(leaf_path)
                    del pending[leaf_path]
    if pending or filled != set(leaves):
        raise ValueError(f"{root}: parameter(s) not filled from the checkpoint: "
                         f"{_short(set(leaves) - filled)}")
    return nnx.merge(graphdef, state)


def load_pretrained(path, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None, rules=None,
                    **config_overrides):
    """Load a Hugging Face checkpoint directory (local or ``gs://``) as a kd_flax model.

    The family is picked from ``model_type`` in ``config.json``; ``config_overrides`` are
    fields of the family config (e.g. ``scan_layers=True``, ``remat="full"``). With a
    ``mesh`` every parameter is created directly in its ``NamedSharding`` (``rules``:
    logical→mesh rules, default :data:`kd_flax.sharding.DEFAULT_RULES`).
    ``generation_config.json``, when present, becomes ``model.generation_config``.
    """
    root = _epath(path)
    if not root.exists():
        raise ValueError(f"path {str(path)!r} does not exist")
    hf_config = _read_json(root / CONFIG_NAME)
    if "model_type" not in hf_config:
        raise ValueError(f"{root / CONFIG_NAME}: no 'model_type' key; supported: {registered_model_types()}")
    family = get_family(hf_config["model_type"])
    config = family.config_cls.from_hf(hf_config).replace(
        dtype=dtype, param_dtype=param_dtype, **config_overrides)
    abstract = nnx.eval_shape(lambda: family.model_cls(config, rngs=nnx.Rngs(0)))
    model = load_state_into(abstract, root, family, config, mesh=mesh, rules=rules)
    gen = root / GENERATION_CONFIG_NAME
    if gen.exists():
        model.generation_config = _read_json(gen)
    return model


# ----------------------------------------------------------------------------- saving

def _fetch(x) -> np.ndarray:
    if jax.process_count() > 1 and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def export_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """``{HF tensor name: numpy array}`` of a model, per its family's name table."""
    config = model.config
    family = get_family(config.model_type)
    scan = bool(getattr(config, "scan_layers", False))
    leaves = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    out, used, cache = {}, set(), {}
    for e in family.name_table(config):
        leaf_path, idx = _resolve(e.path, scan)
        if leaf_path not in leaves:
            raise ValueError(f"name table of {family.name} maps {e.hf!r} to {e.path!r}, "
                             "which is not a parameter of the model")
        if leaf_path not in cache:
            cache[leaf_path] = _fetch(leaves[leaf_path].get_value())
        arr = cache[leaf_path] if idx is None else cache[leaf_path][idx]
        out[e.hf] = _to_hf(arr, e)
        used.add(leaf_path)
    unmapped = sorted(set(leaves) - used)
    if unmapped:
        raise ValueError(f"kd_flax parameter(s) with no entry in the {family.name} name table: "
                         f"{_short(unmapped)}")
    return out


def save_pretrained(model: nnx.Module, path, tokenizer=None) -> None:
    """Write ``config.json``, ``generation_config.json`` and ``model.safetensors`` (and the
    tokenizer when given) so that ``transformers.AutoModelForSeq2SeqLM.from_pretrained(path)``
    loads the model with no missing/unexpected keys. Files are written to temporary names
    and renamed into place. In multi-host runs every process must call it; process 0 writes.
    """
    from safetensors.numpy import save as st_save

    tensors = export_tensors(model)
    if jax.process_index() != 0:
        return
    root = _epath(path)
    root.mkdir(parents=True, exist_ok=True)
    hf_config = model.config.to_hf()
    io_utils.atomic_write_bytes(root / WEIGHTS_NAME, st_save(tensors, metadata={"format": "pt"}))
    io_utils.atomic_write_bytes(root / CONFIG_NAME, (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode())
    gen = generation_defaults(model.config)
    gen.update(dict(getattr(model, "generation_config", None) or {}))
    io_utils.atomic_write_bytes(root / GENERATION_CONFIG_NAME, (json.dumps(gen, indent=2, sort_keys=True) + "\n").encode())
    if tokenizer is not None:
        save_tokenizer(tokenizer, root)


def generation_defaults(config) -> dict:
    """HF generation defaults derived from a kd_flax config (token ids)."""
    out = {"decoder_start_token_id": config.decoder_start_token_id,
           "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    for k in ("bos_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        v = getattr(config, k, None)
        if v is not None:
            out[k] = v
    return out


def read_generation_config(path) -> dict:
    """``generation_config.json`` of a checkpoint dir as a dict ({} when absent)."""
    p = _epath(path) / GENERATION_CONFIG_NAME
    return _read_json(p) if p.exists() else {}
