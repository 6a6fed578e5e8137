"""kd_flax.decoding.generate against transformers' PyTorch `generate` on converted checkpoints.

Tiny random transformers models are trained for a few dozen steps on a toy copy task before
they are saved, so that their outputs are not degenerate: varied tokens, EOS at different
positions (and some rows running to the length limit), beam search different from greedy.
They are then loaded with `kd_flax.models.load_pretrained`.
"""

import numpy as np
import pytest

models = pytest.importorskip("kd_flax.models", reason="kd_flax.models is not importable yet")
torch = pytest.importorskip("torch")

import jax  # noqa: E402

from kd_flax import decoding, sharding  # noqa: E402
from tests.model_fixtures import make_hf_model  # noqa: E402

MAX_NEW = 9


def _toy_batch(rng, n, config, src_len=8):
    """Copy task: target = source + EOS (sources of random length, right-padded)."""
    pad, eos, vocab = config.pad_token_id, config.eos_token_id, config.vocab_size
    src = np.full((n, src_len), pad, np.int64)
    labels = np.full((n, src_len + 1), -100, np.int64)
    for i in range(n):
        k = int(rng.integers(2, src_len + 1))
        s = rng.integers(3, vocab - 1, size=k)
        src[i, :k], labels[i, :k], labels[i, k] = s, s, eos
    return src, (src != pad).astype(np.int64), labels


def trained_model(tmp_path, model_type, steps=40, config=None, **generation):
    """A tiny transformers model, briefly trained, saved; returns (dir, torch model, batch).
    `config`: overrides of the tiny config (e.g. a vocabulary long enough for the folded reductions)."""
    directory, tm = make_hf_model(tmp_path, model_type, **(config or {}))
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead on a shared CPU
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(tm.parameters(), lr=1e-2)
    tm.train()
    for _ in range(steps):
        src, mask, labels = (torch.as_tensor(a) for a in _toy_batch(rng, 16, tm.config))
        loss = tm(input_ids=src, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    tm.eval()
    for key, value in generation.items():
        setattr(tm.generation_config, key, value)
    tm.save_pretrained(directory)
    src, mask, _ = _toy_batch(np.random.default_rng(1), 8, tm.config)
    return directory, tm, {"input_ids": src.astype(np.int32), "attention_mask": mask.astype(np.int32)}


def hf_generate(tm, batch, **kw):
    with torch.no_grad():
        out = tm.generate(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                          attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
                          max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_scores=True, **kw)
    scores = None if getattr(out, "sequences_scores", None) is None else out.sequences_scores.numpy()
    return out.sequences[:, 1:].numpy(), scores  # drop the decoder-start token


def until_eos(row, eos):
    row = list(np.asarray(row))
    return row[: row.index(eos) + 1] if eos in row else row


def assert_greedy_equal(ours, ref, pad):
    """Token-for-token, including the padding after EOS."""
    ours = np.asarray(ours.sequences[:, 0])
    assert ours.shape[1] == MAX_NEW
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == pad).all()


def assert_beams_equal(ours, ref, ref_scores, n, eos, pad):
    ours_seq = np.asarray(ours.sequences)
    b = ours_seq.shape[0]
    for i in range(b):
        for j in range(n):
            mine, theirs = until_eos(ours_seq[i, j], eos), until_eos(ref[i * n + j], eos)
            assert mine == theirs, (i, j, mine, theirs)
            assert (ours_seq[i, j, len(mine):] == pad).all()
    np.testing.assert_allclose(np.asarray(ours.scores).reshape(-1), ref_scores, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    directory, tm, batch = trained_model(tmp_path_factory.mktemp("t5"), "t5")
    return models.load_pretrained(directory), tm, batch


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
    directory, tm, batch = trained_model(tmp_path_factory.mktemp("bart"), "bart")
    return models.load_pretrained(directory), tm, batch


def test_t5_greedy_and_beam_match_transformers(t5):
    model, tm, batch = t5
    c = tm.config
    ref, _ = hf_generate(tm, batch, do_sample=False, num_beams=1)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW)
    assert_greedy_equal(out, ref, c.pad_token_id)
    # The test is meaningful: varied tokens and outputs of different lengths.
    assert len(np.unique(ref)) > 5 and len({len(until_eos(r, c.eos_token_id)) for r in ref}) > 1
    # The greedy scores are the summed log-probs of the chosen tokens.
    with torch.no_grad():
        logits = tm(input_ids=torch.as_tensor(batch["input_ids"], dtype=torch.long),
                    attention_mask=torch.as_tensor(batch["attention_mask"], dtype=torch.long),
                    decoder_input_ids=torch.as_tensor(np.concatenate(
                        [np.zeros((8, 1), np.int64), np.asarray(out.sequences[:, 0, :-1])], 1))).logits
    logp = torch.log_softmax(logits.double(), -1).numpy()
    seqs, lengths = np.asarray(out.sequences[:, 0]), np.asarray(out.lengths[:, 0])
    expect = [sum(logp[i, t, seqs[i, t]] for t in range(lengths[i])) for i in range(8)]
    np.testing.assert_allclose(np.asarray(out.sum_logprobs[:, 0]), expect, rtol=1e-4)

    ref, ref_scores = hf_generate(tm, batch, num_beams=4, num_return_sequences=2, early_stopping=True)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW,
                            num_beams=4, num_return_sequences=2, early_stopping=True)
    assert_beams_equal(out, ref, ref_scores, 2, c.eos_token_id, c.pad_token_id)
    greedy_seqs = np.asarray(decoding.generate(model, batch["input_ids"], batch["attention_mask"],
                                               max_new_tokens=MAX_NEW).sequences[:, 0])
    assert not np.array_equal(np.asarray(out.sequences[:, 0]), greedy_seqs)  # beam != greedy here


