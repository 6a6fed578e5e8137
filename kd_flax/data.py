"""Corpus reading, tokenisation, length buckets, per-host slices and the training batch iterator.

Examples are :class:`Example` records (``id``, ``src``, ``ref`` or None, ``refs`` for
multi-reference rows); ``id`` is the example's line (or row) index in the corpus, counted from 0
over all lines including bad ones, so it is stable whatever gets skipped. Tokenised examples
also carry ``input_ids`` and ``target_ids`` (int32 NumPy arrays that end in EOS).
:func:`read_corpus` returns a :class:`Corpus`: a list of examples with a ``.report``.

Corpus specs accepted by :func:`read_corpus` (local paths or ``gs://``; ``.gz`` transparently):

* ``corpus.tsv``                 one ``src<TAB>ref`` pair a line
* ``corpus.jsonl`` / ``.json``   one JSON object a line: ``{"src": .., "ref": ..}`` (keys
  configurable) or ``{"translation": {"en": .., "fr": ..}}`` with ``src_lang``/``tgt_lang``
* ``train.{lang}.gz``            a pair of plain-text files, ``{lang}`` replaced by the languages
* ``a.en+b.fr``                  a pair of plain-text files named explicitly
* any other single file          monolingual plain text (``ref`` is ``None``)
* ``hf:NAME[:CONFIG][@SPLIT]``   a ``datasets`` dataset: a hub name, a local data file
  (``.json/.jsonl/.csv/.parquet``) or a directory saved with ``save_to_disk``; columns named
  by ``src_key``/``ref_key`` or a ``translation`` column
* a list of specs                read one after the other, ids continuing

Bad lines are reported (``file:line``), counted by kind in a :class:`CorpusReport` and
logged; ``strict=True`` raises a ``ValueError`` at the first one instead.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np

from kd_flax import io_utils

log = logging.getLogger(__name__)

BAD_KINDS = (
    "empty_source",     # source empty or only whitespace
    "empty_target",     # reference present in the format but empty
    "invalid_utf8",     # bytes that do not decode as UTF-8
    "tsv_fields",       # a TSV line without exactly 2 tab-separated fields
    "invalid_json",     # a JSONL line that is not a JSON object, or a non-string field
    "missing_key",      # a JSON object / dataset row without the source (or language) key
    "length_mismatch",  # one file of a pair has lines the other lacks
)
_TEXT_EXTS = (".txt",)
_HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
                     ".txt": "text"}


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class Example:
    """One corpus example. ``target_ids`` are the tokenised ``ref`` (or pseudo-label)."""

    id: int
    src: str
    ref: str | None = None
    refs: tuple[str, ...] | None = None  # all references of a multi-reference row
    input_ids: np.ndarray | None = None
    target_ids: np.ndarray | None = None
    gold: str | None = None  # the corpus reference when `ref` holds a teacher pseudo-label

    def to_dict(self) -> dict:
        d = {"id": self.id, "src": self.src, "ref": self.ref}
        if self.refs is not None:
            d["refs"] = list(self.refs)
        if self.gold is not None:
            d["gold"] = self.gold
        return d


class Corpus(list):
    """A list of :class:`Example` with the :class:`CorpusReport` of how it was read."""

    def __init__(self, examples=(), report: "CorpusReport | None" = None):
        super().__init__(examples)
        self.report = report if report is not None else CorpusReport()

    @property
    def examples(self) -> list:
        return self


# ----------------------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class BadLine:
    file: str
    line: int  # 1-based, like an editor shows it
    kind: str
    message: str

    def __str__(self):
        return f"{self.file}:{self.line}: {self.kind}: {self.message}"


@dataclasses.dataclass
class CorpusReport:
    """What reading (and tokenising) a corpus did: lines read, kept, bad lines by kind."""

    source: str = ""
    read: int = 0
    kept: int = 0
    bad: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    samples: list = dataclasses.field(default_factory=list)  # first `max_samples` BadLines
    truncated_source: int = 0
    truncated_target: int = 0
    max_samples: int = 100

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def add_bad(self, bad: BadLine) -> None:
        self.bad[bad.kind] += 1
        if len(self.samples) < self.max_samples:
            self.samples.append(bad)
        if self.bad[bad.kind] <= 10:  # log the first few of each kind, the counts say the rest
            log.warning("skipping bad line %s", bad)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "read": self.read,
            "kept": self.kept,
            "bad": dict(sorted(self.bad.items())),
            "bad_samples": [str(b) for b in self.samples[:20]],
            "truncated_source": self.truncated_source,
            "truncated_target": self.truncated_target,
        }

    def summary(self) -> str:
        bad = ", ".join(f"{k}={v}" for k, v in sorted(self.bad.items())) or "none"
        return f"{self.source}: read {self.read}, kept {self.kept}, bad lines: {bad}"


class _Sink:
    """Routes bad lines to the report, or raises in strict mode."""

    def __init__(self, report: CorpusReport, strict: bool):
        self.report, self.strict = report, strict

    def bad(self, file, line, kind, message):
        bad = BadLine(str(file), line, kind, message)
        if self.strict:
            raise ValueError(f"bad corpus line {bad} (strict mode; allowed kinds to skip: "
                             f"pass strict=False)")
        self.report.add_bad(bad)


# ----------------------------------------------------------------------------- reading


def read_corpus(spec, *, src_lang: str | None = None, tgt_lang: str | None = None,
                src_key: str = "src", ref_key: str = "ref", fmt: str | None = None,
                strict: bool = False) -> Corpus:
    """Reads a corpus spec (see the module docstring) into a :class:`Corpus`.

    Args:
      spec: a path / pattern / ``hf:`` spec, a list of them, or a ``datasets.Dataset``.
      src_lang, tgt_lang: language codes for ``{lang}`` templates and ``translation`` dicts.
      src_key, ref_key: JSON keys / dataset columns of source and reference.
      fmt: force a format: ``"tsv"``, ``"jsonl"``, ``"text"`` (default: from the extension).
      strict: raise ``ValueError`` naming ``file:line`` at the first bad line instead of
        skipping and counting it.
    """
    if fmt not in (None, "tsv", "jsonl", "text"):
        raise ValueError(f"fmt must be one of None, 'tsv', 'jsonl', 'text'; got {fmt!r}")
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ValueError("read_corpus: spec is an empty list; give at least one corpus")
    report = CorpusReport(source=" ; ".join(_spec_name(s) for s in specs))
    sink = _Sink(report, strict)
    examples = Corpus(report=report)
    for s in specs:
        offset = report.read
        rows = _read_one(s, src_lang=src_lang, tgt_lang=tgt_lang, src_key=src_key,
                         ref_key=ref_key, fmt=fmt, sink=sink)
        for index, src, ref, refs in rows:
            report.read = offset + index + 1
            if src is not None:
                examples.append(Example(offset + index, src, ref, refs))
    report.kept = len(examples)
    if report.num_bad:
        log.warning("%s", report.summary())
    return examples


def _spec_name(spec) -> str:
    return spec if isinstance(spec, str) else type(spec).__name__


def _strip_gz(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def _read_one(spec, *, src_lang, tgt_lang, src_key, ref_key, fmt, sink):
    """Yields ``(index, src, ref, refs)``; ``src`` is None for a bad line (already reported)."""
    if not isinstance(spec, (str, os.PathLike)):
        if hasattr(spec, "column_names"):
            return _read_dataset(spec, "<dataset>", src_lang, tgt_lang, src_key, ref_key, sink)
        raise ValueError(f"corpus spec must be a path, an 'hf:' spec or a datasets.Dataset; "
                         f"got {type(spec).__name__}")
    spec = os.fspath(spec)
    if spec.startswith("hf:"):
        ds = load_hf_dataset(spec)
        return _read_dataset(ds, spec, src_lang, tgt_lang, src_key, ref_key, sink)
    if "{lang}" in spec:
        if not src_lang or not tgt_lang:
            raise ValueError(f"corpus spec {spec!r} is a {{lang}} template: data.src_lang and "
                             f"data.tgt_lang must both be set (got {src_lang!r}, {tgt_lang!r})")
        return _read_pair(spec.replace("{lang}", src_lang), spec.replace("{lang}", tgt_lang), sink)
    if "+" in spec and not io_utils.exists(spec):
        parts = spec.split("+")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"corpus spec {spec!r}: a pair of files is written 'SRC_FILE+REF_FILE'")
        return _read_pair(parts[0], parts[1], sink)
    if not io_utils.exists(spec):
        raise ValueError(f"corpus file {spec!r} does not exist")
    ext = os.path.splitext(_strip_gz(spec))[1].lower()
    kind = fmt or {".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}.get(ext, "text")
    if kind == "tsv":
        return _read_tsv(spec, sink)
    if kind == "jsonl":
        return _read_jsonl(spec, src_lang, tgt_lang, src_key, ref_key, sink)
    return _read_text(spec, sink)


def _decode(raw: bytes, path, lineno, sink) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        sink.bad(path, lineno, "invalid_utf8", f"byte {e.start}: {e.reason}")
        return None


def _check(src, ref, path, lineno, sink, parallel: bool, ref_path=None):
    """Returns (src, ref) stripped, or (None, None) after reporting an empty field."""
    src = src.strip()
    if not src:
        sink.bad(path, lineno, "empty_source", "empty source")
        return None, None
    if parallel:
        ref = ref.strip()
        if not ref:
            sink.bad(ref_path or path, lineno, "empty_target", "empty reference")
            return None, None
    return src, ref


def _read_text(path, sink):
    for i, raw in enumerate(io_utils.iter_lines_bytes(path)):
        text = _decode(raw, path, i + 1, sink)
        src = _check(text, None, path, i + 1, sink, False)[0] if text is not None else None
        yield i, src, None, None


def _read_tsv(path, sink):
    for i, raw in enumerate(io_utils.iter_lines_bytes(path)):
        src = ref = None
        text = _decode(raw, path, i + 1, sink)
        if text is not None:
            fields = text.split("\t")
            if len(fields) != 2:
                sink.bad(path, i + 1, "tsv_fields",
                         f"expected 2 tab-separated fields (src, ref), found {len(fields)}")
            else:
                src, ref = _check(fields[0], fields[1], path, i + 1, sink, True)
        yield i, src, ref, None


def _translation_pair(obj, src_lang, tgt_lang, where):
    tr = obj["translation"]
    if not isinstance(tr, dict):
        return None, None, "invalid_json", "'translation' is not an object"
    if not src_lang or not tgt_lang:
        raise ValueError(f"{where}: 'translation' records need data.src_lang and data.tgt_lang "
                         f"(available languages: {sorted(tr)})")
    if src_lang not in tr:
        return None, None, "missing_key", f"translation has no {src_lang!r} (has {sorted(tr)})"
    return tr[src_lang], tr.get(tgt_lang), None, None


def _read_jsonl(path, src_lang, tgt_lang, src_key, ref_key, sink):
    for i, raw in enumerate(io_utils.iter_lines_bytes(path)):
        src = ref = None
        text = _decode(raw, path, i + 1, sink)
        if text is None:
            yield i, None, None, None
            continue
        if not text.strip():
            sink.bad(path, i + 1, "empty_source", "blank line")
            yield i, None, None, None
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            sink.bad(path, i + 1, "invalid_json", e.msg + f" (column {e.colno})")
            yield i, None, None, None
            continue
        yield i, *_fields_from_record(obj, path, i + 1, src_lang, tgt_lang, src_key, ref_key,
                                      sink)


def _fields_from_record(obj, path, lineno, src_lang, tgt_lang, src_key, ref_key, sink):
    if not isinstance(obj, dict):
        sink.bad(path, lineno, "invalid_json", f"expected a JSON object, got {type(obj).__name__}")
        return None, None, None
    if src_key not in obj and "translation" in obj:
        src, ref, kind, msg = _translation_pair(obj, src_lang, tgt_lang, f"{path}:{lineno}")
        if kind:
            sink.bad(path, lineno, kind, msg)
            return None, None, None
    elif src_key not in obj:
        sink.bad(path, lineno, "missing_key",
                 f"no source key {src_key!r} (keys: {sorted(obj)[:10]}); set data.src_key")
        return None, None, None
    else:
        src, ref = obj[src_key], (obj.get(ref_key) if ref_key is not None else None)
    if src is None:
        sink.bad(path, lineno, "empty_source", f"source {src_key!r} is null")
        return None, None, None
    for name, value in (("source", src), ("reference", ref)):
        if value is not None and not isinstance(value, str):
            sink.bad(path, lineno, "invalid_json", f"{name} is a {type(value).__name__}, not a string")
            return None, None, None
    refs = obj.get("refs")
    if refs is not None:  # multi-reference rows (test sets): a list of strings
        if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
            sink.bad(path, lineno, "invalid_json", "'refs' is not a list of strings")
            return None, None, None
        refs = tuple(r.strip() for r in refs)
    src, ref = _check(src, ref, path, lineno, sink, ref is not None)
    return src, ref, (refs if src is not None else None)


def _read_pair(src_path, ref_path, sink):
    for path in (src_path, ref_path):
        if not io_utils.exists(path):
            raise ValueError(f"corpus file {path!r} does not exist")
    sentinel = object()
    pairs = itertools.zip_longest(io_utils.iter_lines_bytes(src_path),
                                  io_utils.iter_lines_bytes(ref_path), fillvalue=sentinel)
    for i, (a, b) in enumerate(pairs):
        src = ref = None
        if a is sentinel or b is sentinel:
            longer, shorter = (src_path, ref_path) if b is sentinel else (ref_path, src_path)
            sink.bad(longer, i + 1, "length_mismatch", f"{shorter} has only {i} lines")
        else:
            a_text, b_text = _decode(a, src_path, i + 1, sink), None
            if a_text is not None:
                b_text = _decode(b, ref_path, i + 1, sink)
            if a_text is not None and b_text is not None:
                src, ref = _check(a_text, b_text, src_path, i + 1, sink, True, ref_path)
        yield i, src, ref, None


def load_hf_dataset(spec: str):
    """Loads ``hf:NAME[:CONFIG][@SPLIT]`` (default split ``train``) with ``datasets``.

    NAME may be a local data file (``.json``, ``.jsonl``, ``.csv``, ``.parquet``, ``.txt``,
    optionally ``.gz``), a directory written by ``save_to_disk``, or a hub dataset name.
    """
    import datasets  # heavy import: only when a dataset spec is used

    body = spec[len("hf:"):]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, config = body, None
    if ":" in body:
        head, tail = body.rsplit(":", 1)
        if "/" not in tail and head and not head.endswith(":"):  # not the ':' of 'gs://'
            name, config = head, tail
    if not name:
        raise ValueError(f"dataset spec {spec!r}: expected 'hf:NAME[:CONFIG][@SPLIT]'")
    ext = os.path.splitext(_strip_gz(name))[1].lower()
    if ext in _HF_FILE_BUILDERS and io_utils.exists(name):
        return datasets.load_dataset(_HF_FILE_BUILDERS[ext], data_files=name, split=split)
    if io_utils.exists(name) and any(io_utils.exists(io_utils.join(name, f))
                                     for f in ("dataset_dict.json", "state.json")):
        ds = datasets.load_from_disk(name)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset spec {spec!r}: no split {split!r} (has {list(ds)})")
            ds = ds[split]
        return ds
    return datasets.load_dataset(name, config, split=split)


def _read_dataset(ds, where, src_lang, tgt_lang, src_key, ref_key, sink):
    cols = list(ds.column_names)
    if src_key not in cols and "translation" not in cols:
        raise ValueError(f"dataset {where}: no source column {src_key!r} and no 'translation' "
                         f"column (columns: {cols}); set data.src_key")
    for i, row in enumerate(ds):
        yield i, *_fields_from_record(row, where, i + 1, src_lang, tgt_lang, src_key,
                                      ref_key if ref_key in cols else None, sink)


# ----------------------------------------------------------------------------- tokenising


def encode_texts(texts: Sequence[str], tokenizer, max_length: int, *, prefix: str = "",
                 chunk: int = 4096) -> tuple[list[np.ndarray], int]:
    """Tokenises ``prefix + text`` with the tokenizer's special tokens, ensuring a final EOS.

    Sequences longer than ``max_length`` are cut to ``max_length - 1`` tokens + EOS.
    Returns ``(ids, number_truncated)``.
    """
    if max_length is None or int(max_length) < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    eos = tokenizer.eos_token_id
    out, truncated = [], 0
    for start in range(0, len(texts), chunk):
        batch = [prefix + t for t in texts[start:start + chunk]]
        for ids in tokenizer(batch, add_special_tokens=True)["input_ids"]:
            ids = list(ids)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
            if len(ids) > max_length:
                truncated += 1
                ids = ids[:max_length - 1] + ([eos] if eos is not None else ids[max_length - 1:max_length])
            out.append(np.asarray(ids, dtype=np.int32))
    return out, truncated


def tokenize_examples(examples: Sequence[Example], tokenizer, *, max_source_length: int,
                      max_target_length: int | None = None, source_prefix: str = "",
                      report: CorpusReport | None = None) -> list[Example]:
    """Returns copies of the examples with ``input_ids`` (prefix + source) and ``target_ids``
    (the tokenised ``ref``; None without a ref or without ``max_target_length``).

    Truncation counts go to ``report.truncated_source`` / ``truncated_target`` when given.
    """
    srcs = [ex.src for ex in examples]
    src_ids, n_src = encode_texts(srcs, tokenizer, max_source_length, prefix=source_prefix or "")
    with_tgt = [i for i, ex in enumerate(examples) if ex.ref is not None]
    tgt_ids: dict[int, np.ndarray] = {}
    n_tgt = 0
    if with_tgt and max_target_length is not None:
        ids, n_tgt = encode_texts([examples[i].ref for i in with_tgt], tokenizer,
                                  max_target_length)
        tgt_ids = dict(zip(with_tgt, ids))
    if report is not None:
        report.truncated_source += n_src
        report.truncated_target += n_tgt
    if n_src or n_tgt:
        log.info("truncated %d sources to %d tokens and %d targets to %s tokens",
                 n_src, max_source_length, n_tgt, max_target_length)
    return [dataclasses.replace(ex, input_ids=src_ids[i], target_ids=tgt_ids.get(i))
            for i, ex in enumerate(examples)]


# ----------------------------------------------------------------------------- buckets


def normalize_boundaries(boundaries: Iterable[int] | None, max_length: int) -> tuple[int, ...]:
    """Sorted bucket lengths below ``max_length``, with ``max_length`` itself as the last one."""
    bs = sorted({int(b) for b in (boundaries or ()) if 0 < int(b) < int(max_length)})
    return tuple(bs) + (int(max_length),)


def bucket_length(n: int, boundaries: Sequence[int]) -> int:
    """The smallest boundary >= n; past the largest, the next multiple of the largest."""
    if not boundaries:
        raise ValueError("bucket_length: boundaries must be a non-empty sequence of lengths")
    for b in boundaries:
        if n <= b:
            return int(b)
    top = int(boundaries[-1])
    return -(-n // top) * top


def pad_rows(seqs: Sequence[np.ndarray], length: int, pad_id: int) -> np.ndarray:
    out = np.full((len(seqs), length), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


def generation_batches(examples: Sequence[Example], batch_size: int, boundaries: Sequence[int],
                       pad_id: int) -> list[dict]:
    """Groups tokenised examples into fixed-shape batches ``[batch_size, bucket_length]``.

    Examples are sorted by (bucket, length, id), so the batching is a pure function of the
    input. The last batch of a bucket is filled with copies of its first row marked
    ``valid=False`` (copies rather than empty rows so the model never sees a fully masked
    row). Each dict has ``ids`` (int64, -1 on pad rows), ``input_ids``, ``attention_mask``,
    ``valid`` and ``length`` (the bucket length).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keyed = sorted(((bucket_length(len(ex.input_ids), boundaries), len(ex.input_ids), ex.id, k)
                    for k, ex in enumerate(examples)))
    out = []
    for length, group in itertools.groupby(keyed, key=lambda t: t[0]):
        idx = [t[3] for t in group]
        for start in range(0, len(idx), batch_size):
            rows = idx[start:start + batch_size]
            n_valid = len(rows)
            rows = rows + [rows[0]] * (batch_size - n_valid)
            seqs = [examples[r].input_ids for r in rows]
            input_ids = pad_rows(seqs, length, pad_id)
            mask = np.zeros_like(input_ids)
            for i, s in enumerate(seqs):
                mask[i, :len(s)] = 1
            valid = np.arange(batch_size) < n_valid
            ids = np.where(valid, [examples[r].id for r in rows], -1).astype(np.int64)
            out.append({"ids": ids, "rows": np.asarray(rows), "input_ids": input_ids,
                        "attention_mask": mask, "valid": valid, "length": length})
    return out


