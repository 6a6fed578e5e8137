"""Tokenisation, length buckets, per-host slices and the batch iterators (training and
generation) over :class:`kd_flax.corpus.Example` records.

Tokenised examples carry ``input_ids`` and ``target_ids`` (int32 NumPy arrays that end in EOS).
Reading corpora is `kd_flax.corpus` (`read_corpus`, `Example`, `CorpusReport`).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import Iterable, Iterator, Sequence

import jax
import numpy as np


log = logging.getLogger(__name__)

from kd_flax.corpus import CorpusReport, Example


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
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask.astype(np.int32),
        "labels": labels,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": dec_mask.astype(np.int32),
        "loss_mask": (dec_mask & valid[:, None]).astype(np.float32),
        "example_id": np.where(valid, [examples[r].id for r in rows], -1).astype(np.int64),
        "valid": valid,
    }
    if examples[rows[0]].teacher_topk is not None:  # cached top-k KD: [b, T, K], zeros past the target
        out.update(_topk_rows([examples[r].teacher_topk for r in rows], T))
    return out


def _topk_rows(cached, T: int) -> dict:
    k = cached[0][0].shape[-1]
    lp, ids = np.zeros((len(cached), T, k), np.float32), np.zeros((len(cached), T, k), np.int32)
    for i, (a, b) in enumerate(cached):
        n = min(len(a), T)
        lp[i, :n], ids[i, :n] = a[:n], b[:n]
    return {"teacher_topk_logprobs": lp, "teacher_topk_ids": ids}


__all__ = [
    "encode_texts",
    "tokenize_examples", "normalize_boundaries", "bucket_length", "pad_rows",
    "generation_batches", "host_range", "host_slice", "steps_per_epoch", "batches",
]
