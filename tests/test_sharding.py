"""Sharding on an 8-device CPU mesh: rules resolve for every parameter, parameters are
created/loaded directly sharded, and the sharded forward equals the single-device one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kd_flax import sharding as S
from kd_flax.models import create_model, load_pretrained, tiny_config
from kd_flax.models import layers as L
from tests.model_fixtures import make_batch, make_hf_model

MESHES = {"data4_model2": {"data": 4, "fsdp": 1, "model": 2},
          "fsdp": {"data": 2, "fsdp": 2, "model": 2}}


def test_make_mesh_and_rule_resolution():
    mesh = S.make_mesh({"data": -1, "model": 2})
    assert dict(zip(mesh.axis_names, mesh.axis_sizes)) == {"data": 4, "model": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="need 12 devices"):
        S.make_mesh({"data": 6, "model": 2})
    with pytest.raises(ValueError, match="at most one axis"):
        S.make_mesh({"data": -1, "model": -1})
    mesh = S.make_mesh(MESHES["fsdp"])
    # mesh axis used once per array; trailing axes dropped when they do not divide
    assert S.logical_to_spec(("batch", "length", "embed"), mesh) == P(("data", "fsdp"), None, None)
    assert S.logical_to_spec(("embed", "mlp"), mesh, shape=(32, 64)) == P("fsdp", "model")
    assert S.logical_to_spec(("vocab", "embed"), mesh, shape=(95, 32)) == P(None, "fsdp")
    assert S.logical_to_spec(("batch",), mesh, shape=(6,)) == P("data")
    with pytest.raises(ValueError, match="no sharding rule"):
        S.logical_to_spec(("nonsense",), mesh)
    custom = (("embed", None), ("mlp", ("model", "fsdp")))
    assert S.logical_to_spec(("embed", "mlp"), mesh, custom, shape=(32, 64)) == P(None, ("model", "fsdp"))
    assert S.batch_sharding(mesh).spec == P(("data", "fsdp"), None)


def test_auto_axes_makes_any_mesh_auto():
    explicit = jax.make_mesh((4, 2), ("data", "model"))  # JAX's default axis types: Explicit
    assert all(t == jax.sharding.AxisType.Explicit for t in explicit.axis_types)
    auto = S.auto_axes(explicit)
    assert all(t == jax.sharding.AxisType.Auto for t in auto.axis_types)
    assert auto.axis_names == explicit.axis_names and (auto.devices == explicit.devices).all()
    assert S.auto_axes(auto) is auto and S.auto_axes(None) is None
    assert S.batch_sharding(explicit).mesh == auto  # every sharding kd_flax builds is on the Auto mesh


@pytest.mark.parametrize("mesh_name,scan", [("data4_model2", False), ("fsdp", True)])
def test_every_param_resolves_and_is_created_sharded(mesh_name, scan):
    mesh = S.make_mesh(MESHES[mesh_name])
    cfg = tiny_config("t5", feed_forward_proj="gated-gelu", scan_layers=scan)
    model = S.create_sharded_model(lambda: create_model(cfg, nnx.Rngs(0)), mesh)
    specs = S.describe(nnx.state(model), mesh)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = "/".join(map(str, path))
        axes = L.logical_axes_of(var)
        assert axes is not None and len(axes) == var.get_value().ndim, key  # every param is annotated
        arr = var.get_value()
        assert arr.sharding.spec == specs[key], key
        # directly sharded: each device holds only its slice
        shard_shape = arr.sharding.shard_shape(arr.shape)
        assert all(s.data.shape == shard_shape for s in arr.addressable_shards), key
    pre = "encoder/layers/" + ("" if scan else "0/")
    fsdp = "fsdp" if mesh_name == "fsdp" else None
    lead = (None,) if scan else ()
    assert specs[pre + "mlp/wi_0/kernel"] == P(*lead, fsdp, "model")
    assert specs[pre + "self_attn/out_proj/kernel"] == P(*lead, "model", fsdp)
    assert specs["lm_head/kernel"] == P(fsdp, "model")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("shard"), "t5")


@pytest.mark.parametrize("mesh_name", ["fsdp"])  # data × fsdp × model covers the data × model case
def test_sharded_load_and_forward_equal_single_device(ckpt, mesh_name):
    path, _ = ckpt
    mesh = S.make_mesh(MESHES[mesh_name])
    single = load_pretrained(path)
    sharded = load_pretrained(path, mesh=mesh)
    emb = sharded.embed_tokens.embedding[...]
    assert emb.sharding.spec == P("model", "fsdp" if mesh_name == "fsdp" else None)
    assert len(emb.addressable_shards) == 8 and emb.addressable_shards[0].data.shape[0] == emb.shape[0] // 2

    b = {k: jnp.asarray(v) for k, v in make_batch(7, batch=4, vocab=96).items()}
    ref = nnx.jit(lambda m, b: m(**b))(single, b)

    graphdef, state = nnx.split(sharded)
    state_sh = S.param_shardings(state, mesh)
    in_sh = S.batch_sharding(mesh)
    b = jax.device_put(b, in_sh)

    def fwd(state, b):
        m = nnx.merge(graphdef, state)
        enc = m.encode(b["input_ids"], b["attention_mask"])
        cache = m.init_cache(b["input_ids"].shape[0], 2, enc, b["attention_mask"])
        step, cache = m.decode(b["decoder_input_ids"][:, :1], enc, b["attention_mask"], cache=cache)
        full = m(**b)
        return full, step, cache

    with jax.set_mesh(mesh):
        out, step, cache = jax.jit(fwd, in_shardings=(state_sh, in_sh))(state, b)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # an existing single-device model moved onto the mesh gets the same layout
    moved = S.shard_model(single, mesh)
    assert moved.embed_tokens.embedding[...].sharding.spec == emb.sharding.spec
    np.testing.assert_array_equal(moved.embed_tokens.embedding[...], emb)
    np.testing.assert_allclose(step[:, 0], ref[:, 0], rtol=1e-4, atol=1e-4)
    assert out.sharding.spec[0] in ("data", ("data", "fsdp"))  # batch stays split over data
    assert cache["layers"][0]["self"]["k"].sharding.spec[0] in ("data", ("data", "fsdp"))


from hypothesis import given, settings, strategies as st  # noqa: E402

_NAMES = ["batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers", "rel_pos", None]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_NAMES), st.integers(1, 24)), min_size=1, max_size=4),
       st.sampled_from(list(MESHES)))
def test_resolved_specs_are_always_valid(dims, mesh_name):
    """Any logical axes + shape resolve to a spec that uses each mesh axis at most once and
    only where it divides the dimension (so NamedSharding never rejects it)."""
    mesh = S.make_mesh(MESHES[mesh_name])
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes, shape = zip(*dims)
    spec = S.logical_to_spec(axes, mesh, shape=shape)
    used = []
    for d, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        entry = () if entry is None else ((entry,) if isinstance(entry, str) else entry)
        assert d % int(np.prod([sizes[a] for a in entry])) == 0
        used += list(entry)
    assert len(used) == len(set(used))
    jax.sharding.NamedSharding(mesh, spec).shard_shape(shape)  # accepted by JAX


def test_compiler_options_cpu_default_and_user_override(monkeypatch):
    from kd_flax import sharding
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    opts = sharding.compiler_options()
    assert opts == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    f = jax.jit(lambda a, b: jax.nn.log_softmax(a @ b), compiler_options=opts)  # XLA accepts it
    a = np.ones((4, 8), np.float32)
    np.testing.assert_allclose(f(a, a.T), jax.nn.log_softmax(a @ a.T), rtol=1e-6)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    assert sharding.compiler_options() is None  # the user's own setting wins


def test_generate_inside_a_callers_jit():
    # Compiler options are for top-level jits only: generate() nested in a jit must not pass them.
    from flax import nnx
    from kd_flax import decoding, models
    model = models.create_model(models.T5Config(vocab_size=32, d_model=16, d_kv=4, d_ff=32, encoder_layers=1,
                                                decoder_layers=1, num_heads=2), nnx.Rngs(0))
    ids = np.full((2, 5), 3, np.int32)
    eager = decoding.generate(model, ids, max_new_tokens=4).sequences
    nested = jax.jit(lambda x: decoding.generate(model, x, max_new_tokens=4).sequences)(ids)
    np.testing.assert_array_equal(eager, nested)


def test_train_compiler_options_cpu_default_and_user_override(monkeypatch):
    """Train steps ask XLA:CPU for region-analysis copy insertion (fewer copies of the donated
    state); XLA accepts the option on a donating jit, and the user's XLA_FLAGS win."""
    from kd_flax import sharding
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    opts = sharding.train_compiler_options()
    assert opts == {"xla_cpu_copy_insertion_use_region_analysis": True}
    f = jax.jit(lambda s, g: jax.tree.map(lambda a, b: a - 0.5 * b, s, g), donate_argnums=(0,),
                compiler_options=opts)
    out = f({"w": jnp.ones((4, 8))}, {"w": jnp.full((4, 8), 2.0)})
    np.testing.assert_array_equal(np.asarray(out["w"]), np.zeros((4, 8), np.float32))
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_copy_insertion_use_region_analysis=false")
    assert sharding.train_compiler_options() is None