# ----------------------------------------------------------------------------- hosts


def host_range(n: int, process_index: int | None = None,
               process_count: int | None = None) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of ``n`` items owned by a process (balanced to within 1)."""
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    if pc < 1 or not 0 <= pi < pc:
        raise ValueError(f"process_index must be in [0, process_count); got {pi} of {pc}")
    return n * pi // pc, n * (pi + 1) // pc


def host_slice(items: Sequence, process_index: int | None = None,
               process_count: int | None = None) -> Sequence:
    """This process's contiguous slice of ``items`` (deterministic, covering all exactly once)."""
    start, end = host_range(len(items), process_index, process_count)
    return items[start:end]


# ----------------------------------------------------------------------------- training


def _with_eos(ids: np.ndarray, eos_id: int | None) -> np.ndarray:
    if eos_id is not None and (len(ids) == 0 or ids[-1] != eos_id):
        return np.append(ids, np.int32(eos_id)).astype(np.int32)
    return np.asarray(ids, dtype=np.int32)


def _epoch_plan(keys: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches (arrays of example indices) of one epoch, in order.

    Examples are shuffled with ``(seed, epoch)``, chunked within their shape key, and the
    chunks shuffled again. The number of chunks does not depend on the shuffle, so every epoch
    has the same number of steps and a step number maps to (epoch, offset) directly.
    """
    rng = np.random.default_rng([int(seed), int(epoch)])
    perm = rng.permutation(len(keys))
    chunks = []
    for key in np.unique(keys):
        members = perm[keys[perm] == key]
        chunks.extend(members[s:s + batch_size] for s in range(0, len(members), batch_size))
    order = rng.permutation(len(chunks))
    return [chunks[i] for i in order]


def steps_per_epoch(examples: Sequence[Example], batch_size: int, *,
                    bucket_boundaries: Sequence[int] | None = None,
                    max_source_length: int | None = None,
                    max_target_length: int | None = None, eos_id: int | None = None) -> int:
    """Number of batches :func:`batches` yields per epoch with the same arguments."""
    keys, _, _ = _shape_keys(examples, bucket_boundaries, max_source_length, max_target_length,
                             eos_id)
    _, counts = np.unique(keys, return_counts=True)
    return int(sum(-(-c // batch_size) for c in counts))


def _shape_keys(examples, bucket_boundaries, max_source_length, max_target_length, eos_id):
    src_len = np.array([len(ex.input_ids) for ex in examples])
    if any(ex.target_ids is None for ex in examples):
        raise ValueError("batches: every example needs 'target_ids' (tokenise with "
                         "max_target_length and a reference/pseudo-label)")
    tgt_len = np.array([len(_with_eos(ex.target_ids, eos_id)) for ex in examples])
    max_s = int(max_source_length or src_len.max())
    max_t = int(max_target_length or tgt_len.max())
    if bucket_boundaries:
        sb, tb = normalize_boundaries(bucket_boundaries, max_s), normalize_boundaries(
            bucket_boundaries, max_t)
        s_lens = np.array([bucket_length(int(n), sb) for n in src_len])
        t_lens = np.array([bucket_length(int(n), tb) for n in tgt_len])
    else:
        s_lens = np.full(len(examples), max(max_s, int(src_len.max())))
        t_lens = np.full(len(examples), max(max_t, int(tgt_len.max())))
    keys = s_lens.astype(np.int64) * 1_000_003 + t_lens
    return keys, s_lens, t_lens


def batches(examples: Sequence[Example], batch_size: int, seed: int, start_step: int = 0, *,
            pad_id: int, eos_id: int | None, decoder_start_id: int,
            bucket_boundaries: Sequence[int] | None = None,
            max_source_length: int | None = None, max_target_length: int | None = None,
            num_epochs: int | None = None, process_index: int | None = None,
            process_count: int | None = None) -> Iterator[dict]:
    """Deterministic, resumable training batches of tokenised examples.

    Yields NumPy dicts for global step ``start_step``, ``start_step + 1``, ... (forever, or
    ``num_epochs`` epochs in total): ``input_ids``, ``attention_mask`` ``[b, S]``; ``labels``
    (target + EOS), ``decoder_input_ids`` (labels shifted right after ``decoder_start_id``),
    ``decoder_attention_mask``, ``loss_mask`` (float32) ``[b, T]``; ``example_id`` (-1 on pad
    rows) and ``valid`` ``[b]``. ``b = batch_size / process_count``: every process builds the
    same global batch and keeps its contiguous block of rows.

    Without ``bucket_boundaries`` all batches are padded to ``max_source_length`` /
    ``max_target_length`` (one compiled shape); with them, each batch to the bucket of its
    longest member (one shape per (source bucket, target bucket) pair).

    Pad rows (filling the last batch of a bucket) are copies of a real row, so the model's
    forward pass is an ordinary one; their ``loss_mask`` is 0. Weight the loss by
    ``loss_mask`` (equal to ``decoder_attention_mask`` on real rows).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not examples:
        raise ValueError("batches: examples is empty")
    process_count = jax.process_count() if process_count is None else int(process_count)
    pi = jax.process_index() if process_index is None else int(process_index)
    if not 0 <= pi < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {pi}")
    if batch_size % process_count:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of "
                         f"processes ({process_count})")
    local = batch_size // process_count
    row0 = local * pi
    keys, s_lens, t_lens = _shape_keys(examples, bucket_boundaries, max_source_length,
                                       max_target_length, eos_id)
    _, counts = np.unique(keys, return_counts=True)
    spe = int(sum(-(-c // batch_size) for c in counts))
    step = int(start_step)
    while num_epochs is None or step < num_epochs * spe:
        epoch, offset = divmod(step, spe)
        plan = _epoch_plan(keys, batch_size, seed, epoch)
        for chunk in plan[offset:]:
            if num_epochs is not None and step >= num_epochs * spe:
                return
            yield _train_batch(examples, chunk, batch_size, row0, local, s_lens, t_lens,
                               pad_id, eos_id, decoder_start_id)
            step += 1


def _train_batch(examples, chunk, batch_size, row0, local, s_lens, t_lens, pad_id, eos_id,
                 decoder_start_id):
    n_valid = len(chunk)
    rows = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n_valid)])
    valid = np.arange(batch_size) < n_valid
    rows, valid = rows[row0:row0 + local], valid[row0:row0 + local]
    S, T = int(s_lens[chunk[0]]), int(t_lens[chunk[0]])
    src = [examples[r].input_ids for r in rows]
    labels_l = [_with_eos(examples[r].target_ids, eos_id)[:T] for r in rows]
    input_ids = pad_rows(src, S, pad_id)
    labels = pad_rows(labels_l, T, pad_id)
    attention_mask = (np.arange(S)[None] < np.array([len(s) for s in src])[:, None])
    dec_mask = (np.arange(T)[None] < np.array([len(s) for s in labels_l])[:, None])
    decoder_input_ids = np.concatenate(
        [np.full((len(rows), 1), decoder_start_id, np.int32), labels[:, :-1]], axis=1)
    decoder_input_ids = np.where(dec_mask, decoder_input_ids, pad_id).astype(np.int32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask.astype(np.int32),
        "labels": labels,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": dec_mask.astype(np.int32),
        "loss_mask": (dec_mask & valid[:, None]).astype(np.float32),
        "example_id": np.where(valid, [examples[r].id for r in rows], -1).astype(np.int64),
        "valid": valid,
    }


__all__ = [
    "BAD_KINDS", "Example", "Corpus", "BadLine", "CorpusReport", "read_corpus", "load_hf_dataset", "encode_texts",
    "tokenize_examples", "normalize_boundaries", "bucket_length", "pad_rows",
    "generation_batches", "host_range", "host_slice", "steps_per_epoch", "batches",
]
