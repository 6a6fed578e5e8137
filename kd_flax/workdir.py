"""The workdir: where every stage's outputs and record live, local paths and ``gs://`` alike.

```
WORKDIR/
  data/  tokenizer/            made by `main.prepare` from the config (synthetic data, a tokenizer)
  finetune/  generate/         shared stages: the teacher and its pseudo-labels
  distill/ evaluate/ export/   the student stages (no variants)
  variants/NAME/{distill,evaluate,export}/   the student stages of variant NAME
  report.md  report.png
```

A `Workdir(root, variant)` answers every "where is ..." question (a stage's directory, the
teacher, the pseudo-labels, the student, the export summary), so no stage builds such a path
itself. Variants share `data/`, `tokenizer/`, `finetune/` and `generate/` through these
answers, not through symlinks (which object stores do not have).

One record format: a stage, and each resumable sub-stage of one (the `distill.stages`
entries), records ``stage.json`` in its directory: ``stage``, ``status`` ("running" |
"done"), ``config`` (the keys it depends on), ``upstream`` (the hashes of the stage records
it consumed), ``config_hash`` and, when done, ``result`` and ``seconds``. `check_record`
is the one place that compares a record with the settings of a new run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from typing import Any

from kd_flax import config_base, io_utils

RECORD = "stage.json"
LOCK = ".lock"
SHARED_STAGES = ("finetune", "generate")
STUDENT_STAGES = ("distill", "evaluate", "export")
STAGES = SHARED_STAGES + STUDENT_STAGES


class StageRefused(ValueError):
    """A stage's directory holds outputs made with other settings (the message names them)."""


class Preempted(Exception):
    """A stage stopped on SIGTERM after saving its checkpoint; the same command resumes it
    (the CLI exits 143)."""


class WorkdirLocked(StageRefused):
    """Another process holds the workdir's lock (the message names it)."""


