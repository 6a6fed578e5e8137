"""kd_flax.losses against float64 NumPy references written from the formulas, torch, and
finite differences; plus the robustness rules (masks, -inf logits) and the ValueErrors."""

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kd_flax import fused_kd as F
from kd_flax import losses as L

SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RTOL, ATOL = 2e-4, 2e-4


# ----------------------------------------------------------------------------- references


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def np_xlogy_kl(p, log_p, log_q):
    """sum_v p (log p - log q) with 0 log 0 = 0 (p given as probabilities)."""
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def np_reduce(per, w):
    with np.errstate(invalid="ignore"):
        per = np.where(w != 0, per, 0.0) * w
    return per.sum(), w.sum(), per


def ref_cross_entropy(logits, labels, w, eps, smoothing):
    """Cross-entropy against the explicit smoothed target distribution."""
    log_p = np_log_softmax(logits)
    finite = np.isfinite(np.asarray(logits, np.float64))
    n_finite = finite.sum(-1, keepdims=True)
    onehot = np.eye(logits.shape[-1])[np.clip(labels, 0, None)]
    with np.errstate(invalid="ignore", divide="ignore"):  # dead all -inf rows: V' = 0
        if smoothing == "fairseq":  # 1-eps on the label, eps/(V'-1) on every other finite entry
            target = (1 - eps) * onehot + eps / np.maximum(n_finite - 1, 1) * finite * (1 - onehot)
        else:  # (1-eps) onehot + eps/V' on the finite entries
            target = (1 - eps) * onehot + eps / n_finite * finite
    with np.errstate(invalid="ignore"):
        per = np.where(target > 0, -target * log_p, 0.0).sum(-1)
    return np_reduce(per, w * (labels >= 0))


def ref_kd_kl(s, t, w, temp):
    log_q, log_p = np_log_softmax(np.float64(s) / temp), np_log_softmax(np.float64(t) / temp)
    return np_reduce(temp**2 * np_xlogy_kl(np.exp(log_p), log_p, log_q), w)


def ref_reverse_kl(s, t, w, temp):
    log_q, log_p = np_log_softmax(np.float64(s) / temp), np_log_softmax(np.float64(t) / temp)
    return np_reduce(temp**2 * np_xlogy_kl(np.exp(log_q), log_q, log_p), w)


def ref_interpolated(s, t, labels, w, lam, temp):
    log_q = np_log_softmax(np.float64(s) / temp)
    p = np.exp(np_log_softmax(np.float64(t) / temp))
    r = lam * np.eye(s.shape[-1])[np.clip(labels, 0, None)] + (1 - lam) * p
    with np.errstate(divide="ignore"):
        log_r = np.log(r)
    return np_reduce(temp**2 * np_xlogy_kl(r, log_r, log_q), w * (labels >= 0))


def ref_jsd(s, t, w, beta, temp):
    q = np.exp(np_log_softmax(np.float64(s) / temp))
    p = np.exp(np_log_softmax(np.float64(t) / temp))
    m = beta * p + (1 - beta) * q
    with np.errstate(divide="ignore"):
        lp, lq, lm = np.log(p), np.log(q), np.log(m)
    per = beta * np_xlogy_kl(p, lp, lm) + (1 - beta) * np_xlogy_kl(q, lq, lm)
    return np_reduce(temp**2 * per, w)


def ref_topk(s, lp, ids, w, temp):
    log_q = np_log_softmax(np.float64(s) / temp)
    log_p = np_log_softmax(np.float64(lp) / temp)
    log_q_k = np.take_along_axis(log_q, np.clip(ids, 0, s.shape[-1] - 1), -1)
    return np_reduce(temp**2 * np_xlogy_kl(np.exp(log_p), log_p, log_q_k), w)


def ref_hidden(s, t, w):
    return np_reduce(((np.float64(s) - np.float64(t)) ** 2).mean(-1), w)


