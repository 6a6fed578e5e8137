"""Train step and loop on tiny T5s: learning, KD, sharding, accumulation, resume, SIGTERM,
NaN guard, checkpoint contents, fake quantization."""

import os
import re
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from kd_flax import corpus
from kd_flax import data as data_lib
from kd_flax import losses, models, quant, sharding
from kd_flax import student as S
from kd_flax import train as T
from kd_flax.tree_paths import path_str

V = 64


def tcfg(**kw):
    c = {
        "steps": 10, "batch_size": 8, "grad_accum": 1, "eval_every": 0, "checkpoint_every": 0,
        "log_every": 5, "keep_best_by": "loss", "dtype": "float32", "remat": False, "max_nan_steps": 3,
        "optimizer": {"name": "adamw", "learning_rate": 3e-3, "warmup_steps": 5, "schedule": "cosine",
                      "weight_decay": 0.01, "grad_clip_norm": 1.0, "b1": 0.9, "b2": 0.98},
        "loss": {"ce_weight": 1.0, "label_smoothing": 0.0, "smoothing": "fairseq", "kd_weight": 0.0,
                 "kd_type": "kl", "temperature": 1.0, "lam": 0.5, "beta": 0.5, "fused": False,
                 "hidden_weight": 0.0, "attention_weight": 0.0},
    }
    for k, v in kw.items():
        node = c
        parts = k.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = v
    return ml_collections.ConfigDict(c)


def tiny(layers=2, seed=0, d=16, **kw):
    cfg = models.tiny_config("t5", vocab_size=V, d_model=d, d_kv=4, d_ff=32, num_heads=4,
                             encoder_layers=layers, decoder_layers=layers, **kw)
    return models.create_model(cfg, nnx.Rngs(seed))


@pytest.fixture(scope="module")
def plain():
    """(student, cfg, step) shared by the guard and loop tests: one compilation."""
    student = tiny(1, 1)
    cfg = tcfg(steps=50)
    return student, cfg, T.make_train_step(student, cfg)


def rand_batch(seed, b=8, s=8, t=8):
    rng = np.random.default_rng(seed)
    src = rng.integers(3, V, (b, s)).astype(np.int32)
    lab = rng.integers(3, V, (b, t)).astype(np.int32)
    dec_mask = (np.arange(t)[None] < rng.integers(2, t + 1, (b, 1))).astype(np.int32)
    src_mask = (np.arange(s)[None] < rng.integers(2, s + 1, (b, 1))).astype(np.int32)
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), lab[:, :-1]], 1)
    return {"input_ids": src * src_mask, "attention_mask": src_mask, "labels": lab * dec_mask,
            "decoder_input_ids": dec_in * dec_mask, "decoder_attention_mask": dec_mask,
            "loss_mask": dec_mask.astype(np.float32)}


def params_of(model):
    return nnx.state(model, nnx.Param)


