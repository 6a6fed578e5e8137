"""kd_flax.decoding on hand-built Markov chains, against brute-force enumeration in NumPy.

The "model" is a second-order chain: logits = table[prev, cur] with `prev` kept in the cache,
so a wrong cache reordering in beam search changes the result. Tokens: 0 = pad / decoder
start, 1 = EOS, 2..V-1 = words.
"""

import itertools
import math
import types

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_flax import decoding, processing

PAD, EOS = 0, 1
V = 5


# ---------------------------------------------------------------------------------------------
# The chain and the NumPy reference (float64, written from the HF definitions).


def chain_fn(table):
    """tokens_to_logits for logits = table[prev, cur]; `prev` lives in the cache."""
    table = jnp.asarray(table, jnp.float32)

    def tokens_to_logits(tokens, cache):
        cur = tokens[:, 0]
        logits = table[cache["prev"], cur]
        # "const" is returned untouched (a loop-invariant leaf, like cross-attention K/V);
        # it must still be expanded to the beams and stay consistent.
        logits = logits + 0.0 * cache["const"][:, :1]
        return logits, {"prev": cur, "const": cache["const"], "t": cache["t"] + 1}

    return tokens_to_logits


def make_cache(prev):
    prev = jnp.asarray(prev, jnp.int32)
    return {"prev": prev, "const": jnp.ones((prev.shape[0], 3)), "t": jnp.int32(0)}


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_process(logp, step, L, min_new=0, bos=None, feos=None, suppress=()):
    """HF processors on one row of log-probs (order: min-new-tokens, forced BOS, forced EOS, suppress)."""
    logp = logp.copy()
    if step < min_new:
        logp[EOS] = -np.inf
    if bos is not None and step == 0:
        logp[:] = -np.inf
        logp[bos] = 0.0
    if feos is not None and step == L - 1:
        logp[:] = -np.inf
        logp[feos] = 0.0
    for t in suppress:
        logp[t] = -np.inf
    return logp


def lp_div(length, alpha, style="hf"):
    return ((5.0 + length) / 6.0) ** alpha if style == "gnmt" else float(length) ** alpha


def brute_force(table, prev0, L, **proc):
    """All finished hypotheses (EOS-terminated or of length L) with their summed log-probs."""
    out = []

    def rec(prev, cur, seq, total):
        step = len(seq)
        logp = np_process(np_log_softmax(table[prev, cur]), step, L, **proc)
        for tok in range(V):
            if logp[tok] == -np.inf:
                continue
            new, tot = seq + [tok], total + logp[tok]
            if tok == EOS or step + 1 == L:
                out.append((new, tot))
            else:
                rec(cur, tok, new, tot)

    rec(prev0, PAD, [], 0.0)
    return out


def ranked(hyps, alpha, style="hf"):
    return sorted(((tot / lp_div(len(seq), alpha, style), seq, tot) for seq, tot in hyps),
                  key=lambda x: -x[0])


def np_greedy(table, prev0, L, **proc):
    prev, cur, seq, total = prev0, PAD, [], 0.0
    for step in range(L):
        logp = np_process(np_log_softmax(table[prev, cur]), step, L, **proc)
        tok = int(np.argmax(logp))
        seq.append(tok)
        total += logp[tok]
        prev, cur = cur, tok
        if tok == EOS:
            break
    return seq, total


def padded(seq, L):
    return list(seq) + [PAD] * (L - len(seq))


def random_table(seed, scale=2.0, eos_bias=0.0):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(V, V, V)) * scale
    table[..., EOS] += eos_bias
    return table


COMMON = dict(eos_token_id=EOS, pad_token_id=PAD)


# ---------------------------------------------------------------------------------------------
# Greedy.


