"""Autoregressive decoding loops: greedy, beam search (n-best) and sampling; decoding settings.

* The loops (`greedy_search`, `beam_search`, `sample`) run over any
  ``tokens_to_logits(tokens [N, 1] int32, cache) -> (logits [N, V], cache)`` closure.
  They know nothing about models, so they are tested on a hand-built Markov chain.
  Each is one `jax.lax.while_loop` on device over a typed loop state (`TokenLoopState`,
  `BeamState`) that exits as soon as every row is done. Logit processing and the vocabulary
  reductions they use live in `kd_flax.processing`.
* `resolve_settings` turns keywords + a model's ``generation_config`` + ``model.config`` into
  one checked, hashable `GenerationSettings`, the way transformers reads them; `check_search`
  is the one check of beams against returned sequences (configs call it too).
* `generate(model, input_ids, ...)` runs a `kd_flax.models` encoder-decoder
  (`kd_flax.translate.generate`; `kd_flax.translate.Translator` for repeated decoding).

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
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from kd_flax.processing import (Processing, as_ids, check_sampling, first_argmax, fold_reduce,
                                is_eos, length_penalty_divisor, log_softmax, logsumexp, make_processing,
                                process_logprobs, warp_logits)

# HF beam search uses -1e9 (not -inf) to push beams out of the pools; the same constant keeps
# the pool arithmetic (and the early-stop heuristic) identical to transformers.
_BIG_NEG = -1.0e9

# Incremented each time the model-level generate function is traced: tests and the generation
# job use it to check "one compilation per input shape and settings".
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


def _init_tokens(init_tokens) -> jax.Array:
    init_tokens = jnp.asarray(init_tokens, jnp.int32)
    if init_tokens.ndim == 2 and init_tokens.shape[1] == 1:
        init_tokens = init_tokens[:, 0]
    if init_tokens.ndim != 1:
        raise ValueError(f"init_tokens must have shape [B] or [B, 1], got {init_tokens.shape}")
    return init_tokens


# ----------------------------------------------------------------------------------------------
# Greedy and sampling: one token per row per step. N rows, L = max_new_tokens.


@flax.struct.dataclass
class TokenLoopState:
    """Loop state of greedy search and sampling."""

    step: jax.Array          # [] int32: tokens generated so far
    last: jax.Array          # [N] int32: each row's latest token (the next decoder input)
    cache: Any               # pytree threaded through tokens_to_logits, batch N on axis 0
    sequences: jax.Array     # [N, L] int32: generated tokens, pad after EOS
    done: jax.Array          # [N] bool: the row has emitted EOS
    sum_logprobs: jax.Array  # [N] float32: processed log-probs of the row's tokens
    lengths: jax.Array       # [N] int32: generated tokens including EOS


def _token_loop(tokens_to_logits, init_tokens, cache, proc: Processing, choose) -> GenerateOutput:
    """Shared loop of greedy search and sampling.

    ``choose(logits [N, V] float32, lse [N], step)`` picks tokens [N]; the processed
    log-softmax is ``process_logprobs(logits - lse[:, None], step, proc)``. The loop scores
    only the chosen tokens, so greedy never materializes log-probs over the vocabulary.
    """
    tokens = _init_tokens(init_tokens)
    n, length = tokens.shape[0], proc.max_new_tokens

    def cond(s: TokenLoopState):
        return (s.step < length) & ~jnp.all(s.done)

    def body(s: TokenLoopState) -> TokenLoopState:
        logits, cache = tokens_to_logits(s.last[:, None], s.cache)
        logits = logits.astype(jnp.float32)
        lse = logsumexp(logits)
        nxt = choose(logits, lse, s.step).astype(jnp.int32)
        tok_lp = process_logprobs(jnp.take_along_axis(logits, nxt[:, None], axis=-1) - lse[:, None],
                                  s.step, proc, token_ids=nxt[:, None], vocab=logits.shape[-1])[:, 0]
        # Rows that already emitted EOS keep emitting pad (HF: pad after EOS).
        nxt = jnp.where(s.done, proc.pad_token_id, nxt)
        return TokenLoopState(
            step=s.step + 1, last=nxt, cache=cache,
            sequences=jax.lax.dynamic_update_slice(s.sequences, nxt[:, None], (0, s.step)),
            done=s.done | is_eos(nxt, proc.eos_token_id),
            sum_logprobs=s.sum_logprobs + jnp.where(s.done, 0.0, tok_lp),
            lengths=s.lengths + (~s.done).astype(jnp.int32))

    init = TokenLoopState(
        step=jnp.int32(0), last=tokens, cache=cache,
        sequences=jnp.full((n, length), proc.pad_token_id, jnp.int32), done=jnp.zeros((n,), bool),
        sum_logprobs=jnp.zeros((n,), jnp.float32), lengths=jnp.zeros((n,), jnp.int32))
    s = jax.lax.while_loop(cond, body, init)
    scores = s.sum_logprobs / length_penalty_divisor(jnp.maximum(s.lengths, 1), proc.length_penalty,
                                                     proc.length_penalty_style)
    return GenerateOutput(sequences=s.sequences[:, None], scores=scores[:, None],
                          sum_logprobs=s.sum_logprobs[:, None], lengths=s.lengths[:, None])


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
    proc = make_processing(max_new_tokens, eos_token_id, pad_token_id, min_new_tokens,
                           forced_bos_token_id, forced_eos_token_id, suppress_tokens,
                           length_penalty, length_penalty_style)
    # Argmax of the processed logits, as transformers' greedy search: the same token as the
    # processed log-probs' argmax, without a pass over the vocabulary to normalize them.
    return _token_loop(tokens_to_logits, init_tokens, cache, proc,
                       lambda logits, lse, step: first_argmax(process_logprobs(logits, step, proc)))


def sample(tokens_to_logits: Callable, init_tokens, cache, rng: jax.Array, *, max_new_tokens: int,
           eos_token_id, pad_token_id: int, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, min_new_tokens: int = 0, forced_bos_token_id: int | None = None,
           forced_eos_token_id=None, suppress_tokens=(), length_penalty: float = 1.0,
           length_penalty_style: str = "hf") -> GenerateOutput:
    """Ancestral sampling with temperature / top-k / top-p, seeded by `rng` (a `jax.random` key).

    Step t uses ``fold_in(rng, t)``, so a run is reproducible for a given key and batch.
    `sum_logprobs` scores the sample under the model (processed log-probs, before warping).
    """
    check_sampling(temperature, top_k, top_p)
    proc = make_processing(max_new_tokens, eos_token_id, pad_token_id, min_new_tokens,
                           forced_bos_token_id, forced_eos_token_id, suppress_tokens,
                           length_penalty, length_penalty_style)

    def choose(logits, lse, step):
        logp = process_logprobs(logits - lse[:, None], step, proc)
        warped = warp_logits(logp, temperature=temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(jax.random.fold_in(rng, step), warped, axis=-1)

    return _token_loop(tokens_to_logits, init_tokens, cache, proc, choose)


# ----------------------------------------------------------------------------------------------
# Beam search. B inputs, K = num_beams, L = max_new_tokens.


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


def expand_rows(tree, times: int):
    """Repeat the batch (axis 0) of every non-scalar leaf `times` times: row b -> rows b*k..b*k+k-1."""
    return jax.tree.map(lambda x: jnp.repeat(x, times, axis=0) if jnp.ndim(x) >= 1 else x, tree)


@flax.struct.dataclass
class BeamState:
    """Loop state of beam search: a live pool (still growing) and a finished pool per input."""

    step: jax.Array          # [] int32: tokens generated so far
    last: jax.Array          # [B*K] int32: each live beam's latest token (row b*K + j is beam j of b)
    cache: Any               # pytree threaded through tokens_to_logits, B*K rows on axis 0
    live_seqs: jax.Array     # [B, K, L] int32: live beams' tokens, pad beyond `step`
    live_logprobs: jax.Array  # [B, K] float32: live beams' summed log-probs (-1e9 = empty slot)
    fin_seqs: jax.Array      # [B, K, L] int32: finished hypotheses, best first
    fin_scores: jax.Array    # [B, K] float32: their length-penalized scores (-1e9 = empty slot)
    fin_logprobs: jax.Array  # [B, K] float32: their summed log-probs
    fin_lengths: jax.Array   # [B, K] int32: their lengths including EOS
    fin_flags: jax.Array     # [B, K] bool: the slot holds a finished hypothesis
    unsatisfied: jax.Array   # [B] bool: HF's heuristic says a live beam may still beat the pool
    all_hit: jax.Array       # [] bool: every candidate of the last step ended (nothing live)


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
    check_search(num_beams, num_return_sequences)
    _check_beam_options(early_stopping, gather)
    proc = make_processing(max_new_tokens, eos_token_id, pad_token_id, min_new_tokens,
                           forced_bos_token_id, forced_eos_token_id, suppress_tokens,
                           length_penalty, length_penalty_style)
    k, length = int(num_beams), proc.max_new_tokens
    tokens = _init_tokens(init_tokens)
    batch = tokens.shape[0]
    n_keep = max(2, 1 + len(proc.eos_token_id)) * k  # HF: (number of EOS ids + 1) * K candidates
    es_true = early_stopping is True
    lp = functools.partial(length_penalty_divisor, alpha=proc.length_penalty, style=proc.length_penalty_style)

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

    def cond(s: BeamState):
        row_open = s.unsatisfied & ~(jnp.all(s.fin_flags, axis=1) & es_true)
        return (s.step < length) & jnp.any(row_open) & ~s.all_hit

    def body(s: BeamState) -> BeamState:
        step = s.step
        logits, cache = tokens_to_logits(s.last[:, None], s.cache)
        logp = process_logprobs(log_softmax(logits), step, proc)
        vocab = logp.shape[-1]
        cand = (logp.reshape(batch, k, vocab) + s.live_logprobs[:, :, None]).reshape(batch, k * vocab)
        # top_k over [B, K*V] (no full-vocabulary sort).
        top_lp, top_idx = jax.lax.top_k(cand, n_keep)
        src, tok = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        top_seqs = _gather_beams(s.live_seqs, src, gather)
        top_seqs = jax.lax.dynamic_update_slice(top_seqs, tok[:, :, None], (0, 0, step))
        hits = is_eos(tok, proc.eos_token_id) | (step + 1 >= length)

        # Live pool: best K continuations that did not just end.
        run_lp = top_lp + hits.astype(jnp.float32) * _BIG_NEG
        _, live_idx = jax.lax.top_k(run_lp, k)
        live_lp = jnp.take_along_axis(run_lp, live_idx, axis=1)

        # Finished pool: only the best K of the 2K candidates may enter (HF's top_num_beam_mask).
        did_finish = hits & (jnp.arange(n_keep) < k)[None]
        new_scores = top_lp / lp(step + 1)
        full = jnp.all(s.fin_flags, axis=1, keepdims=True) & es_true
        new_scores = new_scores + full.astype(jnp.float32) * _BIG_NEG
        new_scores = new_scores + (~s.unsatisfied)[:, None].astype(jnp.float32) * _BIG_NEG
        new_scores = new_scores + (~did_finish).astype(jnp.float32) * _BIG_NEG
        merged_scores = jnp.concatenate([s.fin_scores, new_scores], axis=1)
        _, fin_idx = jax.lax.top_k(merged_scores, k)

        def merge(old, new):  # the best K of the old pool and the new candidates
            return jnp.take_along_axis(jnp.concatenate([old, new], axis=1), fin_idx, axis=1)

        fin_scores = jnp.take_along_axis(merged_scores, fin_idx, axis=1)
        fin_flags = merge(s.fin_flags, did_finish)
        # HF's early-stop heuristic, evaluated with the new length.
        best_len = length if early_stopping == "never" and proc.length_penalty > 0.0 else step + 1
        best_running = live_lp[:, 0] / lp(best_len)
        worst_fin = jnp.where(fin_flags, jnp.min(fin_scores, axis=1, keepdims=True), _BIG_NEG)
        return BeamState(
            step=step + 1, last=jnp.take_along_axis(tok, live_idx, axis=1).reshape(batch * k),
            cache=reorder_cache(cache, s.cache, jnp.take_along_axis(src, live_idx, axis=1)),
            live_seqs=_gather_beams(top_seqs, live_idx, gather), live_logprobs=live_lp,
            fin_seqs=_gather_beams(jnp.concatenate([s.fin_seqs, top_seqs], axis=1), fin_idx, gather),
            fin_scores=fin_scores, fin_logprobs=merge(s.fin_logprobs, top_lp),
            fin_lengths=merge(s.fin_lengths, jnp.full((batch, n_keep), step + 1, jnp.int32)),
            fin_flags=fin_flags,
            unsatisfied=s.unsatisfied & jnp.any(best_running[:, None] > worst_fin, axis=1),
            all_hit=jnp.all(hits))

    empty = jnp.full((batch, k), _BIG_NEG, jnp.float32)
    pad_seqs = jnp.full((batch, k, length), proc.pad_token_id, jnp.int32)
    init = BeamState(
        step=jnp.int32(0), last=jnp.repeat(tokens, k), cache=expand_rows(cache, k),
        live_seqs=pad_seqs, live_logprobs=empty.at[:, 0].set(0.0),
        fin_seqs=pad_seqs, fin_scores=empty, fin_logprobs=empty,
        fin_lengths=jnp.zeros((batch, k), jnp.int32), fin_flags=jnp.zeros((batch, k), bool),
        unsatisfied=jnp.ones((batch,), bool), all_hit=jnp.array(False))
    s = jax.lax.while_loop(cond, body, init)
    n = int(num_return_sequences)
    return GenerateOutput(sequences=s.fin_seqs[:, :n], scores=s.fin_scores[:, :n],
                          sum_logprobs=s.fin_logprobs[:, :n], lengths=s.fin_lengths[:, :n])
# ----------------------------------------------------------------------------------------------
# Settings: resolved and checked once, here.


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    """Resolved, checked, hashable decoding settings (a static argument of the jitted generate).
    Build it with `resolve_settings`, which applies every check."""

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


def check_search(num_beams, num_return_sequences, do_sample: bool = False, *, prefix: str = "") -> None:
    """The one check of how many sequences a search returns; raises ValueError naming the setting.

    Beam search returns 1..num_beams hypotheses, greedy search one, sampling any number of
    independent samples (from one beam: beam sampling is not implemented). `prefix` is prepended
    to every setting name in the message (``"generate."`` for a kd_flax config).
    """
    for name, v in (("num_beams", num_beams), ("num_return_sequences", num_return_sequences)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{prefix}{name} must be an int >= 1, got {v!r}")
    if do_sample and num_beams != 1:
        raise ValueError(f"{prefix}do_sample=True needs {prefix}num_beams=1 (beam sampling is not "
                         f"implemented), got {prefix}num_beams={num_beams}")
    if not do_sample and num_return_sequences > num_beams:
        why = ("greedy search has one answer: set num_beams > 1 or do_sample=True" if num_beams == 1
               else "beam search returns at most num_beams hypotheses")
        raise ValueError(f"{prefix}num_return_sequences must be <= {prefix}num_beams ({num_beams}), "
                         f"got {num_return_sequences} ({why})")


def _check_beam_options(early_stopping, gather) -> None:
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if gather not in ("take", "one_hot"):
        raise ValueError(f"gather must be 'take' or 'one_hot', got {gather!r}")


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
    eos = as_ids(get("eos_token_id", from_config=True), "eos_token_id")
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
    check_search(s["num_beams"], s["num_return_sequences"], bool(s["do_sample"]))
    if s["do_sample"]:
        check_sampling(s["temperature"], s["top_k"], s["top_p"])
    early = s["early_stopping"]
    _check_beam_options(early, s["gather"])
    proc = make_processing(max_new_tokens, eos, pad, min_new, get("forced_bos_token_id", from_config=True),
                           get("forced_eos_token_id", from_config=True), tuple(suppress),
                           s["length_penalty"], s["length_penalty_style"])
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


def generate(model, input_ids, attention_mask=None, **kwargs) -> GenerateOutput:
    """Decode with a `kd_flax.models` encoder-decoder: `kd_flax.translate.generate` (same
    arguments), kept under this name beside the loops it runs."""
    from kd_flax import translate  # translate builds on this module

    return translate.generate(model, input_ids, attention_mask, **kwargs)


__all__ = ["GenerateOutput", "TokenLoopState", "BeamState", "greedy_search", "sample", "beam_search",
           "expand_rows", "GenerationSettings", "check_search", "resolve_settings", "generate", "TRACE_COUNTS",
           # kd_flax.processing's reductions and warpers, used here and kept importable from here
           "fold_reduce", "logsumexp", "log_softmax", "first_argmax", "warp_logits"]
