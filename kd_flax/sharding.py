"""Device mesh and logical-axis sharding rules.

Parameters and main activations carry *logical* axis names (``batch``, ``embed``,
``heads``, ...). A rules table maps each logical name to a mesh axis, a tuple of mesh
axes, or None (replicated). Resolution is forgiving in two ways, so one rules table
works for every mesh preset and model size:
- mesh axes that the mesh does not have are dropped;
- a mesh axis already used by an earlier dimension of the same array is dropped
  (e.g. activations ``[batch, length, embed]`` with ``batch→(data, fsdp)`` and
  ``embed→fsdp``);
- when the shape is known, a dimension that the mesh axes do not divide is replicated.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from kd_flax.tree_paths import path_str

LOGICAL_AXES = "logical_axes"  # nnx.Variable metadata key (see kd_flax.models.layers)

# (logical name, mesh axis | tuple of mesh axes | None)
DEFAULT_RULES: tuple = (
    ("batch", ("data", "fsdp")),
    ("cache_batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "model"),
    ("kv", None),
    ("mlp", "model"),
    ("vocab", "model"),
    ("layers", None),
    ("rel_pos", None),
)

_rules_stack: list = []


_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"


def compiler_options() -> dict | None:
    """XLA compiler options for kd_flax's jitted functions (``jax.jit(..., compiler_options=)``).

    On CPU, YNNPACK takes only the matmuls. Its default also fuses the element-wise and reduction
    ops around a dot into the dot's kernel (log_softmax after the LM head, say), and inside a
    decoding loop that fused kernel ran at about a third of the plain matmul's speed: beam-4
    generation 4.3 s instead of 5.6 s per batch (``benchmarks/``). Used for decoding and
    scoring; train steps compile without it (see ``train.TrainStep``). None elsewhere, or when
    the user's XLA_FLAGS set the flag themselves.
    """
    return _cpu_option(_YNN_FLAG, "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")


def _cpu_option(flag: str, value) -> dict | None:
    """``{flag: value}`` on the CPU backend unless the user's XLA_FLAGS set ``flag``; else None."""
    if jax.default_backend() != "cpu" or flag in os.environ.get("XLA_FLAGS", ""):
        return None
    return {flag: value}


_REGION_FLAG = "xla_cpu_copy_insertion_use_region_analysis"


def train_compiler_options() -> dict | None:
    """XLA compiler options for train steps. On CPU: copy insertion with region analysis,
    which proves more in-place updates of the donated state safe and so copies less of the
    optimizer state each step (T5-small top-k KD step 1.17 -> 1.09 s on a 2-core CPU,
    benchmarks/topk_speed.py). None elsewhere, or when the user's XLA_FLAGS set the flag."""
    return _cpu_option(_REGION_FLAG, True)


def make_mesh(axes: dict[str, int], *, devices: Sequence | None = None) -> Mesh:
    """Mesh with named axes ``{"data": -1, "fsdp": 1, "model": 2}``; one axis may be -1
    (takes the remaining devices). Axis types are Auto (shardings are hints to XLA)."""
    if not isinstance(axes, dict) or not axes:
        raise ValueError(f"mesh axes must be a non-empty dict name -> size, got {axes!r}")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    names = tuple(axes)
    sizes = [int(s) for s in axes.values()]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"mesh axes {axes}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh axes {axes}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh axes {axes}: {n} devices are not divisible by {known}")
        sizes = [n // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != n:
        raise ValueError(f"mesh axes {axes} need {math.prod(sizes)} devices, but {n} are available")
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names),
                         devices=devices)


def config_rules(mesh_cfg) -> tuple:
    """The logical-axis rules of a config's `mesh` block as tuples; logical names the config
    leaves out (e.g. the decoder cache's `cache_batch`) take `DEFAULT_RULES`'."""
    raw = mesh_cfg.get("rules") if mesh_cfg is not None and hasattr(mesh_cfg, "get") else None
    raw = raw.to_dict() if hasattr(raw, "to_dict") else raw
    rules = tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in (raw or ()))
    named = {r[0] for r in rules}
    return rules + tuple(r for r in DEFAULT_RULES if r[0] not in named)


def mesh_from_config(mesh_cfg, *, devices: Sequence | None = None) -> tuple[Mesh | None, tuple]:
    """`(mesh, rules)` from a config's `mesh` block (`axes`, `rules`) over `devices` (default:
    all devices); the mesh is None on a single device (nothing to shard)."""
    devices = list(jax.devices() if devices is None else devices)
    rules = config_rules(mesh_cfg)
    if len(devices) <= 1:
        return None, rules
    axes = mesh_cfg.axes.to_dict() if hasattr(mesh_cfg.axes, "to_dict") else dict(mesh_cfg.axes)
    return make_mesh(axes, devices=devices), rules