def ref_attention(s, t, qw, kw):
    s, t = np.float64(s), np.float64(t)
    *lead, heads, tq, tk = s.shape
    per = np.zeros(tuple(lead) + (tq,))
    for idx in np.ndindex(*lead, tq):
        b, q = idx[:-1], idx[-1]
        if qw[idx] == 0 or kw[b].sum() == 0:
            continue
        for h in range(heads):
            keys = [k for k in range(tk) if kw[b + (k,)] != 0]
            sq = [(s[b + (h, q, k)] - t[b + (h, q, k)]) ** 2 * kw[b + (k,)] for k in keys]
            per[idx] += sum(sq) / kw[b].sum() / heads
    return np_reduce(per, qw)


# ----------------------------------------------------------------------------- data


@st.composite
def cases(draw):
    """Student/teacher logits, labels, mask with garbage in dead rows, maybe -inf vocab."""
    # Few distinct shapes: every new shape costs compilations, the values vary per example.
    lead = draw(st.sampled_from([(3,), (2, 3)]))
    vocab = draw(st.sampled_from([2, 6]))
    mask_kind = draw(st.sampled_from(["none", "bool", "float"]))
    neg_inf = draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = (rng.normal(size=lead + (vocab,)) * 2).astype(np.float32)
    t = (rng.normal(size=lead + (vocab,)) * 2).astype(np.float32)
    labels = rng.integers(0, vocab, size=lead)
    if mask_kind == "none":
        mask, w = None, np.ones(lead)
    elif mask_kind == "bool":
        mask = rng.random(lead) < 0.7
        w = mask.astype(np.float64)
    else:
        mask = (rng.random(lead) * (rng.random(lead) < 0.7)).astype(np.float32)
        w = mask.astype(np.float64)
    if neg_inf and vocab > 2:  # a masked vocab entry per row, the same for both models
        for idx in np.ndindex(*lead):
            banned = (labels[idx] + 1 + rng.integers(0, vocab - 1)) % vocab
            s[idx + (banned,)] = t[idx + (banned,)] = -np.inf
    dead = w == 0
    s[dead] = -np.inf  # garbage rows: all -inf
    t[dead] = np.where(rng.random(t[dead].shape) < 0.5, -np.inf, 1e4)
    labels = np.where(rng.random(lead) < 0.15, -100, labels)
    return s, t, labels, mask, w


def check(got, ref):
    assert np.isfinite(np.asarray(got[0])) and np.isfinite(np.asarray(got[1]))
    np.testing.assert_allclose(np.asarray(got[0]), ref[0], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(got[1]), ref[1], rtol=1e-6)


# ----------------------------------------------------------------------------- vs references


@SETTINGS
@given(cases(), st.sampled_from([0.0, 0.1, 0.3]), st.sampled_from(["fairseq", "uniform"]))
def test_cross_entropy_reference(case, eps, smoothing):
    s, _, labels, mask, w = case
    got = L.cross_entropy(s, labels, mask, label_smoothing=eps, smoothing=smoothing)
    ref = ref_cross_entropy(s, labels, w, eps, smoothing)
    check(got, ref)
    per = L.cross_entropy(s, labels, mask, label_smoothing=eps, smoothing=smoothing, reduce=False)
    np.testing.assert_allclose(np.asarray(per), ref[2], rtol=RTOL, atol=ATOL)
    assert np.all(np.asarray(per)[(w == 0) | (labels < 0)] == 0)


@SETTINGS
@given(cases(), st.sampled_from([1.0, 2.0, 0.5]))
def test_kd_kl_and_reverse_reference(case, temp):
    s, t, _, mask, w = case
    check(L.kd_kl(s, t, mask, temperature=temp), ref_kd_kl(s, t, w, temp))
    check(L.reverse_kl(s, t, mask, temperature=temp), ref_reverse_kl(s, t, w, temp))
    per = L.kd_kl(s, t, mask, temperature=temp, reduce=False)
    np.testing.assert_allclose(np.asarray(per), ref_kd_kl(s, t, w, temp)[2], rtol=RTOL, atol=ATOL)


@SETTINGS
@given(cases(), st.sampled_from([0.0, 0.3, 1.0]), st.sampled_from([1.0, 2.0]))
def test_interpolated_kl_reference(case, lam, temp):
    s, t, labels, mask, w = case
    check(
        L.interpolated_kl(s, t, labels, mask, lam=lam, temperature=temp),
        ref_interpolated(s, t, labels, w, lam, temp),
    )


