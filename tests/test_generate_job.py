"""The pseudo-label job (kd_flax.pseudo_labels): output, resume after crashes, refusal, SeqInter,
filters, multi-host slices, compilations per bucket.

Most tests use a fake teacher whose outputs are known in closed form (candidate r copies the
source without its first r tokens), so the expected files can be written down independently;
one test runs the real tiny T5 + kd_flax.decoding through the CLI and kills it with SIGKILL.
"""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from jax.sharding import NamedSharding, PartitionSpec as P

from kd_flax import pseudo_labels as G
from kd_flax import io_utils
from kd_flax.workdir import Workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import generate as gen_config  # noqa: E402

WORDS = "the cat sat on a mat le chat est sur un tapis dog runs fast away".split()
Out = collections.namedtuple("Out", "sequences scores sum_logprobs")
TRACES = collections.Counter()


def fake_generate(model, input_ids, attention_mask, *, max_new_tokens, num_return_sequences,
                  seed, **kw):
    """Candidate r = the source tokens after dropping the first r + model['drop'], then EOS.

    score_r = -r - 0.01 * length (so candidate 0 is best); sum_logprobs = 2 * score.
    """
    TRACES[input_ids.shape] += 1  # runs while tracing only
    B, S = input_ids.shape
    pos = jnp.arange(max_new_tokens)
    lens = attention_mask.sum(-1) - 1  # without EOS
    seqs, scores = [], []
    for r in range(num_return_sequences):
        skip = r + model["drop"]
        tok = input_ids[:, jnp.clip(pos + skip, 0, S - 1)]
        clen = jnp.maximum(lens - skip, 0)
        seqs.append(jnp.where(pos < clen[:, None], tok, jnp.where(pos == clen[:, None], 1, 0)))
        scores.append(-r - 0.01 * clen.astype(jnp.float32))
    sc = jnp.stack(scores, 1)
    return Out(jnp.stack(seqs, 1).astype(jnp.int32), sc, 2 * sc)


def make_loader(drop=0):
    def load(config, teacher_path, tokenizer_path, mesh, rules):
        from transformers import AutoTokenizer

        model = {"drop": jnp.int32(drop)}
        if mesh is not None:  # weights replicated over the mesh, as load_pretrained would place them
            model = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), model)
        return model, AutoTokenizer.from_pretrained(tokenizer_path)
    return load


def word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORDS, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    hf.save_pretrained(path)
    return hf


def make_corpus(path, n=45, seed=0):
    """TSV with lengths 1..14 words and ref = src without its first (id % 3) words; 3 bad lines."""
    rng = np.random.default_rng(seed)
    lines, good = [], {}
    for i in range(n):
        if i in (5, 17):
            lines.append("\tno source")
        elif i == 30:
            lines.append("one field only")
        else:
            words = list(rng.choice(WORDS, int(rng.integers(1, 15))))
            k = i % 3 if len(words) > i % 3 else 0
            src, ref = " ".join(words), " ".join(words[k:])
            lines.append(f"{src}\t{ref}")
            good[i] = (src, ref)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return good


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gen")
    word_tokenizer(d / "teacher")
    (d / "teacher" / "weights.bin").write_bytes(b"fake weights v1")
    good = make_corpus(d / "c.tsv")
    return d, good


def config(d, **gen):
    c = gen_config.get_config(f"teacher={d / 'teacher'},data={d / 'c.tsv'},beams=3,n=3,batch=8,"
                              f"shard=10,max_len=20")
    c.data.bucket_boundaries = (4, 8, 16)
    c.generate.write_nbest = True
    for k, v in gen.items():
        if k in ("drop_unfinished", "max_length_ratio", "min_score", "min_ref_chrf"):
            c.generate.filters[k] = v
        else:
            c.generate[k] = v
    return c


def outputs(workdir):
    """{file name: bytes} of the result files (shards and dropped lists)."""
    out = os.path.join(workdir, "generate")
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
            if f.endswith(".jsonl")}


def records(workdir):
    recs = []
    for name, blob in outputs(workdir).items():
        if name.startswith("part-"):
            recs += [json.loads(line) for line in blob.decode().splitlines()]
    return recs