def assert_trees_close(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# ---------------------------------------------------------------------------- loss composition


@pytest.mark.parametrize("mode", ["kl", "fused", "topk_cached"])
def test_step_loss_matches_losses_library(mode):
    """The step's loss is Σ w·sum/count of the losses-library terms on the teacher's logits
    (online KL, the fused chunked KL, and KD against cached top-k teacher log-probs)."""
    teacher, student = tiny(2, 0), tiny(1, 1)
    kw = {"loss.kd_weight": 0.5, "loss.temperature": 2.0, "loss.label_smoothing": 0.1,
          "loss.fused": mode == "fused", "loss.kd_type": "topk" if mode == "topk_cached" else "kl"}
    cfg = tcfg(**kw)
    b = rand_batch(0)
    fwd = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"])
    sl, tl = student(**fwd), teacher(**fwd)
    ce = losses.mean(losses.cross_entropy(sl, b["labels"], b["loss_mask"], label_smoothing=0.1))
    if mode == "topk_cached":
        lp, ids = jax.lax.top_k(jax.nn.log_softmax(tl), 5)
        b = dict(b, teacher_topk_logprobs=np.asarray(lp), teacher_topk_ids=np.asarray(ids))
        kd = losses.mean(losses.topk_kd(sl, lp, ids, b["loss_mask"], temperature=2.0))
        step = T.make_train_step(student, cfg)  # no online teacher needed
        _, m = step(T.init_train_state(params_of(student), cfg), b)
    else:
        kd = losses.mean(losses.kd_kl(sl, tl, b["loss_mask"], temperature=2.0))
        step = T.make_train_step(student, cfg, teacher=teacher)
        _, m = step(T.init_train_state(params_of(student), cfg), b, params_of(teacher))
    np.testing.assert_allclose(float(m["loss"][0]), float(ce + 0.5 * kd), rtol=1e-5)
    np.testing.assert_allclose(float(m["ce"][1]), b["loss_mask"].sum())
    np.testing.assert_allclose(float(losses.mean(m["kd"])), float(kd), rtol=1e-5)


# ---------------------------------------------------------------------------- learning


def test_student_learns_from_teacher_pseudo_labels():
    """A one-layer student trained 200 steps on a teacher's greedy outputs lowers its dev loss."""
    from kd_flax import decoding
    teacher = tiny(2, 3, d=32)
    rng = np.random.default_rng(0)
    src = rng.integers(3, 20, (160, 6)).astype(np.int32)  # a small source vocabulary: learnable
    out = decoding.generate(teacher, jnp.asarray(src), jnp.ones_like(src), max_new_tokens=6)
    hyps = np.asarray(out.sequences)[:, 0]
    ex = [corpus.Example(i, "", input_ids=src[i], target_ids=hyps[i][hyps[i] != 0][:5])
          for i in range(len(src))]
    train_ex, dev_ex = ex[:128], ex[128:]
    c = teacher.config
    kw = dict(pad_id=c.pad_token_id, eos_id=c.eos_token_id, decoder_start_id=c.decoder_start_token_id,
              max_source_length=6, max_target_length=6)
    dev = [T.model_batch(b) for b in data_lib.batches(dev_ex, 32, 0, 0, num_epochs=1, **kw)]
    student, _ = S.scratch_student(teacher.config.replace(encoder_layers=1, decoder_layers=1, d_model=16,
                                                          d_kv=4, d_ff=32), seed=5)
    cfg = tcfg(steps=200, batch_size=16, **{"optimizer.learning_rate": 1e-2})
    graph = T.split_model(student)
    eval_step = T.make_eval_step((graph[0], graph[2]))

    def dev_loss(params):
        s = n = 0.0
        for b in dev:
            ls, ln = eval_step(params, {k: jnp.asarray(v) for k, v in b.items()})
            s, n = s + float(ls), n + float(ln)
        return s / n

    before = dev_loss(params_of(student))
    step = T.make_train_step(student, cfg)
    state = T.init_train_state(params_of(student), cfg)
    for i, b in zip(range(200), data_lib.batches(train_ex, 16, 0, 0, **kw)):
        state, _ = step(state, T.model_batch(b))
    after = dev_loss(state.params)
    assert after < 0.5 * before, (before, after)


def test_word_level_kd_pulls_student_toward_teacher():
    teacher, student = tiny(2, 0), tiny(1, 7)
    cfg = tcfg(steps=30, **{"loss.ce_weight": 0.0, "loss.kd_weight": 1.0, "optimizer.learning_rate": 1e-2})
    held = rand_batch(999)
    tl = teacher(input_ids=held["input_ids"], attention_mask=held["attention_mask"],
                 decoder_input_ids=held["decoder_input_ids"])

    def kl_to_teacher(params):
        m = nnx.merge(*(lambda g: (g[0], params, g[2]))(T.split_model(student)))
        sl = m(input_ids=held["input_ids"], attention_mask=held["attention_mask"],
               decoder_input_ids=held["decoder_input_ids"])
        return float(losses.mean(losses.kd_kl(sl, tl, held["loss_mask"])))

    before = kl_to_teacher(params_of(student))
    step = T.make_train_step(student, cfg, teacher=teacher)
    state = T.init_train_state(params_of(student), cfg)
    tp = params_of(teacher)
    for i in range(30):
        state, m = step(state, rand_batch(i), tp)
    after = kl_to_teacher(state.params)
    assert after < 0.65 * before, (before, after)


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("explicit", [False, True])
def test_sharded_step_equals_single_device(explicit):
    """mesh data=4 × model=2 on the 8 fake devices: same params after one step (with KD and
    hidden/attention terms through the layer map). `explicit`: the mesh comes from plain
    `jax.make_mesh`, whose axes are Explicit (kd_flax makes them Auto)."""
    assert jax.device_count() == 8
    teacher = tiny(2, 0)
    student, info = S.make_student(teacher, 1, 1, layer_map={"encoder": [1], "decoder": [1]})
    cfg = tcfg(**{"loss.kd_weight": 1.0, "loss.hidden_weight": 0.5, "loss.attention_weight": 0.5,
                  "loss.label_smoothing": 0.1})
    b = rand_batch(1)
    tp = params_of(teacher)

    single = T.make_train_step(student, cfg, teacher=teacher, layer_map=info)
    s1, m1 = single(T.init_train_state(params_of(student), cfg), b, tp)

    mesh = (jax.make_mesh((4, 1, 2), ("data", "fsdp", "model")) if explicit
            else sharding.make_mesh({"data": 4, "fsdp": 1, "model": 2}))
    rules = sharding.DEFAULT_RULES
    sharded = T.make_train_step(student, cfg, teacher=teacher, layer_map=info, mesh=mesh, rules=rules)
    tp_sh = jax.device_put(tp, sharding.param_shardings(tp, mesh, rules))
    s8, m8 = sharded(T.init_train_state(params_of(student), cfg, mesh=mesh, rules=rules), b, tp_sh)
    # the params really are distributed over the model axis somewhere
    specs = [x.sharding.spec for x in jax.tree.leaves(s8.params)]
    assert any("model" in str(sp) for sp in specs)
    for k in m1:
        np.testing.assert_allclose(np.asarray(m8[k]), np.asarray(m1[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    assert_trees_close(s8.params, s1.params, rtol=1e-5, atol=1e-6)
    assert_trees_close(s8.opt_state, s1.opt_state, rtol=1e-4, atol=1e-9)


def test_grad_accum_equals_one_big_batch():
    teacher, student = tiny(2, 0), tiny(1, 1)
    b = rand_batch(2, b=8)
    b["loss_mask"][0, :] = 0.0  # an all-padding row: the counts must still be global
    tp = params_of(teacher)
    outs = []
    for accum in (1, 2):
        cfg = tcfg(grad_accum=accum, **{"loss.kd_weight": 0.7, "loss.label_smoothing": 0.1})
        step = T.make_train_step(student, cfg, teacher=teacher)
        outs.append(step(T.init_train_state(params_of(student), cfg), b, tp))
    (s1, m1), (s2, m2) = outs
    for k in m1:
        np.testing.assert_allclose(np.asarray(m2[k]), np.asarray(m1[k]), rtol=2e-5, atol=1e-6, err_msg=k)
    assert_trees_close(s2.params, s1.params, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- guards


def test_nan_guard_skips_and_counts(plain):
    student, cfg, step = plain
    state = T.init_train_state(params_of(student), cfg)
    good = jax.tree.map(np.asarray, state)
    leaves, tdef = jax.tree.flatten(state.params)
    leaves[0] = jnp.full_like(leaves[0], jnp.nan)
    bad_state = state.replace(params=jax.tree.unflatten(tdef, leaves))
    bad_np = jax.tree.map(np.asarray, bad_state)
    s2, m = step(bad_state, rand_batch(0))
    assert float(m["nan_skipped"][0]) == 1.0
    assert int(s2.step) == 1 and int(s2.nan_skips) == 1 and int(s2.nan_streak) == 1
    for x, y in zip(jax.tree.leaves(s2.params), jax.tree.leaves(bad_np.params)):
        np.testing.assert_array_equal(np.asarray(x), y)  # NaN == NaN here: unchanged
    for x, y in zip(jax.tree.leaves(s2.opt_state), jax.tree.leaves(bad_np.opt_state)):
        np.testing.assert_array_equal(np.asarray(x), y)
    # a finite step afterwards resets the streak, keeps the total
    s3, m = step(s2.replace(params=jax.tree.map(jnp.asarray, good.params)), rand_batch(1))
    assert float(m["nan_skipped"][0]) == 0.0 and int(s3.nan_skips) == 1 and int(s3.nan_streak) == 0


def test_loop_stops_after_max_nan_steps(tmp_path, plain):
    student, cfg, step = plain
    state = T.init_train_state(params_of(student), cfg)
    leaves, tdef = jax.tree.flatten(state.params)
    leaves[0] = jnp.full_like(leaves[0], jnp.inf)
    state = state.replace(params=jax.tree.unflatten(tdef, leaves))
    cfg = tcfg(steps=10, max_nan_steps=2)
    with pytest.raises(T.NonFiniteLoss, match=r"2 consecutive steps.*max_nan_steps=2"):
        T.train(step, state, cfg, workdir=str(tmp_path), batches=lambda s: (rand_batch(i) for i in range(s, 99)),
                progress=False)


def test_make_optimizer_and_schedules():
    for sched in ("constant", "linear", "cosine", "rsqrt"):
        f = T.make_schedule({"learning_rate": 1.0, "warmup_steps": 4, "schedule": sched}, 20)
        vals = np.array([float(f(i)) for i in range(20)])
        np.testing.assert_allclose(vals[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
        assert np.all(np.diff(vals[4:]) <= 1e-7)
    assert float(T.make_schedule({"learning_rate": 1.0, "warmup_steps": 4, "schedule": "linear"}, 20)(20)) == 0
    with pytest.raises(ValueError, match=r"optimizer.schedule.*allowed values"):
        T.make_schedule({"learning_rate": 1.0, "schedule": "step"}, 10)
    with pytest.raises(ValueError, match=r"optimizer.name.*allowed values"):
        T.make_optimizer(tcfg(**{"optimizer.name": "sgd"}))
    student = tiny(1, 4)
    mask = T.decay_mask(params_of(student))
    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert not any(v for k, v in flat.items() if "norm" in k) and any(flat.values())
    cfg = tcfg(**{"optimizer.name": "adafactor", "optimizer.b2": 0.8})
    s, m = T.make_train_step(student, cfg)(T.init_train_state(params_of(student), cfg), rand_batch(0))
    assert np.isfinite(float(m["loss"][0]))


def test_adafactor_decay_rate_not_adam_b2():
    """Adafactor's decay_rate is its own key (optax's 0.8 by default), not AdamW's b2 (0.98)."""
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros((3,))}
    grads = [jax.tree.map(lambda x, i=i: jnp.full_like(x, 0.1 * (i + 1)) + jnp.arange(x.size).reshape(x.shape) * 0.01,
                          params) for i in range(4)]

    def run(tx):
        p, st, out = params, tx.init(params), []
        for g in grads:
            u, st = tx.update(g, st, p)
            p = optax.apply_updates(p, u)
            out.append(p)
        return out

    def close(a, b):
        return all(np.allclose(x, y, rtol=1e-6) for pa, pb in zip(a, b)
                   for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)))

    base = {"optimizer.name": "adafactor", "optimizer.weight_decay": 0.0, "optimizer.grad_clip_norm": 0.0,
            "optimizer.warmup_steps": 0, "optimizer.schedule": "constant"}
    sched = T.make_schedule(tcfg(**base)["optimizer"], 10)
    ref = run(optax.adafactor(sched, decay_rate=0.8))
    assert close(run(T.make_optimizer(tcfg(**base))), ref)  # b2=0.98 in the block: unused
    assert not close(run(optax.adafactor(sched, decay_rate=0.98)), ref)  # the check can tell
    assert close(run(T.make_optimizer(tcfg(**base, **{"optimizer.decay_rate": 0.5}))),
                 run(optax.adafactor(sched, decay_rate=0.5)))


# ---------------------------------------------------------------------------- checkpoints


def _examples(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return [corpus.Example(i, "", input_ids=rng.integers(3, V, rng.integers(3, 7)).astype(np.int32),
                             target_ids=rng.integers(3, V, rng.integers(2, 6)).astype(np.int32))
            for i in range(n)]


def _batches_fn(examples, cfg):
    kw = dict(pad_id=0, eos_id=1, decoder_start_id=0, max_source_length=8, max_target_length=8)
    return lambda start: data_lib.batches(examples, cfg.batch_size, 0, start, **kw)


def test_resume_after_crash_reproduces_losses_exactly(tmp_path):
    teacher, student = tiny(2, 0), tiny(1, 1)
    cfg = tcfg(steps=10, checkpoint_every=3, **{"loss.kd_weight": 0.5})
    ex = _examples()
    tp = params_of(teacher)
    step = T.make_train_step(student, cfg, teacher=teacher)  # one compilation for the three runs

    def run(workdir, **kw):
        state = T.init_train_state(params_of(student), cfg)
        return T.train(step, state, cfg, workdir=str(workdir), batches=_batches_fn(ex, cfg), teacher_params=tp,
                       progress=False, **kw)

    full = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="simulated failure at step 7"):
        run(tmp_path / "b", fail_at_step=7)
    resumed = run(tmp_path / "b")
    assert resumed.start_step == 6  # the last checkpoint before the crash
    assert resumed.losses == full.losses[6:]  # bit-exact, data order included
    for x, y in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(full.state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # teacher params never enter the checkpoint: only the student (params + Adam mu, nu)
    mgr = ocp.CheckpointManager(str(tmp_path / "b" / "ckpt"), item_handlers=ocp.StandardCheckpointHandler())
    meta = mgr.item_metadata(mgr.latest_step())
    n_ckpt = sum(int(np.prod(m.shape)) for m in jax.tree.leaves(meta) if hasattr(m, "shape"))
    n_student = sum(x.size for x in jax.tree.leaves(params_of(student)))
    n_teacher = sum(x.size for x in jax.tree.leaves(tp))
    assert n_teacher > n_student
    assert 3 * n_student <= n_ckpt < 3 * n_student + 16
    mgr.close()
    assert os.listdir(tmp_path / "b" / "tb")  # TensorBoard events were written


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, plain):
    student, cfg, step = plain
    ex = _examples()
    inner = _batches_fn(ex, cfg)

    def batches(start):
        for i, b in enumerate(inner(start)):
            if start + i == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # preemption notice during step 5
            yield b

    res = T.train(step, T.init_train_state(params_of(student), cfg), cfg, workdir=str(tmp_path),
                  batches=batches, progress=False)
    assert res.preempted and len(res.losses) == 5
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    assert mgr.latest_step() == 5
    mgr.close()
    # our handler is uninstalled when the loop ends
    assert not isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), T._Preemption)
    res2 = T.train(step, T.init_train_state(params_of(student), cfg), tcfg(steps=7), workdir=str(tmp_path),
                   batches=inner, progress=False)
    assert res2.start_step == 5 and len(res2.losses) == 2


def test_log_lines_report_steps_and_target_tokens_per_s(tmp_path, plain):
    """Without a bar on a terminal, every log_every steps (and the last) a line with steps/s and
    target tokens/s (non-pad labels of real rows)."""
    student, _, step = plain
    b = rand_batch(0)
    b["loss_mask"][0] = 0  # a pad row
    assert T.target_tokens(b) == int(b["decoder_attention_mask"][1:].sum()) > 0
    assert T.target_tokens({"decoder_attention_mask": b["decoder_attention_mask"]}) == \
        int(b["decoder_attention_mask"].sum())
    lines = []
    T.train(step, T.init_train_state(params_of(student), tcfg(steps=7)), tcfg(steps=7), workdir=str(tmp_path),
            batches=_batches_fn(_examples(), tcfg(steps=7)), progress=False, log=lines.append)
    assert [ln.split(":")[0] for ln in lines] == ["step 5/7", "step 7/7"]
    for ln in lines:
        rates = re.search(r"loss=[\d.]+, ([\d.]+) steps/s, (\d+) target tokens/s$", ln)
        assert rates and float(rates[1]) > 0 and int(rates[2]) > float(rates[1]), ln


# ---------------------------------------------------------------------------- fake quantization


def test_w8a8_fake_quant_training():
    cfg_m = models.tiny_config("t5", vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_heads=4,
                               encoder_layers=1, decoder_layers=1)
    fp = models.create_model(cfg_m, nnx.Rngs(3))
    q = models.create_model(cfg_m.replace(act_quant_bits=8), nnx.Rngs(3))
    rules = quant.default_rules(8)
    cfg = tcfg()
    step = T.make_train_step(q, cfg, quant_rules=rules)
    state = T.init_train_state(params_of(q), cfg)
    for i in range(3):
        state, m = step(state, rand_batch(i))
        assert np.isfinite(float(m["loss"][0]))
    # the quantized forward differs from the float one, but not by much
    b = rand_batch(5)
    g, _, rest = T.split_model(q)
    p = params_of(fp)
    qm = nnx.merge(g, quant.quantize_params(p, rules), rest)
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], decoder_input_ids=b["decoder_input_ids"])
    a, z = np.asarray(fp(**kw)), np.asarray(qm(**kw))
    diff = np.abs(a - z).max()
    assert 1e-5 < diff < 0.1 * np.abs(a).max(), diff
    # the trained params stay full precision (not on the 8-bit grid)
    k = [x for pth, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
         if path_str(pth).split("/")[-1] == "kernel"][0]
    kq = quant.quantize_params({"a": {"kernel": k}}, [quant.QuantRule(".*kernel", 8)])["a"]["kernel"]
    assert np.abs(np.asarray(k) - np.asarray(kq)).max() > 0


