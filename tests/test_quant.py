"""Tests for kd_flax.quant against torch's fake-quant kernels and NumPy references."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from kd_flax import int_weights as W
from kd_flax import quant as Q
from kd_flax.tree_paths import path_str

SETTINGS = settings(max_examples=8, deadline=None)


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        a.view(np.uint8), b.view(np.uint8))


def _np_scale(amax, qmax):
    # The library's documented scale: absmax * fl32(1 / qmax).
    return (np.float32(amax) * (np.float32(1) / np.float32(qmax))).astype(np.float32)


# ----------------------------------------------------------------------------- vs torch


@SETTINGS
@given(seed=st.integers(0, 2**16), rows=st.sampled_from([1, 5]), cols=st.sampled_from([3, 8]),
       bits=st.sampled_from([8, 4]), axis=st.sampled_from([None, 0, -1]))
def test_fake_quant_matches_torch(seed, rows, cols, bits, axis):
    x = np.random.RandomState(seed).standard_normal((rows, cols)).astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    tx = torch.tensor(x)
    if axis is None:
        scale = _np_scale(np.abs(x).max(), qmax)
        ref = torch.fake_quantize_per_tensor_affine(tx, float(scale), 0, -qmax, qmax)
    else:
        ax = axis % 2
        scale = _np_scale(np.abs(x).max(axis=1 - ax), qmax)
        ref = torch.fake_quantize_per_channel_affine(
            tx, torch.tensor(scale), torch.zeros(scale.shape, dtype=torch.int32), ax, -qmax, qmax)
    out = Q.fake_quant(x, bits, axis=axis)
    assert _bits_equal(out, ref.numpy())
    # the grid really is the narrow signed range
    if axis is None:
        codes = np.asarray(out) / scale
        assert np.abs(codes).max() <= qmax + 1e-4
        assert np.allclose(codes, np.round(codes), atol=1e-3)


def test_round_half_to_even_like_torch():
    # clip=7 at 4 bits gives scale exactly 1, so the inputs are exact ties.
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 3.49, 9.0], np.float32)
    out = np.asarray(Q.fake_quant(x, 4, clip=7.0))
    np.testing.assert_array_equal(out, [0, 2, 2, 0, -2, 3, 7])
    ref = torch.fake_quantize_per_tensor_affine(torch.tensor(x), 1.0, 0, -7, 7).numpy()
    assert _bits_equal(out, ref)
    assert not np.signbit(out[3])  # -0.5 -> +0.0, like the integer export


def test_asymmetric_matches_numpy_and_torch():
    rng = np.random.RandomState(3)
    x = (rng.standard_normal((4, 6)) + 0.7).astype(np.float32)
    for bits, axis in [(8, None), (4, None), (4, -1)]:
        qmax = 2**bits - 1
        red = None if axis is None else 0
        lo = np.minimum(x.min(axis=red, keepdims=axis is not None), 0)
        hi = np.maximum(x.max(axis=red, keepdims=axis is not None), 0)
        scale = _np_scale(hi - lo, qmax)
        zp = np.clip(np.round(-lo / scale), 0, qmax).astype(np.float32)
        inv = (np.float32(1) / scale).astype(np.float32)
        ref = ((np.clip(np.round(x * inv) + zp, 0, qmax) - zp) * scale).astype(np.float32)
        out = Q.fake_quant(x, bits, axis=axis, symmetric=False)
        assert _bits_equal(out, ref)
        if axis is None:
            t = torch.fake_quantize_per_tensor_affine(
                torch.tensor(x), float(scale), int(zp), 0, qmax).numpy()
            assert _bits_equal(out, t)
        # the error is at most half a step; zero is exact
        assert np.all(np.abs(np.asarray(out) - x) <= scale / 2 + 1e-6)
    assert float(Q.fake_quant(jnp.array([0.0, 1.0, 3.0]), 4, symmetric=False)[0]) == 0.0


def test_fixed_clip_values():
    x = np.array([-3.0, -1.0, -0.2, 0.0, 0.4, 1.0, 2.5], np.float32)
    out = np.asarray(Q.fake_quant(x, 8, clip=1.0))
    scale = _np_scale(1.0, 127)
    ref = np.clip(np.round(x * (np.float32(1) / scale)), -127, 127) * scale
    assert _bits_equal(out, ref.astype(np.float32))
    assert out.max() == pytest.approx(1.0, abs=1e-6) and out.min() == pytest.approx(-1.0, abs=1e-6)
    out_a = np.asarray(Q.fake_quant(x, 8, symmetric=False, clip=(-1.0, 2.0)))
    assert out_a.min() >= -1.0 - 1e-6 and out_a.max() <= 2.0 + 1e-6


# ----------------------------------------------------------------------------- STE


def test_ste_gradients():
    x = jnp.array([-3.0, -1.0, -0.99, 0.0, 0.3, 1.0, 1.01, 2.0])
    g = jax.grad(lambda v: jnp.sum(Q.fake_quant(v, 8, clip=1.0) * jnp.arange(8.0)))(x)
    mask = (np.abs(np.asarray(x)) <= 1.0).astype(np.float32)
    np.testing.assert_array_equal(g, mask * np.arange(8.0))
    ga = jax.grad(lambda v: jnp.sum(Q.fake_quant(v, 4, symmetric=False, clip=(-1.0, 1.5))))(x)
    np.testing.assert_array_equal(ga, ((x >= -1.0) & (x <= 1.5)).astype(np.float32))
    # dynamic range: everything is inside, identity gradient (absmax element included)
    for fn in (lambda v: Q.fake_quant(v, 4, axis=-1), lambda v: Q.ternary_quant(v),
               lambda v: Q.fake_quant(v, 8, symmetric=False),
               lambda v: Q.fake_quant_activation(v, 8)):
        w = jnp.asarray(np.random.RandomState(0).standard_normal((3, 4)), jnp.float32)
        np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(fn(v) * 2.0))(w), 2.0)
    # also inside jit, and in bfloat16
    gb = jax.jit(jax.grad(lambda v: jnp.sum(Q.fake_quant(v, 8, clip=1.0)).astype(jnp.float32)))(
        x.astype(jnp.bfloat16))
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(gb, np.float32), mask)


def test_zero_tensor_no_nan():
    z = jnp.zeros((3, 4))
    for fn in (lambda v: Q.fake_quant(v, 8), lambda v: Q.fake_quant(v, 4, axis=-1),
               lambda v: Q.fake_quant(v, 8, symmetric=False), lambda v: Q.ternary_quant(v, axis=0),
               lambda v: Q.fake_quant_activation(v, 8)):
        out = fn(z)
        assert np.all(np.asarray(out) == 0)
        assert np.all(np.isfinite(jax.grad(lambda v: jnp.sum(fn(v)))(z)))
    # one all-zero channel among non-zero ones
    w = jnp.array([[0.0, 1.0], [0.0, -1.0]])
    np.testing.assert_allclose(Q.fake_quant(w, 8, axis=-1), w)


# ----------------------------------------------------------------------------- ternary


def _np_ternary(w, axis):
    w = np.asarray(w, np.float64)
    red = None if axis is None else tuple(a for a in range(w.ndim) if a != axis % w.ndim)
    a = np.abs(w)
    delta = 0.7 * a.mean(axis=red, keepdims=True)
    m = a > delta
    alpha = (a * m).sum(axis=red, keepdims=True) / np.maximum(m.sum(axis=red, keepdims=True), 1)
    return np.sign(w) * m * alpha, delta, alpha


@pytest.mark.parametrize("axis", [None, -1, 0])
def test_ternary_matches_numpy(axis):
    w = np.random.RandomState(1).standard_normal((6, 5)).astype(np.float32)
    ref, delta, alpha = _np_ternary(w, axis)
    out = np.asarray(Q.ternary_quant(w, axis=axis))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    # at most three values per channel: {-alpha, 0, alpha}
    cols = [out] if axis is None else np.moveaxis(out, axis, 0)
    for c in cols:
        assert len(np.unique(np.abs(c))) <= 2
    # the threshold really is 0.7 mean|w|: entries just under it become 0
    zeroed = np.abs(w) <= delta
    assert np.all(out[zeroed] == 0) and np.all(out[~zeroed] != 0)


# ----------------------------------------------------------------------------- LSQ / PACT


@pytest.mark.parametrize("bits,signed", [(4, True), (8, False)])
def test_lsq_forward_and_gradients(bits, signed):
    rng = np.random.RandomState(2)
    x = rng.standard_normal(40).astype(np.float32) * 2
    step = np.float32(0.37)
    cot = rng.standard_normal(40).astype(np.float32)
    qn, qp = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    out, vjp = jax.vjp(lambda a, s: Q.lsq_quant(a, s, bits, signed=signed), jnp.asarray(x), step)
    gx, gs = vjp(jnp.asarray(cot))
    v = x.astype(np.float64) / step
    np.testing.assert_allclose(out, np.round(np.clip(v, qn, qp)) * step, rtol=1e-6, atol=1e-6)
    inside = (v >= qn) & (v <= qp)
    assert (~inside).any() and inside.any()
    np.testing.assert_allclose(gx, cot * inside, atol=1e-7)
    g = 1 / np.sqrt(x.size * qp)
    dstep = np.where(inside, np.round(v) - v, np.where(v < qn, qn, qp))
    np.testing.assert_allclose(gs, g * np.sum(cot * dstep), rtol=1e-4, atol=1e-6)
    # per-channel steps get per-channel gradients
    xs = x.reshape(4, 10)
    steps = jnp.full((4, 1), 0.37)
    gsc = jax.grad(lambda s: jnp.sum(Q.lsq_quant(xs, s, bits, signed=signed) * cot.reshape(4, 10)))(
        steps)
    assert gsc.shape == (4, 1)
    g10 = 1 / np.sqrt(10 * qp)
    np.testing.assert_allclose(gsc[:, 0], g10 * np.sum((cot * dstep).reshape(4, 10), 1),
                               rtol=1e-4, atol=1e-6)
    assert float(Q.lsq_init_step(x, bits, signed=signed)) == pytest.approx(
        2 * np.abs(x).mean() / np.sqrt(qp), rel=1e-5)


@pytest.mark.parametrize("signed", [False, True])
def test_pact_forward_and_gradients(signed):
    x = np.array([-2.0, -1.2, -0.3, 0.0, 0.2, 0.77, 1.2, 3.0], np.float32)
    alpha, bits = np.float32(1.0), 4
    cot = np.arange(1, 9, dtype=np.float32)
    out, vjp = jax.vjp(lambda a, al: Q.pact_quant(a, al, bits, signed=signed), jnp.asarray(x), alpha)
    gx, ga = vjp(jnp.asarray(cot))
    levels = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    lo = -alpha if signed else 0.0
    y = np.clip(x.astype(np.float64), lo, alpha)
    np.testing.assert_allclose(out, np.round(y * levels / alpha) * alpha / levels, atol=1e-6)
    inside = (x > lo) & (x < alpha)
    np.testing.assert_array_equal(gx, cot * inside)
    da = (x >= alpha).astype(np.float32) - (signed * (x <= -alpha)).astype(np.float32)
    assert float(ga) == pytest.approx(float(np.sum(cot * da)))


# ----------------------------------------------------------------------------- activations


def test_fake_quant_activation():
    x = jnp.asarray(np.random.RandomState(0).standard_normal((2, 3, 8)), jnp.float32)
    assert Q.fake_quant_activation(x, None) is x
    y = Q.fake_quant_activation(x, 8)
    assert _bits_equal(y, Q.fake_quant(x, 8))
    assert not np.array_equal(y, x)
    assert len(np.unique(np.asarray(y))) <= 255


# ----------------------------------------------------------------------------- rules / paths


def test_path_str_and_default_rules():
    @dataclasses.dataclass
    class Box:
        w: object

    jax.tree_util.register_dataclass(Box, data_fields=["w"], meta_fields=[])
    tree = {"a": [np.zeros(1), (np.zeros(1),)], "b": Box(np.zeros(1))}
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert paths == ["a/0", "a/1/0", "b/w"]

    rules = Q.default_rules(8)
    quantized = [
        "encoder/layers/0/self_attn/q_proj/kernel", "decoder/layers/1/fc1/kernel",
        "lm_head/kernel", "shared/embed_tokens/embedding", "encoder/embed_tokens/embedding"]
    kept = [
        "encoder/layers/0/self_attn/q_proj/bias", "encoder/layers/0/self_attn_layer_norm/scale",
        "encoder/final_norm/scale", "decoder/embed_positions/embedding",
        "encoder/layers/0/self_attn/relative_attention_bias/embedding", "kernel_norm/scale"]
    params = {p: np.ones((2, 3), np.float32) for p in quantized + kept}
    assert sorted(Q.matched_paths(params, rules)) == sorted(quantized)
    assert Q.matched_paths(params, rules)["lm_head/kernel"].axis == -1
    assert Q.matched_paths(params, rules)["shared/embed_tokens/embedding"].axis == 0
    assert all(r.mode == "ternary" and r.bits == 2 for r in Q.default_rules(2))
    assert all(r.axis is None for r in Q.default_rules(4, granularity="tensor"))
    # scanned stacks: one scale per (layer, output channel); unstacked kernels unchanged
    stacked = {"encoder/layers/fc1/kernel": np.ones((3, 2, 4), np.float32),
               "encoder/layers/0/fc1/kernel": np.ones((2, 4), np.float32)}
    m = Q.matched_paths(stacked, Q.default_rules(8, scan_layers=True))
    assert m["encoder/layers/fc1/kernel"].axis == (0, -1)
    assert m["encoder/layers/0/fc1/kernel"].axis == -1
    # bits=None excludes a path before a broader rule; fullmatch, not search
    excl = (Q.QuantRule("lm_head/kernel", bits=None),) + rules
    assert "lm_head/kernel" not in Q.matched_paths(params, excl)
    assert not Q.QuantRule("kernel").matches("lm_head/kernel")


def test_invalid_arguments_raise():
    x = jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
        Q.fake_quant(x, 3)
    with pytest.raises(ValueError, match=r"\(8, None\)"):
        Q.fake_quant_activation(x, 4)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
        Q.QuantRule(".*", bits=16)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
        Q.default_rules(1)
    with pytest.raises(ValueError, match="symmetric.*asymmetric.*ternary"):
        Q.QuantRule(".*", mode="log")
    with pytest.raises(ValueError, match="ternary"):
        Q.QuantRule(".*", bits=8, mode="ternary")
    with pytest.raises(ValueError, match="granularity"):
        Q.default_rules(8, granularity="row")
    with pytest.raises(ValueError, match="axis"):
        Q.fake_quant(x, 8, axis=2)
    with pytest.raises(ValueError, match="clip"):
        Q.fake_quant(x, 8, symmetric=False, clip=1.0)
    with pytest.raises(ValueError, match="pattern"):
        Q.QuantRule("(", bits=8)
    with pytest.raises(ValueError, match="w/kernel"):  # the parameter is named
        Q.quantize_params({"w": {"kernel": jnp.ones(3)}}, [Q.QuantRule(".*kernel", 8, axis=1)])


# ----------------------------------------------------------------------------- nnx model


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(11, 8, rngs=rngs)
        self.embed_positions = nnx.Embed(6, 8, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 8, rngs=rngs)])
        self.final_norm = nnx.LayerNorm(8, rngs=rngs)
        self.lm_head = nnx.Linear(8, 11, rngs=rngs)

    def __call__(self, ids):
        h = self.embed_tokens(ids) + self.embed_positions(jnp.arange(ids.shape[-1]))
        h = jax.nn.relu(self.layers[0](h))
        return self.lm_head(self.final_norm(self.layers[1](h)))


def _tiny_state():
    # Abstract init + NumPy values: no initializer compilations. Biases and norm params are
    # random too, so "left alone" is a real check.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
    rng = np.random.RandomState(0)
    state = jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape).astype(np.float32) * 0.5), state)
    return graphdef, state


def test_quantize_params_on_nnx_state():
    graphdef, state = _tiny_state()
    rules = Q.default_rules(4)
    qstate = Q.quantize_params(state, rules)
    assert type(qstate) is type(state)
    changed = {}
    for (kp, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(state),
                               jax.tree_util.tree_leaves_with_path(qstate)):
        changed[path_str(kp)] = not np.array_equal(a, b)
    assert changed == {
        "embed_positions/embedding": False, "embed_tokens/embedding": True,
        "final_norm/bias": False, "final_norm/scale": False,
        "layers/0/bias": False, "layers/0/kernel": True, "layers/1/bias": False,
        "layers/1/kernel": True, "lm_head/bias": False, "lm_head/kernel": True}
    k = np.asarray(qstate["layers"][0]["kernel"][...])
    assert all(len(np.unique(k[:, j])) <= 15 for j in range(k.shape[1]))  # 4-bit grid

    ids = jnp.array([[1, 2, 3, 4, 5]])

    @functools.partial(jax.jit, static_argnums=1)
    def forward(st, quant):
        st = Q.quantize_params(st, rules) if quant else st
        return nnx.merge(graphdef, st)(ids)

    @functools.partial(jax.jit, static_argnums=1)
    def grad(st, quant):
        return jax.grad(lambda s: jnp.sum(forward(s, quant) ** 2))(st)

    f_float = forward(state, False)
    f_quant = forward(state, True)
    assert not np.allclose(f_float, f_quant, atol=1e-3)
    np.testing.assert_allclose(f_quant, forward(qstate, False), rtol=1e-5, atol=1e-6)

    # STE: d loss / d full-precision params = d loss / d quantized params
    g_fp = grad(state, True)
    g_q = grad(qstate, False)
    for a, b in zip(jax.tree.leaves(g_fp), jax.tree.leaves(g_q)):
        # the two programs fuse differently: float32 reassociation noise only
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
    assert float(jnp.abs(g_fp["layers"][0]["kernel"][...]).sum()) > 0


# ----------------------------------------------------------------------------- packing / export


@SETTINGS
@given(bits=st.sampled_from([2, 4, 8]), signed=st.booleans(), n=st.integers(1, 37),
       seed=st.integers(0, 1000))
def test_pack_unpack_round_trip(bits, signed, n, seed):
    rng = np.random.RandomState(seed)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    q = rng.randint(lo, hi + 1, size=n).astype(np.int8 if signed else np.uint8)
    packed = W.pack_bits(q, bits)
    assert packed.nbytes == -(-n * bits // 8)
    np.testing.assert_array_equal(W.unpack_bits(packed, bits, n, signed=signed), q)


@pytest.mark.parametrize("rules", [
    Q.default_rules(8), Q.default_rules(4, granularity="tensor"), Q.default_rules(2),
    (Q.QuantRule("layers/0/kernel", 2, axis=-1, mode="symmetric"),
     Q.QuantRule(".*kernel", 4, axis=-1, mode="asymmetric"),
     Q.QuantRule(".*embed_tokens/embedding", 8, axis=None, mode="asymmetric")),
], ids=["w8", "w4-tensor", "ternary", "mixed"])
def test_export_dequantize_is_bit_exact(rules, tmp_path):
    _, state = _tiny_state()
    # a bfloat16 leaf too: cast back the same way
    state["lm_head"]["kernel"].set_value(state["lm_head"]["kernel"][...].astype(jnp.bfloat16))
    ref = Q.quantize_params(state, rules)
    exported = W.export_quantized(state, rules)
    for back in (exported, None):
        if back is None:
            W.save_quantized(exported, tmp_path / "q.safetensors")
            back = W.load_quantized(tmp_path / "q.safetensors")
        deq = W.dequantize(back, like=state)
        assert type(deq) is type(state)
        for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(deq)):
            assert _bits_equal(a, b)
        pure = W.dequantize(back)
        assert _bits_equal(pure["layers"][1]["kernel"], ref["layers"][1]["kernel"][...])
        assert _bits_equal(pure["final_norm"]["scale"], state["final_norm"]["scale"][...])
    # the jitted fake-quant (what the train step runs) matches the export too
    jref = jax.jit(lambda s: Q.quantize_params(s, rules))(state)
    for a, b in zip(jax.tree.leaves(jref), jax.tree.leaves(W.dequantize(exported, like=state))):
        assert _bits_equal(a, b)


def test_export_byte_size():
    w = jnp.asarray(np.random.RandomState(0).standard_normal((256, 128)), jnp.float32)
    params = {"fc": {"kernel": w, "bias": jnp.zeros(128)}}
    fp = w.size * 4
    sizes = {}
    for bits in (8, 4, 2):
        ex = W.export_quantized(params, Q.default_rules(bits))
        t = ex["fc/kernel"]
        assert t.codes.nbytes == w.size * bits // 8
        assert t.scale.shape == (1, 128)
        assert W.exported_nbytes(ex) == w.size * bits // 8 + 128 * 4 + 128 * 4
        sizes[bits] = t.nbytes / fp
    assert sizes[4] == pytest.approx(1 / 8, rel=0.05)
    assert sizes[8] == pytest.approx(1 / 4, rel=0.05)
    assert sizes[2] == pytest.approx(1 / 16, rel=0.1)
    assert W.export_quantized(params, Q.default_rules(8))["fc/kernel"].codes.dtype == np.int8


def test_load_rejects_foreign_file(tmp_path):
    from safetensors.numpy import save_file

    p = tmp_path / "other.safetensors"
    save_file({"a": np.zeros(2, np.float32)}, str(p))
    with pytest.raises(ValueError, match="format"):
        W.load_quantized(p)


# ----------------------------------------------------------------------------- rules_for: the one home


def test_rules_for_reads_bits_granularity_and_the_models_scan_layers():
    from kd_flax import models

    def model(scan):
        return models.create_model(models.tiny_config("t5", vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_heads=2,
                                                      encoder_layers=2, decoder_layers=2, scan_layers=scan),
                                   nnx.Rngs(0))

    flat, scanned = model(False), model(True)
    assert Q.rules_for(flat, {"weight_bits": 0, "granularity": "channel"}) is None
    assert Q.rules_for(flat, None) is None
    assert Q.rules_for(flat, {"weight_bits": 4, "granularity": "tensor"}) == Q.default_rules(4, granularity="tensor")
    assert Q.rules_for(scanned, {"weight_bits": 8}) == Q.default_rules(8, scan_layers=True)


def test_evaluate_quantizes_a_scanned_student_as_training_did():
    """A `scan_layers=True` W8 student: evaluate's quantized weights and size are those of the
    rules training used (one scale per layer and output channel), not per channel across
    all stacked layers."""
    from kd_flax import evaluate, models
    cfg = models.tiny_config("t5", vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_heads=2,
                             encoder_layers=3, decoder_layers=2, scan_layers=True)
    m = models.create_model(cfg, nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    # layers with very different scales, so a scale shared across layers shows
    state = jax.tree_util.tree_map_with_path(
        lambda p, x: x * (10.0 ** jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (x.ndim - 1)))
        if "/layers/" in path_str(p) and path_str(p).endswith("kernel") else x, state)
    nnx.update(m, state)
    trained_with = Q.default_rules(8, scan_layers=True)  # what stages.run_distill trains this student with
    want = Q.quantize_params(state, trained_with)
    qcfg = {"weight_bits": 8, "granularity": "channel"}
    n, size = evaluate.param_bytes(m, qcfg)
    assert evaluate.apply_weight_quant(m, qcfg)
    for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param)), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path_str(p))
    quantized = Q.matched_paths(state, trained_with)
    leaves = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(state)}
    assert n == sum(x.size for x in leaves.values())
    assert size == sum(x.size * (1 if p in quantized else 4) for p, x in leaves.items())
