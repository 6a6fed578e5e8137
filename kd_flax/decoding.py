"""Autoregressive decoding: greedy, beam search (n-best) and sampling, jitted and sharded.

Two layers:

* Low-level loops (`greedy_search`, `beam_search`, `sample`) over any
  ``tokens_to_logits(tokens [N, 1] int32, cache) -> (logits [N, V], cache)`` closure.
  They know nothing about models, so they are tested on a hand-built Markov chain.
  Each is one `jax.lax.while_loop` on device that exits as soon as every row is done.
* `generate(model, input_ids, attention_mask, ...)` and `make_generate_fn(model, mesh, rules, ...)`
  for `kd_flax.models` encoder-decoders (contract: ``encode`` / ``init_cache`` / ``decode``
  with an explicit cache whose leaves carry the batch on axis 0). Settings are read the way
  transformers reads them: explicit kwargs, then ``model.generation_config``, then
  ``model.config``, then the defaults below.

Scores follow Hugging Face beam search: ``sum_logprobs`` is the sum of per-token
log-probabilities (log-softmax of the logits, then the HF-style masks: min-new-tokens, forced
BOS/EOS, suppressed tokens; a forced token therefore contributes 0), and
``scores = sum_logprobs / length ** length_penalty`` with ``length`` the number of generated
tokens including EOS. ``length_penalty_style="gnmt"`` uses ``((5 + length) / 6) ** alpha``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import warnings
import weakref
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

# HF beam search uses -1e9 (not -inf) to push beams out of the pools; the same constant keeps
# the pool arithmetic (and the early-stop heuristic) identical to transformers.
_BIG_NEG = -1.0e9
_NEG_INF = -jnp.inf

# Incremented each time `generate`'s jitted function is traced: tests and the generation job
# use it to check "one compilation per input shape and settings".
TRACE_COUNTS: collections.Counter = collections.Counter()


@flax.struct.dataclass
class GenerateOutput:
    """Decoding result (a pytree).

    sequences:    [B, n, L] int32, generated tokens without the decoder-start token, padded
                  with ``pad_token_id`` after EOS (and after the last token of an early exit).
    scores:       [B, n] float32, ``sum_logprobs / length_penalty(lengths)``; best first for beams.
    sum_logprobs: [B, n] float32, sum of the per-token log-probabilities.
    lengths:      [B, n] int32, number of generated tokens including EOS.
    """

    sequences: jax.Array
    scores: jax.Array
    sum_logprobs: jax.Array
    lengths: jax.Array


# ----------------------------------------------------------------------------------------------
# Logit processing shared by all loops (Hugging Face semantics and order).


@dataclasses.dataclass(frozen=True)
class _Processing:
    max_new_tokens: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    min_new_tokens: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: tuple[int, ...] | None = None
    suppress_tokens: tuple[int, ...] = ()
    length_penalty: float = 1.0
    length_penalty_style: str = "hf"


def _as_ids(value, name: str) -> tuple[int, ...] | None:
    """int | list[int] | None -> tuple of ints (EOS may be several ids in HF configs)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, np.integer)) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{name} must be an int or a non-empty list of ints, got {value!r}")


def _make_processing(max_new_tokens, eos_token_id, pad_token_id, min_new_tokens=0,
                     forced_bos_token_id=None, forced_eos_token_id=None, suppress_tokens=(),
                     length_penalty=1.0, length_penalty_style="hf") -> _Processing:
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    eos = _as_ids(eos_token_id, "eos_token_id")
    if eos is None:
        raise ValueError("eos_token_id is required (an int or list of ints), got None")
    if pad_token_id is None or not isinstance(pad_token_id, (int, np.integer)):
        raise ValueError(f"pad_token_id must be an int, got {pad_token_id!r}")
    if not isinstance(min_new_tokens, (int, np.integer)) or min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be an int >= 0, got {min_new_tokens!r}")
    if length_penalty_style not in ("hf", "gnmt"):
        raise ValueError(f"length_penalty_style must be 'hf' or 'gnmt', got {length_penalty_style!r}")
    if forced_bos_token_id is not None and not isinstance(forced_bos_token_id, (int, np.integer)):
        raise ValueError(f"forced_bos_token_id must be an int or None, got {forced_bos_token_id!r}")
    return _Processing(
        max_new_tokens=int(max_new_tokens), eos_token_id=eos, pad_token_id=int(pad_token_id),
        min_new_tokens=int(min_new_tokens),
        forced_bos_token_id=None if forced_bos_token_id is None else int(forced_bos_token_id),
        forced_eos_token_id=_as_ids(forced_eos_token_id, "forced_eos_token_id"),
        suppress_tokens=tuple(int(t) for t in (suppress_tokens or ())),
        length_penalty=float(length_penalty), length_penalty_style=length_penalty_style)


def _id_mask(vocab_size: int, ids) -> np.ndarray:
    """Static boolean [V] mask of `ids` (ids outside the vocabulary are ignored)."""
    mask = np.zeros((vocab_size,), bool)
    ids = [i for i in ids if 0 <= i < vocab_size]
    mask[ids] = True
    return mask


