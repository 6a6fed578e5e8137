"""File helpers shared by the stages: local paths and ``gs://`` alike, atomic writes, checksums.

Every stage output goes through :func:`atomic_write_bytes` (or its text/JSON siblings) so a
reader never sees a half-written file: on a local disk the data goes to a temporary name in
the same directory, is fsync'ed and then ``os.replace``'d over the target (atomic on POSIX);
on Cloud Storage an object only becomes visible once its upload completes, which gives the
same guarantee without the rename.

Paths are handled through ``etils.epath`` (already a dependency of orbax), so ``gs://bucket/x``
works wherever a local path does (the GCS backend is ``gcsfs``, a core dependency).

Storage emulators: the standard ``STORAGE_EMULATOR_HOST`` variable (``http://127.0.0.1:9023``)
is all a user sets. gcsfs follows it itself; tensorstore (Orbax's checkpoint backend) has its
own variable, ``TENSORSTORE_GCS_HTTP_URL``, which :func:`follow_storage_emulator` sets from it,
so checkpoints go to the same emulator as every other file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import tempfile
from typing import Any, BinaryIO, Iterator

from etils import epath


_CHUNK = 1 << 20


def follow_storage_emulator() -> None:
    """Point tensorstore at ``$STORAGE_EMULATOR_HOST`` too. Called on import (before gcsfs is
    imported); a no-op without an emulator.

    Also switches off gcsfs's bucket-type probe: it asks Cloud Storage's gRPC control API,
    which an emulator does not serve, on every operation (it does not cache a failed answer),
    costing a warning per call and up to a minute each when it gets as far as a TLS handshake."""
    host = os.environ.get("STORAGE_EMULATOR_HOST")
    if not host:
        return
    if "://" not in host:
        host = "http://" + host
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", host)
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


follow_storage_emulator()


def as_path(path) -> epath.Path:
    """Returns an ``epath.Path`` for a local path or a ``gs://`` URL."""
    if isinstance(path, epath.Path):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a str or os.PathLike, got {type(path).__name__}: {path!r}")
    return epath.Path(path)


def is_remote(path) -> bool:
    """True for object-store URLs (``gs://``, ``s3://``...), which have no atomic rename."""
    return "://" in os.fspath(path) if isinstance(path, (str, os.PathLike)) else "://" in str(path)