@hypothesis.settings(max_examples=6, deadline=None)
@hypothesis.given(seed=st.integers(0, 2**16))
def test_greedy_is_the_argmax_path(seed):
    table, L, prev0 = random_table(seed, eos_bias=0.5), 6, [0, 2, 3, 4]
    out = _greedy_jit(jnp.asarray(table, jnp.float32), make_cache(prev0))
    for b, p in enumerate(prev0):
        seq, total = np_greedy(table, p, L)
        assert out.sequences[b, 0].tolist() == padded(seq, L)  # pad after EOS
        assert int(out.lengths[b, 0]) == len(seq)
        np.testing.assert_allclose(float(out.sum_logprobs[b, 0]), total, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(out.scores[b, 0]), total / len(seq), rtol=1e-5, atol=1e-5)


@jax.jit
def _greedy_jit(table, cache):
    return decoding.greedy_search(chain_fn(table), jnp.zeros((4,), jnp.int32), cache,
                                  max_new_tokens=6, **COMMON)


def test_greedy_min_new_tokens_and_forced_tokens():
    table, L = random_table(3, eos_bias=4.0), 6  # EOS is almost always the argmax
    cache = make_cache([0, 2])
    for proc in [dict(min_new=3), dict(feos=EOS, min_new=6), dict(bos=3, min_new=2, suppress=(2,))]:
        kw = dict(min_new_tokens=proc.get("min_new", 0), forced_bos_token_id=proc.get("bos"),
                  forced_eos_token_id=proc.get("feos"), suppress_tokens=proc.get("suppress", ()))
        out = decoding.greedy_search(chain_fn(table), jnp.zeros((2,), jnp.int32), cache,
                                     max_new_tokens=L, **COMMON, **kw)
        for b, p in enumerate([0, 2]):
            seq, total = np_greedy(table, p, L, **proc)
            assert out.sequences[b, 0].tolist() == padded(seq, L), proc
            np.testing.assert_allclose(float(out.sum_logprobs[b, 0]), total, rtol=1e-5, atol=1e-5)
        if "min_new" in proc:  # EOS can't come earlier than min_new_tokens
            assert all(len(np_greedy(table, p, L, **proc)[0]) >= min(proc["min_new"] + 1, L) for p in [0, 2])
        if proc.get("bos") is not None:
            assert (out.sequences[:, 0, 0] == proc["bos"]).all()
        if proc.get("feos") is not None:  # forced EOS at the length limit
            assert (out.sequences[:, 0, L - 1] == EOS).all()


def test_early_exit_stops_the_loop():
    """Every row ends at step 2 -> only 2 decoder calls, not max_new_tokens."""
    table = np.full((V, V, V), -5.0)
    table[:, PAD, 2] = 5.0  # first token 2, then EOS
    table[:, 2, EOS] = 5.0
    calls = []

    def counting(tokens, cache):
        jax.debug.callback(lambda: calls.append(1))
        return chain_fn(table)(tokens, cache)

    out = decoding.greedy_search(counting, jnp.zeros((3,), jnp.int32), make_cache([0, 0, 0]),
                                 max_new_tokens=10, **COMMON)
    jax.block_until_ready(out)
    assert out.sequences[0, 0].tolist() == [2, EOS] + [PAD] * 8
    assert len(calls) == 2
    calls.clear()
    out = decoding.beam_search(counting, jnp.zeros((3,), jnp.int32), make_cache([0, 0, 0]), num_beams=2,
                               max_new_tokens=10, **COMMON)
    jax.block_until_ready(out)
    assert out.sequences[0, 0].tolist() == [2, EOS] + [PAD] * 8
    assert len(calls) < 10


# ---------------------------------------------------------------------------------------------
# Beam search.

K_EXHAUSTIVE = 128  # > number of finished hypotheses (1+3+9+108 = 121 with 3 words, L=4): no pruning