def _process_logprobs(logp: jax.Array, step: jax.Array, proc: _Processing, *,
                      token_ids: jax.Array | None = None, vocab: int | None = None) -> jax.Array:
    """HF logits processors, in transformers' order, on float32 log-probs [N, V].

    `step` is the number of tokens generated so far (0 for the first one). Only the processors
    that are switched on are traced, so the common case costs nothing.
    With `token_ids` [N, k] (and the `vocab` size), `logp` [N, k] holds only those tokens'
    values and gets the same treatment: the processed log-prob of a chosen token without
    processing the whole vocabulary.
    """
    if token_ids is None:
        vocab = logp.shape[-1]

    def has(ids):  # the static [V] mask of `ids`, broadcast against logp
        mask = _id_mask(vocab, ids)
        return mask[None] if token_ids is None else jnp.asarray(mask)[token_ids]

    if proc.min_new_tokens > 0:  # MinNewTokensLengthLogitsProcessor: no EOS before min_new_tokens.
        logp = jnp.where((step < proc.min_new_tokens) & has(proc.eos_token_id), _NEG_INF, logp)
    if proc.forced_bos_token_id is not None:  # ForcedBOSTokenLogitsProcessor (mBART language code).
        forced = jnp.where(has([proc.forced_bos_token_id]), 0.0, _NEG_INF)
        logp = jnp.where(step == 0, forced, logp)
    if proc.forced_eos_token_id is not None:  # ForcedEOSTokenLogitsProcessor at the length limit.
        forced = jnp.where(has(proc.forced_eos_token_id), 0.0, _NEG_INF)
        logp = jnp.where(step == proc.max_new_tokens - 1, forced, logp)
    if proc.suppress_tokens:
        logp = jnp.where(has(proc.suppress_tokens), _NEG_INF, logp)
    return logp


# ----------------------------------------------------------------------------------------------
# Reductions over the vocabulary.


def fold_reduce(x: jax.Array, kind: str, *, stop: int = 256) -> jax.Array:
    """max / min / sum over the last axis: fold it in halves with element-wise ops down to
    `stop` entries, then one reduction.

    Why: XLA CPU vectorizes element-wise ops well but runs a reduction over a long minor axis
    (a 32k vocabulary) about 5x slower: max over [32, 32128] 0.47 -> 0.09 ms, logsumexp 0.87 ->
    0.41 ms. An odd length folds with one entry overlapping: harmless for max / min, zeroed for sum.
    """
    op = {"max": jnp.maximum, "min": jnp.minimum, "sum": jnp.add}.get(kind)
    if op is None:
        raise ValueError(f"fold_reduce kind must be 'max', 'min' or 'sum', got {kind!r}")
    while x.shape[-1] > stop:
        n = x.shape[-1]
        half = (n + 1) // 2
        low, high = x[..., :half], x[..., n - half:]  # for odd n, high[0] is low[-1] again
        if n % 2 and kind == "sum":
            high = jnp.where(jax.lax.broadcasted_iota(jnp.int32, high.shape, high.ndim - 1) == 0, 0, high)
        x = op(low, high)
    return {"max": jnp.max, "min": jnp.min, "sum": jnp.sum}[kind](x, axis=-1)


def logsumexp(x: jax.Array) -> jax.Array:
    """``jax.nn.logsumexp`` over the last axis (float32) with `fold_reduce`'s faster reductions."""
    x = x.astype(jnp.float32)
    top = jax.lax.stop_gradient(fold_reduce(x, "max"))
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # an all -inf row gives -inf, not NaN
    return top + jnp.log(fold_reduce(jnp.exp(x - top[..., None]), "sum"))


def log_softmax(x: jax.Array) -> jax.Array:
    """``jax.nn.log_softmax`` over the last axis (float32), via `logsumexp`."""
    x = x.astype(jnp.float32)
    return x - logsumexp(x)[..., None]


def _length_penalty(length, alpha: float, style: str):
    """Divisor of the summed log-probs: HF ``length**alpha`` or GNMT ``((5+length)/6)**alpha``."""
    length = jnp.asarray(length, jnp.float32)
    if style == "gnmt":
        return ((5.0 + length) / 6.0) ** alpha
    return length ** alpha


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
    out = tokens == eos[0]
    for e in eos[1:]:
        out = out | (tokens == e)
    return out


def _init_tokens(init_tokens, batch: int | None = None) -> jax.Array:
    init_tokens = jnp.asarray(init_tokens, jnp.int32)
    if init_tokens.ndim == 2 and init_tokens.shape[1] == 1:
        init_tokens = init_tokens[:, 0]
    if init_tokens.ndim != 1:
        raise ValueError(f"init_tokens must have shape [B] or [B, 1], got {init_tokens.shape}")
    return init_tokens