@SETTINGS
@given(cases(), st.sampled_from([0.1, 0.5, 0.9]), st.sampled_from([1.0, 2.0]))
def test_generalized_jsd_reference(case, beta, temp):
    s, t, _, mask, w = case
    check(L.generalized_jsd(s, t, mask, beta=beta, temperature=temp), ref_jsd(s, t, w, beta, temp))


@SETTINGS
@given(cases(), st.integers(1, 4), st.sampled_from([1.0, 2.0]), st.booleans())
def test_topk_kd_reference(case, k, temp, pad_slot):
    s, t, _, mask, w = case
    t = np.where(np.isfinite(t), t, -30.0)  # teacher top-k from a full distribution
    k = min(k, s.shape[-1])
    log_t = np_log_softmax(t)
    ids = np.argsort(-log_t, axis=-1)[..., :k]
    lp = np.take_along_axis(log_t, ids, -1).astype(np.float32)
    if pad_slot and k > 1:  # padding slot: -inf log-prob, id outside the vocab is allowed
        lp[..., -1], ids[..., -1] = -np.inf, -1
    check(L.topk_kd(s, lp, ids, mask, temperature=temp), ref_topk(s, lp, ids, w, temp))


@SETTINGS
@given(st.sampled_from([(3,), (2, 3)]), st.sampled_from([1, 4]), st.integers(0, 2**32 - 1))
def test_hidden_and_attention_mse_reference(lead, heads, seed):
    rng = np.random.default_rng(seed)
    hs, ht = rng.normal(size=(2,) + lead + (6,)).astype(np.float32)
    w = (rng.random(lead) < 0.7).astype(np.float32)
    check(L.hidden_mse(hs, ht, w), ref_hidden(hs, ht, w))
    tq, tk = 3, 4
    a_s, a_t = rng.random((2,) + lead[:-1] + (heads, tq, tk)).astype(np.float32)
    qw = (rng.random(lead[:-1] + (tq,)) < 0.7).astype(np.float32)
    kw = (rng.random(lead[:-1] + (tk,)) * (rng.random(lead[:-1] + (tk,)) < 0.8)).astype(np.float32)
    check(L.attention_mse(a_s, a_t, qw, kw), ref_attention(a_s, a_t, qw, kw))
    ones = (np.ones(lead[:-1] + (tq,)), np.ones(lead[:-1] + (tk,)))
    check(L.attention_mse(a_s, a_t), ref_attention(a_s, a_t, *ones))


# ----------------------------------------------------------------------------- vs torch


def test_cross_entropy_uniform_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, size=(2, 5))
    labels[0, 3] = labels[1, 0] = -100
    for eps in (0.0, 0.1, 0.4):
        want = torch.nn.functional.cross_entropy(
            torch.tensor(logits).reshape(-1, 7), torch.tensor(labels).reshape(-1),
            label_smoothing=eps, ignore_index=-100, reduction="sum",
        )
        total, count = L.cross_entropy(logits, labels, label_smoothing=eps, smoothing="uniform")
        np.testing.assert_allclose(float(total), want.item(), rtol=1e-5)
        assert float(count) == 8.0


def test_kd_kl_matches_torch_kl_div():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(2, 3, 4, 9)).astype(np.float32) * 2
    for temp in (1.0, 3.0):
        want = torch.nn.functional.kl_div(
            torch.log_softmax(torch.tensor(s) / temp, -1), torch.log_softmax(torch.tensor(t) / temp, -1),
            log_target=True, reduction="sum",
        ) * temp**2
        np.testing.assert_allclose(float(L.kd_kl(s, t, temperature=temp)[0]), want.item(), rtol=1e-5)


# ----------------------------------------------------------------------------- gradients


def _fd_grad(f, x, h=1e-6):
    x = np.float64(x)
    g = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (f(xp) - f(xm)) / (2 * h)
    return g


