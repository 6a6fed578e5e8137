"""The teacher's top-k cache (`generate.store_topk`, kd_flax.topk_cache): what the job stores
equals an online teacher forward's top-k; a SIGKILLed job resumes to identical files; the
distill stage trains on it without the teacher, and refuses a cache that does not fit."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_flax import data as data_lib
from kd_flax import io_utils, models, objectives, topk_cache
from kd_flax import pseudo_labels as G

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import generate as gen_config  # noqa: E402
from test_generate_job import kill9_once_exists, real_teacher  # noqa: E402,F401  (a fixture)

K = 4
N = 48  # the real_teacher corpus


@pytest.fixture(scope="module")
def teacher(real_teacher):
    return real_teacher


def _arg(d, shard=16):
    return f"teacher={d / 'teacher'},data={d / 'c.tsv'},batch=8,shard={shard},max_len=12"


def _config(d, target="pseudo", shard=16):
    c = gen_config.get_config(_arg(d, shard))
    c.generate.store_topk, c.generate.store_topk_target = K, target
    return c


def _files(workdir):
    out = os.path.join(workdir, "generate")
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
            if f.endswith((".jsonl", topk_cache.SUFFIX))}


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    work = tmp_path_factory.mktemp("ref")
    return work, G.run(_config(teacher), work, progress=False)


@pytest.mark.parametrize("target", ["pseudo", "gold"])
def test_stored_topk_equals_online_teacher_topk(teacher, reference, tmp_path, target):
    work, manifest = reference if target == "pseudo" else (tmp_path, G.run(_config(teacher, target), tmp_path,
                                                                             progress=False))
    info = manifest["topk"]
    assert (info["k"], info["target"], info["logprobs_dtype"], info["ids_dtype"]) == (K, target, "float16", "uint16")
    assert info["teacher_checksum"] == manifest["teacher"]["checksum"]
    assert info["tokenizer_checksum"] == manifest["teacher"]["tokenizer_checksum"]
    assert manifest["counts"]["topk_bytes"] > 0 and manifest["counts"]["topk_tokens"] > 0

    cache = topk_cache.DistillCache.open(_config(teacher, target), G.Workdir.of(work), K)
    model = models.load_pretrained(str(teacher / "teacher"))
    tok = models.load_tokenizer(str(teacher / "teacher"))
    recs = G.load_pseudo_labels(work)
    exs = recs if target == "pseudo" else [type(e)(e.id, e.src, e.gold) for e in recs]
    exs = data_lib.tokenize_examples(exs, tok, max_source_length=12, max_target_length=12)
    assert len(cache.rows) >= len(exs) == N
    c = model.config
    n_checked = 0
    for b in data_lib.batches(exs, 5, 0, pad_id=c.pad_token_id, eos_id=c.eos_token_id,
                              decoder_start_id=c.decoder_start_token_id, num_epochs=1,
                              max_source_length=12, max_target_length=12):
        logits, _, _ = objectives.forward(model, {k: jnp.asarray(v) for k, v in b.items()})
        lp, ids = jax.device_get(objectives.TeacherOutput(logits=logits).topk(K))
        for i in np.flatnonzero(b["valid"]):
            n = int(b["decoder_attention_mask"][i].sum())
            c_lp, c_ids = cache.rows[int(b["example_id"][i])]
            assert c_lp.shape == (n, K) and c_lp.dtype == np.float16 and c_ids.dtype == np.uint16
            np.testing.assert_allclose(c_lp.astype(np.float32), lp[i, :n], rtol=1e-3, atol=2e-3)
            np.testing.assert_array_equal(c_ids, ids[i, :n])
            n_checked += 1
    assert n_checked == N


def test_kill9_then_resume_gives_identical_files(teacher, reference, tmp_path):
    """`python -m kd_flax.main generate` with store_topk, SIGKILLed once the first top-k file
    exists (possibly before its part file), then resumed: the files of an uninterrupted run."""
    work = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    cmd = [sys.executable, "-m", "kd_flax.main", "generate", "--config",
           f"{ROOT}/configs/generate.py:{_arg(teacher)}", "--workdir", str(work),
           f"--config.generate.store_topk={K}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill9_once_exists(proc, work / "generate" / ("part-00000" + topk_cache.SUFFIX), timeout=180)
    before = _files(work)
    assert "part-00000" + topk_cache.SUFFIX in before and "part-00002.jsonl" not in before  # killed mid-run
    # As if killed between a shard's top-k file and its part file: the orphan is rewritten.
    (work / "generate" / ("part-00002" + topk_cache.SUFFIX)).write_bytes(b"half a file")
    assert io_utils.read_json(work / "generate" / "manifest.json")["status"] == "running"
    resumed = []
    G.run(_config(teacher), work, on_shard_done=resumed.append, progress=False)
    assert resumed and len(resumed) <= 3
    assert _files(work) == _files(reference[0])
    assert not [f for f in os.listdir(work / "generate") if f.endswith(".tmp")]


def test_store_topk_is_validated_and_off_keeps_old_settings(teacher):
    c = _config(teacher)
    c.generate.store_topk = -1
    with pytest.raises(ValueError, match=r"generate.store_topk: -1 is not allowed; allowed: an int >= 0"):
        G.validate_config(c)
    c.generate.store_topk, c.generate.store_topk_target = 2, "silver"
    with pytest.raises(ValueError, match=r"generate.store_topk_target: 'silver' is not allowed"):
        G.validate_config(c)
    off = G.job_settings(gen_config.get_config(_arg(teacher)), str(teacher / "teacher"), str(teacher / "teacher"), 1)
    assert "store_topk" not in off["generate"] and "max_target_length" not in off["data"]
    on = G.job_settings(_config(teacher), str(teacher / "teacher"), str(teacher / "teacher"), 1)
    assert on["generate"]["store_topk"] == K and on["data"]["max_target_length"] == 12


# ----------------------------------------------------------------------------- training side


def _cached_examples(teacher, workdir):
    cache = topk_cache.DistillCache.open(_config(teacher), G.Workdir.of(workdir), K)
    tok = models.load_tokenizer(str(teacher / "teacher"))
    exs = data_lib.tokenize_examples(G.load_pseudo_labels(workdir), tok, max_source_length=12,
                                     max_target_length=12)
    return cache, cache.attach(exs, "pseudo", "test")


@pytest.mark.parametrize("loss", [dict(ce_weight=0.0), dict(ce_weight=1.0, label_smoothing=0.1, temperature=2.0),
                                  dict(ce_weight=0.5, quant=True)])
def test_cached_topk_step_equals_online_topk_step(teacher, reference, loss):
    from flax import nnx

    from kd_flax import config_base, quant
    from kd_flax import train as train_lib

    loss = dict(loss)
    rules = quant.default_rules(8) if loss.pop("quant", False) else None
    _, exs = _cached_examples(teacher, reference[0])
    t_model = models.load_pretrained(str(teacher / "teacher"))
    c = t_model.config
    student = models.create_model(c, nnx.Rngs(7))
    batch = next(data_lib.batches(exs, 8, 0, pad_id=c.pad_token_id, eos_id=c.eos_token_id,
                                  decoder_start_id=c.decoder_start_token_id, max_source_length=12,
                                  max_target_length=12, bucket_boundaries=(4, 8)))
    batch = {k: jnp.asarray(v) for k, v in train_lib.model_batch(batch).items()}
    assert batch["teacher_topk_logprobs"].shape == batch["labels"].shape + (K,)
    online_batch = {k: v for k, v in batch.items() if not k.startswith("teacher_topk")}
    common = dict(loss, kd_weight=1.0, kd_type="topk", topk=K)
    on_spec = objectives.LossSpec.from_config(dict(common, teacher="online"))
    cached_spec = objectives.LossSpec.from_config(dict(common, teacher="cached"))
    assert not cached_spec.needs_teacher
    graph, params, rest = train_lib.split_model(student)

    def value_and_grad(spec, b, t):
        def f(p):
            terms = objectives.loss_terms(train_lib.forward_model((graph, rest), p, rules), b, t, spec=spec)
            return objectives.combine(terms, spec)
        return jax.value_and_grad(f)(params)

    l_on, g_on = value_and_grad(on_spec, online_batch, t_model)
    l_ca, g_ca = value_and_grad(cached_spec, batch, None)
    assert abs(float(l_on) - float(l_ca)) < 1e-3
    for a, b in zip(jax.tree.leaves(g_on), jax.tree.leaves(g_ca)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-3, rtol=1e-3)

    # The jitted train steps: online (teacher params passed) vs cached (no teacher at all).
    losses = []
    for spec_loss, t in ((dict(common, teacher="online"), t_model), (dict(common, teacher="cached"), None)):
        cfg = config_base.train_block(steps=10, loss=spec_loss)
        t_graph, t_params = (None, None) if t is None else (lambda g, p, r: ((g, r), p))(*train_lib.split_model(t))
        step = train_lib.make_train_step((graph, rest), cfg, teacher=t_graph, quant_rules=rules)
        state = train_lib.init_train_state(params, cfg, seed=0)
        b = online_batch if t is not None else batch
        _, m = step(state, b, t_params)
        losses.append(float(m["loss"][0]))
    assert abs(losses[0] - losses[1]) < 1e-3
    assert abs(losses[0] - float(l_on)) < 1e-3


def test_cache_that_does_not_fit_is_refused(teacher, reference, tmp_path):
    import shutil

    from kd_flax.corpus import Example

    work = G.Workdir.of(reference[0])
    with pytest.raises(topk_cache.TopKCacheError, match=r"K: cache 4, distill.loss.topk 3"):
        topk_cache.DistillCache.open(_config(teacher), work, 3)
    c = _config(teacher)
    c.data.max_target_length = 10
    with pytest.raises(topk_cache.TopKCacheError, match=r"data.max_target_length: cache 12, this run 10"):
        topk_cache.DistillCache.open(c, work, K)
    other = tmp_path / "other"
    shutil.copytree(teacher / "teacher", other)
    (other / "added_tokens.json").write_text("{}")
    from kd_flax import models
    same_tok = models.load_tokenizer(str(other))  # the same vocabulary from other files: accepted
    topk_cache.DistillCache.open(_config(teacher), work, K, tokenizer=same_tok)
    other_tok = models.load_tokenizer(str(other))
    other_tok.add_tokens(["zzz_not_in_the_teachers_vocab"])
    with pytest.raises(topk_cache.TopKCacheError, match=r"teacher checksum: .*tokenizer \(vocabulary"):
        topk_cache.DistillCache.open(_config(teacher), work, K, teacher_dir=str(other), tokenizer=other_tok)
    with pytest.raises(topk_cache.TopKCacheError, match=r"vocab size: cache \d+, student 7"):
        topk_cache.DistillCache.open(_config(teacher), work, K, vocab_size=7)
    cache, exs = _cached_examples(teacher, reference[0])
    with pytest.raises(topk_cache.TopKCacheError, match=r"1 of 2 examples have no top-k rows .*ids \[999\]"):
        cache.attach(exs[:1] + [Example(999, "x", "y")], "pseudo", "distill.stages[0]")
    with pytest.raises(topk_cache.TopKCacheError, match=r"distill.stages\[1\].targets='gold' but the top-k cache "
                                                        r"scored 'pseudo'"):
        cache.attach(exs, "gold", "distill.stages[1]")
    with pytest.raises(topk_cache.TopKCacheError, match=r"no finished top-k cache"):
        topk_cache.DistillCache.open(_config(teacher), G.Workdir.of(tmp_path / "empty"), K)


def test_distill_stage_trains_on_the_cache_without_the_teacher(teacher, tmp_path, monkeypatch):
    import shutil

    from flax import nnx

    from kd_flax import stages

    t_dir, tok_dir = tmp_path / "t", tmp_path / "tok"
    shutil.copytree(teacher / "teacher", t_dir)
    tok = models.load_tokenizer(str(t_dir))
    tok.save_pretrained(str(tok_dir))
    student_dir = tmp_path / "student"
    models.save_pretrained(models.create_model(models.load_pretrained(str(t_dir)).config, nnx.Rngs(5)),
                           student_dir, tokenizer=tok)
    c = _config(teacher)
    c.teacher.path, c.teacher.tokenizer = str(t_dir), str(tok_dir)
    work = tmp_path / "work"
    G.run(c, work, progress=False)
    shutil.rmtree(t_dir)  # the cached path never reads the teacher
    real_load = models.load_pretrained
    monkeypatch.setattr(models, "load_pretrained", lambda p, **kw: real_load(p, **kw) if str(p) == str(
        student_dir) else pytest.fail(f"loaded {p}"))
    c.student.init, c.student.path = "pretrained", str(student_dir)
    c.data.dev = ""
    c.distill.loss.update(kd_type="topk", teacher="cached", topk=K, kd_weight=1.0, ce_weight=0.5)
    c.distill.update(batch_size=8, eval_every=0, checkpoint_every=0, log_every=1)
    c.distill.stages = [{"targets": "pseudo", "steps": 2}]
    from kd_flax import config_base
    config_base.validate(c, check_paths=False)
    out = stages.run_distill(c, str(work))
    assert out["stages"][0]["steps"] == 2
    assert os.path.exists(os.path.join(G.Workdir.of(work).student_dir, "config.json"))
    c.distill.loss.kd_type = "kl"
    with pytest.raises(config_base.ConfigError, match=r"distill.loss.teacher: 'cached' .* serves kd_type='topk'"):
        config_base.validate(c, check_paths=False)


def test_batches_carry_each_examples_rows_through_buckets_shuffles_and_hosts():
    from kd_flax.corpus import Example

    rng = np.random.default_rng(0)
    exs = []
    for i in range(37):
        n = int(rng.integers(2, 11))
        cached = (np.full((n, 3), -i, np.float16), np.tile(np.arange(n)[:, None] * 100 + i, (1, 3)).astype(np.uint16))
        exs.append(Example(i, "s", "t", input_ids=np.arange(1, int(rng.integers(2, 9)), dtype=np.int32),
                           target_ids=np.append(np.arange(3, n + 2), 1).astype(np.int32), teacher_topk=cached))
    seen = set()
    for pi in range(2):
        for b in data_lib.batches(exs, 8, 3, pad_id=0, eos_id=1, decoder_start_id=0, bucket_boundaries=(4, 8),
                                  max_source_length=10, max_target_length=12, num_epochs=2, process_index=pi,
                                  process_count=2):
            T = b["labels"].shape[1]
            assert b["teacher_topk_logprobs"].shape == (4, T, 3) == b["teacher_topk_ids"].shape
            for r, e in enumerate(b["example_id"]):
                e = int(e) if e >= 0 else None
                if e is None:
                    continue
                n = len(exs[e].target_ids)
                np.testing.assert_array_equal(b["teacher_topk_ids"][r, :n], exs[e].teacher_topk[1])
                np.testing.assert_array_equal(b["teacher_topk_logprobs"][r, :n], -e)
                assert not b["teacher_topk_logprobs"][r, n:].any()
                seen.add(e)
    assert seen == set(range(37))
