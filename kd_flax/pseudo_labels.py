"""The teacher job: translate the training corpus into pseudo-label shards, resumably.

``run(config, workdir)`` writes ``workdir/generate/``:

* ``part-00000.jsonl`` ... (``part-pPPP-00000.jsonl`` per process when multi-host): one JSON
  object a line, sorted by ``id``: ``id``, ``src``, ``ref`` (the corpus reference or null),
  ``hyp`` (the chosen teacher output), ``score`` (its length-normalised score) and, with
  ``generate.write_nbest``, ``hyps``, ``scores``, ``sum_logprobs`` (the n-best list);
* ``dropped-*.jsonl``: examples removed by a filter, with ``reason`` and ``value``;
* ``part-*.stats.json``: per-shard counts; ``manifest.json``: settings, teacher checksum,
  counts (read, bad lines by kind, generated, kept, dropped by filter, and
  ``hit_max_new_tokens`` / ``hit_max_new_tokens_share``: chosen outputs that reached
  ``generate.max_new_tokens`` without EOS, i.e. runaway loops), status.

Why shards: a shard is a fixed, contiguous range of this process's corpus slice, so the set
of shards and the content of each depend only on the corpus and the settings. A shard's
``part`` file is written last, atomically, and marks it done; a re-run after a crash (even
``kill -9``) redoes only shards without one and ends with exactly the files of an
uninterrupted run. A manifest written with other settings (teacher weights, decoding or data
options) makes the job refuse to start, naming the changed keys.

Multi-host: every process reads the corpus, keeps its contiguous slice
(``jax.process_index()``) and generates on its own local devices (the mesh is built over
``jax.local_devices()``, so processes never wait on each other mid-run); process 0 writes
the manifest once every process's shards exist.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from kd_flax import corpus as corpus_lib
from kd_flax import data as data_lib
from kd_flax import io_utils, sharding, topk_cache
from kd_flax import workdir as workdir_lib
from kd_flax.workdir import Workdir
from kd_flax.config_base import cfg_get as _get
from kd_flax.decoding import check_search

log = logging.getLogger(__name__)

OUT_SUBDIR = "generate"
MANIFEST = "manifest.json"
SELECT_CHOICES = ("best", "bleu", "chrf")
FILTERS = ("drop_unfinished", "max_length_ratio", "min_score", "min_ref_chrf")
_GEN_KWARGS = ("max_new_tokens", "num_beams", "num_return_sequences", "length_penalty",
               "early_stopping", "do_sample", "temperature", "top_k", "top_p")


class GenerateError(ValueError):
    """A refused or impossible generation job (message says why and what to do)."""


# ----------------------------------------------------------------------------- config


def validate_config(config) -> None:
    """Checks the keys this stage reads; raises ``ValueError`` naming the key and allowed values."""
    g = config.generate
    problems = []

    def need(key, ok, allowed):
        if not ok:
            problems.append(f"generate.{key}: {_get(g, key)!r} is not allowed; allowed: {allowed}")

    for key in ("num_beams", "num_return_sequences", "max_new_tokens", "batch_size", "shard_size"):
        v = _get(g, key)
        need(key, isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1")
    need("select", _get(g, "select") in SELECT_CHOICES, list(SELECT_CHOICES))
    need("temperature", isinstance(_get(g, "temperature"), (int, float)) and _get(g, "temperature") > 0,
         "a number > 0")
    need("top_p", isinstance(_get(g, "top_p"), (int, float)) and 0 < _get(g, "top_p") <= 1, "(0, 1]")
    need("top_k", isinstance(_get(g, "top_k"), int) and _get(g, "top_k") >= 0, "an int >= 0")
    for key in ("do_sample", "early_stopping", "write_nbest"):
        need(key, isinstance(_get(g, key), bool), "True or False")
    k = _get(g, "store_topk", 0)
    need("store_topk", isinstance(k, int) and not isinstance(k, bool) and k >= 0, "an int >= 0 (0 = off)")
    need("store_topk_target", _get(g, "store_topk_target", "pseudo") in topk_cache.TARGETS,
         list(topk_cache.TARGETS))
    if not problems:
        try:
            check_search(g.num_beams, g.num_return_sequences, g.do_sample, prefix="generate.")
        except ValueError as e:
            problems.append(str(e))
    filters = _get(g, "filters") or {}
    for key in filters:
        if key not in FILTERS:
            problems.append(f"generate.filters.{key}: unknown filter; allowed: {list(FILTERS)}")
    for key in ("max_length_ratio", "min_ref_chrf"):
        v = _get(filters, key)
        if v is not None and not (isinstance(v, (int, float)) and v >= 0):
            problems.append(f"generate.filters.{key}: {v!r} is not allowed; allowed: a number >= 0 "
                            f"(0 or None = off)")
    v = _get(filters, "drop_unfinished")
    if v is not None and not isinstance(v, bool):
        problems.append(f"generate.filters.drop_unfinished: {v!r} is not allowed; allowed: True, False")
    v = _get(filters, "min_score")
    if v is not None and not isinstance(v, (int, float)):
        problems.append(f"generate.filters.min_score: {v!r} is not allowed; allowed: a number or None")
    d = config.data
    if not _get(d, "train"):
        problems.append("data.train: required (a corpus spec: file.tsv, file.jsonl, "
                        "train.{lang}.gz, a+b, hf:NAME@SPLIT)")
    msl = _get(d, "max_source_length")
    if not (isinstance(msl, int) and msl >= 2):
        problems.append(f"data.max_source_length: {msl!r} is not allowed; allowed: an int >= 2")
    bb = _get(d, "bucket_boundaries") or ()
    if not all(isinstance(b, int) and b >= 1 for b in bb):
        problems.append(f"data.bucket_boundaries: {bb!r} is not allowed; allowed: ints >= 1")
    if problems:
        raise ValueError("invalid generate config:\n  " + "\n  ".join(problems))


def _plain(x):
    """ConfigDict / tuples → JSON-friendly dicts and lists (for hashing and the manifest)."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def job_settings(config, teacher_path: str, tokenizer_path: str, process_count: int, *,
                 checksum_cache=None, write_cache: bool = True) -> dict:
    """Everything the output depends on; a change in any of it must not mix outputs.
    ``checksum_cache``: see `io_utils.tree_checksum` (re-runs then skip re-reading the teacher)."""
    d = config.data
    kw = dict(cache=checksum_cache, write_cache=write_cache)
    gen = _plain(config.generate)
    data_keys = ("train", "src_lang", "tgt_lang", "source_prefix", "max_source_length", "bucket_boundaries",
                 "max_train_examples")
    if _store_topk(config):  # the scored targets are cut to max_target_length
        data_keys += ("max_target_length",)
    else:  # off: the settings (and the hash) of a job from before store_topk existed
        gen = {k: v for k, v in gen.items() if k not in ("store_topk", "store_topk_target")}
    return {
        "teacher": {"checksum": io_utils.tree_checksum(teacher_path, **kw),
                    "tokenizer_checksum": io_utils.tree_checksum(tokenizer_path, **kw)},
        "data": {k: _plain(_get(d, k)) for k in data_keys},
        "generate": gen,
        "process_count": int(process_count),
    }