@pytest.mark.parametrize("alpha,style,early", [(1.0, "hf", True), (2.0, "hf", "never"), (0.6, "gnmt", False)])
def test_exhaustive_beam_is_the_brute_force_nbest(alpha, style, early):
    L, prev0 = 4, [0, 3]
    table = random_table(11, eos_bias=-0.5)
    out = decoding.beam_search(chain_fn(table), jnp.zeros((2,), jnp.int32), make_cache(prev0),
                               num_beams=K_EXHAUSTIVE, num_return_sequences=8, max_new_tokens=L,
                               length_penalty=alpha, length_penalty_style=style, early_stopping=early,
                               suppress_tokens=(PAD,), **COMMON)
    for b, p in enumerate(prev0):
        best = ranked(brute_force(table, p, L, suppress=(PAD,)), alpha, style)[:8]
        assert [out.sequences[b, i].tolist() for i in range(8)] == [padded(s, L) for _, s, _ in best]
        np.testing.assert_allclose(np.asarray(out.scores[b]), [x[0] for x in best], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.sum_logprobs[b]), [x[2] for x in best], rtol=1e-5, atol=1e-5)
        assert out.lengths[b].tolist() == [len(s) for _, s, _ in best]
        assert np.all(np.diff(np.asarray(out.scores[b])) <= 0)  # n-best ordering


def test_beam_escapes_the_greedy_trap():
    """Greedy takes the locally best first token; beam 2 finds the brute-force best sequence."""
    table = np.full((V, V, V), 0.0)
    table[:, PAD] = [-9, -9, 1.0, 0.8, -9]  # first token: 2 (p~.55) or 3 (p~.45)
    table[:, 2] = [-9, 0.0, 0.0, 0.0, 0.0]  # after 2: flat over EOS and 3 words
    table[:, 3] = [-9, 6.0, -9, -9, -9]  # after 3: EOS almost surely
    table[:, 4] = [-9, 6.0, -9, -9, -9]
    L = 3
    greedy = decoding.greedy_search(chain_fn(table), jnp.zeros((1,), jnp.int32), make_cache([0]),
                                    max_new_tokens=L, **COMMON)
    beam = decoding.beam_search(chain_fn(table), jnp.zeros((1,), jnp.int32), make_cache([0]), num_beams=2,
                                max_new_tokens=L, **COMMON)
    best = ranked(brute_force(table, 0, L), 1.0)[0]
    assert beam.sequences[0, 0].tolist() == padded(best[1], L) == [3, EOS, PAD]
    np.testing.assert_allclose(float(beam.scores[0, 0]), best[0], rtol=1e-5)
    assert greedy.sequences[0, 0, 0] == 2  # the trap


def test_finished_beams_do_not_starve_the_live_pool():
    """EOS is the most likely token everywhere: each step the K best candidates include finished
    ones, yet the live pool continues (2K candidates). With early_stopping="never" and a strong
    length reward the best hypothesis is the longest one; with early_stopping=True the row stops
    as soon as K hypotheses are finished (HF semantics)."""
    table = np.zeros((V, V, V))
    table[...] = np.log([1e-9, 0.6, 0.25, 0.1, 0.05])
    L = 5
    kw = dict(num_beams=2, num_return_sequences=2, max_new_tokens=L, length_penalty=3.0, **COMMON)
    never = decoding.beam_search(chain_fn(table), jnp.zeros((1,), jnp.int32), make_cache([0]),
                                 early_stopping="never", **kw)
    best = ranked(brute_force(table, 0, L), 3.0)[0]
    assert best[1] == [2, 2, 2, 2, EOS]
    assert never.sequences[0, 0].tolist() == best[1]
    early = decoding.beam_search(chain_fn(table), jnp.zeros((1,), jnp.int32), make_cache([0]),
                                 early_stopping=True, **kw)
    # Step 0 finishes [EOS], step 1 finishes [2, EOS]: two finished -> stop; the better is [2, EOS].
    assert early.sequences[0, 0].tolist() == [2, EOS, PAD, PAD, PAD]
    assert early.sequences[0, 1].tolist() == [EOS, PAD, PAD, PAD, PAD]