@dataclasses.dataclass(frozen=True)
class Workdir:
    """`root`: the top workdir (local path, made absolute, or URL); `variant`: the student
    variant whose stages this view addresses (None: the top-level student stages)."""

    root: str
    variant: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "root", io_utils.abspath(self.root))
        if self.variant == "":
            object.__setattr__(self, "variant", None)

    @classmethod
    def of(cls, workdir) -> "Workdir":
        """A `Workdir` from a Workdir or a path (stage functions accept either)."""
        return workdir if isinstance(workdir, Workdir) else cls(os.fspath(workdir))

    def for_variant(self, name: str | None) -> "Workdir":
        return Workdir(self.root, name)

    @property
    def remote(self) -> bool:
        return io_utils.is_remote(self.root)

    def path(self, *parts: str) -> str:
        """A path below the top workdir."""
        return os.path.join(self.root, *parts)  # POSIX join: a gs:// URL joins the same way

    @property
    def student_root(self) -> str:
        """Where this view's student stages live: WORKDIR, or WORKDIR/variants/NAME."""
        return self.root if self.variant is None else self.path("variants", self.variant)

    def stage_dir(self, stage: str, *parts: str) -> str:
        if stage in SHARED_STAGES:
            return self.path(stage, *parts)
        if stage in STUDENT_STAGES:
            return os.path.join(self.student_root, stage, *parts)
        raise ValueError(f"stage {stage!r} is unknown; allowed: {', '.join(STAGES)}")

    # -- what the stages read -------------------------------------------------------------

    @property
    def data_dir(self) -> str:
        return self.path("data")

    @property
    def tokenizer_dir(self) -> str:
        return self.path("tokenizer")

    @property
    def checksum_cache(self) -> str:
        """Per-file digests of the teacher (`io_utils.tree_checksum`); outside `generate/` so
        that `--force`, which empties it, keeps them."""
        return self.path(".teacher_checksums.json")

    @property
    def trained_teacher_dir(self) -> str:
        return self.stage_dir("finetune", "model")

    def teacher_dir(self, config, *, must_exist: bool = True) -> str:
        """The teacher checkpoint: the one `finetune` trained here, else ``teacher.path``.

        A finetune stage that started but did not finish is refused rather than skipped over
        to the raw ``teacher.path`` (its pseudo-labels would come from another teacher).
        ``must_exist=False``: a ``teacher.path`` that is gone is returned as is (a stage that
        never loads the teacher, e.g. KD against its cached top-k)."""
        record = read_record(self.stage_dir("finetune"))
        trained = self.trained_teacher_dir
        if record is not None and record.get("status") != "done":
            raise StageRefused(f"the finetune stage in {self.stage_dir('finetune')} is not finished "
                               f"(status {record.get('status')!r}); run it to the end first")
        if io_utils.exists(io_utils.join(trained, "config.json")):
            return trained
        path = config.teacher.get("path") if hasattr(config.teacher, "get") else None
        if not path:
            raise ValueError(f"teacher.path: required (an HF checkpoint dir); the finetune stage's "
                             f"{trained} does not exist either")
        if must_exist and not io_utils.exists(path):
            raise ValueError(f"teacher.path: {path!r} does not exist")
        return os.fspath(path)

    def teacher_tokenizer_dir(self, config, *, must_exist: bool = True) -> str:
        """The teacher's tokenizer: saved beside the teacher, else ``teacher.tokenizer``."""
        t_dir = self.teacher_dir(config, must_exist=must_exist)
        if io_utils.exists(io_utils.join(t_dir, "tokenizer.json")) or not config.teacher.get("tokenizer"):
            return t_dir
        return config.teacher.tokenizer

    @property
    def pseudo_label_dir(self) -> str:
        return self.stage_dir("generate")

    @property
    def student_dir(self) -> str:
        return self.stage_dir("distill", "model")

    @property
    def export_dir(self) -> str:
        return self.stage_dir("export")

    # -- content identity ------------------------------------------------------------------

    def portable(self, obj):
        """`obj` (JSON-able) with this workdir's root written as ``$WORKDIR``, so files that
        `main.prepare` put inside the workdir do not tie a record to where the workdir is."""
        root = json.dumps(self.root)[1:-1]
        return json.loads(json.dumps(obj, default=str).replace(root, "$WORKDIR"))

    def digest(self, path, *, write_cache: bool = True) -> str:
        """Content digest of a file or directory (`io_utils.tree_checksum`, per-file digests
        cached by size and mtime in `checksum_cache`, so an unchanged multi-GB teacher is not
        read again)."""
        return io_utils.tree_checksum(path, cache=self.checksum_cache, write_cache=write_cache)

    def corpus_digest(self, spec, *, src_lang=None, tgt_lang=None, write_cache: bool = True) -> str | None:
        """One digest over the files `corpus.read_corpus(spec)` reads (None: no local or
        ``gs://`` files, e.g. an ``hf:`` hub name; or one of them is missing, which the reader
        then reports by name)."""
        from kd_flax import corpus as corpus_lib
        files = corpus_lib.corpus_files(spec, src_lang=src_lang, tgt_lang=tgt_lang)
        if not files or not all(io_utils.exists(f) for f in files):
            return None
        return io_utils.json_hash([self.digest(f, write_cache=write_cache) for f in files])

    # -- one process at a time ----------------------------------------------------------

    @property
    def lock_path(self) -> str:
        return self.path(LOCK)

    @contextlib.contextmanager
    def lock(self):
        """Holds `WORKDIR/.lock` while the body runs; a second process is refused with the
        holder named. Locally: a file created with ``O_CREAT | O_EXCL`` (a lock whose process
        is gone from this host is taken over). On ``gs://``: an object created with the
        generation precondition ``ifGenerationMatch=0`` (gcsfs ``pipe_file(mode="create")``),
        which Cloud Storage grants to exactly one writer; a lock left by a killed process
        there must be deleted by hand (the message says so)."""
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        blob = json.dumps(holder).encode()
        path = self.lock_path
        if self.remote:
            _create_remote(path, blob)
        else:
            _create_local(path, blob)
        try:
            yield holder
        finally:
            try:
                io_utils.rmtree(path)
            except OSError:
                pass

    def clean_temps(self) -> list[str]:
        """Removes what interrupted writes leave: ``.NAME.*.tmp`` of `io_utils.atomic_write_bytes`
        and Orbax's ``*.orbax-checkpoint-tmp*`` dirs. Call it holding the lock. Local only
        (object stores publish an object whole, and have no temp names). Returns the paths."""
        if self.remote or not os.path.isdir(self.root):
            return []
        removed = []
        for d, dirs, files in os.walk(self.root):
            for name in list(dirs):
                if ".orbax-checkpoint-tmp" in name:
                    removed.append(os.path.join(d, name))
                    dirs.remove(name)
            for name in files:
                if (name.startswith(".") and name.endswith(".tmp")) or ".orbax-checkpoint-tmp" in name:
                    removed.append(os.path.join(d, name))
        for p in removed:
            io_utils.rmtree(p)
        return removed

    # -- records and summaries ------------------------------------------------------------

    def record(self, stage: str) -> dict | None:
        return read_record(self.stage_dir(stage))

    def result(self, stage: str) -> dict | None:
        """The `result` of a finished stage, or None."""
        rec = self.record(stage)
        return rec.get("result") if rec and rec.get("status") == "done" else None

    def export_summary(self) -> dict | None:
        """`export/summary.json` of this view's student, or None."""
        path = self.stage_dir("export", "summary.json")
        return io_utils.read_json(path) if io_utils.exists(path) else None

    def eval_results(self) -> dict | None:
        """`evaluate/results.json` of this view, or None."""
        path = self.stage_dir("evaluate", "results.json")
        return io_utils.read_json(path) if io_utils.exists(path) else None

    def variants(self) -> list[str]:
        """Names of the variants that have a directory under WORKDIR/variants."""
        return io_utils.listdir(self.path("variants"))


