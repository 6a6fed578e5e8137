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


def _sampled(student, cfg, batch, step=0, seed=0):
    """The step's own samples, rebuilt outside it: the same key the step folds in."""
    spec = on_policy.OnPolicySpec.from_config(cfg.on_policy)
    rng = T.init_train_state(params_of(student), cfg, seed=seed).rng
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
    ids = on_policy.token_ids(student, spec)
    seqs, lengths = jax.jit(lambda i, m: on_policy.sample_targets(student, i, m, key, spec, ids))(
        batch["input_ids"], batch["attention_mask"])
    return spec, rng, on_policy.student_batch(batch, seqs, lengths, ids.decoder_start_token_id)


def test_gradients_are_those_of_the_jsd_on_fixed_samples():
    """The step's gradient = jax.grad of the generalized JSD with the sampled tokens held
    constant: nothing flows through sampling, and the teacher gets no gradient."""
    student, teacher, cfg = _setup()
    cfg.on_policy = {"lmbda": 1.0, "beta": 0.3, "max_new_tokens": 6}
    b, tp = rand_batch(2), params_of(teacher)
    spec, rng, sbatch = _sampled(student, cfg, {k: jnp.asarray(v) for k, v in b.items()})
    step = T.make_train_step(student, cfg, teacher=teacher)
    loss, _, grads, flag, _ = jax.jit(step.compute_grads)(params_of(student), b, tp, 0, rng)
    assert float(flag) == 1.0

    def ref(p, tp):
        s = T.forward_model(T._graph(student), p)
        t = T.forward_model(T._graph(teacher), tp)
        return losses.mean(on_policy.loss_on_samples(s, t, sbatch, spec))
    ref_loss, g_s = jax.value_and_grad(ref)(params_of(student), tp)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(g_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7)
    # The teacher is constant inside the step's loss (stop_gradient): zero gradient w.r.t. it.
    step_t = jax.grad(lambda tp: step.compute_grads(params_of(student), b, tp, 0, rng)[0])(tp)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(step_t))


def test_grad_accum_on_policy_equals_one_batch():
    student, teacher, _ = _setup()
    b, tp = rand_batch(3), params_of(teacher)
    out = []
    for accum in (1, 2):
        cfg = tcfg(**{"loss.kd_weight": 1.0, "grad_accum": accum})
        cfg.on_policy = {"lmbda": 1.0, "beta": 0.5, "max_new_tokens": 6}
        step = T.make_train_step(student, cfg, teacher=teacher)
        rng = T.init_train_state(params_of(student), cfg, seed=0).rng
        out.append(jax.jit(step.compute_grads)(params_of(student), b, tp, 0, rng))
    np.testing.assert_allclose(float(out[0][0]), float(out[1][0]), rtol=1e-5)
    for a, r in zip(jax.tree.leaves(out[0][2]), jax.tree.leaves(out[1][2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_distill_on_policy_config_keys_are_validated():
    import pytest
    from kd_flax import config_base
    from test_config import load_recipe
    c = load_recipe("demo_cpu", "tiny")
    c.distill.on_policy.lmbda, c.distill.on_policy.top_p = 1.5, 0.0
    c.distill.stages = [{"targets": "pseudo", "steps": 2}, {"targets": "students", "steps": 2}]
    with pytest.raises(config_base.ConfigError) as e:
        config_base.validate(c, check_paths=False)
    msg = str(e.value)
    assert "distill.on_policy.lmbda: 1.5 out of range" in msg and "distill.on_policy.top_p" in msg
    assert "distill.stages[1]" in msg and "'student'" in msg
    c = load_recipe("demo_cpu", "tiny")
    c.distill.stages = [{"targets": "pseudo", "steps": 2}, {"targets": "student", "steps": 2}]
    config_base.validate(c, check_paths=False)


def test_the_base_configs_train_block_builds_a_step():
    """`base_config().distill` as a train block (on_policy off, max_new_tokens 0 = "the data's
    length", which only the distill stage knows) builds a step; on, it needs a length."""
    import pytest
    from kd_flax import config_base
    student, teacher, _ = _setup()
    block = config_base.base_config().distill
    T.make_train_step(student, block)
    block.on_policy.lmbda = 0.5
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1 when lmbda > 0"):
        T.make_train_step(student, block, teacher=teacher)
