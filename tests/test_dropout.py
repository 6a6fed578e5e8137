"""Dropout (issue 16): on only in a train step's student forward, keyed by the train state's
`fold_in(rng, step)`, so a resumed run redraws the same masks; eval, decoding, the teacher
and on-policy sampling stay deterministic and equal the rate-0 model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_flax import decoding, models, on_policy
from kd_flax import train as T
from kd_flax.models import layers as L
from tests.test_train import V, params_of, rand_batch, tcfg

RATE = 0.3


def tiny_model(family="t5", rate=RATE, seed=0, **kw):
    if family == "t5":
        cfg = models.tiny_config("t5", vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_heads=4,
                                 dropout_rate=rate, **kw)
    else:
        cfg = models.tiny_config(family, vocab_size=V, dropout=rate, attention_dropout=rate,
                                 activation_dropout=rate, **kw)
    return models.create_model(cfg, nnx.Rngs(seed))


def fwd(b):
    return dict(input_ids=jnp.asarray(b["input_ids"]), attention_mask=jnp.asarray(b["attention_mask"]),
                decoder_input_ids=jnp.asarray(b["decoder_input_ids"]))


def test_dropout_helper_rate_scaling_and_identity():
    x = jnp.ones((200, 500), jnp.float32)
    y = np.asarray(L.Dropout(jax.random.key(0))(x, RATE))
    zero = (y == 0).mean()
    assert abs(zero - RATE) < 0.01, zero
    np.testing.assert_allclose(y[y != 0], 1 / (1 - RATE), rtol=1e-6)
    assert abs(y.mean() - 1.0) < 0.02  # inverted dropout keeps the expectation
    assert L.Dropout()(x, RATE) is x and L.Dropout(jax.random.key(0))(x, 0.0) is x
    d = L.Dropout(jax.random.key(0))  # successive calls draw fresh masks
    assert not np.array_equal(np.asarray(d(x, RATE)), np.asarray(d(x, RATE)))


@pytest.mark.parametrize("family,kw", [("t5", {}), ("t5", {"scan_layers": True, "remat": True}),
                                       ("bart", {}), ("mbart", {"scan_layers": True}), ("marian", {})])
def test_forward_with_and_without_key(family, kw):
    """No key: equal to the rate-0 model with the same weights. A key: different, and the
    same key gives the same output; another key other masks."""
    b = fwd(rand_batch(0))
    m, m0 = tiny_model(family, **kw), tiny_model(family, rate=0.0, **kw)
    nnx.update(m0, params_of(m))
    det = np.asarray(m(**b))
    np.testing.assert_array_equal(det, np.asarray(m0(**b)))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    a = np.asarray(m(**b, dropout_rng=k1))
    assert not np.allclose(a, det, atol=1e-4)
    np.testing.assert_array_equal(a, np.asarray(m(**b, dropout_rng=k1)))
    assert not np.allclose(a, np.asarray(m(**b, dropout_rng=k2)), atol=1e-4)
    # a rate-0 model ignores the key: bit-identical
    np.testing.assert_array_equal(np.asarray(m0(**b, dropout_rng=k1)), det)


def test_attention_probabilities_are_dropped_at_the_rate():
    mha = L.MultiHeadAttention(16, 4, 4, use_bias=False, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 64, 16))
    out0, _, w = mha(x, output_attentions=True)
    seen = {}
    orig = L.Dropout.__call__

    def spy(self, a, rate):
        y = orig(self, a, rate)
        seen["zero"] = float(jnp.mean(y == 0))
        return y

    L.Dropout.__call__ = spy
    try:
        out1, _, w1 = mha(x, output_attentions=True, dropout=L.Dropout(jax.random.key(3)))
    finally:
        L.Dropout.__call__ = orig
    assert abs(seen["zero"] - 0.5) < 0.02
    np.testing.assert_array_equal(np.asarray(w), np.asarray(w1))  # returned: pre-dropout probs
    assert not np.allclose(np.asarray(out0), np.asarray(out1))


def test_generation_and_sampling_ignore_dropout():
    m, m0 = tiny_model(), tiny_model(rate=0.0)
    nnx.update(m0, params_of(m))
    b = rand_batch(1)
    ids, mask = jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"])
    g, g0 = (decoding.generate(x, ids, mask, max_new_tokens=6, num_beams=2) for x in (m, m0))
    np.testing.assert_array_equal(np.asarray(g.sequences), np.asarray(g0.sequences))
    spec = on_policy.OnPolicySpec(lmbda=1.0, max_new_tokens=6)
    s, s0 = (on_policy.sample_targets(x, ids, mask, jax.random.key(5), spec) for x in (m, m0))
    np.testing.assert_array_equal(np.asarray(s[0]), np.asarray(s0[0]))


def _loss(step, st, b, k):
    return float(step.compute_grads(st.params, b, None, jnp.int32(k), st.rng)[0])


def test_train_step_masks_depend_on_step_and_are_deterministic():
    m, m0 = tiny_model(), tiny_model(rate=0.0)
    nnx.update(m0, params_of(m))
    cfg = tcfg()
    step, step0 = T.make_train_step(m, cfg), T.make_train_step(m0, cfg)
    st = T.init_train_state(params_of(m), cfg, seed=0)
    b = {k: jnp.asarray(v) for k, v in rand_batch(2).items()}
    l3, l3b, l4 = _loss(step, st, b, 3), _loss(step, st, b, 3), _loss(step, st, b, 4)
    assert l3 == l3b and l3 != l4
    no_drop = _loss(step0, st, b, 3)
    assert l3 != no_drop
    assert _loss(step0, st, b, 4) == no_drop  # rate 0: no key dependence at all
    # eval (dev loss) is deterministic: the rate-0 value
    ev = T.make_eval_step(m)(st.params, b)
    ev0 = T.make_eval_step(m0)(st.params, b)
    assert float(ev[0]) == float(ev0[0])
    # another seed, other masks
    assert _loss(step, T.init_train_state(params_of(m), cfg, seed=1), b, 3) != l3
    # micro-batches draw their own masks; the accumulated step still runs
    cfg2 = tcfg(grad_accum=2)
    l_acc = _loss(T.make_train_step(m, cfg2), st, b, 3)
    assert np.isfinite(l_acc) and l_acc != l3


def test_resume_redraws_the_same_masks():
    """Steps k.. after restoring the state saved at step k equal the uninterrupted run."""
    m = tiny_model(family="bart")
    cfg = tcfg()
    step = T.make_train_step(m, cfg)
    st = T.init_train_state(params_of(m), cfg, seed=7)
    batches = [rand_batch(i) for i in range(5)]
    losses, saved = [], None
    for i, b in enumerate(batches):
        if i == 2:
            saved = jax.device_get(st)  # what a checkpoint holds (rng and step included)
        st, met = step(st, b)
        losses.append(float(met["loss"][0]))
    assert len(set(losses)) == len(losses)
    st2 = jax.tree.map(jnp.asarray, saved)
    resumed = []
    for b in batches[2:]:
        st2, met = step(st2, b)
        resumed.append(float(met["loss"][0]))
    assert resumed == losses[2:]
    for a, c in zip(jax.tree.leaves(st.params), jax.tree.leaves(st2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