def _rules_dict(rules) -> dict:
    rules = DEFAULT_RULES if rules is None else rules
    out = {}
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"sharding rule {item!r} must be a (logical_name, mesh_axes) pair")
        name, target = item
        out.setdefault(name, target)  # first match wins, like flax/t5x rules
    return out


def logical_to_spec(logical_axes: Sequence[str | None] | None, mesh, rules=None,
                    shape: Sequence[int] | None = None) -> PartitionSpec:
    """Resolve logical axis names to a ``PartitionSpec`` for ``mesh`` (see module doc)."""
    if logical_axes is None:
        return PartitionSpec()
    table = _rules_dict(rules)
    mesh_sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    used: set = set()
    spec = []
    for d, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
        target = table[name]
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if t in mesh_sizes and t not in used and mesh_sizes[t] > 1)
        if shape is not None and targets:
            size = math.prod(mesh_sizes[t] for t in targets)
            while targets and shape[d] % size:
                targets = targets[:-1]  # drop trailing mesh axes until it divides
                size = math.prod(mesh_sizes[t] for t in targets)
        used.update(targets)
        spec.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*spec)


def auto_axes(mesh):
    """`mesh` with every axis Auto (None stays None); kd_flax applies it to any mesh it is given.

    kd_flax's shardings are hints that XLA completes (parameters and activations are placed and
    constrained by logical rules, like t5x / MaxText). A mesh from plain ``jax.make_mesh`` has
    Explicit axes, JAX's default, under which sharding-in-types refuses ops whose output
    sharding it cannot infer, such as the embedding lookup.
    """
    if mesh is None or all(t == AxisType.Auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def logical_to_sharding(logical_axes, mesh, rules=None, shape=None) -> NamedSharding:
    """``NamedSharding`` for an array with the given logical axes."""
    mesh = auto_axes(mesh)
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, rules, shape))


def variable_sharding(var, mesh, rules=None) -> NamedSharding:
    """Sharding of one ``nnx.Variable`` from its ``logical_axes`` metadata."""
    axes = var.get_metadata().get(LOGICAL_AXES)
    shape = getattr(var.get_value(), "shape", None)
    if axes is not None and shape is not None and len(axes) != len(shape):
        raise ValueError(f"variable with shape {shape} has logical axes {axes} of a different rank")
    return logical_to_sharding(axes, mesh, rules, shape)


def param_shardings(state, mesh, rules=None):
    """Pytree of ``NamedSharding`` matching an ``nnx.State`` (abstract or concrete)."""
    return jax.tree.map(lambda v: v.replace(variable_sharding(v, mesh, rules)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh, rules=None) -> nnx.Module:
    """Move an existing model's state onto ``mesh`` per the rules (in place; returned)."""
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, param_shardings(state, mesh, rules)))
    return model


def create_sharded_model(ctor, mesh, rules=None) -> nnx.Module:
    """Build ``ctor()`` with every parameter created directly in its sharding.

    ``ctor`` takes no arguments and must create its own ``nnx.Rngs`` (it is traced under
    ``jax.jit``), e.g. ``lambda: T5Model(cfg, rngs=nnx.Rngs(0))``. No full copy of the
    parameters ever lives on one device.
    """
    mesh = auto_axes(mesh)
    graphdef, abs_state = nnx.split(nnx.eval_shape(ctor))
    shardings = param_shardings(abs_state, mesh, rules)

    def init():
        return nnx.split(ctor())[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh, rules=None, ndim: int = 2) -> NamedSharding:
    """Sharding of ``[B, T, ...]`` input arrays: batch split over the data axes."""
    axes = ("batch", "length") + (None,) * max(0, ndim - 2)
    return logical_to_sharding(axes[:ndim], mesh, rules)


@contextlib.contextmanager
def use_rules(rules):
    """Rules used by :func:`constrain` inside model code (default ``DEFAULT_RULES``)."""
    _rules_stack.append(rules)
    try:
        yield
    finally:
        _rules_stack.pop()


def current_rules():
    return _rules_stack[-1] if _rules_stack else DEFAULT_RULES


def constrain(x, logical_axes: Sequence[str | None]):
    """Sharding constraint on an activation when a mesh is set (``jax.set_mesh``);
    identity otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not isinstance(x, jax.Array) and not hasattr(x, "shape"):
        return x
    spec = logical_to_spec(logical_axes, mesh, current_rules(), x.shape)
    if all(s is None for s in spec):
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def describe(state, mesh, rules=None) -> dict[str, Any]:
    """``{param path: PartitionSpec}`` (for logs and tests)."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[path_str(path)] = variable_sharding(var, mesh, rules).spec
    return out
