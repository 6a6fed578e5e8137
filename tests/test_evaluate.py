"""kd_flax.evaluate: metrics equal sacrebleu's own functions, stats equal numpy, tables,
bucketed Translator.translate with a stand-in model/decoder, and the stage end to end on stand-ins."""

import json
import math
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st

from kd_flax import config_base, corpus, evaluate, metrics, report
from kd_flax.translate import Translator

HYPS = ["the cat sat on the mat", "a dog runs in the park", "hello world", "it is raining today"]
REFS_A = ["the cat is on the mat", "a dog is running in the park", "hello world !", "it rains today"]
REFS_B = ["there is a cat on the mat", "the dog runs in a park", "hello , world", "today it is raining"]


def test_bleu_chrf_single_reference_equal_sacrebleu():
    b = metrics.corpus_bleu(HYPS, [REFS_A])
    c = metrics.corpus_chrf(HYPS, [REFS_A])
    assert b.score == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS_A]).score, abs=1e-9)
    assert c.score == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS_A]).score, abs=1e-9)
    assert b.signature.startswith("nrefs:1|") and "tok:13a" in b.signature
    assert "nrefs:1" in c.signature and c.name == "chrF2"
    assert 0 < b.score < 100 and 0 < c.score < 100


def test_bleu_chrf_multi_reference_equal_sacrebleu():
    b = metrics.corpus_bleu(HYPS, [REFS_A, REFS_B])
    c = metrics.corpus_chrf(HYPS, [REFS_A, REFS_B])
    assert b.score == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS_A, REFS_B]).score, abs=1e-9)
    assert c.score == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS_A, REFS_B]).score, abs=1e-9)
    assert "nrefs:2" in b.signature
    # A second reference can only add matching n-grams here.
    assert b.score > metrics.corpus_bleu(HYPS, [REFS_A]).score


def test_references_from_examples_variable_count():
    per_sentence = [[REFS_A[0], REFS_B[0]], REFS_A[1], [REFS_A[2]], [REFS_A[3], REFS_B[3]]]
    streams = metrics.references_from_examples(per_sentence)
    assert streams == [REFS_A, [REFS_B[0], None, None, REFS_B[3]]]
    b = metrics.corpus_bleu(HYPS, streams)
    ref = sacrebleu.metrics.BLEU().corpus_score(HYPS, streams)
    assert b.score == pytest.approx(ref.score, abs=1e-9)
    assert "nrefs:var" in b.signature


def test_metric_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"references\[0\]: has 3 sentences"):
        metrics.corpus_bleu(HYPS, [REFS_A[:3]])
    with pytest.raises(ValueError, match=r"references\[0\]: is a string"):
        metrics.corpus_chrf(HYPS, REFS_A)
    with pytest.raises(ValueError, match="hypotheses: empty"):
        metrics.corpus_bleu([], [[]])
    with pytest.raises(ValueError, match=r"refs_per_sentence\[1\]"):
        metrics.references_from_examples(["a", []])


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=2, max_size=8))
def test_split_stats_equal_numpy(scores):
    s = metrics.split_stats(scores)
    assert s.n == len(scores)
    assert s.mean == pytest.approx(float(np.mean(np.float64(scores))), abs=1e-9)
    assert s.std == pytest.approx(float(np.std(np.float64(scores), ddof=1)), abs=1e-9)


def test_split_stats_single_and_bad():
    s = metrics.split_stats([31.5])
    assert s.mean == 31.5 and math.isnan(s.std) and str(s) == "31.5"
    assert str(metrics.split_stats([30.0, 32.0])) == "31.0 ± 1.4"
    with pytest.raises(ValueError, match="scores"):
        metrics.split_stats([])
    with pytest.raises(ValueError, match="finite"):
        metrics.split_stats([1.0, float("nan")])