@pytest.fixture(scope="module")
def reference_run(setup):
    d, _ = setup
    TRACES.clear()
    manifest = G.run(config(d), d / "ref", generate_fn=fake_generate, load_fn=make_loader(),
                     progress=False)
    return d / "ref", manifest, dict(TRACES)


# ----------------------------------------------------------------------------- output


def test_job_output_manifest_and_skip(setup, reference_run):
    d, good = setup
    workdir, manifest, _ = reference_run
    assert manifest["status"] == "done"
    c = manifest["counts"]
    assert (c["read"], c["examples"], c["generated"], c["kept"]) == (45, 42, 42, 42)
    assert c["bad"] == {"empty_source": 2, "tsv_fields": 1}
    assert manifest["shards"] == [f"part-{k:05d}" for k in range(5)]  # 42 examples / 10 per shard
    assert manifest["teacher"]["checksum"] == io_utils.tree_checksum(d / "teacher")
    # re-runs find the teacher's per-file digests here instead of reading it again
    cached = io_utils.read_json(Workdir(workdir).checksum_cache)["files"]
    assert any(k.endswith("weights.bin") for k in cached)
    assert manifest["decoding"]["num_beams"] == 3
    recs = records(workdir)
    assert [r["id"] for r in recs] == sorted(good)  # complete, unique, in id order
    for r in recs:
        src, ref = good[r["id"]]
        words = src.split()
        assert (r["src"], r["ref"], r["hyp"]) == (src, ref, src)  # candidate 0 = the copy
        assert r["hyps"] == [" ".join(words[k:]) for k in range(3)]
        assert r["scores"] == pytest.approx([-k - 0.01 * max(len(words) - k, 0) for k in range(3)], abs=1e-6)
        assert r["sum_logprobs"] == pytest.approx([2 * s for s in r["scores"]], abs=1e-6)
    pseudo = G.load_pseudo_labels(workdir)
    assert [(e.id, e.src, e.ref, e.gold) for e in pseudo] == [(i, s, s, ref) for i, (s, ref) in sorted(good.items())]

    def must_not_load(*a):
        raise AssertionError("a finished job must be skipped")
    again = G.run(config(d), workdir, generate_fn=fake_generate, load_fn=must_not_load)
    assert again["status"] == "done" and again["counts"] == c


def test_compiles_once_per_bucket(setup, reference_run):
    d, good = setup
    _, manifest, traces = reference_run
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "teacher")
    lengths = [len(tok(s)["input_ids"]) for s, _ in good.values()]
    buckets = {min(b for b in (4, 8, 16, 20) if n <= b) for n in lengths}
    assert len(manifest["shards"]) > len(buckets) > 1
    assert traces == {(8, b): 1 for b in buckets}  # one compilation per bucket over all shards


# ----------------------------------------------------------------------------- resume


def test_resume_after_exception_equals_uninterrupted(setup, reference_run, tmp_path):
    d, _ = setup
    done = []

    def crash_after_two(name):
        done.append(name)
        if len(done) == 2:
            raise RuntimeError("simulated preemption")
    with pytest.raises(RuntimeError, match="preemption"):
        G.run(config(d), tmp_path, generate_fn=fake_generate, load_fn=make_loader(),
              on_shard_done=crash_after_two)
    assert io_utils.read_json(tmp_path / "generate" / "manifest.json")["status"] == "running"
    assert sorted(outputs(tmp_path)) == ["part-00000.jsonl", "part-00001.jsonl"]
    with pytest.raises(ValueError, match="status 'running'"):
        G.load_pseudo_labels(tmp_path)
    redone = []
    manifest = G.run(config(d), tmp_path, generate_fn=fake_generate, load_fn=make_loader(),
                     on_shard_done=redone.append)
    assert redone == ["part-00002", "part-00003", "part-00004"]  # finished shards not redone
    assert outputs(tmp_path) == outputs(reference_run[0])
    assert manifest["counts"] == reference_run[1]["counts"]