# ----------------------------------------------------------------------------------------------
# Greedy and sampling: one token per row per step.


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax` over the last axis (first index among ties; a NaN counts as the maximum) as
    a max, then a min over the matching indices, both `fold_reduce`d: XLA CPU runs argmax's
    (value, index) pair reduction over a 32k vocabulary ~4x slower.

    The max folds all the way down (``stop=1``): XLA CPU's vectorized max *reduction* may drop a
    NaN, its element-wise maximum propagates it, and a NaN maximum then selects the first NaN.
    """
    top = fold_reduce(x, "max", stop=1)[..., None]
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return fold_reduce(jnp.where((x == top) | jnp.isnan(x), index, x.shape[-1]), "min")


def _token_loop(tokens_to_logits, init_tokens, cache, proc: _Processing, choose) -> GenerateOutput:
    """Shared loop of greedy search and sampling.

    ``choose(logits [N, V] float32, lse [N], step)`` picks tokens [N]; the processed
    log-softmax is ``_process_logprobs(logits - lse[:, None], step, proc)``. The loop scores
    only the chosen tokens, so greedy never materializes log-probs over the vocabulary.
    """
    tokens = _init_tokens(init_tokens)
    n, length = tokens.shape[0], proc.max_new_tokens

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < length) & ~jnp.all(done)

    def body(state):
        step, last, cache, seqs, done, sum_lp, lengths = state
        logits, cache = tokens_to_logits(last[:, None], cache)
        logits = logits.astype(jnp.float32)
        lse = logsumexp(logits)
        nxt = choose(logits, lse, step).astype(jnp.int32)
        tok_lp = _process_logprobs(jnp.take_along_axis(logits, nxt[:, None], axis=-1) - lse[:, None],
                                   step, proc, token_ids=nxt[:, None], vocab=logits.shape[-1])[:, 0]
        # Rows that already emitted EOS keep emitting pad (HF: pad after EOS).
        nxt = jnp.where(done, proc.pad_token_id, nxt)
        seqs = jax.lax.dynamic_update_slice(seqs, nxt[:, None], (0, step))
        sum_lp = sum_lp + jnp.where(done, 0.0, tok_lp)
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_eos(nxt, proc.eos_token_id)
        return step + 1, nxt, cache, seqs, done, sum_lp, lengths

    state = (jnp.int32(0), tokens, cache, jnp.full((n, length), proc.pad_token_id, jnp.int32),
             jnp.zeros((n,), bool), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.int32))
    _, _, _, seqs, _, sum_lp, lengths = jax.lax.while_loop(cond, body, state)
    scores = sum_lp / _length_penalty(jnp.maximum(lengths, 1), proc.length_penalty, proc.length_penalty_style)
    return GenerateOutput(sequences=seqs[:, None], scores=scores[:, None],
                          sum_logprobs=sum_lp[:, None], lengths=lengths[:, None])


def greedy_search(tokens_to_logits: Callable, init_tokens, cache, *, max_new_tokens: int,
                  eos_token_id, pad_token_id: int, min_new_tokens: int = 0,
                  forced_bos_token_id: int | None = None, forced_eos_token_id=None,
                  suppress_tokens=(), length_penalty: float = 1.0,
                  length_penalty_style: str = "hf") -> GenerateOutput:
    """Greedy decoding (argmax of the processed logits, as transformers; ties go to the lowest id).

    Args:
      tokens_to_logits: ``(tokens [N, 1] int32, cache) -> (logits [N, V], cache)``.
      init_tokens: [N] or [N, 1] first decoder inputs (the decoder-start token).
      cache: any pytree threaded through `tokens_to_logits` (batch N).
    Returns `GenerateOutput` with n = 1.
    """
    proc = _make_processing(max_new_tokens, eos_token_id, pad_token_id, min_new_tokens,
                            forced_bos_token_id, forced_eos_token_id, suppress_tokens,
                            length_penalty, length_penalty_style)
    # Argmax of the processed logits, as transformers' greedy search: the same token as the
    # processed log-probs' argmax, without a pass over the vocabulary to normalize them.
    return _token_loop(tokens_to_logits, init_tokens, cache, proc,
                       lambda logits, lse, step: first_argmax(_process_logprobs(logits, step, proc)))


def warp_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0) -> jax.Array:
    """Sampling warpers in HF order: temperature, then top-k, then top-p (nucleus).

    Filtered entries become -inf. Top-p keeps the smallest set of most likely tokens whose
    cumulative probability reaches `top_p` (always at least one token), like transformers'
    TopPLogitsWarper.
    """
    logits = logits.astype(jnp.float32)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k > 0:
        k = min(int(top_k), logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][..., -1:]
        logits = jnp.where(logits < kth, _NEG_INF, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        # A token stays if the mass of the strictly more likely tokens is still below top_p.
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p
        keep = keep.at[..., 0].set(True)
        cutoff = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, _NEG_INF, logits)
    return logits


def _check_sampling(temperature, top_k, top_p):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def sample(tokens_to_logits: Callable, init_tokens, cache, rng: jax.Array, *, max_new_tokens: int,
           eos_token_id, pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_new_tokens: int = 0, forced_bos_token_id: int | None = None,
           forced_eos_token_id=None, suppress_tokens=(), length_penalty: float = 1.0,
           length_penalty_style: str = "hf") -> GenerateOutput:
    """Ancestral sampling with temperature / top-k / top-p, seeded by `rng` (a `jax.random` key).

    Step t uses ``fold_in(rng, t)``, so a run is reproducible for a given key and batch.
    `sum_logprobs` scores the sample under the model (processed log-probs, before warping).
    """
    _check_sampling(temperature, top_k, top_p)
    proc = _make_processing(max_new_tokens, eos_token_id, pad_token_id, min_new_tokens,
                            forced_bos_token_id, forced_eos_token_id, suppress_tokens,
                            length_penalty, length_penalty_style)

    def choose(logits, lse, step):
        logp = _process_logprobs(logits - lse[:, None], step, proc)
        warped = warp_logits(logp, temperature=temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(jax.random.fold_in(rng, step), warped, axis=-1)

    return _token_loop(tokens_to_logits, init_tokens, cache, proc, choose)


# ----------------------------------------------------------------------------------------------
# Beam search.


def _gather_beams(x: jax.Array, idx: jax.Array, mode: str = "take") -> jax.Array:
    """x [B, K, ...], idx [B, K'] -> [B, K', ...]: beam reordering within each row.

    "take" is a per-row `take` of whole beam slices, vmapped so that the batch is a gather
    batching dimension: XLA partitions it along a sharded batch without any communication, and on
    CPU/GPU it is a copy of contiguous slices (`take_along_axis`, which indexes every element, was
    twice as slow on the KV cache). "one_hot" is the t5x form (a one-hot contraction, MXU friendly
    on TPU, also communication-free under batch sharding); it is exact for finite values.
    """
    if mode == "one_hot":
        onehot = jax.nn.one_hot(idx, x.shape[1], dtype=x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.int32)
        out = jnp.einsum("bnk,bk...->bn...", onehot, x.astype(onehot.dtype))
        return out.astype(x.dtype)
    return jax.vmap(lambda rows, i: jnp.take(rows, i, axis=0, mode="clip"))(x, idx)


def _expand_rows(tree, times: int):
    """Repeat the batch (axis 0) of every non-scalar leaf `times` times: row b -> rows b*k..b*k+k-1."""
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0) if jnp.ndim(x) >= 1 else x, tree)


def beam_search(tokens_to_logits: Callable, init_tokens, cache, *, num_beams: int,
                max_new_tokens: int, eos_token_id, pad_token_id: int,
                num_return_sequences: int = 1, length_penalty: float = 1.0,
                length_penalty_style: str = "hf", early_stopping: bool | str = True,
                min_new_tokens: int = 0, forced_bos_token_id: int | None = None,
                forced_eos_token_id=None, suppress_tokens=(), gather: str = "take") -> GenerateOutput:
    """Beam search with Hugging Face semantics (transformers >= 4.50 `_beam_search`).

    `init_tokens` [B] and `cache` have the *unexpanded* batch B; both are repeated to B*K rows
    here, and `tokens_to_logits` sees B*K rows (row b*K + j is beam j of input b). Cache leaves
    that `tokens_to_logits` returns unchanged (e.g. cross-attention K/V) are identical across the
    beams of a row and are therefore not reordered.

    Per step: the 2K best continuations of all K*V candidates are taken (so that K beams ending
    at once cannot starve the live pool); the best K non-finished ones stay live; those among the
    best K that end (EOS or the length limit) enter the finished pool with score
    ``sum_logprobs / lp(length)``; the finished pool keeps its best K. `early_stopping`:
    True stops a row once K hypotheses are finished; False stops it when the best live beam,
    scored at its current length, cannot beat the worst finished one; "never" scores the live
    beam at the maximum length when length_penalty > 0 (HF's heuristics).

    Returns `GenerateOutput` with n = num_return_sequences, best first.
    """
    if not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    if not isinstance(num_return_sequences, (int, np.integer)) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be an int in [1, num_beams={num_beams}], "
                         f"got {num_return_sequences!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if gather not in ("take", "one_hot"):
        raise ValueError(f"gather must be 'take' or 'one_hot', got {gather!r}")
    proc = _make_processing(max_new_tokens, eos_token_id, pad_token_id, min_new_tokens,
                            forced_bos_token_id, forced_eos_token_id, suppress_tokens,
                            length_penalty, length_penalty_style)
    k, length = int(num_beams), proc.max_new_tokens
    tokens = _init_tokens(init_tokens)
    batch = tokens.shape[0]
    n_keep = max(2, 1 + len(proc.eos_token_id)) * k  # HF: (number of EOS ids + 1) * K candidates
    es_true = early_stopping is True
    lp = functools.partial(_length_penalty, alpha=proc.length_penalty, style=proc.length_penalty_style)

    def reorder_cache(new_cache, old_cache, src):
        new_leaves, treedef = jax.tree.flatten(new_cache)
        old_leaves = jax.tree.leaves(old_cache)
        out = []
        for new, old in zip(new_leaves, old_leaves):
            if new is old or jnp.ndim(new) == 0:
                out.append(new)  # loop-invariant (same in every beam of a row) or shared scalar
                continue
            if new.shape[0] != batch * k:
                raise ValueError(f"cache leaf of shape {new.shape} does not have the batch*num_beams="
                                 f"{batch * k} rows on axis 0 (the cache contract)")
            rows = new.reshape((batch, k) + new.shape[1:])
            out.append(_gather_beams(rows, src, gather).reshape(new.shape))
        return jax.tree.unflatten(treedef, out)

    def cond(s):
        row_open = s["unsatisfied"] & ~(jnp.all(s["fin_flag"], axis=1) & es_true)
        return (s["step"] < length) & jnp.any(row_open) & ~s["all_hit"]

    def body(s):
        step = s["step"]
        logits, cache = tokens_to_logits(s["last"][:, None], s["cache"])
        logp = _process_logprobs(log_softmax(logits), step, proc)
        vocab = logp.shape[-1]
        cand = (logp.reshape(batch, k, vocab) + s["live_lp"][:, :, None]).reshape(batch, k * vocab)
        # top_k over [B, K*V] (no full-vocabulary sort).
        top_lp, top_idx = jax.lax.top_k(cand, n_keep)
        src, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather_beams(s["live_seqs"], src, gather)
        top_seqs = jax.lax.dynamic_update_slice(top_seqs, tok[:, :, None], (0, 0, step))
        hits = _is_eos(tok, proc.eos_token_id) | (step + 1 >= length)

        # Live pool: best K continuations that did not just end.
        run_lp = top_lp + hits.astype(jnp.float32) * _BIG_NEG
        _, live_idx = jax.lax.top_k(run_lp, k)
        live_seqs = _gather_beams(top_seqs, live_idx, gather)
        live_lp = jnp.take_along_axis(run_lp, live_idx, axis=1)
        live_src = jnp.take_along_axis(src, live_idx, axis=1)
        last = jnp.take_along_axis(tok, live_idx, axis=1).reshape(batch * k)

        # Finished pool: only the best K of the 2K candidates may enter (HF's top_num_beam_mask).
        did_finish = hits & (jnp.arange(n_keep) < k)[None]
        new_scores = top_lp / lp(step + 1)
        full = jnp.all(s["fin_flag"], axis=1, keepdims=True) & es_true
        new_scores = new_scores + full.astype(jnp.float32) * _BIG_NEG
        new_scores = new_scores + (~s["unsatisfied"])[:, None].astype(jnp.float32) * _BIG_NEG
        new_scores = new_scores + (~did_finish).astype(jnp.float32) * _BIG_NEG
        merged_scores = jnp.concatenate([s["fin_scores"], new_scores], axis=1)
        _, fin_idx = jax.lax.top_k(merged_scores, k)

        def merge(old, new):
            return _gather_beams(jnp.concatenate([old, new], axis=1), fin_idx, gather)

        fin_len_new = jnp.full((batch, n_keep), step + 1, jnp.int32)
        out = dict(
            step=step + 1, last=last,
            cache=reorder_cache(cache, s["cache"], live_src),
            live_seqs=live_seqs, live_lp=live_lp,
            fin_seqs=merge(s["fin_seqs"], top_seqs),
            fin_scores=jnp.take_along_axis(merged_scores, fin_idx, axis=1),
            fin_lp=jnp.take_along_axis(jnp.concatenate([s["fin_lp"], top_lp], axis=1), fin_idx, axis=1),
            fin_len=jnp.take_along_axis(jnp.concatenate([s["fin_len"], fin_len_new], axis=1), fin_idx, axis=1),
            fin_flag=jnp.take_along_axis(jnp.concatenate([s["fin_flag"], did_finish], axis=1), fin_idx, axis=1),
            all_hit=jnp.all(hits),
        )
        # HF's early-stop heuristic, evaluated with the new length.
        if early_stopping == "never" and proc.length_penalty > 0.0:
            best_len = length
        else:
            best_len = step + 1
        best_running = live_lp[:, 0] / lp(best_len)
        worst_fin = jnp.where(out["fin_flag"], jnp.min(out["fin_scores"], axis=1, keepdims=True), _BIG_NEG)
        out["unsatisfied"] = s["unsatisfied"] & jnp.any(best_running[:, None] > worst_fin, axis=1)
        return out

    live_lp0 = jnp.full((batch, k), _BIG_NEG, jnp.float32).at[:, 0].set(0.0)
    pad_seqs = jnp.full((batch, k, length), proc.pad_token_id, jnp.int32)
    state = dict(
        step=jnp.int32(0), last=jnp.repeat(tokens, k), cache=_expand_rows(cache, k),
        live_seqs=pad_seqs, live_lp=live_lp0,
        fin_seqs=pad_seqs, fin_scores=jnp.full((batch, k), _BIG_NEG, jnp.float32),
        fin_lp=jnp.full((batch, k), _BIG_NEG, jnp.float32), fin_len=jnp.zeros((batch, k), jnp.int32),
        fin_flag=jnp.zeros((batch, k), bool), unsatisfied=jnp.ones((batch,), bool),
        all_hit=jnp.array(False),
    )
    s = jax.lax.while_loop(cond, body, state)
    n = int(num_return_sequences)
    return GenerateOutput(sequences=s["fin_seqs"][:, :n], scores=s["fin_scores"][:, :n],
                          sum_logprobs=s["fin_lp"][:, :n], lengths=s["fin_len"][:, :n])


# ----------------------------------------------------------------------------------------------
# Model-level API: settings resolution, jitted and sharded `generate`.


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Resolved, hashable decoding settings (a static argument of the jitted generate)."""

    max_new_tokens: int
    num_beams: int
    num_return_sequences: int
    length_penalty: float
    length_penalty_style: str
    early_stopping: bool | str
    min_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    decoder_start_token_id: int
    forced_bos_token_id: int | None
    forced_eos_token_id: tuple[int, ...] | None
    suppress_tokens: tuple[int, ...]
    gather: str

    def to_dict(self) -> dict:
        """Plain dict (JSON-friendly) e.g. for a manifest."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}


_DEFAULTS = dict(num_beams=1, num_return_sequences=1, length_penalty=1.0, length_penalty_style="hf",
                 early_stopping=True, min_new_tokens=0, do_sample=False, temperature=1.0, top_k=0,
                 top_p=1.0, gather="take")
# generation_config keys that change outputs but are not implemented: warn rather than ignore silently.
_UNSUPPORTED = dict(no_repeat_ngram_size=0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
                    encoder_no_repeat_ngram_size=0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                    diversity_penalty=0.0, num_beam_groups=1, min_p=None, top_h=None,
                    exponential_decay_length_penalty=None, begin_suppress_tokens=None, sequence_bias=None)


def resolve_settings(model_or_config, generation_config: dict | None = None, **kwargs) -> GenerationSettings:
    """Resolve decoding settings like transformers' `generate`.

    Precedence: explicit (non-None) kwargs > `generation_config` (default
    ``model.generation_config``) > ``model.config`` attributes (token ids) > defaults
    (num_beams=1, early_stopping=True, length_penalty=1.0, top_k=0, top_p=1.0, ...).
    `model_or_config` is a model with ``.config`` or a config object.
    """
    config = getattr(model_or_config, "config", model_or_config)
    if generation_config is None:
        generation_config = dict(getattr(model_or_config, "generation_config", None) or {})
    unknown = set(kwargs) - set(_DEFAULTS) - {
        "max_new_tokens", "eos_token_id", "pad_token_id", "decoder_start_token_id",
        "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "min_length", "bad_words_ids"}
    if unknown:
        raise ValueError(f"unknown generation setting(s) {sorted(unknown)}; allowed: "
                         f"{sorted(set(_DEFAULTS) | {'max_new_tokens', 'eos_token_id', 'pad_token_id', 'decoder_start_token_id', 'forced_bos_token_id', 'forced_eos_token_id', 'suppress_tokens', 'min_length', 'bad_words_ids'})}")

    def get(name, default=None, from_config=False):
        if kwargs.get(name) is not None:
            return kwargs[name]
        if generation_config.get(name) is not None:
            return generation_config[name]
        if from_config and getattr(config, name, None) is not None:
            return getattr(config, name)
        return default

    for name, neutral in _UNSUPPORTED.items():
        value = generation_config.get(name)
        if value is not None and value != neutral and value != [] and value != ():
            warnings.warn(f"generation_config[{name!r}]={value!r} is not supported by kd_flax.decoding "
                          "and is ignored; outputs can differ from transformers")

    s = {name: get(name, default) for name, default in _DEFAULTS.items()}
    max_new_tokens = get("max_new_tokens")
    if max_new_tokens is None:
        raise ValueError("max_new_tokens is required (an int >= 1)")
    eos = _as_ids(get("eos_token_id", from_config=True), "eos_token_id")
    if eos is None:
        raise ValueError("eos_token_id is not set in kwargs, generation_config or model.config")
    pad = get("pad_token_id", from_config=True)
    pad = eos[0] if pad is None else int(pad)  # HF falls back to EOS for padding
    start = get("decoder_start_token_id", from_config=True)
    if start is None:
        start = get("bos_token_id", from_config=True)  # HF's fallback
    if start is None:
        raise ValueError("decoder_start_token_id is not set in kwargs, generation_config or model.config")
    min_new = int(s["min_new_tokens"])
    min_length = get("min_length", 0)
    if min_length and min_length > 1:  # HF min_length counts the decoder-start token
        min_new = max(min_new, int(min_length) - 1)
    suppress = list(get("suppress_tokens", ()) or ())
    for bad in get("bad_words_ids", ()) or ():  # single-token bad words are suppressed tokens
        if len(bad) != 1:
            raise ValueError(f"bad_words_ids: only single-token entries are supported, got {bad!r}")
        if bad[0] not in eos:  # HF never bans EOS through bad_words_ids
            suppress.append(bad[0])
    if s["do_sample"]:
        _check_sampling(s["temperature"], s["top_k"], s["top_p"])
        if int(s["num_beams"]) != 1:
            raise ValueError(f"do_sample=True needs num_beams=1 (beam sampling is not implemented), "
                             f"got num_beams={s['num_beams']}")
    elif int(s["num_beams"]) == 1 and int(s["num_return_sequences"]) != 1:
        raise ValueError("num_return_sequences > 1 needs num_beams > 1 or do_sample=True "
                         f"(greedy has one answer), got {s['num_return_sequences']}")
    if int(s["num_beams"]) > 1 and not 1 <= int(s["num_return_sequences"]) <= int(s["num_beams"]):
        raise ValueError(f"num_return_sequences must be in [1, num_beams={s['num_beams']}], "
                         f"got {s['num_return_sequences']}")
    early = s["early_stopping"]
    if early not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early!r}")
    proc = _make_processing(max_new_tokens, eos, pad, min_new, get("forced_bos_token_id", from_config=True),
                            get("forced_eos_token_id", from_config=True), tuple(suppress),
                            s["length_penalty"], s["length_penalty_style"])
    if s["gather"] not in ("take", "one_hot"):
        raise ValueError(f"gather must be 'take' or 'one_hot', got {s['gather']!r}")
    return GenerationSettings(
        max_new_tokens=proc.max_new_tokens, num_beams=int(s["num_beams"]),
        num_return_sequences=int(s["num_return_sequences"]), length_penalty=proc.length_penalty,
        length_penalty_style=proc.length_penalty_style, early_stopping=early,
        min_new_tokens=proc.min_new_tokens, do_sample=bool(s["do_sample"]),
        temperature=float(s["temperature"]), top_k=int(s["top_k"]), top_p=float(s["top_p"]),
        eos_token_id=proc.eos_token_id, pad_token_id=proc.pad_token_id,
        decoder_start_token_id=int(start), forced_bos_token_id=proc.forced_bos_token_id,
        forced_eos_token_id=proc.forced_eos_token_id, suppress_tokens=proc.suppress_tokens,
        gather=s["gather"])


def _constrain_batch(tree, mesh, batch_spec):
    """Shard axis 0 of every non-scalar leaf like the activations' batch; other axes are left to
    XLA (e.g. heads over the model axis under tensor parallelism)."""
    if mesh is None:
        return tree

    def one(x):
        if jnp.ndim(x) == 0:
            return x
        spec = P(batch_spec, *([P.UNCONSTRAINED] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    return jax.tree.map(one, tree)


class _StaticGraph:
    """Hashable handle of an `nnx.GraphDef` for jit's static arguments.

    A GraphDef hashes by structure and static values; kd_flax models keep every static attribute
    hashable (`generation_config` is stored as JSON text). Only for a module that holds an
    unhashable one (e.g. a dict) is its repr the key: still correct, but slower (~30 ms per call
    for a T5-small-sized graph).
    """

    def __init__(self, graphdef):
        self.graphdef = graphdef
        try:
            hash(graphdef)
            self._key = graphdef
        except TypeError:
            self._key = repr(graphdef)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _StaticGraph) and self._key == other._key


def _generate_impl(graphdef, state, input_ids, attention_mask, seed, head=None, *,
                   settings: GenerationSettings, mesh=None, batch_spec=None) -> GenerateOutput:
    """Traced body of `generate`: encode, build the cache once, run the decoding loop.
    `head`: ``model.unembedding()`` computed by the caller, or None to compute it here."""
    from flax import nnx

    TRACE_COUNTS["generate"] += 1
    if isinstance(graphdef, _StaticGraph):
        graphdef = graphdef.graphdef
    model = nnx.merge(graphdef, state)
    model.eval()  # dropout off, whatever mode the caller left the model in
    st = settings
    batch = input_ids.shape[0]
    enc = model.encode(input_ids, attention_mask)
    # Rows per input: K beams, or n independent samples.
    rows = st.num_beams if st.num_beams > 1 else (st.num_return_sequences if st.do_sample else 1)
    common = dict(max_new_tokens=st.max_new_tokens, eos_token_id=st.eos_token_id,
                  pad_token_id=st.pad_token_id, min_new_tokens=st.min_new_tokens,
                  forced_bos_token_id=st.forced_bos_token_id, forced_eos_token_id=st.forced_eos_token_id,
                  suppress_tokens=st.suppress_tokens, length_penalty=st.length_penalty,
                  length_penalty_style=st.length_penalty_style)
    start = jnp.full((batch,), st.decoder_start_token_id, jnp.int32)

    if st.num_beams > 1:
        # The cache is built for B rows (cross-attention K/V computed once per input) and
        # beam_search repeats it; the closure sees the B*K rows.
        cache = _constrain_batch(model.init_cache(batch, st.max_new_tokens, enc, attention_mask), mesh, batch_spec)
        enc_rows, mask_rows = _expand_rows(enc, rows), _expand_rows(attention_mask, rows)
    else:
        enc_rows, mask_rows = _expand_rows(enc, rows), _expand_rows(attention_mask, rows)
        cache = _constrain_batch(
            model.init_cache(batch * rows, st.max_new_tokens, enc_rows, mask_rows), mesh, batch_spec)
        start = jnp.repeat(start, rows)

    # The LM head weight as [D, V], laid out once, outside the loop: a tied head is the embedding
    # [V, D] transposed, and XLA CPU re-lays it out (or runs a slower dot) on every step otherwise.
    if head is None:
        head = model.unembedding()

    def tokens_to_logits(tokens, cache):
        logits, new_cache = model.decode(tokens, enc_rows, mask_rows, cache=cache, unembedding=head)
        # Constrain only the leaves the step rewrote: untouched ones (cross-attention K/V) keep
        # their identity, which tells beam_search that it need not reorder them.
        old_leaves = jax.tree.leaves(cache)
        new_leaves, treedef = jax.tree.flatten(new_cache)
        new_leaves = [n if n is o else _constrain_batch(n, mesh, batch_spec)
                      for n, o in zip(new_leaves, old_leaves)]
        return logits[:, -1], jax.tree.unflatten(treedef, new_leaves)

    if st.num_beams > 1:
        out = beam_search(tokens_to_logits, start, cache, num_beams=st.num_beams,
                          num_return_sequences=st.num_return_sequences,
                          early_stopping=st.early_stopping, gather=st.gather, **common)
    elif st.do_sample:
        rng = jax.random.key(seed)
        out = sample(tokens_to_logits, start, cache, rng, temperature=st.temperature, top_k=st.top_k,
                     top_p=st.top_p, **common)
    else:
        out = greedy_search(tokens_to_logits, start, cache, **common)
    if out.sequences.shape[0] != batch:  # samples: [B*n, 1, L] -> [B, n, L]
        out = jax.tree.map(lambda x: x.reshape((batch, rows) + x.shape[2:]), out)
    return out


@functools.cache
def _generate_jit(nested: bool = False):
    # Built on first use: compiler_options() asks for the backend, which must not start at import
    # (jax.distributed.initialize has to come first on multi-host runs). Compiler options are for
    # top-level jits only; inside a caller's jit (the generation job's step) they are the caller's.
    from kd_flax import sharding
    return jax.jit(_generate_impl, static_argnames=("graphdef", "settings", "mesh", "batch_spec"),
                   compiler_options=None if nested else sharding.compiler_options())


_HEAD_CACHE: dict = {}  # "last": (weak refs to the model's state leaves, its laid-out LM head)


def _weak(x):
    try:
        return weakref.ref(x)
    except TypeError:  # a plain Python leaf: compared as is
        return lambda: x


def laid_out_head(model, state=None):
    """``model.unembedding()`` computed once per set of weights, for `generate(unembedding=)`.

    A tied head is the embedding [V, D] transposed to [D, V]. XLA CPU takes 25-55 ms for T5-small's
    32k x 512 (4 % of a greedy batch of 32) and would redo it on every call. The copy is reused
    while every leaf of the model's state is the same array (new weights, new copy); one model is
    remembered at a time. Only on CPU: elsewhere the transpose is cheap and a second copy of a big
    embedding would cost device memory, so this returns None (`generate` lays it out in its jit).
    """
    from flax import nnx

    if jax.default_backend() != "cpu":
        return None
    leaves = jax.tree.leaves(nnx.state(model) if state is None else state)
    last = _HEAD_CACHE.get("last")
    if last is not None and len(last[0]) == len(leaves) and all(r() is x for r, x in zip(last[0], leaves)):
        return last[1]
    head = model.unembedding()
    if any(head[0] is x for x in leaves):  # an untied head is a weight already: nothing to keep
        return head
    _HEAD_CACHE["last"] = ([_weak(x) for x in leaves], head)
    return head


def _default_mask(input_ids, settings: GenerationSettings):
    """HF's inferred attention mask: non-pad positions when pad is a distinct token, else all ones."""
    if settings.pad_token_id not in settings.eos_token_id:
        return (input_ids != settings.pad_token_id).astype(jnp.int32)
    return jnp.ones_like(input_ids, dtype=jnp.int32)


def _check_inputs(input_ids, attention_mask):
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {input_ids.shape}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, num_beams: int | None = None,
             num_return_sequences: int | None = None, length_penalty: float | None = None,
             early_stopping: bool | str | None = None, min_new_tokens: int | None = None,
             do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, mesh=None, rules=None, unembedding=None,
             **extra) -> GenerateOutput:
    """Generate with a `kd_flax.models` encoder-decoder; jitted, one compilation per input shape
    and settings (the jitted function is cached; the model enters as graphdef + state).

    Settings left as None come from ``model.generation_config``, then ``model.config``, then the
    defaults num_beams=1, num_return_sequences=1, length_penalty=1.0, early_stopping=True,
    min_new_tokens=0, do_sample=False, temperature=1.0, top_k=0 (off), top_p=1.0 (off).
    `extra` may set: length_penalty_style ("hf"|"gnmt"), eos_token_id, pad_token_id,
    decoder_start_token_id, forced_bos_token_id, forced_eos_token_id, suppress_tokens,
    min_length, bad_words_ids (single tokens), gather ("take"|"one_hot").
    With `mesh` (and optional logical `rules`), runs the sharded function of `make_generate_fn`.
    `unembedding`: the LM head as ``model.unembedding()`` returns it (`laid_out_head`). Outside a
    jit, `generate` keeps the laid-out head between calls itself; a caller that wraps `generate`
    in its own jit passes it as an argument so that it is not laid out again on every call.

    Returns `GenerateOutput`: sequences [B, n, max_new_tokens] (no decoder-start token, pad after
    EOS), scores / sum_logprobs / lengths [B, n]; n = num_return_sequences.
    """
    from flax import nnx

    kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams,
                  num_return_sequences=num_return_sequences, length_penalty=length_penalty,
                  early_stopping=early_stopping, min_new_tokens=min_new_tokens, do_sample=do_sample,
                  temperature=temperature, top_k=top_k, top_p=top_p, **extra)
    if mesh is not None:
        if unembedding is not None:
            raise ValueError("generate(unembedding=) is for unsharded calls; with mesh= the sharded "
                             "function lays out the LM head itself")
        fn = _cached_sharded_fn(model, mesh, rules, kwargs)
        return fn(input_ids, attention_mask, seed=seed, state=nnx.state(model))
    settings = resolve_settings(model, **kwargs)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    _check_inputs(input_ids, attention_mask)
    mask = _default_mask(input_ids, settings) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    graphdef, state = nnx.split(model)
    nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((input_ids, mask, state)))
    if unembedding is None and not nested:
        unembedding = laid_out_head(model, state)
    return _generate_jit(nested)(_StaticGraph(graphdef), state, input_ids, mask, jnp.int32(seed),
                                 unembedding, settings=settings)


def _rules_key(rules):
    return None if rules is None else tuple((name, tuple(ax) if isinstance(ax, list) else ax) for name, ax in rules)


_SHARDED_CACHE: dict = {}


def _cached_sharded_fn(model, mesh, rules, kwargs):
    """One sharded function per (model structure, mesh, rules, settings)."""
    from flax import nnx

    from kd_flax import sharding as shd

    mesh = shd.auto_axes(mesh)
    key = (_StaticGraph(nnx.graphdef(model)), mesh, _rules_key(rules), resolve_settings(model, **kwargs))
    fn = _SHARDED_CACHE.get(key)
    if fn is None:
        fn = _SHARDED_CACHE[key] = make_generate_fn(model, mesh, rules, **kwargs)
    return fn


def make_generate_fn(model, mesh, rules=None, **settings):
    """Sharded generate: ``fn(input_ids, attention_mask=None, *, seed=0, state=None) -> GenerateOutput``.

    `jax.jit` with explicit `NamedSharding`s: parameters by the logical `rules`
    (`kd_flax.sharding.param_shardings`, tensor parallel over the model axis when the rules say so),
    input rows and outputs over the mesh's data axes (`kd_flax.sharding.batch_sharding`), the KV
    cache constrained to the same batch sharding inside. The cache is created inside the jitted
    function (from the encoder output) and updated in place by the while loop, so no cache buffer
    crosses the jit boundary and there is nothing to donate. `settings` are `generate`'s
    keywords (max_new_tokens is required).
    The batch must be divisible by the number of data shards. Each call decodes with the model's
    current weights, or with ``state=`` (an `nnx.State` of the same model structure).
    """
    from flax import nnx

    from kd_flax import sharding as shd

    if rules is None:
        rules = shd.DEFAULT_RULES
    mesh = shd.auto_axes(mesh)
    settings = resolve_settings(model, **settings)
    graphdef, state = nnx.split(model)
    state_sh = shd.param_shardings(state, mesh, rules)
    del state
    data_sh = shd.batch_sharding(mesh, rules, ndim=2)
    batch_spec = data_sh.spec[0] if len(data_sh.spec) else None
    n_shards = 1
    for ax in (batch_spec if isinstance(batch_spec, tuple) else (batch_spec,)):
        if ax is not None:
            n_shards *= mesh.shape[ax]
    out_sh = GenerateOutput(
        sequences=NamedSharding(mesh, P(batch_spec, None, None)),
        scores=NamedSharding(mesh, P(batch_spec, None)),
        sum_logprobs=NamedSharding(mesh, P(batch_spec, None)),
        lengths=NamedSharding(mesh, P(batch_spec, None)))
    seed_sh = NamedSharding(mesh, P())
    impl = functools.partial(_generate_impl, graphdef, settings=settings, mesh=mesh, batch_spec=batch_spec)
    jitted = jax.jit(impl, in_shardings=(state_sh, data_sh, data_sh, seed_sh), out_shardings=out_sh,
                     compiler_options=shd.compiler_options())

    def run(input_ids, attention_mask=None, *, seed: int = 0, state=None) -> GenerateOutput:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        _check_inputs(input_ids, attention_mask)
        if input_ids.shape[0] % n_shards:
            raise ValueError(f"input_ids batch {input_ids.shape[0]} must be divisible by the "
                             f"{n_shards} data shards of the mesh (axes {batch_spec})")
        mask = (_default_mask(input_ids, settings) if attention_mask is None
                else jnp.asarray(attention_mask, jnp.int32))
        # The model's current weights (a no-op placement when they already live on the mesh,
        # e.g. after `kd_flax.sharding.shard_model`).
        params = jax.device_put(nnx.state(model) if state is None else state, state_sh)
        ids, mask = jax.device_put(input_ids, data_sh), jax.device_put(mask, data_sh)
        # The mesh and rules are visible to the model's own activation constraints while tracing.
        with jax.set_mesh(mesh), shd.use_rules(rules):
            return jitted(params, ids, mask, jnp.int32(seed))

    run.jitted, run.settings, run.model = jitted, settings, model
    return run
