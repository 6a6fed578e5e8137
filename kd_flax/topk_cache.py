"""The teacher's top-k log-probs, stored beside the pseudo-labels, for word-level KD without
the teacher in memory (`generate.store_topk: K`, `distill.loss.teacher: "cached"`).

Writing (the teacher job, `kd_flax.pseudo_labels`): after a shard's pseudo-labels are chosen,
`TopKScorer` runs the teacher teacher-forced over the shard's targets (the chosen pseudo-label,
or with `generate.store_topk_target: "gold"` the corpus reference), tokenised and batched
exactly as `kd_flax.data.batches` feeds the student, and keeps at every target position the
K largest log-probs (`log_softmax` at T=1 over the full vocabulary) and their ids. They go to
``part-XXXXX.topk.safetensors`` (written temp-then-rename *before* the shard's ``.jsonl``,
which stays the shard's one commit marker):

* ``logprobs`` float16 ``[n_tokens_total, K]``, ``ids`` uint16 (vocab <= 65535) else int32;
* ``offsets`` int64 ``[n_examples + 1]`` (example j's rows are ``offsets[j]:offsets[j+1]``),
  ``example_ids`` int64 ``[n_examples]`` (sorted);
* metadata ``kd_flax_topk``: JSON ``{"k", "target", "vocab_size"}``.

safetensors gives random access by tensor name and zero-copy reads (it is already installed
with transformers). The manifest's ``topk`` block records K, the dtypes, the target kind, the
lengths the targets were cut to and the teacher's and tokenizer's checksums.

Reading (the distill stage): `DistillCache.open` checks the cache against the run (teacher,
tokenizer, K, lengths) and `attach` gives each tokenised example its ``[len, K]`` arrays
(``Example.teacher_topk``); `kd_flax.data.batches` pads them into ``teacher_topk_logprobs`` /
``teacher_topk_ids``.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np

from kd_flax import io_utils

log = logging.getLogger(__name__)

SUFFIX = ".topk.safetensors"
TARGETS = ("pseudo", "gold")
LOGPROB_DTYPE = np.float16
META_KEY = "kd_flax_topk"


class TopKCacheError(ValueError):
    """A cache that does not fit the run (the message names what differs and what to do)."""


def tokenizer_fingerprint(tokenizer) -> str:
    """What the cached ids mean: the vocabulary (token -> id) and the special tokens. Not the
    files' bytes: the same tokenizer saved in `WORKDIR/tokenizer` and beside the trained
    teacher differ in their files (and the teacher's dir holds its weights too)."""
    import hashlib
    blob = json.dumps({"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0])),
                       "special": sorted(map(str, tokenizer.all_special_tokens))}, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def ids_dtype(vocab_size: int):
    return np.uint16 if int(vocab_size) <= np.iinfo(np.uint16).max else np.int32


def file_name(shard_name: str) -> str:
    return shard_name + SUFFIX


# ----------------------------------------------------------------------------- the file


def encode(example_ids, logprobs, ids, *, k: int, vocab_size: int, target: str) -> bytes:
    """The safetensors bytes of one shard: per-example ``[len, K]`` arrays, concatenated in
    ``example_ids`` order (sorted here)."""
    from safetensors.numpy import save

    order = np.argsort(np.asarray(example_ids, np.int64), kind="stable")
    lens = np.array([len(logprobs[j]) for j in order], np.int64)
    tensors = {
        "example_ids": np.asarray(example_ids, np.int64)[order].reshape(-1),
        "offsets": np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
        "logprobs": np.concatenate([np.asarray(logprobs[j], np.float32) for j in order] or
                                   [np.zeros((0, k), np.float32)]).astype(LOGPROB_DTYPE).reshape(-1, k),
        "ids": np.concatenate([np.asarray(ids[j]) for j in order] or [np.zeros((0, k), np.int64)])
        .astype(ids_dtype(vocab_size)).reshape(-1, k),
    }
    # One metadata entry: safetensors writes a metadata map in hash order (it differs between
    # processes), and a resumed job must write byte-identical files.
    meta = json.dumps({"k": int(k), "vocab_size": int(vocab_size), "target": target}, sort_keys=True)
    return save(tensors, metadata={META_KEY: meta})


def write(path, example_ids, logprobs, ids, **kw) -> int:
    """Atomically writes one shard's file (temp name, then rename); returns its size in bytes."""
    blob = encode(example_ids, logprobs, ids, **kw)
    io_utils.atomic_write_bytes(path, blob)
    return len(blob)


def read(path) -> dict[str, np.ndarray]:
    """All tensors of one file (zero-copy from a local file; remote ones are downloaded)."""
    from safetensors.numpy import load, load_file

    if io_utils.is_remote(path):
        with io_utils.open_path(path, "rb") as f:
            return load(f.read())
    return load_file(str(path))


def rows(tensors: dict[str, np.ndarray]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{example id: (logprobs [len, K] float16, ids [len, K])}`` of one file's tensors."""
    off, lp, ids = tensors["offsets"], tensors["logprobs"], tensors["ids"]
    return {int(e): (lp[off[j]:off[j + 1]], ids[off[j]:off[j + 1]])
            for j, e in enumerate(tensors["example_ids"])}


# ----------------------------------------------------------------------------- scoring


class TopKScorer:
    """The teacher, teacher-forced, jitted: a `kd_flax.data.batches` batch -> its top-k
    ``(logprobs [B, T, K] float32, ids [B, T, K] int32)`` as numpy. With `mesh`: weights by the
    logical `rules`, rows over the mesh's data axes (`jax.jit` + `NamedSharding`), as the
    job's `Translator`. One compilation per (source, target) bucket pair."""

    def __init__(self, model, k: int, mesh=None, rules=None):
        from flax import nnx

        from kd_flax import objectives, sharding as shd
        from kd_flax.translate import _mesh_layout

        self.k = int(k)
        self.model_config = model.config  # pad / EOS / decoder-start ids of the batches
        self.vocab_size = int(model.config.vocab_size)
        self._graphdef, self._state = nnx.split(model)
        graphdef, kk = self._graphdef, self.k

        def score(state, batch):
            m = nnx.merge(graphdef, state)
            m.eval()
            logits, _, _ = objectives.forward(m, batch)
            return tuple(objectives.TeacherOutput(logits=logits).topk(kk))  # what online top-k KD uses

        self.mesh = None
        self.data_shards = 1
        if mesh is None:
            self._jitted = jax.jit(score, compiler_options=shd.compiler_options())
            return
        self.mesh, self.rules, self._data_sh, batch_spec, self.data_shards = _mesh_layout(mesh, rules)
        self._state = jax.device_put(self._state, shd.param_shardings(self._state, self.mesh, self.rules))
        from jax.sharding import NamedSharding, PartitionSpec as P

        out = NamedSharding(self.mesh, P(batch_spec, None, None))
        self._jitted = jax.jit(score, in_shardings=(jax.tree.map(lambda x: x.sharding, self._state),
                                                    self._data_sh), out_shardings=(out, out),
                               compiler_options=shd.compiler_options())

    KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")

    def __call__(self, batch) -> tuple[np.ndarray, np.ndarray]:
        from kd_flax import sharding as shd
        from kd_flax.translate import _place, _to_host

        b = {k: np.asarray(batch[k], np.int32) for k in self.KEYS}
        if self.mesh is None:
            lp, ids = self._jitted(self._state, {k: jnp.asarray(v) for k, v in b.items()})
        else:
            b = {k: _place(v, self._data_sh) for k, v in b.items()}
            with jax.set_mesh(self.mesh), shd.use_rules(self.rules):
                lp, ids = self._jitted(self._state, b)
        return _to_host(lp), _to_host(ids)


def score_examples(scorer: TopKScorer, examples, batch_size: int, *, pad_id: int, eos_id,
                   decoder_start_id: int, bucket_boundaries, max_source_length: int,
                   max_target_length: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{id: (logprobs [len, K], ids [len, K])}`` for tokenised examples (``target_ids`` set),
    batched exactly as `kd_flax.data.batches` batches them for the student."""
    from kd_flax import data as data_lib

    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if not examples:
        return out
    for batch in data_lib.batches(examples, batch_size, 0, pad_id=pad_id, eos_id=eos_id,
                                  decoder_start_id=decoder_start_id, bucket_boundaries=bucket_boundaries,
                                  max_source_length=max_source_length, max_target_length=max_target_length,
                                  num_epochs=1, process_index=0, process_count=1):
        lp, ids = scorer(batch)
        lens = batch["decoder_attention_mask"].sum(-1)
        for i in np.flatnonzero(batch["valid"]):
            n = int(lens[i])
            out[int(batch["example_id"][i])] = (lp[i, :n], ids[i, :n])
    return out


# ----------------------------------------------------------------------------- reading for distill


def _where(wd) -> str:
    return f"{wd.pseudo_label_dir}/manifest.json"


@dataclasses.dataclass
class DistillCache:
    """A checked top-k cache: ``rows`` by example id, and the manifest's ``topk`` block."""
    info: dict
    rows: dict[int, tuple[np.ndarray, np.ndarray]]

    @classmethod
    def open(cls, config, wd, k: int, *, teacher_dir=None, tokenizer=None,
             vocab_size: int | None = None) -> "DistillCache":
        """Reads ``wd``'s cache and refuses (`TopKCacheError`, naming what differs) one made with
        another teacher (its checksum, when its dir is present: the cached path runs without
        it) or another tokenizer (`tokenizer_fingerprint` of the student's ``tokenizer``),
        another K, other source/target lengths, or (given the student's ``vocab_size``)
        another vocabulary size."""
        from kd_flax.config_base import cfg_get
        from kd_flax import pseudo_labels

        out = pseudo_labels.output_dir(wd.pseudo_label_dir)
        manifest = pseudo_labels._read_manifest(out)
        info = (manifest or {}).get("topk")
        if manifest is None or manifest.get("status") != "done" or not info:
            raise TopKCacheError(
                f"distill.loss.teacher='cached': no finished top-k cache in {out} (manifest "
                f"{'missing' if manifest is None else 'status ' + repr(manifest.get('status'))}"
                f"{'' if manifest is None or info else ', no topk block'}); run the generate stage with "
                f"generate.store_topk={k}")
        diffs = []
        if int(info["k"]) != int(k):
            diffs.append(f"K: cache {info['k']}, distill.loss.topk {k}")
        if vocab_size is not None and int(info.get("vocab_size", vocab_size)) != int(vocab_size):
            diffs.append(f"vocab size: cache {info['vocab_size']}, student {vocab_size}")
        d = config.data
        for key in ("max_source_length", "max_target_length", "source_prefix"):
            if info.get(key) != cfg_get(d, key):
                diffs.append(f"data.{key}: cache {info.get(key)!r}, this run {cfg_get(d, key)!r}")
        kw = dict(cache=wd.checksum_cache, write_cache=jax.process_index() == 0)
        if teacher_dir is None or not io_utils.exists(io_utils.join(teacher_dir)):
            log.info("topk cache: teacher %s not present; its checksum is not compared", teacher_dir)
        else:
            got = io_utils.tree_checksum(teacher_dir, **kw)
            if got != info["teacher_checksum"]:
                diffs.append(f"teacher checksum: cache {info['teacher_checksum'][:12]}, {teacher_dir} {got[:12]}")
        if tokenizer is not None:
            got = tokenizer_fingerprint(tokenizer)
            if got != info.get("tokenizer_fingerprint"):  # absent: a cache from before it was recorded
                diffs.append(f"tokenizer (vocabulary and special tokens): cache "
                             f"{(info.get('tokenizer_fingerprint') or 'not recorded')[:12]}, this run's {got[:12]}")
        if diffs:
            raise TopKCacheError(f"distill.loss.teacher='cached': the top-k cache in {out} was made "
                                 f"with other settings: " + "; ".join(diffs) +
                                 f"; re-run the generate stage with generate.store_topk={k} (--force)")
        table: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for name in manifest["shards"]:
            path = io_utils.join(out, file_name(name))
            if not io_utils.exists(path):
                raise TopKCacheError(f"distill.loss.teacher='cached': {path} is missing; run the "
                                     f"generate stage again to redo shard {name} (delete {name}.jsonl)")
            table.update(rows(read(path)))
        log.info("topk cache: %d examples, K=%d, target %s, %d bytes", len(table), int(info["k"]),
                 info["target"], (manifest.get("counts") or {}).get("topk_bytes", 0))
        return cls(info, table)

    def attach(self, examples, targets: str, where: str):
        """Tokenised examples with ``teacher_topk`` set (aligned by id); refuses a stage whose
        targets are not the cache's, and examples without rows or with another target length."""
        if targets != self.info["target"]:
            raise TopKCacheError(f"{where}.targets={targets!r} but the top-k cache scored "
                                 f"{self.info['target']!r} targets (generate.store_topk_target); "
                                 f"regenerate with generate.store_topk_target={targets!r}")
        missing = [ex.id for ex in examples if ex.id not in self.rows]
        if missing:
            raise TopKCacheError(f"{where}: {len(missing)} of {len(examples)} examples have no top-k "
                                 f"rows in the cache (ids {missing[:5]} ...); the cache is from another "
                                 f"corpus or run: regenerate it with generate.store_topk={self.info['k']}")
        out = []
        for ex in examples:
            lp, ids = self.rows[ex.id]
            if ex.target_ids is not None and len(lp) != len(ex.target_ids):
                raise TopKCacheError(f"{where}: example {ex.id} has {len(ex.target_ids)} target tokens "
                                     f"but {len(lp)} cached top-k rows: another tokenizer or target "
                                     f"text; regenerate the cache")
            out.append(dataclasses.replace(ex, teacher_topk=(lp, ids)))
        return out


__all__ = ["TopKScorer", "DistillCache", "TopKCacheError", "score_examples", "encode", "write", "read",
           "rows", "ids_dtype", "file_name", "SUFFIX", "TARGETS"]