_RNG = np.random.default_rng(2)
_S, _T = (_RNG.normal(size=(2, 2, 3, 5)) * 1.5).astype(np.float32)  # student/teacher [B=2, T=3, V=5]
_LABELS = np.array([[1, 4, -100], [0, 2, 3]])
_W = np.array([[1.0, 0.5, 1.0], [0.0, 1.0, 2.0]])
_TOPK_LP = np.log(np.array([0.5, 0.3, 0.2]) * np.ones((2, 3, 3))).astype(np.float32)
_TOPK_IDS = np.array([4, 0, 2]) + np.zeros((2, 3, 3), int)
_A_S, _A_T = _RNG.random((2, 2, 2, 3, 4)).astype(np.float32)  # [B=2, H=2, Tq=3, Tk=4]
_KW = np.array([[1.0, 1.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0]])
GRAD_CASES = {
    "ce_fairseq": (lambda s: L.cross_entropy(s, _LABELS, _W, label_smoothing=0.1),
                   lambda s: ref_cross_entropy(s, _LABELS, _W, 0.1, "fairseq")[0], _S),
    "ce_uniform": (lambda s: L.cross_entropy(s, _LABELS, _W, label_smoothing=0.2, smoothing="uniform"),
                   lambda s: ref_cross_entropy(s, _LABELS, _W, 0.2, "uniform")[0], _S),
    "kd_kl": (lambda s: L.kd_kl(s, _T, _W, temperature=2.0), lambda s: ref_kd_kl(s, _T, _W, 2.0)[0], _S),
    "reverse_kl": (lambda s: L.reverse_kl(s, _T, _W, temperature=2.0),
                   lambda s: ref_reverse_kl(s, _T, _W, 2.0)[0], _S),
    "interpolated": (lambda s: L.interpolated_kl(s, _T, _LABELS, _W, lam=0.4, temperature=1.5),
                     lambda s: ref_interpolated(s, _T, _LABELS, _W, 0.4, 1.5)[0], _S),
    "jsd": (lambda s: L.generalized_jsd(s, _T, _W, beta=0.3, temperature=2.0),
            lambda s: ref_jsd(s, _T, _W, 0.3, 2.0)[0], _S),
    "topk": (lambda s: L.topk_kd(s, _TOPK_LP, _TOPK_IDS, _W, temperature=2.0),
             lambda s: ref_topk(s, _TOPK_LP, _TOPK_IDS, _W, 2.0)[0], _S),
    "hidden": (lambda s: L.hidden_mse(s, _T, _W), lambda s: ref_hidden(s, _T, _W)[0], _S),
    "attention": (lambda a: L.attention_mse(a, _A_T, _W, _KW),
                  lambda a: ref_attention(a, _A_T, _W, _KW)[0], _A_S),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_match_finite_differences(name):
    """jax.grad in float32 vs central differences of the float64 NumPy reference."""
    loss, ref, x = GRAD_CASES[name]
    got = jax.grad(lambda s: loss(s)[0])(jnp.asarray(x))
    want = _fd_grad(ref, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=2e-5)


# ----------------------------------------------------------------------------- robustness

# Every loss as f(student [2, 3, 6], mask) with the other inputs fixed; masked vocab entry
# 5 is -inf for both models, row [1, 2] is dead and full of -inf.
_R = np.random.default_rng(3)
_RS, _RT = (_R.normal(size=(2, 2, 3, 6)) * 2).astype(np.float32)
_RS[..., 5] = _RT[..., 5] = -np.inf
_RLAB = np.array([[0, 1, 2], [3, 4, 0]])
_RMASK = np.array([[1, 1, 1], [1, 1, 0]], bool)
_RS[1, 2], _RT[1, 2] = -np.inf, -np.inf
_RLP = np.log(np.array([0.6, 0.4, 1.0]) * np.ones((2, 3, 3))).astype(np.float32)
_RLP[..., 2] = -np.inf  # a padding slot
_RIDS = np.array([1, 3, 5]) * np.ones((2, 3, 3), int)
ROBUST = {
    "ce_fairseq": lambda s, m: L.cross_entropy(s, _RLAB, m, label_smoothing=0.1),
    "ce_uniform": lambda s, m: L.cross_entropy(s, _RLAB, m, label_smoothing=0.1, smoothing="uniform"),
    "kd_kl": lambda s, m: L.kd_kl(s, _RT, m, temperature=2.0),
    "reverse_kl": lambda s, m: L.reverse_kl(s, _RT, m, temperature=2.0),
    "interpolated": lambda s, m: L.interpolated_kl(s, _RT, _RLAB, m, lam=0.5),
    "jsd": lambda s, m: L.generalized_jsd(s, _RT, m, beta=0.5),
    "topk": lambda s, m: L.topk_kd(s, _RLP, _RIDS, m),
    "hidden": lambda s, m: L.hidden_mse(s, np.nan_to_num(_RT, neginf=-1e4), m),
    "attention": lambda s, m: L.attention_mse(s[:, None], np.nan_to_num(_RT, neginf=0)[:, None], m),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_no_nan_with_inf_logits_dead_rows_and_all_masked(name):
    loss = ROBUST[name]
    s = _RS if name not in ("hidden", "attention") else np.nan_to_num(_RS, neginf=-3.0)
    value_and_grad = jax.jit(jax.value_and_grad(lambda s, m: L.mean(loss(s, m))))
    value, grad = value_and_grad(s, _RMASK)
    grad = np.asarray(grad)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad)), (value, grad)
    assert np.all(grad[1, 2] == 0)  # the dead row
    if name not in ("hidden", "attention"):
        assert np.all(grad[..., 5] == 0)  # the masked vocab entry
    assert np.all(np.isfinite(np.asarray(loss(s, _RMASK))))  # eager path too
    # All-masked batch: 0/0 -> 0 with zero (not NaN) gradients.
    none = np.zeros_like(_RMASK)
    value, grad = value_and_grad(s, none)
    assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)
    assert tuple(map(float, loss(s, none))) == (0.0, 0.0)