def _store_topk(config) -> int:
    return int(_get(config.generate, "store_topk", 0) or 0)


def _topk_block(config, teacher: dict, tokenizer_path) -> dict:
    """The manifest's record of the top-k cache (ids dtype and vocab come from the shards)."""
    from kd_flax import models
    d = config.data
    return {"k": _store_topk(config), "target": _get(config.generate, "store_topk_target", "pseudo"),
            "logprobs_dtype": np.dtype(topk_cache.LOGPROB_DTYPE).name, "file_suffix": topk_cache.SUFFIX,
            "teacher_checksum": teacher["checksum"], "tokenizer_checksum": teacher["tokenizer_checksum"],
            "tokenizer_fingerprint": topk_cache.tokenizer_fingerprint(models.load_tokenizer(tokenizer_path)),
            **{k: _plain(_get(d, k)) for k in ("max_source_length", "max_target_length", "source_prefix")}}


# ----------------------------------------------------------------------------- shards


@dataclasses.dataclass(frozen=True)
class Shard:
    process: int
    index: int
    start: int  # into this process's slice
    end: int

    def name(self, process_count: int) -> str:
        if process_count == 1:
            return f"part-{self.index:05d}"
        return f"part-p{self.process:03d}-{self.index:05d}"


def plan_shards(n_examples: int, shard_size: int, process_index: int,
                process_count: int) -> tuple[tuple[int, int], list[Shard]]:
    """This process's slice ``[start, end)`` of the corpus and its shards (pure function)."""
    start, end = data_lib.host_range(n_examples, process_index, process_count)
    n = end - start
    shards = [Shard(process_index, k, s, min(s + shard_size, n))
              for k, s in enumerate(range(0, n, shard_size))]
    return (start, end), shards