def _holder_text(path, raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return (f"{path} is held by pid {h.get('pid')} on host {h.get('host')} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(h.get('since', 0)))}")
    except (ValueError, AttributeError):
        return f"{path} is held by another process"


def _stale(raw: bytes) -> bool:
    """A lock whose holder ran on this host and is gone (kill -9, a crash)."""
    try:
        h = json.loads(raw.decode())
    except (ValueError, AttributeError):
        return False
    return isinstance(h, dict) and h.get("host") == socket.gethostname() \
        and isinstance(h.get("pid"), int) and not _alive(h["pid"])


def _locked(path, raw: bytes) -> WorkdirLocked:
    return WorkdirLocked(f"workdir locked: {_holder_text(path, raw)}; wait for it to finish "
                         f"(or delete {path} if that process is gone)")


def _create_local(path: str, blob: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                raw = open(path, "rb").read()
            except OSError:
                raw = b""
            if attempt == 0 and _stale(raw):
                os.unlink(path)  # its process is gone: take it over
                continue
            raise _locked(path, raw) from None
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        return


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _create_remote(path: str, blob: bytes) -> None:
    """Create-only write: gcsfs ``pipe_file(mode="create")`` sends ``ifGenerationMatch=0``,
    which Cloud Storage answers with 412 (gcsfs: FileExistsError) when the object exists.
    The existence check before it is for stores that ignore preconditions (the local
    emulator): it refuses a second run that starts while the first holds the lock, but
    only the precondition makes two simultaneous starts safe."""
    import fsspec
    fs, _, (target,) = fsspec.get_fs_token_paths(path)
    for attempt in range(2):
        try:
            raw = fs.cat_file(target)
        except FileNotFoundError:
            raw = None
        if raw is not None:
            if attempt == 0 and _stale(raw):
                fs.rm_file(target)
                continue
            raise _locked(path, raw)
        try:
            fs.pipe_file(target, blob, mode="create")
        except FileExistsError:
            raise _locked(path, b"") from None
        return


# ---------------------------------------------------------------------------
# The one record format
# ---------------------------------------------------------------------------


def read_record(directory) -> dict | None:
    path = io_utils.join(directory, RECORD)
    return io_utils.read_json(path) if io_utils.exists(path) else None


def write_record(directory, record: dict) -> None:
    """Atomically (re)writes ``directory/stage.json``; values JSON can't hold become strings."""
    import json
    io_utils.atomic_write_json(io_utils.join(directory, RECORD),
                               json.loads(json.dumps(dict(record, updated=time.time()), default=str)))


def new_record(stage: str, config: Any, upstream: dict[str, str] | None = None,
               inputs: dict[str, str] | None = None) -> dict:
    """A record (status unset) for `stage` depending on `config`, the `upstream` records'
    hashes and `inputs`: the content digests of the files it reads (`Workdir.digest`), by
    role (``teacher``, ``tokenizer``, ``data.train``...). Digests, not paths: a moved workdir
    or a copied teacher keeps the hash, a teacher retrained in place changes it."""
    upstream, inputs = dict(upstream or {}), dict(inputs or {})
    keys = {"keys": config, "upstream": upstream}
    if inputs:
        keys["inputs"] = inputs
    return {"stage": stage, "config": config, "upstream": upstream, "inputs": inputs,
            "config_hash": config_base.config_hash(keys)}


def check_record(old: dict | None, new: dict, directory, *, force: bool = False,
                 remove=None) -> dict | None:
    """Compares the record found in `directory` with the one a run would write.

    Returns the old record when it was made with the same settings (the caller skips a
    finished stage or resumes an unfinished one), or None when there is none. Other settings
    are refused, naming the changed keys, unless `force`: then `remove()` (default: empty the
    directory) clears the old outputs and None is returned.
    """
    if old is None or old.get("config_hash") == new["config_hash"]:
        return old
    changed = (config_base.diff_keys(old.get("config"), new["config"])
               + config_base.diff_keys(old.get("upstream") or {}, new["upstream"], "upstream")
               + [f"input {k} (its content)" for k in
                  config_base.diff_keys(old.get("inputs") or {}, new.get("inputs") or {})])
    if not force:
        raise StageRefused(
            f"stage {new['stage']!r} in {directory} was produced with other settings; changed: "
            f"{', '.join(changed) or '(upstream)'}. Use another --workdir, or --force to redo it.")
    import logging
    logging.getLogger(__name__).warning("--force: redoing stage %s in %s (changed: %s)",
                                        new["stage"], directory, ", ".join(changed))
    (remove or (lambda: io_utils.rmtree(directory)))()
    return None
