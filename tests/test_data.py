"""kd_flax.data: corpus formats, bad-line reports, tokenisation, buckets, host slices, batches."""

import gzip
import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kd_flax import corpus as C
from kd_flax import data, io_utils

WORDS = "the cat sat on a mat le chat est sur un tapis".split()


def word_tokenizer(path=None):
    """A word-level HF fast tokenizer (pad 0, eos 1, unk 2) that appends </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(WORDS + ["translate", "English", "to", "French:"],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                 unk_token="<unk>")
    if path:
        hf.save_pretrained(path)
    return hf


def write(path, content: bytes):
    if str(path).endswith(".gz"):
        content = gzip.compress(content)
    path.write_bytes(content)
    return str(path)


# ----------------------------------------------------------------------------- formats


def test_tsv_gz_and_every_tsv_bad_kind(tmp_path):
    p = write(tmp_path / "c.tsv.gz", b"the cat\tle chat\n\tvide\nno tab here\n"
              b"bad \xff byte\tx\na\tb\tc\nsat\t \non a mat\tsur un tapis\r\n")
    corpus = C.read_corpus(p)
    assert [(e.id, e.src, e.ref) for e in corpus] == [(0, "the cat", "le chat"),
                                                      (6, "on a mat", "sur un tapis")]
    r = corpus.report
    assert r.read == 7 and r.kept == 2
    assert dict(r.bad) == {"empty_source": 1, "tsv_fields": 2, "invalid_utf8": 1, "empty_target": 1}
    assert [str(b).split(": ")[0] for b in r.samples] == [f"{p}:{i}" for i in (2, 3, 4, 5, 6)]
    assert r.samples[3].kind == "tsv_fields" and "found 3" in r.samples[3].message
    with pytest.raises(ValueError, match=rf"{p}:2: empty_source"):
        C.read_corpus(p, strict=True)


def test_jsonl_plain_translation_and_bad_kinds(tmp_path):
    lines = [json.dumps({"src": "the cat", "ref": "le chat"}),
             '{"src": broken',
             json.dumps({"translation": {"en": "a mat", "fr": "un tapis"}}),
             json.dumps(["a", "list"]),
             json.dumps({"other": "x"}),
             json.dumps({"src": 3, "ref": "x"}),
             json.dumps({"translation": {"de": "x", "fr": "y"}}),
             json.dumps({"src": "sat", "refs": ["est", "assis"]})]
    p = write(tmp_path / "c.jsonl", ("\n".join(lines) + "\n").encode())
    corpus = C.read_corpus(p, src_lang="en", tgt_lang="fr")
    assert [(e.id, e.src, e.ref, e.refs) for e in corpus] == [
        (0, "the cat", "le chat", None), (2, "a mat", "un tapis", None), (7, "sat", None, ("est", "assis"))]
    assert dict(corpus.report.bad) == {"invalid_json": 3, "missing_key": 2}
    assert [b.line for b in corpus.report.samples] == [2, 4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"src_lang"):
        C.read_corpus(write(tmp_path / "t.jsonl", lines[2].encode() + b"\n"))
    # configurable keys
    q = write(tmp_path / "k.jsonl", b'{"en": "a cat", "fr": "un chat"}\n')
    assert C.read_corpus(q, src_key="en", ref_key="fr")[0].ref == "un chat"


def test_text_pair_template_plus_and_length_mismatch(tmp_path):
    write(tmp_path / "train.en.gz", b"the cat\na mat\nsat\nextra\n")
    write(tmp_path / "train.fr.gz", b"le chat\nun tapis\nassis\n")
    tpl = str(tmp_path / "train.{lang}.gz")
    corpus = C.read_corpus(tpl, src_lang="en", tgt_lang="fr")
    assert [(e.id, e.src, e.ref) for e in corpus] == [(0, "the cat", "le chat"), (1, "a mat", "un tapis"),
                                                      (2, "sat", "assis")]
    assert dict(corpus.report.bad) == {"length_mismatch": 1}
    assert str(corpus.report.samples[0]).startswith(f"{tmp_path / 'train.en.gz'}:4: length_mismatch")
    plus = f"{tmp_path / 'train.en.gz'}+{tmp_path / 'train.fr.gz'}"
    assert [e.src for e in C.read_corpus(plus)] == [e.src for e in corpus]
    with pytest.raises(ValueError, match="train.en.gz:4: length_mismatch"):
        C.read_corpus(plus, strict=True)
    with pytest.raises(ValueError, match="src_lang"):
        C.read_corpus(tpl)
    # monolingual: one plain file
    mono = C.read_corpus(str(tmp_path / "train.en.gz"))
    assert [e.ref for e in mono] == [None] * 4 and [e.id for e in mono] == [0, 1, 2, 3]
    # a list of specs: ids continue
    both = C.read_corpus([str(tmp_path / "train.fr.gz"), str(tmp_path / "train.en.gz")])
    assert [e.id for e in both] == list(range(7))


def test_datasets_local_json_and_csv(tmp_path):
    p = write(tmp_path / "d.jsonl", b'{"src": "the cat", "ref": "le chat"}\n{"src": "", "ref": "x"}\n'
              b'{"src": "a mat", "ref": "un tapis"}\n')
    corpus = C.read_corpus(f"hf:{p}@train")
    assert [(e.id, e.src, e.ref) for e in corpus] == [(0, "the cat", "le chat"), (2, "a mat", "un tapis")]
    assert dict(corpus.report.bad) == {"empty_source": 1}
    csv = write(tmp_path / "d.csv", b"en,fr\nthe cat,le chat\nsat,assis\n")
    corpus = C.read_corpus(f"hf:{csv}", src_key="en", ref_key="fr")
    assert [(e.src, e.ref) for e in corpus] == [("the cat", "le chat"), ("sat", "assis")]
    import datasets

    ds = datasets.Dataset.from_list([{"translation": {"en": "a cat", "fr": "un chat"}}])
    assert C.read_corpus(ds, src_lang="en", tgt_lang="fr")[0].ref == "un chat"
    with pytest.raises(ValueError, match="no source column 'src'"):
        C.read_corpus(f"hf:{csv}")


def test_missing_file_and_bad_fmt(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        C.read_corpus(str(tmp_path / "nope.tsv"))
    with pytest.raises(ValueError, match="fmt must be one of"):
        C.read_corpus(str(tmp_path / "x"), fmt="csv")


# ----------------------------------------------------------------------------- tokenising, buckets


def test_tokenize_prefix_truncation_and_eos():
    tok = word_tokenizer()
    exs = [C.Example(0, "the cat sat on a mat", "le chat"), C.Example(1, "cat", None)]
    report = C.CorpusReport()
    out = data.tokenize_examples(exs, tok, max_source_length=5, max_target_length=8,
                                 source_prefix="translate English to French: ", report=report)
    ref0 = tok("translate English to French: the cat sat on a mat")["input_ids"]
    assert out[0].input_ids.tolist() == ref0[:4] + [tok.eos_token_id]
    assert out[1].input_ids.tolist() == tok("translate English to French: cat")["input_ids"][:4] + [1]
    assert out[0].target_ids.tolist() == tok("le chat")["input_ids"] and out[1].target_ids is None
    assert report.truncated_source == 2 and report.truncated_target == 0
    assert exs[0].input_ids is None  # inputs not modified


def test_bucket_length_and_generation_batches():
    bounds = data.normalize_boundaries((16, 4, 8, 99), 12)
    assert bounds == (4, 8, 12)
    assert [data.bucket_length(n, bounds) for n in (1, 4, 5, 12, 13, 25)] == [4, 4, 8, 12, 24, 36]
    rng = np.random.default_rng(0)
    exs = [C.Example(i, "x", input_ids=np.arange(1, int(n) + 1, dtype=np.int32))
           for i, n in enumerate(rng.integers(1, 13, size=23))]
    batches = data.generation_batches(exs, 4, bounds, pad_id=0)
    seen = []
    for b in batches:
        assert b["input_ids"].shape == (4, b["length"]) and b["length"] in bounds
        for row, ok, i in zip(b["input_ids"], b["valid"], b["ids"]):
            n = int((row != 0).sum())
            assert data.bucket_length(n, bounds) == b["length"]
            if ok:
                seen.append(int(i))
                assert row[:n].tolist() == exs[i].input_ids.tolist()
        assert (b["attention_mask"] == (b["input_ids"] != 0)).all()
        assert (b["ids"][~b["valid"]] == -1).all()
    assert sorted(seen) == list(range(23))
    again = data.generation_batches(exs[::-1], 4, bounds, pad_id=0)
    assert [b["ids"].tolist() for b in again] == [b["ids"].tolist() for b in batches]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 200), count=st.integers(1, 9))
def test_host_slices_cover_once(n, count):
    got = []
    for p in range(count):
        lo, hi = data.host_range(n, p, count)
        assert 0 <= lo <= hi <= n and hi - lo in (n // count, n // count + 1)
        got += list(range(n))[lo:hi]
        assert list(data.host_slice(list(range(n)), p, count)) == list(range(n))[lo:hi]
    assert got == list(range(n))


def test_host_range_rejects_bad_index():
    with pytest.raises(ValueError, match="process_index"):
        data.host_range(10, 3, 3)


# ----------------------------------------------------------------------------- training batches


def _train_examples(n=13):
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        s = rng.integers(3, 20, size=int(rng.integers(1, 9))).astype(np.int32)
        t = np.append(rng.integers(3, 20, size=int(rng.integers(0, 7))), 1).astype(np.int32)
        if i % 3 == 0:
            t = t[:-1]  # no EOS: batches() must add it
        out.append(C.Example(100 + i, "x", "y", input_ids=s, target_ids=t))
    return out


KW = dict(pad_id=0, eos_id=1, decoder_start_id=0)


@pytest.mark.parametrize("bounds", [None, (4, 8)])
def test_batches_epoch_contents_labels_and_resume(bounds):
    exs = _train_examples()
    kw = dict(KW, bucket_boundaries=bounds, max_source_length=8, max_target_length=8)
    spe = data.steps_per_epoch(exs, 4, bucket_boundaries=bounds, max_source_length=8,
                               max_target_length=8, eos_id=1)
    full = list(data.batches(exs, 4, seed=7, num_epochs=3, process_index=0, process_count=1, **kw))
    assert len(full) == 3 * spe
    by_id = {e.id: e for e in exs}
    for epoch in range(3):
        ids = np.concatenate([b["example_id"][b["valid"]] for b in full[epoch * spe:(epoch + 1) * spe]])
        assert sorted(ids.tolist()) == sorted(by_id)  # each example exactly once per epoch
    assert [b["example_id"].tolist() for b in full[:spe]] != [b["example_id"].tolist() for b in full[spe:2 * spe]]
    shapes = {(b["input_ids"].shape, b["labels"].shape) for b in full}
    if bounds is None:
        assert shapes == {((4, 8), (4, 8))}
    for b in full:
        for r in range(4):
            ex = by_id[abs(int(b["example_id"][r]))] if b["valid"][r] else None
            lab = b["labels"][r][b["decoder_attention_mask"][r] == 1].tolist()
            if ex is not None:
                want = ex.target_ids.tolist() + ([] if ex.target_ids[-1] == 1 else [1])
                assert lab == want
                assert b["input_ids"][r][b["attention_mask"][r] == 1].tolist() == ex.input_ids.tolist()
                assert (b["loss_mask"][r] == b["decoder_attention_mask"][r]).all()
            else:
                assert not b["loss_mask"][r].any() and b["attention_mask"][r].any()
            dec = b["decoder_input_ids"][r]
            assert dec[0] == 0 and dec[1:len(lab)].tolist() == lab[:-1]
    # resume: starting at step k gives exactly the tail
    for k in (1, spe, spe + 2):
        tail = list(data.batches(exs, 4, seed=7, start_step=k, num_epochs=3, process_index=0,
                                 process_count=1, **kw))
        assert len(tail) == len(full) - k
        for a, b in zip(tail, full[k:]):
            assert all(np.array_equal(a[key], b[key]) for key in a)


def test_batches_split_over_processes():
    exs = _train_examples()
    glob = list(data.batches(exs, 4, seed=3, num_epochs=1, process_index=0, process_count=1, **KW))
    parts = [list(data.batches(exs, 4, seed=3, num_epochs=1, process_index=p, process_count=2, **KW))
             for p in range(2)]
    for g, a, b in zip(glob, *parts):
        for key in g:
            assert np.array_equal(np.concatenate([a[key], b[key]]), g[key])
    with pytest.raises(ValueError, match="divisible"):
        next(data.batches(exs, 3, seed=3, process_index=0, process_count=2, **KW))


def test_tree_checksum_cache_skips_unchanged_files(tmp_path, monkeypatch):
    d, cache = tmp_path / "ckpt", tmp_path / "cache.json"
    io_utils.atomic_write_text(d / "model.safetensors", "w" * 1000)
    io_utils.atomic_write_text(d / "sub" / "config.json", "{}")
    plain = io_utils.tree_checksum(d)
    assert io_utils.tree_checksum(d, cache=cache) == plain
    assert len(io_utils.read_json(cache)["files"]) == 2
    real_sha = io_utils.sha256_file
    reads = []
    monkeypatch.setattr(io_utils, "sha256_file", lambda f: reads.append(f) or real_sha(f))
    assert io_utils.tree_checksum(d, cache=cache) == plain and reads == []  # nothing read again
    io_utils.atomic_write_text(d / "sub" / "config.json", '{"a": 1}')  # a changed file is re-read
    changed = io_utils.tree_checksum(d, cache=cache)
    assert [f.name for f in reads] == ["config.json"]
    assert changed != plain and changed == io_utils.tree_checksum(d)
    reads.clear()
    assert io_utils.tree_checksum(d, cache=cache) == changed and reads == []
    cache.write_text("{not json")  # a damaged cache costs a re-read, never a wrong checksum
    assert io_utils.tree_checksum(d, cache=cache) == changed
    assert io_utils.tree_checksum(d / "model.safetensors", cache=cache) == real_sha(d / "model.safetensors")


def test_io_utils_atomic_and_checksum(tmp_path):
    io_utils.atomic_write_json(tmp_path / "d" / "a.json", {"b": 1})
    io_utils.atomic_write_text(tmp_path / "d" / "s" / "t.txt", "é")
    assert io_utils.read_json(tmp_path / "d" / "a.json") == {"b": 1}
    before = io_utils.tree_checksum(tmp_path / "d")
    (tmp_path / "d" / ".tmp-leftover").write_text("x")  # hidden temp files do not count
    assert io_utils.tree_checksum(tmp_path / "d") == before
    io_utils.atomic_write_text(tmp_path / "d" / "s" / "t.txt", "e")
    assert io_utils.tree_checksum(tmp_path / "d") != before
    import hashlib

    assert io_utils.sha256_file(tmp_path / "d" / "s" / "t.txt") == hashlib.sha256(b"e").hexdigest()
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == [".tmp-leftover", "a.json", "s"]
    with io_utils.open_path(tmp_path / "z.txt.gz", "w") as f:
        f.write("un\ndeux\n")
    assert list(io_utils.iter_lines_bytes(tmp_path / "z.txt.gz")) == [b"un", b"deux"]
    with pytest.raises(ValueError, match=r"j.jsonl:2"):
        (tmp_path / "j.jsonl").write_text('{"a": 1}\n{oops\n')
        io_utils.read_jsonl(tmp_path / "j.jsonl")