def all_shard_names(n_examples: int, shard_size: int, process_count: int) -> list[str]:
    names = []
    for p in range(process_count):
        _, shards = plan_shards(n_examples, shard_size, p, process_count)
        names += [s.name(process_count) for s in shards]
    return names


def _batch_seed(seed: int, process: int, shard: int, batch: int) -> int:
    # Sampling seeds depend on the shard and batch position only, so a resumed shard samples
    # exactly what the interrupted one would have.
    return int(np.random.SeedSequence([seed, process, shard, batch]).generate_state(1)[0] >> 1)


# ----------------------------------------------------------------------------- selection / filters


def select_candidate(hyps: list[str], scores: list[float], ref: str | None, select: str) -> int:
    """Index of the candidate to keep: highest score, or (SeqInter) closest to ``ref``.

    Ties go to the higher-scored (earlier after sorting by score) candidate.
    """
    order = sorted(range(len(hyps)), key=lambda i: (-scores[i], i))
    if select == "best" or ref is None:
        return order[0]
    import sacrebleu

    if select == "bleu":
        sim = [sacrebleu.sentence_bleu(hyps[i], [ref]).score for i in order]
    elif select == "chrf":
        sim = [sacrebleu.sentence_chrf(hyps[i], [ref]).score for i in order]
    else:
        raise ValueError(f"generate.select: {select!r} is not allowed; allowed: {list(SELECT_CHOICES)}")
    return order[int(np.argmax(sim))]  # argmax takes the first maximum


def apply_filters(rec: dict, n_src_tokens: int, n_hyp_tokens: int, filters,
                  unfinished: bool = False) -> tuple[str, float] | None:
    """``(reason, value)`` of the first filter that drops ``rec``, or None to keep it.
    ``unfinished``: the hypothesis reached ``generate.max_new_tokens`` without EOS."""
    if unfinished and _get(filters, "drop_unfinished"):
        return "drop_unfinished", float(n_hyp_tokens)
    ratio_max = _get(filters, "max_length_ratio")
    if ratio_max:
        s, h = max(n_src_tokens, 0), max(n_hyp_tokens, 0)
        ratio = float("inf") if min(s, h) == 0 else max(h / s, s / h)
        if ratio > ratio_max:
            return "max_length_ratio", ratio
    min_score = _get(filters, "min_score")
    if min_score is not None and rec["score"] < min_score:
        return "min_score", rec["score"]
    min_chrf = _get(filters, "min_ref_chrf")
    if min_chrf:
        import sacrebleu

        chrf = sacrebleu.sentence_chrf(rec["hyp"], [rec["ref"]]).score
        if chrf < min_chrf:
            return "min_ref_chrf", chrf
    return None


# ----------------------------------------------------------------------------- model / step