def test_mean_zero_over_zero():
    assert float(L.mean((jnp.float32(0), jnp.float32(0)))) == 0.0
    assert float(L.mean((3.0, 2.0))) == 1.5
    assert float(jax.grad(lambda x: L.mean((x * 0.0, jnp.float32(0))))(1.0)) == 0.0
    with pytest.raises(ValueError, match="loss_sum, weight_sum"):
        L.mean(jnp.ones(3))


def test_interpolated_endpoints_equal_ce_and_kd_kl():
    s, t, labels, w = _S, _T, _LABELS, _W
    np.testing.assert_allclose(
        np.asarray(L.interpolated_kl(s, t, labels, w, lam=1.0, reduce=False)),
        np.asarray(L.cross_entropy(s, labels, w, reduce=False)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        np.asarray(L.interpolated_kl(s, t, labels, w, lam=0.0, temperature=2.0, reduce=False)),
        np.asarray(L.kd_kl(s, t, w * (labels >= 0), temperature=2.0, reduce=False)), rtol=1e-5, atol=1e-6)


def test_negative_labels_are_ignored_and_traced_out_of_range_gives_nan():
    a = L.cross_entropy(_S, _LABELS, _W, label_smoothing=0.1)
    b = L.cross_entropy(_S, np.where(_LABELS < 0, 0, _LABELS), _W * (_LABELS >= 0), label_smoothing=0.1)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    bad = _LABELS.copy()
    bad[0, 0] = 5  # == V: only detectable at run time under jit
    per = jax.jit(lambda y: L.cross_entropy(_S, y, reduce=False))(bad)
    assert np.isnan(per[0, 0]) and np.all(np.isfinite(np.asarray(per)[1]))
    per = jax.jit(lambda y: L.interpolated_kl(_S, _T, y, lam=0.5, reduce=False))(bad)
    assert np.isnan(per[0, 0])


def test_jit_and_vmap():
    eager = L.generalized_jsd(_S, _T, _W, beta=0.3)
    jitted = jax.jit(lambda s, t, w, b: L.generalized_jsd(s, t, w, beta=b))(_S, _T, _W, 0.3)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-6)
    # vmap over the batch: per-example pairs sum to the batch pair.
    pairs = jax.vmap(lambda s, y, w: L.cross_entropy(s, y, w, label_smoothing=0.1))(_S, _LABELS, _W)
    whole = L.cross_entropy(_S, _LABELS, _W, label_smoothing=0.1)
    np.testing.assert_allclose([float(pairs[0].sum()), float(pairs[1].sum())], np.asarray(whole), rtol=1e-6)
    per = jax.vmap(lambda s, t: L.kd_kl(s, t, temperature=2.0, reduce=False))(_S, _T)
    np.testing.assert_allclose(np.asarray(per), np.asarray(L.kd_kl(_S, _T, temperature=2.0, reduce=False)),
                               rtol=1e-6)


