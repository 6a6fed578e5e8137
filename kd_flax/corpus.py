"""Corpus reading: every corpus format kd_flax reads, as `Example` records with a report of bad lines.

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
    teacher_topk: tuple | None = None  # cached (logprobs, ids) [len(target_ids), K] (`kd_flax.topk_cache`)

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


def corpus_files(spec, *, src_lang: str | None = None, tgt_lang: str | None = None) -> list[str]:
    """The files `read_corpus(spec)` reads, for content digests (a stage records what it read).

    ``hf:`` hub names and in-memory datasets have no files here (their identity is the spec);
    a local ``hf:`` data file or directory is listed. Files that do not exist are listed too
    (digesting them reports the missing one)."""
    out: list[str] = []
    for s in (list(spec) if isinstance(spec, (list, tuple)) else [spec]):
        if not isinstance(s, (str, os.PathLike)) or not s:
            continue
        s = os.fspath(s)
        if s.startswith("hf:"):
            name = s[3:].split("@", 1)[0]
            if io_utils.exists(name):
                out.append(name)
        elif s.startswith("synthetic:"):
            continue  # materialised by kd_flax.main.prepare into a file before any stage reads it
        elif "{lang}" in s:
            out += [s.replace("{lang}", lang or "") for lang in (src_lang, tgt_lang)]
        elif "+" in s and not io_utils.exists(s):
            out += s.split("+")
        else:
            out.append(s)
    return out


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
    shorter_len = None  # lines of the shorter file: the index of the first unpaired line
    for i, (a, b) in enumerate(pairs):
        src = ref = None
        if a is sentinel or b is sentinel:
            longer, shorter = (src_path, ref_path) if b is sentinel else (ref_path, src_path)
            shorter_len = i if shorter_len is None else shorter_len
            sink.bad(longer, i + 1, "length_mismatch", f"{shorter} has only {shorter_len} lines")
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


__all__ = ["BAD_KINDS", "Example", "Corpus", "BadLine", "CorpusReport", "read_corpus", "load_hf_dataset"]