def abspath(path) -> str:
    """An absolute local path, or the URL as it is (``os.path.abspath('gs://b/x')`` would give
    a local ``./gs:/b/x``)."""
    path = os.fspath(path) if not isinstance(path, epath.Path) else str(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def join(path, *parts) -> epath.Path:
    return as_path(path).joinpath(*parts)


def exists(path) -> bool:
    return as_path(path).exists()


def makedirs(path) -> epath.Path:
    p = as_path(path)
    p.mkdir(parents=True, exist_ok=True)
    return p


def is_dir(path) -> bool:
    return as_path(path).is_dir()


def listdir(path) -> list[str]:
    """Sorted entry names of a directory ([] when it does not exist)."""
    p = as_path(path)
    return sorted(f.name for f in p.iterdir()) if p.exists() else []


def rmtree(path) -> None:
    """Removes a directory tree (or file) if it exists."""
    p = as_path(path)
    if p.is_dir():
        p.rmtree()
    elif p.exists():
        p.unlink()


def copy_tree(src, dst) -> None:
    """Copies every file below ``src`` to ``dst`` (local or remote either side), each file
    atomically, so a reader of ``dst`` never sees a half-written file."""
    src, dst = as_path(src), as_path(dst)
    if not src.is_dir():
        atomic_write_bytes(dst, src.read_bytes())
        return
    for f in src.iterdir():
        copy_tree(f, dst / f.name)


@contextlib.contextmanager
def local_dir(path) -> Iterator[str]:
    """A local directory with the contents of ``path``: the path itself when local, else a
    temporary download (for libraries that only read local files, e.g. tokenizers)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="kd_flax-") as tmp:
        copy_tree(path, tmp)
        yield tmp


def open_path(path, mode: str = "rb"):
    """Opens a local or remote file. ``.gz`` files are (de)compressed transparently.

    Text modes use UTF-8 with strict error handling; callers that must survive bad bytes
    (the corpus reader) open in binary mode and decode line by line instead.
    """
    p = as_path(path)
    if mode not in ("r", "rb", "w", "wb", "rt", "wt"):
        raise ValueError(f"open_path mode must be one of r, rb, rt, w, wb, wt; got {mode!r}")
    binary = "b" in mode
    raw_mode = ("r" if "r" in mode else "w") + "b"
    f: BinaryIO = p.open(raw_mode)
    if str(p).endswith(".gz"):
        f = _OwningGzipFile(fileobj=f, mode=raw_mode)
    if binary:
        return f
    return io.TextIOWrapper(f, encoding="utf-8", newline="")


class _OwningGzipFile(gzip.GzipFile):
    """A GzipFile that also closes the (possibly remote) file object it wraps."""

    def close(self):
        under = self.fileobj
        try:
            super().close()
        finally:
            if under is not None:
                under.close()


def iter_lines_bytes(path) -> Iterator[bytes]:
    """Yields the raw lines of a (possibly gzipped) file without their line terminator.
    A truncated or non-gzip ``.gz`` file raises ``ValueError`` naming it."""
    import zlib
    with open_path(path, "rb") as f:
        try:
            for line in f:
                if line.endswith(b"\n"):
                    line = line[:-1]
                if line.endswith(b"\r"):
                    line = line[:-1]
                yield line
        except EOFError:
            raise ValueError(f"{path}: truncated gzip file (it ends before the end of its "
                             f"compressed stream); restore or re-download it") from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise ValueError(f"{path}: not a valid gzip file ({e})") from None


def atomic_write_bytes(path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see either the old file or the new one."""
    p = as_path(path)
    if is_remote(p):
        # Object stores publish an object only when its upload finishes: already atomic.
        p.write_bytes(data)
        return
    directory = os.path.dirname(os.path.abspath(os.fspath(p))) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; outputs are meant to be shared
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.fspath(p))
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not e.filename:  # ENOSPC, EIO...: name the file written
            raise OSError(e.errno, e.strerror or str(e), os.fspath(p)) from None
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj: Any, *, indent: int | None = 2) -> None:
    """Atomically writes ``obj`` as JSON (UTF-8, keys sorted for reproducible files)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path, records) -> int:
    """Atomically writes an iterable of JSON-serialisable records, one per line. Returns the count."""
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def read_json(path) -> Any:
    with open_path(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def read_jsonl(path) -> list:
    """Reads a JSON Lines file; a bad line raises ``ValueError`` naming ``path:line``."""
    out = []
    for lineno, raw in enumerate(iter_lines_bytes(path), start=1):
        if not raw.strip():
            continue
        try:
            out.append(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
    return out


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes (streamed, so multi-GB checkpoints are fine)."""
    h = hashlib.sha256()
    with as_path(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _signature(f: epath.Path) -> list:
    """(size, modification time) of a file: ns resolution locally, the object's stat remotely."""
    if not is_remote(f):
        st = os.stat(os.fspath(f))
        return [st.st_size, st.st_mtime_ns]
    st = f.stat()
    return [st.length, st.mtime]


def tree_checksum(path, *, exclude_hidden: bool = True, cache=None, write_cache: bool = True) -> str:
    """SHA-256 over every file below ``path``: relative names and contents, in sorted order.

    A single file is hashed by content alone. Hidden files (``.foo``, e.g. temp files of an
    unfinished atomic write) are left out by default so they cannot change the checksum.
    ``cache``: a JSON file of per-file digests keyed by the file's path, size and modification
    time. A file whose size and time match its entry is not read again, so a re-run (a resumed
    job, a skipped stage) does not re-read, or re-download from ``gs://``, a multi-GB teacher.
    With ``write_cache`` the file is updated (atomically) when an entry was added or changed.
    """
    root = as_path(path)
    if not root.exists():
        raise ValueError(f"tree_checksum: {path} does not exist")
    memo = {}
    if cache is not None and exists(cache):
        try:
            memo = read_json(cache).get("files", {})
        except (ValueError, AttributeError):
            memo = {}  # a damaged cache only costs a re-read
    fresh = {}

    def digest(f: epath.Path) -> str:
        key = os.fspath(f) if is_remote(f) else os.path.abspath(os.fspath(f))  # not cwd-relative
        sig = _signature(f)
        hit = memo.get(key)
        sha = hit[2] if isinstance(hit, list) and len(hit) == 3 and hit[:2] == sig else sha256_file(f)
        fresh[key] = sig + [sha]
        return sha

    if not root.is_dir():
        result = digest(root)
    else:
        files = []
        stack = [(root, "")]
        while stack:  # explicit walk: epath refuses recursive globs on GCS
            d, prefix = stack.pop()
            for f in d.iterdir():
                if exclude_hidden and f.name.startswith("."):
                    continue
                rel = prefix + f.name
                if f.is_dir():
                    stack.append((f, rel + "/"))
                else:
                    files.append((rel, f))
        h = hashlib.sha256()
        for rel, f in sorted(files, key=lambda t: t[0]):
            h.update(rel.encode("utf-8") + b"\0" + digest(f).encode("ascii") + b"\n")
        result = h.hexdigest()
    if cache is not None and write_cache and any(memo.get(k) != v for k, v in fresh.items()):
        atomic_write_json(cache, {"files": {**memo, **fresh}})
    return result


def json_hash(obj: Any) -> str:
    """Stable SHA-256 of a JSON-serialisable object (keys sorted, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class _ObjectEventFile:
    """A TensorBoard event file on an object store. Objects cannot be appended to, so the
    events are buffered and the whole object is rewritten on each flush (event files are
    small: a few scalars every `log_every` steps)."""

    def __init__(self, path: str):
        self.path, self.buffer = path, io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        as_path(self.path).write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _ObjectEventFiles:
    """tensorboardX writer factory for ``gs://`` logdirs, through epath like every other file
    (tensorboardX's own would need google-cloud-storage and ignore the emulator setting)."""

    def directory_check(self, path: str) -> None:
        makedirs(path)

    def open(self, path: str) -> _ObjectEventFile:
        return _ObjectEventFile(path)


def summary_writer(logdir):
    """A tensorboardX ``SummaryWriter`` for a local or ``gs://`` logdir."""
    from tensorboardX import SummaryWriter, record_writer
    record_writer.register_writer_factory("gs", _ObjectEventFiles())
    return SummaryWriter(abspath(logdir))