def test_long_vocabulary_greedy_and_beam_match_transformers(tmp_path):
    """An odd vocabulary above fold_reduce's stop (515 > 256): the folded max / sum / argmax of the
    decoding loops give transformers' tokens and scores, with a logit processor switched on."""
    directory, tm, batch = trained_model(tmp_path, "t5", config=dict(vocab_size=515))
    model, c = models.load_pretrained(directory), tm.config
    ref, _ = hf_generate(tm, batch, do_sample=False, num_beams=1, min_new_tokens=2)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW,
                            min_new_tokens=2)
    assert_greedy_equal(out, ref, c.pad_token_id)
    assert len(np.unique(ref)) > 5
    ref, ref_scores = hf_generate(tm, batch, num_beams=3, num_return_sequences=2, early_stopping=True)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW,
                            num_beams=3, num_return_sequences=2, early_stopping=True)
    assert_beams_equal(out, ref, ref_scores, 2, c.eos_token_id, c.pad_token_id)


def test_translator_lays_out_the_head_once_per_weights(t5, tmp_path):
    """A Translator lays out a tied LM head once per set of weights, and decodes as generate does,
    with its model's weights or others of the same structure, compiling once."""
    from flax import nnx

    from kd_flax.translate import Translator

    model, _, batch = t5
    ids, mask = batch["input_ids"], batch["attention_mask"]
    kw = dict(max_new_tokens=MAX_NEW)
    translator = Translator(model, None, kw)
    first = translator.head_for()
    assert translator.head_for()[0] is first[0]  # kept, not laid out again
    np.testing.assert_array_equal(first[0], np.asarray(model.embed_tokens.embedding[...]).T)
    out = decoding.generate(model, ids, mask, **kw)
    np.testing.assert_array_equal(translator(ids, mask)[0], out.sequences)
    # A caller that jits generate itself passes the head in; the output is the same.
    jitted = jax.jit(lambda state, head, ids, mask: decoding.generate(
        nnx.merge(nnx.graphdef(model), state), ids, mask, unembedding=head, **kw).sequences)
    np.testing.assert_array_equal(jitted(nnx.state(model), first, ids, mask), out.sequences)
    # New weights: a new layout, and the Translator follows them without compiling again.
    changed = nnx.clone(model)
    changed.embed_tokens.embedding[...] = changed.embed_tokens.embedding[...] * 2.0
    second = translator.head_for(nnx.state(changed))
    np.testing.assert_array_equal(second[0], 2.0 * np.asarray(first[0]))
    assert translator.head_for()[0] is not second[0]
    n = translator.compilations()
    np.testing.assert_array_equal(translator(ids, mask, state=nnx.state(changed))[0],
                                  decoding.generate(changed, ids, mask, **kw).sequences)
    assert translator.compilations() == n == 1
    # An untied head is a weight already: returned as is, nothing copied.
    untied = models.load_pretrained(make_hf_model(tmp_path, "t5", untie_head=True)[0])
    assert Translator(untied, None, kw).head_for()[0] is untied.lm_head.kernel[...]
    with pytest.raises(ValueError, match="unembedding"):
        decoding.generate(model, ids, mask, mesh=sharding.make_mesh({"data": -1}), unembedding=first, **kw)


@pytest.mark.parametrize("how", ["generate", "translator", "translator_unsharded"])
def test_decoding_keeps_no_model_alive(t5, how):
    """Once the caller drops a model (and its Translator), nothing holds it or its weights: not
    `generate(mesh=)` (a module-level cache of sharded functions used to keep every model it
    had seen on the devices), not the Translator's compiled function or laid-out head."""
    import weakref

    from flax import nnx

    from kd_flax.translate import Translator

    model, _, batch = t5
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, jax.tree.map(jnp_copy, state))  # weights of its own
    refs = [weakref.ref(copy), weakref.ref(jax.tree.leaves(nnx.state(copy))[0])]
    kw = dict(max_new_tokens=MAX_NEW, num_beams=2)
    mesh = None if how == "translator_unsharded" else sharding.make_mesh({"data": 4, "model": 2})
    if how == "generate":
        out = decoding.generate(copy, batch["input_ids"], batch["attention_mask"], mesh=mesh, **kw).sequences
    else:
        translator = Translator(copy, None, kw, mesh)
        out = translator(batch["input_ids"], batch["attention_mask"])[0]
        assert translator.head_for() is None or how == "translator_unsharded"
        del translator
    np.testing.assert_array_equal(np.asarray(out), np.asarray(
        decoding.generate(model, batch["input_ids"], batch["attention_mask"], **kw).sequences))
    del copy
    assert [r() for r in refs] == [None, None]