def test_beam_forced_bos_min_new_tokens_and_forced_eos():
    L, table = 4, random_table(5, eos_bias=1.0)
    proc = dict(bos=4, min_new=2, feos=EOS, suppress=(PAD,))
    out = decoding.beam_search(chain_fn(table), jnp.zeros((1,), jnp.int32), make_cache([2]),
                               num_beams=K_EXHAUSTIVE, num_return_sequences=5, max_new_tokens=L,
                               forced_bos_token_id=4, min_new_tokens=2, forced_eos_token_id=EOS,
                               suppress_tokens=(PAD,), **COMMON)
    best = ranked(brute_force(table, 2, L, **proc), 1.0)[:5]
    assert [out.sequences[0, i].tolist() for i in range(5)] == [padded(s, L) for _, s, _ in best]
    np.testing.assert_allclose(np.asarray(out.sum_logprobs[0]), [x[2] for x in best], rtol=1e-5, atol=1e-5)
    seqs = np.asarray(out.sequences[0])
    assert (seqs[:, 0] == 4).all()
    assert (seqs[:, 1] != EOS).all()  # min_new_tokens=2: no EOS at step 1
    assert all(EOS in row.tolist() for row in seqs)  # forced EOS at the limit


def test_one_hot_gather_matches_take():
    table, L = random_table(21), 5
    kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=L, **COMMON)
    a = decoding.beam_search(chain_fn(table), jnp.zeros((2,), jnp.int32), make_cache([0, 4]), **kw)
    b = decoding.beam_search(chain_fn(table), jnp.zeros((2,), jnp.int32), make_cache([0, 4]), gather="one_hot", **kw)
    assert np.array_equal(a.sequences, b.sequences)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)


def test_gather_beams_reorders_whole_beams():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    idx = np.array([[2, 0, 2, 1, 1, 0], [1, 1, 0, 2, 0, 2]], np.int32)  # K' = 2K candidates
    want = np.stack([x[b, idx[b]] for b in range(2)])
    for mode in ("take", "one_hot"):
        np.testing.assert_array_equal(jax.jit(decoding._gather_beams, static_argnums=2)(x, idx, mode), want)


# Vocabulary lengths below, at and above fold_reduce's stop (256), even and odd (odd lengths fold
# with an overlapping entry), and T5's 32128.
FOLD_LENGTHS = [1, 37, 256, 257, 1000, 1001, 4097, 32128]


