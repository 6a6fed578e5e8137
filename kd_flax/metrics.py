"""Metrics: sacreBLEU BLEU and chrF, mean ± std over test splits, decoding speed.

- `corpus_bleu(hyps, refs)` / `corpus_chrf(hyps, refs)` → `MetricResult(score, signature)`,
  computed by `sacrebleu.metrics.BLEU` / `CHRF` themselves (so scores and signatures are the
  ones papers report). `refs` is a list of *reference streams* (sacrebleu's convention:
  `refs[k][i]` is the k-th reference of sentence i); `references_from_examples` builds them
  from per-sentence reference lists, padding with None where a sentence has fewer refs.
- `split_stats(scores)` → `Stats(mean, std, n)` with the **sample** standard deviation
  (ddof=1) across splits — the spread one would expect on a new split of the same size;
  `std` is NaN for a single split (no spread can be estimated from one number).
- `SpeedMeter`: sentences/s and tokens/s over decoded batches, leaving out each batch shape's
  first call (which includes XLA compilation) when warm batches exist; and how many
  hypotheses hit max_new_tokens without EOS (`hit_max_new_tokens`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterable, Sequence

import numpy as np
import sacrebleu


@dataclasses.dataclass(frozen=True)
class MetricResult:
    """A corpus-level score with the sacrebleu signature that makes it reproducible."""

    name: str  # "BLEU" or "chrF2" (chrF2++ with word_order=2)
    score: float
    signature: str
    details: str  # sacrebleu's full formatted score line (n-gram precisions, BP, ...)


def _check_streams(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]]) -> None:
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise ValueError(f"hypotheses: expected a list of strings, got {type(hypotheses).__name__}")
    if not hypotheses:
        raise ValueError("hypotheses: empty list; need at least one sentence")
    if isinstance(references, str) or not isinstance(references, Sequence) or not references:
        raise ValueError("references: expected a non-empty list of reference streams "
                         "(refs[k][i] = k-th reference of sentence i)")
    for k, stream in enumerate(references):
        if isinstance(stream, str):
            raise ValueError(f"references[{k}]: is a string; references must be a list of reference "
                             f"streams, e.g. [refs] for one reference per sentence")
        if len(stream) != len(hypotheses):
            raise ValueError(f"references[{k}]: has {len(stream)} sentences, hypotheses have "
                             f"{len(hypotheses)}; every reference stream must match the hypotheses")
    for i in range(len(hypotheses)):
        if all(stream[i] is None for stream in references):
            raise ValueError(f"references: sentence {i} has no reference in any stream")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]], *,
                tokenize: str | None = None, lowercase: bool = False,
                trg_lang: str = "") -> MetricResult:
    """Corpus BLEU with sacrebleu (default 13a tokenization, exp smoothing).

    `references` is a list of reference streams (one per reference set); a stream may hold
    None where a sentence has fewer references. `trg_lang` picks sacrebleu's tokenizer for
    zh/ja/ko when `tokenize` is None.
    """
    _check_streams(hypotheses, references)
    metric = sacrebleu.metrics.BLEU(tokenize=tokenize, lowercase=lowercase, trg_lang=trg_lang)
    score = metric.corpus_score(list(hypotheses), [list(s) for s in references])
    return MetricResult("BLEU", float(score.score), str(metric.get_signature()), str(score))


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str | None]], *,
                word_order: int = 0, lowercase: bool = False) -> MetricResult:
    """Corpus chrF with sacrebleu (chrF2; `word_order=2` gives chrF++)."""
    _check_streams(hypotheses, references)
    metric = sacrebleu.metrics.CHRF(word_order=word_order, lowercase=lowercase)
    score = metric.corpus_score(list(hypotheses), [list(s) for s in references])
    return MetricResult(score.name, float(score.score), str(metric.get_signature()), str(score))


def references_from_examples(refs_per_sentence: Sequence[str | Sequence[str]]) -> list[list[str | None]]:
    """Per-sentence references (a string or a list of strings each) → reference streams.

    Sentences with fewer references than the most get None in the missing streams, which
    sacrebleu skips (variable number of references).
    """
    rows = [[r] if isinstance(r, str) else list(r) for r in refs_per_sentence]
    for i, row in enumerate(rows):
        if not row or not all(isinstance(r, str) for r in row):
            raise ValueError(f"refs_per_sentence[{i}]: expected a string or a non-empty list of "
                             f"strings, got {refs_per_sentence[i]!r}")
    k = max(len(r) for r in rows) if rows else 0
    return [[row[j] if j < len(row) else None for row in rows] for j in range(k)]


# ---------------------------------------------------------------------------
# Aggregation over splits, speed, tables
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stats:
    mean: float
    std: float  # sample std (ddof=1); NaN when n == 1
    n: int

    def __str__(self) -> str:
        return format_mean_std(self)


def split_stats(scores: Iterable[float]) -> Stats:
    """Mean and sample standard deviation (ddof=1) of per-split scores.

    ddof=1 because the splits are a sample of possible test sets: the std estimates the
    spread of the score on a new split. One split → std is NaN (printed without "±").
    """
    values = np.asarray(list(scores), dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"scores: expected a non-empty list of numbers, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"scores: all values must be finite, got {values.tolist()}")
    mean = float(values.mean())
    std = float(values.std(ddof=1)) if values.size > 1 else float("nan")
    return Stats(mean, std, int(values.size))


def format_mean_std(stats: Stats, digits: int = 1) -> str:
    if math.isnan(stats.std):
        return f"{stats.mean:.{digits}f}"
    return f"{stats.mean:.{digits}f} ± {stats.std:.{digits}f}"


class SpeedMeter:
    """Sentences/s and tokens/s over decoded batches.

    `add(sentences, tokens, seconds, first_call=...)` records one batch. The first call of a
    batch shape includes XLA compilation; rates are computed over the other ("warm") batches
    when there are any, else over all of them (and `includes_compile` says so).
    """

    def __init__(self):
        self.batches: list[tuple[int, int, float, bool]] = []
        self.hit_max = 0  # hypotheses that reached max_new_tokens without EOS, over all batches

    def add(self, sentences: int, tokens: int, seconds: float, *, first_call: bool = False,
            hit_max: int = 0) -> None:
        if sentences < 0 or tokens < 0 or seconds < 0 or not 0 <= hit_max <= sentences:
            raise ValueError(f"SpeedMeter.add: sentences, tokens and seconds must be ≥ 0 and "
                             f"0 ≤ hit_max ≤ sentences, got {sentences}, {tokens}, {seconds}, {hit_max}")
        self.batches.append((int(sentences), int(tokens), float(seconds), bool(first_call)))
        self.hit_max += int(hit_max)

    def hit_max_new_tokens(self) -> dict[str, float]:
        """``{"count", "share"}`` of the sentences (all batches) whose hypothesis hit
        max_new_tokens without EOS; share is NaN before any sentence."""
        n = sum(b[0] for b in self.batches)
        return {"count": self.hit_max, "share": self.hit_max / n if n else float("nan")}

    def time(self, sentences: int = 0, tokens: int = 0, *, first_call: bool = False) -> "_Timing":
        """Context manager timing a block: `with meter.time(n, t): work()` (set `.tokens` inside
        the block when they are known only afterwards)."""
        return _Timing(self, sentences, tokens, first_call)

    def _used(self):
        warm = [b for b in self.batches if not b[3]]
        return (warm, False) if warm else (self.batches, bool(self.batches))

    @property
    def includes_compile(self) -> bool:
        return self._used()[1]

    @property
    def seconds(self) -> float:
        return sum(b[2] for b in self._used()[0])

    @property
    def sentences_per_s(self) -> float:
        used, _ = self._used()
        s = sum(b[2] for b in used)
        return sum(b[0] for b in used) / s if s > 0 else float("nan")

    @property
    def tokens_per_s(self) -> float:
        used, _ = self._used()
        s = sum(b[2] for b in used)
        return sum(b[1] for b in used) / s if s > 0 else float("nan")

    def summary(self) -> dict[str, float | bool]:
        return {"sentences_per_s": self.sentences_per_s, "tokens_per_s": self.tokens_per_s,
                "seconds": self.seconds, "includes_compile": self.includes_compile,
                "total_seconds": sum(b[2] for b in self.batches)}


class _Timing:
    def __init__(self, meter: SpeedMeter, sentences: int, tokens: int, first_call: bool):
        self.meter, self.sentences, self.tokens, self.first_call = meter, sentences, tokens, first_call
        self.seconds = 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, exc_type, *exc):
        self.seconds = time.perf_counter() - self._t0
        if exc_type is None:
            self.meter.add(self.sentences, self.tokens, self.seconds, first_call=self.first_call)
        return False


PROGRESS_EVERY_S = 30.0  # seconds between ProgressLog lines
PROGRESS_LOGGER = "kd_flax.progress"  # the CLI shows this logger's INFO lines (kd_flax.main)


def stderr_is_tty() -> bool:
    import sys
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class ProgressLog:
    """Progress lines for a run that has no progress bar (stderr is not a terminal, so a log
    file or a scheduler would show nothing for minutes): `add(sentences, tokens)` after each
    batch; every `every_s` seconds one INFO line on the `kd_flax.progress` logger:
    ``WHAT: done/total sentences (pct), X sentences/s, Y target tokens/s, ETA Hh MMm SSs``
    (rates over the whole run so far). Disabled: `add` does nothing."""

    def __init__(self, total: int, what: str, *, enabled: bool = True, every_s: float | None = None,
                 clock=time.monotonic):
        import logging
        self.total, self.what, self.enabled, self.clock = int(total), what, enabled, clock
        self.every_s = PROGRESS_EVERY_S if every_s is None else float(every_s)
        self.log = logging.getLogger(PROGRESS_LOGGER)
        self.sentences = self.tokens = 0
        self.t_start = self._t_last = clock()

    def add(self, sentences: int, tokens: int) -> None:
        self.sentences += int(sentences)
        self.tokens += int(tokens)
        now = self.clock()
        if self.enabled and now - self._t_last >= self.every_s:
            self._t_last = now
            self.log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        el = max((self.clock() if now is None else now) - self.t_start, 1e-9)
        rate = self.sentences / el
        left = max(self.total - self.sentences, 0)
        eta = _hms(left / rate) if rate > 0 else "?"
        pct = 100 * self.sentences / self.total if self.total else 100.0
        return (f"{self.what}: {self.sentences}/{self.total} sentences ({pct:.1f}%), "
                f"{rate:.1f} sentences/s, {self.tokens / el:.0f} target tokens/s, ETA {eta}")


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h {s % 3600 // 60:02d}m {s % 60:02d}s"