@pytest.fixture(scope="module")
def real_teacher(tmp_path_factory):
    """A tiny random T5 saved by kd_flax with a BPE tokenizer trained on the corpus."""
    from kd_flax import models

    d = tmp_path_factory.mktemp("real")
    rng = np.random.default_rng(3)
    pairs = [(" ".join(rng.choice(WORDS, int(rng.integers(1, 9)))),
              " ".join(rng.choice(WORDS, int(rng.integers(1, 9))))) for _ in range(48)]
    (d / "c.tsv").write_text("".join(f"{s}\t{r}\n" for s, r in pairs))
    tok = models.train_tokenizer([t for p in pairs for t in p], 60, kind="bpe")
    model = models.create_model(models.tiny_config("t5", vocab_size=len(tok)))
    models.save_pretrained(model, d / "teacher", tokenizer=tok)
    return d


def kill9_once_exists(proc, path, timeout=120):
    """SIGKILLs `proc` (stderr piped) as soon as `path` exists; fails if it ended on its own."""
    try:
        deadline = time.time() + timeout
        while not path.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    proc.stderr.close()


def test_cli_kill9_then_resume_equals_uninterrupted(real_teacher, tmp_path):
    """`python -m kd_flax.main generate` on a real tiny T5, SIGKILLed mid-run, then resumed."""
    d = real_teacher
    arg = f"teacher={d / 'teacher'},data={d / 'c.tsv'},batch=8,shard=1,max_len=12"
    ref = G.run(gen_config.get_config(arg), tmp_path / "ref", progress=False)
    assert ref["counts"]["generated"] == 48 and len(ref["shards"]) == 48
    work = tmp_path / "killed"
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="8")
    proc = subprocess.Popen([sys.executable, "-m", "kd_flax.main", "generate", "--config",
                             f"{ROOT}/configs/generate.py:{arg}", "--workdir", str(work)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill9_once_exists(proc, work / "generate" / "part-00000.jsonl")
    done_before = len(outputs(work))
    (work / "generate" / ".part-00047.jsonl.abc.tmp").write_text("half a shard")  # as if killed mid-write
    assert 1 <= done_before < 48  # killed mid-run
    assert io_utils.read_json(work / "generate" / "manifest.json")["status"] == "running"
    resumed = []
    G.run(gen_config.get_config(arg), work, on_shard_done=resumed.append, progress=False)
    assert len(resumed) == 48 - done_before
    assert outputs(work) == outputs(tmp_path / "ref")
    ids = [r["id"] for r in records(work)]
    assert ids == list(range(48))
    assert not [f for f in os.listdir(work / "generate") if f.endswith(".tmp")]


def test_changed_settings_are_refused(setup, reference_run, tmp_path):
    d, _ = setup
    G.run(config(d), tmp_path, generate_fn=fake_generate, load_fn=make_loader())
    with pytest.raises(G.GenerateError, match=r"changed: generate\.num_beams, generate\.num_return_sequences"):
        G.run(config(d, num_beams=4, num_return_sequences=4), tmp_path, generate_fn=fake_generate,
              load_fn=make_loader())
    weights = d / "teacher" / "weights.bin"
    weights.write_bytes(b"fake weights v2")
    try:
        with pytest.raises(G.GenerateError, match=r"changed: teacher\.checksum"):
            G.run(config(d), tmp_path, generate_fn=fake_generate, load_fn=make_loader())
    finally:
        weights.write_bytes(b"fake weights v1")
    m = G.run(config(d, num_beams=4), tmp_path, generate_fn=fake_generate, load_fn=make_loader(),
              force=True)
    assert m["status"] == "done" and m["decoding"]["num_beams"] == 4


# ----------------------------------------------------------------------------- SeqInter, filters


def test_select_candidate_matches_sacrebleu():
    hyps = ["le chat est sur le tapis", "un chat est sur un tapis", "le chien court", "un chat"]
    scores = [-0.1, -0.5, -0.2, -0.3]
    ref = "un chat est sur le tapis"
    for metric, fn in (("bleu", sacrebleu.sentence_bleu), ("chrf", sacrebleu.sentence_chrf)):
        sims = [fn(h, [ref]).score for h in hyps]
        assert G.select_candidate(hyps, scores, ref, metric) == int(np.argmax(sims))
    assert G.select_candidate(hyps, scores, ref, "best") == 0
    assert G.select_candidate(["a b", "a b"], [-2.0, -1.0], "a b", "bleu") == 1  # tie → higher score
    with pytest.raises(ValueError, match="generate.select"):
        G.select_candidate(hyps, scores, ref, "ter")


@pytest.mark.parametrize("metric", ["bleu", "chrf"])
def test_seqinter_job_picks_closest_candidate(setup, tmp_path, metric):
    d, good = setup
    G.run(config(d, select=metric), tmp_path, generate_fn=fake_generate, load_fn=make_loader())
    fn = sacrebleu.sentence_bleu if metric == "bleu" else sacrebleu.sentence_chrf
    picked = collections.Counter()
    for r in records(tmp_path):
        sims = [fn(h, [r["ref"]]).score for h in r["hyps"]]
        best = max(sims)
        want = min((i for i in range(3) if sims[i] == best), key=lambda i: -r["scores"][i])
        assert r["hyp"] == r["hyps"][want] and r["score"] == r["scores"][want]
        picked[want] += 1
    assert picked[0] and (picked[1] + picked[2])  # not always the top-scored candidate


def test_filters_drop_and_record(setup, tmp_path):
    d, good = setup
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d / "teacher")
    flt = dict(max_length_ratio=1.5, min_score=-0.095, min_ref_chrf=90.0)
    m = G.run(config(d, **flt), tmp_path, generate_fn=fake_generate, load_fn=make_loader(drop=1))
    want_drop, want_keep = {}, []
    for i, (src, ref) in sorted(good.items()):
        hyp = " ".join(src.split()[1:])  # drop=1: the best candidate lacks the first word
        n_src, n_hyp = len(tok(src, add_special_tokens=False)["input_ids"]), len(hyp.split())
        ratio = np.inf if min(n_src, n_hyp) == 0 else max(n_src / n_hyp, n_hyp / n_src)
        if ratio > 1.5:
            want_drop[i] = "max_length_ratio"
        elif -0.01 * n_hyp < -0.095:
            want_drop[i] = "min_score"
        elif sacrebleu.sentence_chrf(hyp, [ref]).score < 90.0:
            want_drop[i] = "min_ref_chrf"
        else:
            want_keep.append(i)
    assert set(want_drop.values()) == {"max_length_ratio", "min_score", "min_ref_chrf"}
    assert [r["id"] for r in records(tmp_path)] == want_keep
    dropped = {}
    for name in m["dropped_files"]:
        for line in open(tmp_path / "generate" / name):
            rec = json.loads(line)
            dropped[rec["id"]] = rec["reason"]
    assert dropped == want_drop
    assert m["counts"]["dropped"] == dict(collections.Counter(want_drop.values()))
    assert m["counts"]["kept"] == len(want_keep) and m["counts"]["generated"] == 42


def test_outputs_that_hit_max_new_tokens_are_counted(setup, reference_run, tmp_path, caplog):
    """Candidates with no EOS within max_new_tokens (runaways) are counted, kept or not."""
    d, good = setup
    assert reference_run[1]["counts"]["hit_max_new_tokens"] == 0  # max_new_tokens=20 > every source
    with caplog.at_level("WARNING", logger="kd_flax.pseudo_labels"):
        m = G.run(config(d, max_new_tokens=6), tmp_path, generate_fn=fake_generate, load_fn=make_loader(),
                  progress=False)
    # The fake copies the source (one token a word) then EOS: sources of ≥ 6 words never get one.
    hit = sum(len(src.split()) >= 6 for src, _ in good.values())
    assert 0 < hit < len(good)
    c = m["counts"]
    assert (c["hit_max_new_tokens"], c["hit_max_new_tokens_share"]) == (hit, pytest.approx(hit / 42))
    assert sum(io_utils.read_json(tmp_path / "generate" / f"{n}.stats.json")["hit_max_new_tokens"]
               for n in m["shards"]) == hit
    assert f"{hit} of 42 pseudo-labels" in caplog.text and "max_new_tokens without EOS" in caplog.text


def test_drop_unfinished_drops_exactly_the_outputs_without_eos(setup, tmp_path):
    """filters.drop_unfinished: a pseudo-label that hit max_new_tokens without EOS (a loop) is
    dropped with reason drop_unfinished; every finished one is kept."""
    d, good = setup
    m = G.run(config(d, max_new_tokens=6, drop_unfinished=True), tmp_path, generate_fn=fake_generate,
              load_fn=make_loader(), progress=False)
    long = {i for i, (src, _) in good.items() if len(src.split()) >= 6}  # the fake copies the source
    assert 0 < len(long) < len(good)
    assert {r["id"] for r in records(tmp_path)} == set(good) - long
    dropped = [json.loads(ln) for n in m["dropped_files"] for ln in open(tmp_path / "generate" / n)]
    assert {r["id"] for r in dropped} == long and {r["reason"] for r in dropped} == {"drop_unfinished"}
    assert m["counts"]["dropped"] == {"drop_unfinished": len(long)}
    assert m["counts"]["hit_max_new_tokens"] == len(long)


def test_drop_unfinished_must_be_a_bool(setup, tmp_path):
    d, _ = setup
    with pytest.raises(ValueError, match=r"generate.filters.drop_unfinished: 'yes' is not allowed; allowed: True, False"):
        G.run(config(d, drop_unfinished="yes"), tmp_path, generate_fn=fake_generate, load_fn=make_loader())


def test_progress_lines_without_a_bar(setup, tmp_path, caplog, monkeypatch):
    """No bar (progress=False, or stderr not a terminal): a line on `kd_flax.progress` every
    PROGRESS_EVERY_S seconds with sentences done/total, sentences/s, target tokens/s and ETA."""
    from kd_flax import metrics
    d, good = setup
    monkeypatch.setattr(metrics, "PROGRESS_EVERY_S", 0.0)  # a line after every batch
    with caplog.at_level("INFO", logger=metrics.PROGRESS_LOGGER):
        G.run(config(d), tmp_path / "a", generate_fn=fake_generate, load_fn=make_loader(), progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == metrics.PROGRESS_LOGGER]
    pat = (r"generate: (\d+)/42 sentences \([\d.]+%\), ([\d.]+) sentences/s, (\d+) target tokens/s, "
           r"ETA (\d+h \d\dm \d\ds|\?)$")
    done = [int(re.match(pat, ln)[1]) for ln in lines]
    assert done == sorted(done) and done[-1] == 42 and len(done) > 5, lines
    caplog.clear()
    with caplog.at_level("INFO", logger=metrics.PROGRESS_LOGGER):  # a bar instead
        G.run(config(d), tmp_path / "b", generate_fn=fake_generate, load_fn=make_loader(), progress=True)
    assert not [r for r in caplog.records if r.name == metrics.PROGRESS_LOGGER]


def test_progress_log_every_n_seconds(caplog):
    from kd_flax import metrics
    now = [0.0]
    p = metrics.ProgressLog(100, "job", every_s=30, clock=lambda: now[0])
    with caplog.at_level("INFO", logger=metrics.PROGRESS_LOGGER):
        for t, n in ((10, 10), (29, 10), (40, 20), (50, 10)):
            now[0] = t
            p.add(n, 5 * n)
    assert [r.getMessage() for r in caplog.records] == [
        "job: 40/100 sentences (40.0%), 1.0 sentences/s, 5 target tokens/s, ETA 0h 01m 00s"]
    assert not metrics.ProgressLog(1, "x", enabled=False, every_s=0).add(1, 1)


# ----------------------------------------------------------------------------- multi-host


def test_multihost_slices_cover_corpus_once(setup, reference_run, tmp_path):
    d, good = setup
    results = {}
    for p in (2, 1, 0):  # process 0 last: it writes the manifest once all shards exist
        results[p] = G.run(config(d), tmp_path, generate_fn=fake_generate, load_fn=make_loader(),
                           process_index=p, process_count=3)
    assert results[1]["status"] == "running" and results[0]["status"] == "done"
    names = sorted(outputs(tmp_path))
    assert names == [f"part-p{p:03d}-{k:05d}.jsonl" for p in range(3) for k in range(2)]
    per_proc = collections.defaultdict(list)
    for name, blob in outputs(tmp_path).items():
        per_proc[name[6:9]] += [json.loads(line)["id"] for line in blob.decode().splitlines()]
    ids = sorted(sum(per_proc.values(), []))
    assert ids == sorted(good)  # every example exactly once
    ranges = [(min(v), max(v)) for _, v in sorted(per_proc.items())]
    assert ranges[0][1] < ranges[1][0] and ranges[1][1] < ranges[2][0]  # contiguous slices
    # same pseudo-labels as the single-process run
    single = {r["id"]: r["hyp"] for r in records(reference_run[0])}
    assert {e.id: e.ref for e in G.load_pseudo_labels(tmp_path)} == single
    with pytest.raises(G.GenerateError, match="process_count"):
        G.run(config(d), tmp_path, generate_fn=fake_generate, load_fn=make_loader(),
              process_index=0, process_count=2)


# ----------------------------------------------------------------------------- config


def test_config_arg_parsing_and_validation(setup):
    d, _ = setup
    c = gen_config.get_config("teacher=T,data=D,src=de,tgt=en,beams=5,n=2,select=chrf,max_len=64,"
                              "prefix=translate German to English:")
    assert (c.teacher.path, c.data.train, c.data.src_lang, c.data.tgt_lang) == ("T", "D", "de", "en")
    assert (c.generate.num_beams, c.generate.num_return_sequences, c.generate.select) == (5, 2, "chrf")
    assert c.data.max_source_length == c.generate.max_new_tokens == 64
    assert c.data.source_prefix == "translate German to English: "
    with pytest.raises(ValueError, match=r"unknown argument key\(s\) \['beam'\].*allowed"):
        gen_config.get_config("beam=4")
    with pytest.raises(ValueError, match="select='x'; allowed: best, bleu, chrf"):
        gen_config.get_config("select=x")
    bad = config(d, select="nearest", num_return_sequences=5)
    bad.generate.filters.min_ref_chrf = -1.0
    with pytest.raises(ValueError) as e:
        G.validate_config(bad)
    msg = str(e.value)
    assert "generate.select: 'nearest' is not allowed; allowed: ['best', 'bleu', 'chrf']" in msg
    assert "generate.filters.min_ref_chrf" in msg
    mono = config(d, select="bleu")
    mono.data.train = str(d / "mono.txt")
    (d / "mono.txt").write_text("the cat\n")
    with pytest.raises(G.GenerateError, match="need a reference"):
        G.run(mono, d / "mono", generate_fn=fake_generate, load_fn=make_loader())


def test_unsharded_translator_lays_out_the_head_once(real_teacher):
    """Without a mesh the job's Translator gives its jitted function the LM head laid out once
    (not once per batch inside the jit); the tokens are kd_flax generate's own."""
    from kd_flax import decoding, models
    from kd_flax.translate import Translator

    model = models.load_pretrained(real_teacher / "teacher")
    kw = dict(max_new_tokens=6, num_beams=2)
    translator = Translator(model, None, kw)
    head = translator.head_for()
    assert head is not None and translator.head_for()[0] is head[0]
    ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (4, 5)).astype(np.int32)
    mask = np.ones_like(ids)
    seqs, scores, _ = translator(ids, mask, 0)
    assert translator.head_for()[0] is head[0]  # still the same layout after a call
    want = decoding.generate(model, ids, mask, **kw)
    np.testing.assert_array_equal(seqs, want.sequences)
    np.testing.assert_allclose(scores, want.scores, rtol=1e-6)
    assert Translator(model, None, kw, generate_fn=lambda *a, **k: None).head_for() is None  # another decoder


def test_beams_and_returned_sequences_are_checked_by_one_function(setup):
    """decoding.check_search is the one check of num_return_sequences against num_beams: the
    decoder, the base config and this stage's config give its message, naming the config key."""
    from kd_flax import config_base, decoding

    d, _ = setup
    with pytest.raises(ValueError) as want:
        decoding.check_search(2, 3, prefix="generate.")
    with pytest.raises(ValueError) as job:
        G.validate_config(config(d, num_beams=2, num_return_sequences=3))
    base = config_base.base_config()
    base.generate.update(num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError) as cfg:
        config_base.validate(base, check_paths=False)
    assert str(want.value).startswith("generate.num_return_sequences must be <= generate.num_beams (2)")
    assert str(want.value) in str(job.value) and str(want.value) in str(cfg.value)
    with pytest.raises(ValueError, match=r"^num_return_sequences must be <= num_beams \(2\)"):
        decoding.resolve_settings(types.SimpleNamespace(eos_token_id=1, pad_token_id=0, decoder_start_token_id=0),
                                  max_new_tokens=4, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="generate.do_sample=True needs generate.num_beams=1"):
        G.validate_config(config(d, num_beams=2, num_return_sequences=1, do_sample=True))