def jnp_copy(x):
    return jax.numpy.array(x, copy=True)


def test_t5_beam_heuristic_early_stopping_false(t5):
    model, tm, batch = t5
    c = tm.config
    kw = dict(num_beams=3, num_return_sequences=3, early_stopping=False, length_penalty=0.6)
    ref, ref_scores = hf_generate(tm, batch, **kw)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW, **kw)
    assert_beams_equal(out, ref, ref_scores, 3, c.eos_token_id, c.pad_token_id)


def test_sampling_through_generate(t5):
    """top_k=1 samples are the greedy answer, for every one of n samples per input."""
    model, tm, batch = t5
    greedy = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW,
                            do_sample=True, top_k=1, num_return_sequences=2, seed=3)
    assert out.sequences.shape == (8, 2, MAX_NEW)
    for j in range(2):
        np.testing.assert_array_equal(out.sequences[:, j], greedy.sequences[:, 0])


def test_generate_compiles_once_per_shape(t5):
    model, _, batch = t5
    kw = dict(max_new_tokens=MAX_NEW)
    decoding.generate(model, batch["input_ids"], batch["attention_mask"], **kw)
    before = decoding.TRACE_COUNTS["generate"]
    for seed in range(2):
        decoding.generate(model, batch["input_ids"][::-1], batch["attention_mask"][::-1], seed=seed, **kw)
    assert decoding.TRACE_COUNTS["generate"] == before
    decoding.generate(model, batch["input_ids"][:2], batch["attention_mask"][:2], **kw)  # new shape
    assert decoding.TRACE_COUNTS["generate"] == before + 1


def test_sharded_generation_equals_single_device(t5):
    """4 (data) x 2 (model) CPU mesh: same tokens as one device (tensor-parallel params)."""
    model, tm, batch = t5
    kw = dict(max_new_tokens=MAX_NEW, num_beams=4, num_return_sequences=2, early_stopping=True)
    single = decoding.generate(model, batch["input_ids"], batch["attention_mask"], **kw)
    mesh = sharding.make_mesh({"data": 4, "model": 2})
    # generate(mesh=...) is jax.jit with NamedShardings; the compiled function keys on the graph
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], mesh=mesh,
                            rules=sharding.DEFAULT_RULES, **kw)
    np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(single.sequences))
    np.testing.assert_allclose(np.asarray(out.scores), np.asarray(single.scores), rtol=1e-5, atol=1e-6)
    assert out.sequences.sharding.spec[0] == "data"
    assert len(out.sequences.sharding.device_set) == 8
    # A mesh from plain jax.make_mesh (Explicit axes, JAX's default) works the same.
    explicit = jax.make_mesh((4, 2), ("data", "model"))
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], mesh=explicit, **kw)
    np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(single.sequences))
    with pytest.raises(ValueError, match="divisible"):
        decoding.generate(model, batch["input_ids"][:2], batch["attention_mask"][:2], mesh=mesh,
                          rules=sharding.DEFAULT_RULES, **kw)


def test_bart_greedy_and_beam_match_transformers(bart):
    """BART: decoder start = EOS, forced EOS at the length limit from the config."""
    model, tm, batch = bart
    c = tm.config
    assert model.generation_config.get("forced_eos_token_id", c.forced_eos_token_id) == c.eos_token_id
    ref, _ = hf_generate(tm, batch, do_sample=False, num_beams=1)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW)
    assert_greedy_equal(out, ref, c.pad_token_id)
    ref, ref_scores = hf_generate(tm, batch, num_beams=4, num_return_sequences=2, early_stopping=True)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW,
                            num_beams=4, num_return_sequences=2)
    assert_beams_equal(out, ref, ref_scores, 2, c.eos_token_id, c.pad_token_id)


@pytest.mark.parametrize("model_type", ["mbart", "marian"])
def test_mbart_forced_bos_and_marian_greedy(tmp_path, model_type):
    """mBART: the target-language code from generation_config.json is the first token."""
    gen = {"forced_bos_token_id": 90} if model_type == "mbart" else {}
    directory, tm, batch = trained_model(tmp_path, model_type, **gen)
    model = models.load_pretrained(directory)
    c = tm.config
    ref, _ = hf_generate(tm, batch, do_sample=False, num_beams=1)
    out = decoding.generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=MAX_NEW)
    assert_greedy_equal(out, ref, c.pad_token_id)
    if model_type == "mbart":
        assert (np.asarray(out.sequences[:, 0, 0]) == 90).all()
        # an explicit kwarg wins over the checkpoint's setting
        assert decoding.resolve_settings(model, max_new_tokens=3, forced_bos_token_id=91).forced_bos_token_id == 91
