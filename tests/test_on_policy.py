"""On-policy distillation (issue 15): loss reductions, gradients, lmbda=0 bit-equality."""

import jax
import jax.numpy as jnp
import numpy as np

from kd_flax import losses, on_policy
from kd_flax import train as T
from tests.test_train import V, params_of, rand_batch, tcfg, tiny


def _np_kl(p_logits, q_logits, w):
    lp = p_logits - np.logaddexp.reduce(p_logits, -1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits, -1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(-1).__mul__(w).sum() / w.sum())


def test_beta_0_and_1_reduce_to_kd_kl_and_reverse_kl():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 5, 11)).astype(np.float64)
    w = (rng.random((3, 5)) > 0.3).astype(np.float64)
    f0 = losses.mean(on_policy.gjsd(s.astype(np.float32), t.astype(np.float32), w, beta=0.0))
    f1 = losses.mean(on_policy.gjsd(s.astype(np.float32), t.astype(np.float32), w, beta=1.0))
    assert float(f0) == float(losses.mean(losses.kd_kl(s.astype(np.float32), t.astype(np.float32), w)))
    assert float(f1) == float(losses.mean(losses.reverse_kl(s.astype(np.float32), t.astype(np.float32), w)))
    np.testing.assert_allclose(float(f0), _np_kl(t, s, w), rtol=1e-5)
    np.testing.assert_allclose(float(f1), _np_kl(s, t, w), rtol=1e-5)


def _setup(**kw):
    student, teacher = tiny(1, 1), tiny(2, 2)
    cfg = tcfg(**{"loss.kd_weight": 1.0, **kw})
    return student, teacher, cfg


def test_lmbda_0_equals_off_policy_bit_for_bit():
    student, teacher, cfg = _setup()
    tp = params_of(teacher)
    outs = []
    for c in (cfg, tcfg(**{"loss.kd_weight": 1.0})):
        if c is cfg:
            c.on_policy = {"lmbda": 0.0, "beta": 0.5}
        step = T.make_train_step(student, c, teacher=teacher)
        st = T.init_train_state(params_of(student), c, seed=0)
        ls = []
        for i in range(3):
            st, m = step(st, rand_batch(i), tp)
            ls.append(float(m["loss"][0]))
        outs.append((ls, jax.tree.leaves(st.params)))
    assert outs[0][0] == outs[1][0]
    for a, b in zip(outs[0][1], outs[1][1]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_on_policy_step_runs_and_gradients_reach_student_only():
    student, teacher, cfg = _setup()
    cfg.on_policy = {"lmbda": 1.0, "beta": 0.5, "max_new_tokens": 6}
    step = T.make_train_step(student, cfg, teacher=teacher)
    st0 = T.init_train_state(params_of(student), cfg, seed=0)
    before = [np.asarray(x).copy() for x in jax.tree.leaves(st0.params)]
    st, m = step(st0, rand_batch(0), params_of(teacher))
    assert float(m["on_policy"][0]) == 1.0
    assert np.isfinite(float(m["loss"][0])) and float(m["grad_norm"][0]) > 0
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in zip(before, jax.tree.leaves(st.params)))


def test_step_choice_is_a_function_of_seed_and_step():
    spec = on_policy.OnPolicySpec(lmbda=0.5, seed=3)
    a = on_policy.on_policy_steps(spec, 40)
    assert a == on_policy.on_policy_steps(spec, 40) and 5 < sum(a) < 35


def test_sharded_on_policy_step_matches_single_device():
    from kd_flax import sharding
    student, teacher, cfg = _setup()
    cfg.on_policy = {"lmbda": 1.0, "beta": 0.5, "max_new_tokens": 6}
    b, tp = rand_batch(1), params_of(teacher)
    s1, m1 = T.make_train_step(student, cfg, teacher=teacher)(T.init_train_state(params_of(student), cfg), b, tp)
    mesh, rules = sharding.make_mesh({"data": 4, "fsdp": 1, "model": 2}), sharding.DEFAULT_RULES
    step = T.make_train_step(student, cfg, teacher=teacher, mesh=mesh, rules=rules)
    tp_sh = jax.device_put(tp, sharding.param_shardings(tp, mesh, rules))
    s8, m8 = step(T.init_train_state(params_of(student), cfg, mesh=mesh, rules=rules), b, tp_sh)
    np.testing.assert_allclose(float(m8["loss"][0]), float(m1["loss"][0]), rtol=1e-4)