def test_bfloat16_compute_step():
    """dtype=bfloat16 (compute) keeps float32 params and a float32 loss close to the fp32 one."""
    fp = tiny(1, 2)
    bf = models.create_model(fp.config.replace(dtype="bfloat16"), nnx.Rngs(2))
    cfg = tcfg()
    b = rand_batch(3)
    out = {}
    for name, m in (("fp32", fp), ("bf16", bf)):
        state, met = T.make_train_step(m, cfg)(T.init_train_state(params_of(m), cfg), b)
        out[name] = float(met["loss"][0])
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
    assert np.isfinite(out["bf16"]) and out["bf16"] != out["fp32"]
    np.testing.assert_allclose(out["bf16"], out["fp32"], rtol=3e-2)


def test_decay_mask_exempts_every_bias_and_norm():
    """BART's `final_logits_bias` is a bias: no weight decay on it (HF trains it as a buffer
    it never decays), nor on `bias` leaves or norms; kernels and embeddings decay."""
    from flax import nnx

    from kd_flax import models
    model = models.create_model(models.tiny_config("mbart", vocab_size=50), nnx.Rngs(0))
    mask = T.decay_mask(nnx.state(model, nnx.Param))
    flat = {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert any("final_logits_bias" in k for k in flat)
    for k, v in flat.items():
        exempt = k.split("/")[-1].endswith("bias") or "norm" in k
        assert v == (not exempt), k
    assert any(v for k, v in flat.items() if "embed" in k or "shared" in k)