def test_format_table():
    rows = [{"model": "teacher", "parameters": "1,234", "BLEU": metrics.Stats(31.25, 1.04, 5),
             "sentences/s": 1234.5},
            {"model": "student|w8", "parameters": "321", "BLEU": metrics.Stats(29.0, float("nan"), 1),
             "sentences/s": 2.5, "extra": None}]
    table = report.format_table(rows)
    lines = table.strip().split("\n")
    assert len(lines) == 4
    assert [c.strip() for c in lines[0].strip("|").split("|")] == \
        ["model", "parameters", "BLEU", "sentences/s", "extra"]
    seps = [c.strip() for c in lines[1].strip("|").split("|")]
    assert seps[0].startswith(":") and seps[2].endswith(":") and seps[3].endswith(":")
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells == ["teacher", "1,234", "31.2 ± 1.0", "1234.5", ""]
    assert "student\\|w8" in lines[3] and "29.0" in lines[3] and "2.5" in lines[3]
    # All rows have the same number of cells (valid markdown).
    assert len({ln.count(" | ") for ln in lines}) == 1
    assert report.format_table(rows, columns=["model"]).count("\n") == 4
    with pytest.raises(ValueError, match="rows"):
        report.format_table([])
    with pytest.raises(ValueError, match=r"align\['model'\]"):
        report.format_table(rows, align={"model": "middle"})


def test_speed_meter_leaves_out_compiling_batches():
    m = metrics.SpeedMeter()
    m.add(10, 100, 5.0, first_call=True)
    assert m.includes_compile and m.sentences_per_s == pytest.approx(2.0)
    m.add(10, 100, 0.5)
    m.add(30, 200, 1.5)
    assert not m.includes_compile
    assert m.sentences_per_s == pytest.approx(40 / 2.0)
    assert m.tokens_per_s == pytest.approx(300 / 2.0)
    with m.time(4, first_call=False) as t:
        t.tokens = 8
    assert m.batches[-1][:2] == (4, 8) and m.batches[-1][2] >= 0
    with pytest.raises(ValueError, match="SpeedMeter.add"):
        m.add(-1, 0, 0.0)
    with pytest.raises(ValueError, match="hit_max"):
        m.add(2, 0, 0.0, hit_max=3)
    assert metrics.SpeedMeter().hit_max_new_tokens()["count"] == 0
    m.add(6, 10, 0.1, hit_max=3)  # counted over all batches, compiling ones too
    assert m.hit_max_new_tokens() == {"count": 3, "share": pytest.approx(3 / 60)}


def test_hit_max_new_tokens_is_no_eos_in_the_row():
    from kd_flax.translate import hit_max_new_tokens
    seqs = np.array([[[5, 6, 1, 0], [5, 6, 7, 8]], [[1, 0, 0, 0], [9, 9, 9, 2]]])
    assert hit_max_new_tokens(seqs, 1).tolist() == [[False, True], [False, True]]
    assert hit_max_new_tokens(seqs, (1, 2)).tolist() == [[False, True], [False, False]]
    assert hit_max_new_tokens(seqs[0], None).tolist() == [True, True]


def test_bucketing():
    """The one batching function (evaluate, dev BLEU and the teacher job): every sentence once,
    fixed batch size, each batch padded only to its bucket."""
    from kd_flax import data
    lengths = [3, 12, 5, 9, 2, 15, 7]
    examples = [corpus.Example(i, "", input_ids=np.arange(n, dtype=np.int32)) for i, n in enumerate(lengths)]
    batches = data.generation_batches(examples, 2, data.normalize_boundaries((8,), 16), pad_id=0)
    assert sorted(int(b["rows"][r]) for b in batches for r in np.flatnonzero(b["valid"])) == list(range(7))
    for b in batches:
        assert b["input_ids"].shape == (2, b["length"]) and 1 <= b["valid"].sum() <= 2
        assert all(lengths[b["rows"][r]] <= b["length"] for r in np.flatnonzero(b["valid"]))
    assert {b["length"] for b in batches} == {8, 16}
    with pytest.raises(ValueError, match="boundaries"):
        data.bucket_length(3, ())


# ---------------------------------------------------------------------------
# Translator.translate / run with stand-ins (the real model + decoder are tested by their owners)
# ---------------------------------------------------------------------------