def _load_teacher(config, teacher_path, tokenizer_path, mesh, rules):
    from kd_flax import models

    kw = {} if mesh is None else {"mesh": mesh, "rules": rules}
    dtype = _get(config.teacher, "dtype")
    if dtype and dtype != "float32":
        import jax.numpy as jnp

        kw["dtype"] = getattr(jnp, dtype)
    model = models.load_pretrained(teacher_path, **kw)
    if hasattr(models, "load_tokenizer"):
        tokenizer = models.load_tokenizer(tokenizer_path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return model, tokenizer




# ----------------------------------------------------------------------------- the job


def _read_manifest(out_dir):
    path = io_utils.join(out_dir, MANIFEST)
    return io_utils.read_json(path) if io_utils.exists(path) else None


def run(config, workdir, *, force: bool = False, generate_fn: Callable | None = None,
        load_fn: Callable | None = None, process_index: int | None = None,
        process_count: int | None = None, on_shard_done: Callable[[str], Any] | None = None,
        progress: bool | None = None) -> dict:
    """Runs (or resumes, or skips) the generation job; returns the manifest dict.

    Args:
      config: the full ``ml_collections`` config (keys ``teacher``, ``data``, ``generate``, ``mesh``).
      workdir: output root; files go to ``workdir/generate/``.
      force: delete outputs made with other settings instead of refusing.
      generate_fn: a stand-in decoder for the `kd_flax.translate.Translator` (tests; default: kd_flax's own).
      load_fn: ``(config, teacher_path, tokenizer_path, mesh, rules) -> (model, tokenizer)``
        (default: ``kd_flax.models.load_pretrained`` + the tokenizer of that dir).
      process_index, process_count: override ``jax.process_index()/process_count()``
        (to simulate hosts in tests).
      on_shard_done: called with each shard's name after it is committed.
      progress: show a tqdm bar (default: when stderr is a terminal); without one, a line
        every 30 s on the `kd_flax.progress` logger (sentences done/total, sentences/s,
        target tokens/s, ETA).
    """
    validate_config(config)
    pi = jax.process_index() if process_index is None else int(process_index)
    pc = jax.process_count() if process_count is None else int(process_count)
    simulated = process_index is not None or process_count is not None
    wd = Workdir.of(workdir)
    out_dir = io_utils.makedirs(wd.pseudo_label_dir)
    t_path = wd.teacher_dir(config)
    tok_path = _get(config.teacher, "tokenizer") or t_path
    # Path-independent: files inside the workdir as $WORKDIR, the corpus by its content.
    settings = wd.portable(job_settings(config, t_path, tok_path, pc, checksum_cache=wd.checksum_cache,
                                        write_cache=pi == 0))
    corpus_digest = wd.corpus_digest(config.data.train, src_lang=_get(config.data, "src_lang") or None,
                                     tgt_lang=_get(config.data, "tgt_lang") or None, write_cache=pi == 0)
    record = workdir_lib.new_record("generate", settings,
                                    inputs={"data.train": corpus_digest} if corpus_digest else None)
    config_hash = record["config_hash"]

    def empty_out_dir():
        if pi == 0:
            for f in out_dir.iterdir():
                f.unlink() if not f.is_dir() else f.rmtree()

    try:
        old = workdir_lib.check_record(_read_manifest(out_dir), record, out_dir, force=force,
                                       remove=empty_out_dir)
    except workdir_lib.StageRefused as e:
        raise GenerateError(f"{out_dir} holds pseudo-labels made with other settings: {e}") from None
    if old is not None and old.get("status") == "done":
        missing = missing_shards(out_dir)
        if not missing:
            log.info("generate: %s is done already (config %s), skipped", out_dir, config_hash[:12])
            return old
        log.warning("generate: %s is done but %d shards are gone (%s ...); redoing them",
                    out_dir, len(missing), missing[0])

    g, d = config.generate, config.data
    corpus = corpus_lib.read_corpus(d.train, src_lang=_get(d, "src_lang") or None,
                                  tgt_lang=_get(d, "tgt_lang") or None)
    report = corpus.report
    limit = int(_get(d, "max_train_examples") or 0)
    examples = list(corpus[:limit] if limit > 0 else corpus)
    if not examples:
        raise GenerateError(f"data.train: {d.train} has no valid lines ({report.summary()}); "
                            f"nothing to generate")
    needs_ref = g.select != "best" or bool(_get(g.filters, "min_ref_chrf"))
    if needs_ref and any(ex.ref is None for ex in examples):
        raise GenerateError(f"generate.select={g.select!r} / generate.filters.min_ref_chrf need a "
                            f"reference for every example, but {d.train} has sources without one")
    (lo, hi), shards = plan_shards(len(examples), g.shard_size, pi, pc)
    local = examples[lo:hi]
    base = {**record,  # the job's settings are its record's `config`
            "teacher": {"path": os.fspath(t_path), "tokenizer": os.fspath(tok_path),
                        **settings["teacher"]},
            "decoding": _plain(g), "corpus": report.as_dict(),
            "shards": all_shard_names(len(examples), g.shard_size, pc)}
    if _store_topk(config):
        base["topk"] = _topk_block(config, settings["teacher"], tok_path)
    if pi == 0:
        io_utils.atomic_write_json(io_utils.join(out_dir, MANIFEST),
                                   dict(base, status="running", updated=time.time()))

    _remove_stale_temps(out_dir, {s.name(pc) for s in shards})
    pending = [s for s in shards if not io_utils.exists(io_utils.join(out_dir, s.name(pc) + ".jsonl"))]
    log.info("generate: %d examples (%d bad lines), process %d/%d has %d shards, %d to do",
             len(examples), report.num_bad, pi, pc, len(shards), len(pending))
    if pending:
        _generate_shards(config, pending, local, out_dir, pc, t_path, tok_path, generate_fn,
                         load_fn, on_shard_done, progress)

    if pc > 1 and not simulated:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kd_flax-generate-done")
    if pi != 0:
        return dict(base, status="running")
    return _finish(out_dir, base, report, len(examples))


def _remove_stale_temps(out_dir, names) -> None:
    """Deletes temp files a killed run of this process left (``.part-00003.jsonl.x.tmp``)."""
    if io_utils.is_remote(out_dir):
        return  # object stores have no temp names
    for f in out_dir.iterdir():
        n = f.name
        if n.startswith(".") and n.endswith(".tmp"):
            base = n[1:].split(".", 1)[0].replace("dropped-", "part-")
            if base in names:
                f.unlink()


def _finish(out_dir, base, report, n_examples) -> dict:
    """Process 0: when every shard of every process exists, sum the stats and mark done."""
    missing = [n for n in base["shards"] if not io_utils.exists(io_utils.join(out_dir, n + ".jsonl"))]
    if missing:
        log.warning("generate: %d shards of other processes are not done yet (%s ...); "
                    "manifest stays 'running'", len(missing), missing[0])
        return dict(base, status="running", missing=missing)
    counts = {"read": report.read, "bad": dict(sorted(report.bad.items())),
              "examples": n_examples, "generated": 0, "kept": 0, "dropped": {},
              "truncated_source": 0, "tokens": 0, "hit_max_new_tokens": 0}
    seconds = 0.0
    dropped_files = []
    topk_keys = ("topk_tokens", "topk_bytes") if "topk" in base else ()
    counts.update({k: 0 for k in topk_keys})
    for name in base["shards"]:
        st = io_utils.read_json(io_utils.join(out_dir, name + ".stats.json"))
        for k in ("generated", "kept", "truncated_source", "tokens", "hit_max_new_tokens") + topk_keys:
            counts[k] += st.get(k, 0)  # hit_max_new_tokens: absent in shards of older versions
        if topk_keys:
            base["topk"].update(vocab_size=st["topk_vocab_size"],
                                ids_dtype=np.dtype(topk_cache.ids_dtype(st["topk_vocab_size"])).name)
        for reason, c in st["dropped"].items():
            counts["dropped"][reason] = counts["dropped"].get(reason, 0) + c
        if st["dropped"]:
            dropped_files.append(st["dropped_file"])
        seconds += st["seconds"]
    counts["hit_max_new_tokens_share"] = (counts["hit_max_new_tokens"] / counts["generated"]
                                          if counts["generated"] else 0.0)
    if counts["hit_max_new_tokens"]:
        log.warning("generate: %d of %d pseudo-labels (%.1f%%) hit generate.max_new_tokens without "
                    "EOS (runaway loops or too short a limit); generate.filters.drop_unfinished "
                    "drops them all, max_length_ratio those much longer than their source (dropped: "
                    "see counts.dropped)", counts["hit_max_new_tokens"],
                    counts["generated"], 100 * counts["hit_max_new_tokens_share"])
    manifest = dict(base, status="done", counts=counts, dropped_files=dropped_files,
                    generate_seconds=round(seconds, 3), updated=time.time())
    io_utils.atomic_write_json(io_utils.join(out_dir, MANIFEST), manifest)
    log.info("generate: done: %s", counts)
    if topk_keys:
        from kd_flax.metrics import PROGRESS_LOGGER  # a line the CLI shows (its default level is WARNING)
        logging.getLogger(PROGRESS_LOGGER).info(
            "generate: top-k cache (K=%d): %d bytes for %d target tokens (%.1f bytes per token)",
            base["topk"]["k"], counts["topk_bytes"], counts["topk_tokens"],
            counts["topk_bytes"] / max(counts["topk_tokens"], 1))
    return manifest


def _generate_shards(config, pending, local, out_dir, pc, t_path, tok_path, generate_fn,
                     load_fn, on_shard_done, progress):
    g, d = config.generate, config.data
    mesh, rules = sharding.mesh_from_config(config.mesh, devices=jax.local_devices())
    model, tokenizer = (load_fn or _load_teacher)(config, t_path, tok_path, mesh, rules)
    from kd_flax.translate import Translator

    translator = Translator(model, tokenizer, {k: _plain(g[k]) for k in _GEN_KWARGS}, mesh, rules,
                            generate_fn=generate_fn)
    if g.batch_size % translator.data_shards:
        raise ValueError(f"generate.batch_size ({g.batch_size}) must be divisible by the "
                         f"{translator.data_shards} devices the batch is split over "
                         f"(mesh.axes={dict(mesh.shape)})")
    boundaries = data_lib.normalize_boundaries(_get(d, "bucket_boundaries"), d.max_source_length)
    scorer = topk_cache.TopKScorer(model, _store_topk(config), mesh, rules) if _store_topk(config) else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    special = set(tokenizer.all_special_ids)
    eos = tokenizer.eos_token_id

    from tqdm.auto import tqdm

    from kd_flax.metrics import ProgressLog, stderr_is_tty

    total = sum(s.end - s.start for s in pending)
    show_bar = stderr_is_tty() if progress is None else bool(progress)
    bar = tqdm(total=total, unit="sent", desc="generate", dynamic_ncols=True, disable=not show_bar)
    lines = ProgressLog(total, "generate", enabled=not show_bar)  # no bar: a line every 30 s
    t_start, n_sent, n_tok = time.time(), 0, 0
    try:
        for shard in pending:
            t0 = time.time()
            stats = _run_shard(config, shard, local[shard.start:shard.end], translator, tokenizer,
                               boundaries, pad_id, eos, special, out_dir, pc, scorer, on_batch=lines.add)
            n_sent += stats["generated"]
            n_tok += stats["tokens"]
            el = max(time.time() - t_start, 1e-9)
            bar.update(stats["generated"])
            bar.set_postfix(sent_s=f"{n_sent / el:.1f}", tok_s=f"{n_tok / el:.0f}")
            log.info("generate: %s done: %d kept, %d dropped, %d hit max_new_tokens, %.1f sent/s, "
                     "%.0f tok/s (%d compilations)",
                     shard.name(pc), stats["kept"], sum(stats["dropped"].values()), stats["hit_max_new_tokens"],
                     stats["generated"] / max(time.time() - t0, 1e-9),
                     stats["tokens"] / max(time.time() - t0, 1e-9), translator.compilations())
            if on_shard_done is not None:
                on_shard_done(shard.name(pc))
    finally:
        bar.close()
    return translator


def _run_shard(config, shard, examples, translator, tokenizer, boundaries, pad_id, eos, special,
               out_dir, pc, scorer=None, on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Generate one shard and write its files (with its top-k file when `scorer` is given);
    `on_batch(sentences, tokens)` after each batch."""
    from kd_flax.translate import hit_max_new_tokens

    g, d = config.generate, config.data
    t0 = time.time()
    report = corpus_lib.CorpusReport()
    tok_ex = data_lib.tokenize_examples(examples, tokenizer, max_source_length=d.max_source_length,
                                        source_prefix=_get(d, "source_prefix") or "", report=report)
    src_counts = None
    if _get(g.filters, "max_length_ratio"):
        src_counts = [len(ids) for ids in tokenizer([ex.src for ex in examples],
                                                    add_special_tokens=False)["input_ids"]]
    records: dict[int, dict] = {}
    dropped: list[dict] = []
    n_tokens = n_hit_max = 0
    for j, batch in enumerate(data_lib.generation_batches(tok_ex, g.batch_size, boundaries, pad_id)):
        seqs, scores, sum_lp = translator(batch["input_ids"], batch["attention_mask"],
                                          _batch_seed(g.seed, shard.process, shard.index, j))
        rows = np.flatnonzero(batch["valid"])
        n_ret = seqs.shape[1]
        tokens_before = n_tokens
        token_lists, lengths = [], []
        for i in rows:
            for r in range(n_ret):
                toks = seqs[i, r].tolist()
                end = toks.index(eos) + 1 if eos is not None and eos in toks else len(toks)
                toks = toks[:end]
                n_tokens += len(toks)
                token_lists.append(toks)
                lengths.append(sum(1 for t in toks if t not in special))
        texts = tokenizer.batch_decode(token_lists, skip_special_tokens=True)
        hit_max = hit_max_new_tokens(seqs, eos)
        for k, i in enumerate(rows):
            ex = examples[batch["rows"][i]]
            hyps = [t.strip() for t in texts[k * n_ret:(k + 1) * n_ret]]
            sc = [float(x) for x in scores[i]]
            choice = select_candidate(hyps, sc, ex.ref, g.select)
            n_hit_max += int(hit_max[i, choice])
            rec = {"id": ex.id, "src": ex.src, "ref": ex.ref, "hyp": hyps[choice], "score": sc[choice]}
            if g.write_nbest:
                rec.update(hyps=hyps, scores=sc, sum_logprobs=[float(x) for x in sum_lp[i]])
            n_src = src_counts[batch["rows"][i]] if src_counts is not None else 0
            verdict = apply_filters(rec, n_src, lengths[k * n_ret + choice], g.filters,
                                    unfinished=bool(hit_max[i, choice]))
            if verdict is None:
                records[ex.id] = rec
            else:
                dropped.append(dict(rec, reason=verdict[0], value=verdict[1]))
        if on_batch is not None:
            on_batch(len(rows), n_tokens - tokens_before)
    name = shard.name(pc)
    by_reason: dict[str, int] = {}
    for rec in dropped:
        by_reason[rec["reason"]] = by_reason.get(rec["reason"], 0) + 1
    dropped_file = name.replace("part-", "dropped-") + ".jsonl"
    if dropped:
        io_utils.atomic_write_jsonl(io_utils.join(out_dir, dropped_file),
                                    sorted(dropped, key=lambda r: r["id"]))
    stats = {"shard": name, "examples": len(examples), "generated": len(examples),
             "kept": len(records), "dropped": by_reason, "dropped_file": dropped_file,
             "truncated_source": report.truncated_source, "tokens": n_tokens,
             "hit_max_new_tokens": n_hit_max,
             "first_id": examples[0].id if examples else None,
             "last_id": examples[-1].id if examples else None,
             "seconds": round(time.time() - t0, 3)}
    if scorer is not None:  # before the part file: its existence means both exist
        stats.update(_store_shard_topk(config, scorer, examples, records, tokenizer, out_dir, name))
        stats["seconds"] = round(time.time() - t0, 3)
    io_utils.atomic_write_json(io_utils.join(out_dir, name + ".stats.json"), stats)
    # The part file is the shard's commit marker: written last.
    io_utils.atomic_write_jsonl(io_utils.join(out_dir, name + ".jsonl"),
                                [records[k] for k in sorted(records)])
    return stats


def _store_shard_topk(config, scorer, examples, records, tokenizer, out_dir, name) -> dict:
    """Scores the shard's targets (kept pseudo-labels, or the gold references) with the teacher
    and writes ``<name>.topk.safetensors``; returns its stats."""
    g, d = config.generate, config.data
    target = _get(g, "store_topk_target", "pseudo")
    if target == "pseudo":
        chosen = [corpus_lib.Example(i, records[i]["src"], records[i]["hyp"]) for i in sorted(records)]
    else:
        chosen = [ex for ex in examples if ex.ref is not None]
    tok = data_lib.tokenize_examples(chosen, tokenizer, max_source_length=d.max_source_length,
                                     max_target_length=d.max_target_length,
                                     source_prefix=_get(d, "source_prefix") or "")
    model_cfg = scorer.model_config
    scored = topk_cache.score_examples(
        scorer, tok, g.batch_size, pad_id=model_cfg.pad_token_id, eos_id=model_cfg.eos_token_id,
        decoder_start_id=model_cfg.decoder_start_token_id, bucket_boundaries=tuple(_get(d, "bucket_boundaries") or ()),
        max_source_length=d.max_source_length, max_target_length=d.max_target_length)
    ids = sorted(scored)
    n_bytes = topk_cache.write(io_utils.join(out_dir, topk_cache.file_name(name)), ids,
                               [scored[i][0] for i in ids], [scored[i][1] for i in ids], k=scorer.k,
                               vocab_size=scorer.vocab_size, target=target)
    n_tok = sum(len(v[0]) for v in scored.values())
    return {"topk_examples": len(ids), "topk_tokens": n_tok, "topk_bytes": n_bytes,
            "topk_vocab_size": scorer.vocab_size}


# ----------------------------------------------------------------------------- reading back


def output_dir(workdir_or_dir) -> str:
    p = io_utils.as_path(workdir_or_dir)
    if io_utils.exists(p / MANIFEST):
        return os.fspath(p)
    return os.fspath(p / OUT_SUBDIR)


def missing_shards(out_dir) -> list[str]:
    """Shards a manifest lists whose part file is gone ([] without a manifest)."""
    manifest = _read_manifest(out_dir)
    if manifest is None:
        return []
    return [n for n in manifest.get("shards", []) if not io_utils.exists(io_utils.join(out_dir, n + ".jsonl"))]


def load_pseudo_labels(workdir_or_dir, *, with_nbest: bool = False) -> list[corpus_lib.Example]:
    """The kept pseudo-labels of a finished job, sorted by id.

    Returns :class:`kd_flax.corpus.Example` records whose ``ref`` is the teacher's ``hyp`` and
    ``gold`` the corpus reference. Raises ``ValueError`` if the job is not done, a shard is
    missing, or an id appears twice.
    """
    out = output_dir(workdir_or_dir)
    manifest = _read_manifest(out)
    if manifest is None:
        raise ValueError(f"load_pseudo_labels: no {MANIFEST} in {out} (run the generate stage first)")
    if manifest.get("status") != "done":
        raise ValueError(f"load_pseudo_labels: {out}/{MANIFEST} has status "
                         f"{manifest.get('status')!r}, not 'done'; re-run the generate stage to finish it")
    examples, seen = [], set()
    for name in manifest["shards"]:
        path = io_utils.join(out, name + ".jsonl")
        if not io_utils.exists(path):
            raise ValueError(f"load_pseudo_labels: shard {path} listed in the manifest is missing; "
                             f"run the generate stage again to redo it")
        recs = io_utils.read_jsonl(path)
        stats_path = io_utils.join(out, name + ".stats.json")
        kept = io_utils.read_json(stats_path).get("kept") if io_utils.exists(stats_path) else None
        if kept is not None and len(recs) != kept:
            raise ValueError(f"load_pseudo_labels: {path} has {len(recs)} records but the job wrote "
                             f"{kept} ({stats_path}); it was changed after generate finished: delete it "
                             f"and run the generate stage again to redo it")
        for rec in recs:
            if rec["id"] in seen:
                raise ValueError(f"load_pseudo_labels: id {rec['id']} appears twice ({path})")
            seen.add(rec["id"])
            ex = corpus_lib.Example(rec["id"], rec["src"], rec["hyp"], gold=rec.get("ref"))
            if with_nbest and "hyps" in rec:
                ex.refs = tuple(rec["hyps"])
            examples.append(ex)
    total = (manifest.get("counts") or {}).get("kept")
    if total is not None and len(examples) != total:
        raise ValueError(f"load_pseudo_labels: {out} holds {len(examples)} records, its {MANIFEST} "
                         f"counts {total}; run the generate stage again (--force redoes it all)")
    examples.sort(key=lambda e: e.id)
    return examples


__all__ = ["run", "load_pseudo_labels", "validate_config", "select_candidate", "apply_filters",
           "plan_shards", "GenerateError"]