# ----------------------------------------------------------------------------- fused KD

_F = np.random.default_rng(4)
_HS = _F.normal(size=(2, 7, 3)).astype(np.float32)  # [B, T, Ds]
_WS = _F.normal(size=(3, 11)).astype(np.float32)
_BS = _F.normal(size=(11,)).astype(np.float32)
_HT = _F.normal(size=(2, 7, 4)).astype(np.float32)  # teacher is wider: Dt = 4
_WT = _F.normal(size=(4, 11)).astype(np.float32)
_BT = _F.normal(size=(11,)).astype(np.float32)
_FW = (_F.random((2, 7)) * (_F.random((2, 7)) < 0.8)).astype(np.float32)
_FT = np.arange(14, dtype=np.float32).reshape(2, 7)  # per-token cotangent for reduce=False


def _unfused(hs, ws, bs, reduce):
    out = L.kd_kl(hs @ ws + bs, _HT @ _WT + _BT, _FW, temperature=2.0, reduce=reduce)
    return out[0] if reduce else jnp.sum(out * _FT)


@pytest.mark.parametrize("chunk,reduce", [(1, True), (4, True), (64, True), (3, False)])
def test_fused_kd_kl_matches_unfused(chunk, reduce):
    def fused(hs, ws, bs):
        out = F.fused_kd_kl(hs, ws, _HT, _WT, _FW, temperature=2.0, chunk_size=chunk,
                            student_bias=bs, teacher_bias=_BT, reduce=reduce)
        return out[0] if reduce else jnp.sum(out * _FT)

    want, want_g = jax.value_and_grad(_unfused, argnums=(0, 1, 2))(_HS, _WS, _BS, reduce)
    got, got_g = jax.jit(jax.value_and_grad(fused, argnums=(0, 1, 2)))(_HS, _WS, _BS)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for g, w in zip(got_g, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
    if reduce:
        assert float(F.fused_kd_kl(_HS, _WS, _HT, _WT, _FW, chunk_size=chunk)[1]) == pytest.approx(_FW.sum())


def test_fused_kd_kl_teacher_is_constant_and_no_bias_path():
    grads = jax.grad(lambda ht, wt: F.fused_kd_kl(_HS, _WS, ht, wt, chunk_size=4)[0], argnums=(0, 1))(_HT, _WT)
    assert all(np.all(np.asarray(g) == 0) for g in grads)
    got = jax.grad(lambda hs: L.mean(F.fused_kd_kl(hs, _WS, _HT, _WT, _FW, chunk_size=5)))(_HS)
    want = jax.grad(lambda hs: L.mean(L.kd_kl(hs @ _WS, _HT @ _WT, _FW)))(_HS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)


def _largest_intermediate(jaxpr):
    """Largest array size produced anywhere in a jaxpr, sub-jaxprs (scan bodies...) included."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    biggest = max(biggest, _largest_intermediate(sub))
    return biggest


@pytest.mark.parametrize("reduce", [True, False])
def test_fused_kd_kl_never_materialises_token_by_vocab_logits(reduce):
    n_tokens, vocab = 14, 11  # chunk of 2 tokens: [2, 11] logits at most

    def fused(hs, ws):
        out = F.fused_kd_kl(hs, ws, _HT, _WT, _FW, chunk_size=2, reduce=reduce)
        return out[0] if reduce else jnp.sum(out * _FT)

    def unfused(hs, ws):
        return _unfused(hs, ws, 0.0, reduce)

    for fn in (fused, jax.value_and_grad(fused, argnums=(0, 1))):
        assert _largest_intermediate(jax.make_jaxpr(fn)(_HS, _WS).jaxpr) < n_tokens * vocab
    # The walker does see the unfused logits (so the check above can fail).
    assert _largest_intermediate(jax.make_jaxpr(jax.grad(unfused))(_HS, _WS).jaxpr) >= n_tokens * vocab


# ----------------------------------------------------------------------------- ValueErrors

_V5 = np.zeros((2, 3, 5), np.float32)
_Y = np.zeros((2, 3), int)
BAD = [
    (lambda: L.kd_kl(_V5, np.zeros((2, 3, 6), np.float32)), r"vocab size 5 .* 6.*shared vocabulary.*sequence-level"),
    (lambda: F.fused_kd_kl(_HS, _WS, _HT, np.zeros((4, 12), np.float32)), r"vocab size 11 .* 12.*shared vocabulary"),
    (lambda: L.reverse_kl(_V5, np.zeros((2, 4, 5), np.float32)), r"teacher_logits has shape"),
    (lambda: L.interpolated_kl(_V5, _V5, _Y, lam=1.5), r"lam must be in \[0, 1\]"),
    (lambda: L.interpolated_kl(_V5, _V5, _Y, lam=-0.1), r"lam must be in \[0, 1\]"),
    (lambda: L.cross_entropy(_V5, _Y, label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
    (lambda: L.cross_entropy(_V5, _Y, label_smoothing=-0.1), r"label_smoothing must be in \[0, 1\)"),
    (lambda: L.cross_entropy(_V5, _Y, smoothing="t5"), r"smoothing must be 'fairseq' or 'uniform'"),
    (lambda: L.kd_kl(_V5, _V5, temperature=0.0), r"temperature must be a finite number > 0"),
    (lambda: L.generalized_jsd(_V5, _V5, temperature=-1.0), r"temperature must be a finite number > 0"),
    (lambda: F.fused_kd_kl(_HS, _WS, _HT, _WT, temperature=0), r"temperature must be"),
    (lambda: L.generalized_jsd(_V5, _V5, beta=0.0), r"beta must be in \(0, 1\)"),
    (lambda: L.generalized_jsd(_V5, _V5, beta=1.0), r"beta must be in \(0, 1\)"),
    (lambda: L.cross_entropy(_V5, _Y + 5), r"labels must be in \[0, 5\).*found id 5"),
    (lambda: L.interpolated_kl(_V5, _V5, _Y + 7, lam=0.5), r"labels must be in \[0, 5\)"),
    (lambda: L.cross_entropy(_V5, np.zeros((2, 4), int)), r"labels has shape \(2, 4\) but must have shape \(2, 3\)"),
    (lambda: L.cross_entropy(_V5, _Y.astype(np.float32)), r"labels must be an integer array"),
    (lambda: L.kd_kl(_V5, _V5, np.ones((3, 2))), r"mask has shape \(3, 2\) but must have shape \(2, 3\)"),
    (lambda: L.topk_kd(_V5, np.zeros((2, 3, 2), np.float32), np.full((2, 3, 2), 5)), r"teacher_topk_ids must be in \[0, 5\)"),
    (lambda: L.topk_kd(_V5, np.zeros((2, 3, 2), np.float32), np.zeros((2, 3, 3), int)), r"teacher_topk_ids has shape"),
    (lambda: L.hidden_mse(_HS, _HT), r"hidden size 3 but teacher_hidden has 4"),
    (lambda: L.attention_mse(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 5), np.float32)), r"student_attn has shape"),
    (lambda: L.attention_mse(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32), np.ones(4)), r"query_mask has shape"),
    (lambda: F.fused_kd_kl(_HS, _WS, _HT, _WT, chunk_size=0), r"chunk_size must be a positive int"),
    (lambda: F.fused_kd_kl(_HT, _WS, _HT, _WT), r"student_hidden has hidden size 4 but student_unembed"),
    (lambda: F.fused_kd_kl(_HS, _WS, _HT[:, :5], _WT), r"token axes"),
    (lambda: F.fused_kd_kl(_HS, _WS, _HT, _WT, student_bias=np.zeros(3, np.float32)), r"student_bias has shape \(3,\)"),
]


@pytest.mark.parametrize("call,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_traced_hyperparameters_are_accepted():
    # Under jit the ranges cannot be checked; the loss still runs with traced values.
    f = jax.jit(lambda s, t, temp, lam: L.interpolated_kl(s, t, _LABELS, lam=lam, temperature=temp))
    np.testing.assert_allclose(
        np.asarray(f(_S, _T, 2.0, 0.3)),
        np.asarray(L.interpolated_kl(_S, _T, _LABELS, lam=0.3, temperature=2.0)), rtol=1e-6)


def test_fused_kd_kl_under_a_data_sharded_mesh():
    """Batch-sharded tokens stay sharded inside each chunk: no all-gather of hidden states."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(5)
    hs, ht = rng.normal(size=(8, 6, 3)).astype(np.float32), rng.normal(size=(8, 6, 4)).astype(np.float32)
    mask = rng.random((8, 6)) < 0.8

    def step(hs, ws, ht, wt, mask):
        loss = lambda hs, ws: L.mean(F.fused_kd_kl(hs, ws, ht, wt, mask, chunk_size=8))  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1))(hs, ws)

    data, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    fn = jax.jit(step, in_shardings=(data, rep, data, rep, data), out_shardings=(rep, (data, rep)))
    with jax.set_mesh(mesh):
        value, grads = fn(hs, _WS, ht, _WT, mask)
        hlo = fn.lower(hs, _WS, ht, _WT, mask).compile().as_text()
    want, want_g = jax.value_and_grad(
        lambda hs, ws: L.mean(L.kd_kl(hs @ ws, ht @ _WT, mask)), argnums=(0, 1))(hs, _WS)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    for g, w in zip(grads, want_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    assert "all-gather" not in hlo and "all-to-all" not in hlo


def _autodiff_cross_entropy(s, labels, w, eps, smoothing):
    """The smoothed CE written the obvious way (an independent copy of the formula)."""
    w = jnp.asarray(w, jnp.float32) * (labels >= 0)
    x = jnp.where((w != 0)[..., None], s.astype(jnp.float32), 0.0)
    log_p = x - jax.nn.logsumexp(x, -1, keepdims=True)
    nll = -jnp.take_along_axis(log_p, jnp.clip(labels, 0)[..., None], -1)[..., 0]
    finite = x > -jnp.inf
    n = finite.sum(-1).astype(jnp.float32)
    smooth = jnp.where(finite, -log_p, 0.0).sum(-1)
    if smoothing == "fairseq":
        e = eps / jnp.maximum(n - 1, 1)
        loss = (1 - eps - e) * nll + e * smooth
    else:
        loss = (1 - eps) * nll + eps / n * smooth
    return jnp.sum(jnp.where(w != 0, loss, 0.0) * w)


@pytest.mark.parametrize("smoothing", ["fairseq", "uniform"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_gradient_equals_the_plain_formulas(eps, smoothing):
    """With -inf vocabulary entries, a dead row of -inf, ignored (-100) labels, float weights;
    eps also traced under jit; bfloat16 logits get a bfloat16 gradient of the same values."""
    s, labels, w = jnp.asarray(_RS), jnp.asarray(np.where(_RMASK, _RLAB, -100)), _RMASK * 1.5
    want = jax.grad(_autodiff_cross_entropy)(s, labels, w, eps, smoothing)
    got = jax.grad(lambda s: L.cross_entropy(s, labels, w, label_smoothing=eps, smoothing=smoothing)[0])(s)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    traced = jax.jit(jax.grad(lambda s, e: L.cross_entropy(s, labels, w, label_smoothing=e, smoothing=smoothing)[0]))
    np.testing.assert_allclose(np.asarray(traced(s, eps)), np.asarray(want), rtol=1e-5, atol=1e-7)
    sb = jnp.nan_to_num(s, neginf=-30.0).astype(jnp.bfloat16)
    gb = jax.grad(lambda s: L.cross_entropy(s, labels, w, label_smoothing=eps, smoothing=smoothing)[0])(sb)
    wb = jax.grad(_autodiff_cross_entropy)(sb.astype(jnp.float32), labels, w, eps, smoothing)
    assert gb.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gb, np.float32), np.asarray(wb), rtol=2e-2, atol=1e-3)