class CharTokenizer:
    """Characters a..z and space → ids 3..29; 0 pad, 1 eos (appended), 2 unk."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens=True, truncation=False, max_length=None):
        out = []
        for t in texts:
            ids = [3 + "abcdefghijklmnopqrstuvwxyz ".index(ch) if ch in "abcdefghijklmnopqrstuvwxyz " else 2
                   for ch in t]
            if truncation and max_length:
                ids = ids[: max_length - 1]
            out.append(ids + [1])
        return {"input_ids": out}

    def batch_decode(self, rows, skip_special_tokens=True):
        alphabet = "abcdefghijklmnopqrstuvwxyz "
        return ["".join(alphabet[i - 3] for i in row if i >= 3) for row in rows]


def reverse_generate(calls, runs=None):
    """A stand-in decoder: the target is the source reversed (pad after EOS), shape [B, 1, L].
    Jitted by the Translator: `calls` gets one entry per compilation, `runs` one per call."""

    def generate(model, input_ids, attention_mask, *, max_new_tokens, num_beams, seed, **kw):
        calls.append((tuple(input_ids.shape), num_beams, max_new_tokens))  # while tracing
        if runs is not None:
            jax.debug.callback(lambda: runs.append(1))
        length = max_new_tokens
        keep = (attention_mask > 0) & (input_ids >= 3)
        n = keep.sum(-1, keepdims=True)
        pos = n - jnp.cumsum(keep, -1)  # a kept token's position once reversed
        pos = jnp.where(keep & (pos < length - 1), pos, length)  # room for EOS; `length` is dropped
        seqs = jax.vmap(lambda p, t: jnp.zeros((length,), jnp.int32).at[p].set(t, mode="drop"))(pos, input_ids)
        seqs = jnp.where(jnp.arange(length) == jnp.minimum(n, length - 1), 1, seqs)[:, None]
        return SimpleNamespace(sequences=seqs, scores=jnp.zeros(seqs.shape[:2]),
                               sum_logprobs=jnp.zeros(seqs.shape[:2]))

    return generate


def test_translate_buckets_restores_order_and_counts_tokens():
    calls, runs = [], []
    sources = ["abc", "hello world", "xy", "a much longer sentence here", "q", "mnop"]
    meter = metrics.SpeedMeter()
    model = {"w": jnp.zeros(())}  # a stand-in model: any pytree of arrays
    tr = Translator(model, CharTokenizer(), {"num_beams": 3, "max_new_tokens": 40}, batch_size=2,
                    bucket_boundaries=(8, 16, 32), generate_fn=reverse_generate(calls, runs))
    out = tr.translate(sources, meter=meter)
    assert out == [s[::-1] for s in sources]
    # Fixed batch size, bucketed lengths: shapes come from a small set, each compiled once.
    assert {c[0] for c in calls} <= {(2, 8), (2, 16), (2, 32)}
    assert tr.compilations() == len(calls) == len({c[0] for c in calls})
    assert all(c[1] == 3 and c[2] == 40 for c in calls)
    assert sum(b[0] for b in meter.batches) == len(sources)
    assert sum(b[1] for b in meter.batches) == sum(len(s) + 1 for s in sources)  # tokens + EOS
    # Each shape is decoded once untimed first (compilation), so every timed batch is warm.
    assert not any(b[3] for b in meter.batches) and not meter.includes_compile
    assert len(runs) == len(meter.batches) + len(calls)
    assert tr.translate(sources[:2], meter=meter) == [s[::-1] for s in sources[:2]]
    assert len(runs) == len(meter.batches) + len(calls)  # shapes seen before: no untimed rerun
    # source prefix and truncation reach the tokenizer.
    tr = Translator(model, CharTokenizer(), {"num_beams": 1, "max_new_tokens": 10}, batch_size=4,
                    source_prefix="zz ", max_source_length=4, generate_fn=reverse_generate(calls))
    assert tr.translate(["abcdef"]) == ["zz"]  # "zz " + EOS after truncation to 4, reversed, stripped
    assert tr.translate([]) == []
    with pytest.raises(ValueError, match="texts"):
        tr.translate("abc")


def test_split_names_and_selection():
    specs = ["synthetic:test0:60", "/d/newstest2014.en-fr.jsonl.gz", "hf:wmt14:fr-en@test", "a/b.tsv"]
    assert [evaluate.split_name(s) for s in specs] == ["test0", "newstest2014.en-fr", "test", "b"]
    # A parallel-file pair is named by the stem its files share.
    assert [evaluate.split_name(s) for s in ["a.en+a.fr", "/d/nt14.en-fr.en.gz+/d/nt14.en-fr.fr.gz",
                                             "d/src.txt+d/tgt.txt"]] == ["a", "nt14.en-fr", "src"]
    assert evaluate.select_splits(specs, ["b", "test0"]) == [("b", "a/b.tsv"), ("test0", specs[0])]
    assert [n for n, _ in evaluate.select_splits(["x/t.jsonl", "y/t.jsonl"], [])] == ["t", "t_2"]
    # Materialised synthetic specs are NAME-COUNT.jsonl; the config names them NAME.
    assert evaluate.select_splits(["d/test0-60.jsonl", "d/test1-60.jsonl"], ["test1"]) == \
        [("test1", "d/test1-60.jsonl")]
    with pytest.raises(ValueError, match=r"evaluate.splits: \['nope'\].*available"):
        evaluate.select_splits(specs, ["nope"])
    with pytest.raises(ValueError, match="data.test"):
        evaluate.select_splits([], [])


def test_run_stage_with_stand_ins(tmp_path):
    """The stage on a JSONL multi-reference test split, a stand-in model and decoder."""
    split = tmp_path / "test0.jsonl"
    rows = [{"src": "abc de", "ref": "ed cba", "refs": ["ed cba", "ed cb a"]},
            {"src": "hello", "ref": "olleh", "refs": ["olleh", "oleh"]},
            {"src": "xyz", "ref": "zyx", "refs": ["zyx", "zy x"]}]
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))
    workdir = tmp_path / "wd"
    (workdir / "distill" / "model").mkdir(parents=True)
    config = config_base.base_config()
    config.data.test = [str(split)]
    config.data.bucket_boundaries = (8,)
    config.evaluate.update(splits=[], models=["student"], num_beams=2, max_new_tokens=12, batch_size=2)
    model = {"w": jnp.zeros(())}  # a stand-in model: any pytree of arrays
    calls = []
    res = evaluate.run(config, str(workdir), load_fn=lambda p: (model, CharTokenizer()),
                       generate_fn=reverse_generate(calls))
    hyps = [r["src"][::-1] for r in rows]
    expect_bleu = sacrebleu.corpus_bleu(hyps, [[r["refs"][0] for r in rows], [r["refs"][1] for r in rows]])
    assert res["models"]["student"]["bleu"]["per_split"] == [pytest.approx(expect_bleu.score)]
    assert res["splits"] == ["test0"]
    out = workdir / "evaluate"
    saved = json.loads((out / "results.json").read_text())
    assert saved["models"]["student"]["bleu"]["mean"] == pytest.approx(expect_bleu.score)
    assert saved["models"]["student"]["bleu"]["std"] is None  # one split: no spread
    assert (out / "hyps" / "student" / "test0.txt").read_text().split("\n")[:3] == hyps
    report = (out / "report.md").read_text()
    assert "| student" in report and "nrefs:2" in report
    assert not [p for p in os.listdir(out) if "tmp" in p]
    # evaluate.also_num_beams: greedy scored beside beam 2, as rows of its own.
    config.evaluate.also_num_beams = [1]
    calls.clear()
    res = evaluate.run(config, str(workdir), load_fn=lambda p: (model, CharTokenizer()),
                       generate_fn=reverse_generate(calls))
    assert list(res["models"]) == ["student", "student_greedy"]
    assert {c[1] for c in calls} == {1, 2}  # each width decoded (compiled) separately
    assert res["models"]["student_greedy"]["num_beams"] == 1 and res["models"]["student"]["num_beams"] == 2
    assert (out / "hyps" / "student_greedy" / "test0.txt").read_text().split("\n")[:3] == hyps
    assert "| student_greedy" in (out / "report.md").read_text()
    config.evaluate.also_num_beams = []
    # The teacher is required to exist when asked for.
    config.evaluate.models = ["teacher"]
    with pytest.raises(ValueError, match="teacher.path"):
        evaluate.run(config, str(workdir), load_fn=lambda p: (model, CharTokenizer()),
                     generate_fn=reverse_generate(calls))


def test_run_real_tiny_model_on_8_devices(tmp_path):
    """The stage with its real loader and decoder: a tiny random T5 saved as an HF dir with a
    tokenizer, a multi-reference JSONL split read by kd_flax.data, decoded over an 8-device mesh."""
    from kd_flax import config_base, models
    from flax import nnx

    texts = ["the cat sat", "a dog ran far", "hello there world", "it rains", "le chat", "un chien"]
    tok = models.train_tokenizer(texts * 5, 64)
    cfg = models.tiny_config("t5", vocab_size=len(tok))
    model = models.create_model(cfg, nnx.Rngs(0))
    workdir = tmp_path / "wd"
    models.save_pretrained(model, str(workdir / "distill" / "model"), tokenizer=tok)
    split = tmp_path / "test0-3.jsonl"
    rows = [{"src": "the cat", "ref": "le chat", "refs": ["le chat", "un chat"]},
            {"src": "a dog ran", "ref": "un chien", "refs": ["un chien", "le chien"]},
            {"src": "hello world", "ref": "bonjour", "refs": ["bonjour", "salut"]}]
    split.write_text("".join(json.dumps(r) + "\n" for r in rows))

    config = config_base.base_config()
    config.data.test = [str(split)]
    config.data.bucket_boundaries = (8,)
    config.evaluate.update(splits=["test0"], models=["student"], num_beams=1, max_new_tokens=5, batch_size=3)
    res = evaluate.run(config, str(workdir))
    m = res["models"]["student"]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert m["parameters"] == n_params and m["size_mb"] == pytest.approx(n_params * 4 / 2**20, rel=1e-6)
    hyps = (workdir / "evaluate" / "hyps" / "student" / "test0.txt").read_text().split("\n")[:3]
    # The same model decoded directly, one batch padded to its own length (no buckets, no
    # mesh, no padding rows): bucketing and sharding must not change the output.
    from kd_flax.decoding import generate
    enc = tok([r["src"] for r in rows])["input_ids"]
    width = max(len(x) for x in enc)
    ids = np.zeros((len(enc), width), np.int32)
    mask = np.zeros((len(enc), width), np.int32)
    for i, x in enumerate(enc):
        ids[i, :len(x)], mask[i, :len(x)] = x, 1
    out = np.asarray(generate(model, ids, mask, max_new_tokens=5, num_beams=1).sequences)[:, 0]
    assert [t.strip() for t in tok.batch_decode(out.tolist(), skip_special_tokens=True)] == hyps
    streams = [[r["refs"][0] for r in rows], [r["refs"][1] for r in rows]]
    assert m["bleu"]["per_split"] == [pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score)]
    assert m["chrf"]["per_split"] == [pytest.approx(sacrebleu.corpus_chrf(hyps, streams).score)]
    assert m["splits"]["test0"]["num_refs"] == 2 and res["splits"] == ["test0"]
    # Runaways: hypotheses with no EOS within max_new_tokens=5 (an untrained model loops).
    hit = int(sum(cfg.eos_token_id not in row for row in out.tolist()))
    assert hit > 0 and m["hit_max_new_tokens"] == {"count": hit, "share": pytest.approx(hit / 3)}
    assert f"| {hit} ({100 * hit / 3:.1f}%)" in (workdir / "evaluate" / "report.md").read_text()


def test_dev_evaluator_decodes_current_params_with_one_translator(monkeypatch):
    """Dev BLEU during training: one Translator per train stage, each evaluation decoding with
    the params it is given (as a fresh decode of those params would) and compiling nothing new."""
    import ml_collections
    from flax import nnx
    from kd_flax import data, models, stages, train, translate

    texts = ["the cat sat", "a dog ran far", "hello there world", "it rains", "le chat", "un chien"]
    tok = models.train_tokenizer(texts * 5, 64)
    model = models.create_model(models.tiny_config("t5", vocab_size=len(tok)), nnx.Rngs(0))
    config = config_base.base_config()
    config.data.update(bucket_boundaries=(8,), max_source_length=16, max_target_length=6)
    tcfg = ml_collections.ConfigDict({"batch_size": 4, "eval_max_examples": 5})
    dev = data.tokenize_examples([corpus.Example(i, s, s) for i, s in enumerate(texts)], tok,
                                 max_source_length=16, max_target_length=6)
    made, decoded = [], []
    real_init, real_translate = translate.Translator.__init__, translate.Translator.translate
    monkeypatch.setattr(translate.Translator, "__init__", lambda self, *a, **k: (made.append(self), real_init(self, *a, **k))[1])
    monkeypatch.setattr(translate.Translator, "translate",
                        lambda self, *a, **k: decoded.append(real_translate(self, *a, **k)) or decoded[-1])
    graphdef, params, rest = train.split_model(model)
    evaluate_dev = stages._evaluator((graphdef, rest), tok, dev, config, tcfg)
    other = jax.tree.map(lambda x: x * 3.0, params)
    assert set(evaluate_dev(params)) == {"loss", "bleu", "chrf"}
    compiled = made[0].compilations()
    for p in (other, params):
        evaluate_dev(p)
    assert len(made) == 1 and made[0].compilations() == compiled  # new weights, no new compilation
    fresh = translate.Translator(nnx.merge(graphdef, other, rest), tok, dict(max_new_tokens=6, num_beams=1),
                                 batch_size=4, max_source_length=16, bucket_boundaries=(8,))
    assert decoded[1] == real_translate(fresh, texts[:5]) and decoded[0] == decoded[2] != decoded[1]


def test_report_rows_name_each_variants_ct2_conversion():
    """Two variants with a CTranslate2 row each: the rows are told apart by the variant."""
    from kd_flax import report
    assert report._row_name("seqkd_w8a8", "student_ct2_int8") == "seqkd_w8a8_ct2_int8"
    assert report._row_name("seqkd_w8a8", "student") == "seqkd_w8a8"
    assert report._row_name("", "student_ct2_int8") == "student_ct2_int8"
    assert report._row_name("seqkd", "teacher") == "teacher"


def test_report_reduces_seed_repeats_to_mean_std_across_seeds():
    """`<variant>_seed<k>` rows (and their `_greedy` rows) join their variant's row: mean ± sample
    std (ddof=1) across the seeds, as NumPy computes it; unrepeated rows are left out."""
    from kd_flax import report
    bleu = {"seqkd": 30.0, "seqkd_seed1": 32.0, "seqkd_seed2": 34.5, "seqkd_greedy": 29.0,
            "seqkd_seed1_greedy": 31.0, "seqkd_seed2_greedy": 30.0, "teacher": 40.0}
    rows = [{"model": k, "_bleu": v, "_chrf": v + 20} for k, v in bleu.items()]
    got = {r["model"]: r for r in report.seed_rows(rows)}
    assert set(got) == {"seqkd", "seqkd_greedy"} and got["seqkd"]["seeds"] == 3
    b = np.array([30.0, 32.0, 34.5])
    assert got["seqkd"]["BLEU"] == f"{b.mean():.1f} ± {b.std(ddof=1):.1f}"
    g = np.array([29.0, 31.0, 30.0]) + 20
    assert got["seqkd_greedy"]["chrF"] == f"{g.mean():.1f} ± {g.std(ddof=1):.1f}"
    assert report.seed_rows([r for r in rows if "seed" not in r["model"]]) == []