@pytest.mark.parametrize("length", FOLD_LENGTHS)
def test_first_argmax_is_numpy_argmax(length):
    rng = np.random.default_rng(length)
    x = rng.integers(0, 4, (16, length)).astype(np.float32)  # many ties: the first index must win
    x[3, length // 2] = np.nan  # a NaN counts as the maximum, as in jnp.argmax (even after a 3)
    x[5] = np.nan
    x[9] = -np.inf
    x[10, -1] = 9.0  # the maximum in the last entry (the one an odd fold visits twice)
    x[11, length // 2] = 9.0  # ... and in the middle
    np.testing.assert_array_equal(jax.jit(decoding.first_argmax)(x), np.argmax(x, axis=-1))
    np.testing.assert_array_equal(decoding.first_argmax(x[None]), np.argmax(x, axis=-1)[None])


@pytest.mark.parametrize("length", FOLD_LENGTHS)
def test_fold_reduce_and_logsumexp_match_numpy(length):
    rng = np.random.default_rng(length)
    x = (rng.standard_normal((6, length)) * 8).astype(np.float32)
    x[1, -1] = 50.0  # extremes in the last and middle entries
    x[2, length // 2] = -50.0
    x[3, : length // 3] = -np.inf  # masked entries, as the logit processors leave them
    x64 = x.astype(np.float64)
    fold = jax.jit(decoding.fold_reduce, static_argnums=1)
    np.testing.assert_array_equal(fold(x, "max"), x.max(-1))
    np.testing.assert_array_equal(fold(x, "min"), x.min(-1))
    finite = np.where(np.isfinite(x), x, 0.0)
    np.testing.assert_allclose(fold(finite, "sum"), finite.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-3)
    ones = np.ones((2, length), np.float32)  # an odd fold must not count its overlap twice
    np.testing.assert_array_equal(fold(ones, "sum"), [length, length])
    m = x64.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(x64 - m).sum(-1, keepdims=True)))[:, 0]
    np.testing.assert_allclose(jax.jit(decoding.logsumexp)(x), lse, rtol=1e-6, atol=1e-5)
    got = np.asarray(jax.jit(decoding.log_softmax)(x))
    np.testing.assert_allclose(got[np.isfinite(x)], (x64 - lse[:, None])[np.isfinite(x)], rtol=1e-5, atol=1e-4)
    assert (got[~np.isfinite(x)] == -np.inf).all()
    # A fully masked row gives -inf, not NaN (as jax.nn.logsumexp).
    assert float(decoding.logsumexp(np.full((length,), -np.inf, np.float32))) == -np.inf
    with pytest.raises(ValueError, match="'max', 'min' or 'sum'"):
        decoding.fold_reduce(x, "mean")


def test_processing_the_chosen_tokens_equals_processing_the_vocabulary():
    """The loops score only the chosen token; that must be the full processed log-prob there."""
    rng = np.random.default_rng(0)
    vocab, length = 300, 5
    logp = jnp.asarray(rng.standard_normal((4, vocab)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, vocab, (4, 3)), jnp.int32).at[:, 0].set(jnp.array([1, 3, 7, 299]))
    for proc in [processing.make_processing(length, (1, 299), 0, min_new_tokens=2, suppress_tokens=(7,)),
                 processing.make_processing(length, 1, 0, forced_bos_token_id=3, forced_eos_token_id=1)]:
        for step in range(length):
            full = processing.process_logprobs(logp, jnp.int32(step), proc)
            chosen = processing.process_logprobs(jnp.take_along_axis(logp, ids, axis=-1), jnp.int32(step),
                                                 proc, token_ids=ids, vocab=vocab)
            np.testing.assert_array_equal(chosen, jnp.take_along_axis(full, ids, axis=-1))


# ---------------------------------------------------------------------------------------------
# Sampling.


def test_sampling_degenerate_settings_equal_greedy():
    table, L = random_table(7, eos_bias=0.3), 6
    cache = make_cache([0, 2, 3])
    init = jnp.zeros((3,), jnp.int32)
    greedy = decoding.greedy_search(chain_fn(table), init, cache, max_new_tokens=L, **COMMON)
    for kw in [dict(top_k=1), dict(top_p=1e-6, temperature=0.5)]:
        s = decoding.sample(chain_fn(table), init, cache, jax.random.key(3), max_new_tokens=L, **COMMON, **kw)
        assert np.array_equal(s.sequences, greedy.sequences), kw
        np.testing.assert_allclose(s.sum_logprobs, greedy.sum_logprobs, rtol=1e-5)


def np_warp(logits, temperature=1.0, top_k=0, top_p=1.0):
    """Reference warpers from the HF definitions: returns the sampling distribution."""
    x = np.asarray(logits, np.float64) / temperature
    if top_k:
        x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = np.zeros_like(p, bool)
        mass = 0.0
        for i in order:  # smallest set of most likely tokens reaching top_p
            keep[i] = True
            mass += p[i]
            if mass >= top_p:
                break
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_k=3), dict(temperature=1.5, top_p=0.8)])
def test_sample_frequencies_match_the_distribution(kw):
    n = 4000
    logits = np.array([0.3, 1.0, 0.5, -0.4, 0.9])
    table = np.broadcast_to(logits, (V, V, V)).copy()
    out = decoding.sample(chain_fn(table), jnp.zeros((n,), jnp.int32), make_cache(np.zeros(n, int)),
                          jax.random.key(0), max_new_tokens=2, **COMMON, **kw)
    first = np.asarray(out.sequences[:, 0, 0])
    expected = np_warp(logits, **kw)
    counts = np.bincount(first, minlength=V)
    assert (counts[expected == 0] == 0).all()  # filtered tokens never drawn
    pos = expected > 0
    chi2 = (((counts[pos] - n * expected[pos]) ** 2) / (n * expected[pos])).sum()
    assert chi2 < 20.0, (counts, n * expected)  # chi2(df<=4) 99.95% quantile ~ 20
    # Rows that drew EOS first are padded afterwards and scored on one token.
    eos_rows = first == EOS
    assert (np.asarray(out.sequences[eos_rows, 0, 1]) == PAD).all()
    assert (np.asarray(out.lengths[eos_rows, 0]) == 1).all()
    # sum_logprobs scores the draw under the model (not the warped distribution).
    lsm = np_log_softmax(logits)
    np.testing.assert_allclose(np.asarray(out.sum_logprobs[eos_rows, 0]), lsm[EOS], rtol=1e-5)


def test_sampling_is_seeded():
    table = random_table(2)
    args = (chain_fn(table), jnp.zeros((8,), jnp.int32), make_cache(np.zeros(8, int)))
    a = decoding.sample(*args, jax.random.key(1), max_new_tokens=5, **COMMON)
    b = decoding.sample(*args, jax.random.key(1), max_new_tokens=5, **COMMON)
    c = decoding.sample(*args, jax.random.key(2), max_new_tokens=5, **COMMON)
    assert np.array_equal(a.sequences, b.sequences)
    assert not np.array_equal(a.sequences, c.sequences)


# ---------------------------------------------------------------------------------------------
# Compilation, settings, errors.


def test_jit_traces_once_per_shape():
    traces = []

    @jax.jit
    def run(table, cache):
        traces.append(1)  # side effect: runs only while tracing
        init = jnp.zeros(cache["prev"].shape, jnp.int32)
        return decoding.beam_search(chain_fn(table), init, cache, num_beams=2,
                                    max_new_tokens=4, **COMMON)

    run(jnp.asarray(random_table(1), jnp.float32), make_cache([0, 1]))
    run(jnp.asarray(random_table(2), jnp.float32), make_cache([2, 3]))
    assert len(traces) == 1
    run(jnp.asarray(random_table(2), jnp.float32), make_cache([2, 3, 4]))  # new batch shape
    assert len(traces) == 2


def test_resolve_settings_precedence():
    config = types.SimpleNamespace(eos_token_id=2, pad_token_id=1, decoder_start_token_id=2,
                                   forced_bos_token_id=None, forced_eos_token_id=2, bos_token_id=0)
    model = types.SimpleNamespace(config=config, generation_config={"num_beams": 4, "forced_bos_token_id": 7,
                                                                     "max_length": 200})
    s = decoding.resolve_settings(model, max_new_tokens=10)
    assert (s.num_beams, s.forced_bos_token_id, s.forced_eos_token_id, s.eos_token_id) == (4, 7, (2,), (2,))
    assert s.early_stopping is True and s.top_k == 0 and s.length_penalty == 1.0
    s = decoding.resolve_settings(model, max_new_tokens=10, num_beams=1, forced_bos_token_id=9,
                                  length_penalty_style="gnmt")
    assert (s.num_beams, s.forced_bos_token_id, s.length_penalty_style) == (1, 9, "gnmt")
    s = decoding.resolve_settings(model, max_new_tokens=5, num_beams=1, bad_words_ids=[[1], [2]], min_length=3)
    assert s.suppress_tokens == (1,) and s.min_new_tokens == 2  # EOS is never banned; min_length counts start
    assert s.to_dict()["eos_token_id"] == [2]
    hash(s)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(num_beams=2, early_stopping="sometimes"), "early_stopping"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, num_beams=3), "num_beams"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(length_penalty_style="linear"), "length_penalty_style"),
    (dict(beams=2), "unknown generation setting"),
])
def test_bad_settings_raise(kwargs, match):
    config = types.SimpleNamespace(eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        decoding.resolve_settings(config, **kwargs)


def test_low_level_bad_arguments_raise():
    fn, cache = chain_fn(random_table(0)), make_cache([0])
    with pytest.raises(ValueError, match="num_return_sequences"):
        decoding.beam_search(fn, jnp.zeros((1,), jnp.int32), cache, num_beams=2, num_return_sequences=3,
                             max_new_tokens=3, **COMMON)
    with pytest.raises(ValueError, match="eos_token_id"):
        decoding.greedy_search(fn, jnp.zeros((1,), jnp.int32), cache, max_new_tokens=3, eos_token_id=None,
                               pad_token_id=0)
    with pytest.raises(ValueError, match="init_tokens"):
        decoding.greedy_search(fn, jnp.zeros((1, 2), jnp.int32), cache, max_new_tokens=3, **COMMON)
