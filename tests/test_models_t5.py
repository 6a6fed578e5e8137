"""T5 family (v1.0, v1.1, mT5) against transformers PyTorch on tiny random checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kd_flax.models import layers as L
from kd_flax.models import load_pretrained
from tests.model_fixtures import make_batch, make_hf_model, rel_err, to_np, torch_forward

VARIANTS = {
    "t5_v1_0": ("t5", {}),
    "t5_v1_1": ("t5", {"feed_forward_proj": "gated-gelu"}),
    "mt5": ("mt5", {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("t5ckpt")
    return {name: make_hf_model(root, mt, **kw) for name, (mt, kw) in VARIANTS.items()}


def _jit_forward(model, output=False):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, b):
        m = nnx.merge(graphdef, state)
        enc = m.encode(b["input_ids"], b["attention_mask"], output_hidden_states=output,
                       output_attentions=output)
        res = m.decode(b["decoder_input_ids"], enc, b["attention_mask"],
                       decoder_attention_mask=b["decoder_attention_mask"],
                       output_hidden_states=output, output_attentions=output)
        return enc, res

    return lambda b: f(state, b)


def _incremental(model, b, steps):
    """Greedy-free teacher-forced decoding one token at a time with the KV cache."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def start(state, ids, mask):
        m = nnx.merge(graphdef, state)
        enc = m.encode(ids, mask)
        return enc, m.init_cache(ids.shape[0], steps, enc, mask)

    @jax.jit
    def step(state, tok, enc, mask, cache):
        return nnx.merge(graphdef, state).decode(tok, enc, mask, cache=cache)

    enc, cache = start(state, b["input_ids"], b["attention_mask"])
    out = []
    for t in range(steps):
        logits, cache = step(state, b["decoder_input_ids"][:, t:t + 1], enc, b["attention_mask"], cache)
        out.append(logits[:, 0])
    assert int(cache["index"]) == steps
    return np.stack(out, 1), cache


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_hidden_attentions_match_transformers(checkpoints, variant):
    path, tmodel = checkpoints[variant]
    model = load_pretrained(path)
    cfg = model.config
    if variant == "t5_v1_0":
        assert cfg.tie_word_embeddings and cfg.scale_decoder_outputs and model.lm_head is None
    else:
        assert not cfg.tie_word_embeddings and not cfg.scale_decoder_outputs and cfg.is_gated
    b = make_batch(1, vocab=cfg.vocab_size)
    enc, (logits, cache, extras) = _jit_forward(model, output=True)(b)
    assert cache is None and logits.dtype == jnp.float32
    ref = torch_forward(tmodel, b, output_hidden_states=True, output_attentions=True)
    dm, em = b["decoder_attention_mask"], b["attention_mask"]
    assert rel_err(logits, to_np(ref.logits), dm) < 1e-4
    # hidden states: embeddings, each layer, final norm (valid positions only)
    assert len(enc.hidden_states) == len(ref.encoder_hidden_states) == cfg.encoder_layers + 1
    for a, r in zip(enc.hidden_states, ref.encoder_hidden_states):
        assert rel_err(a, to_np(r), em) < 1e-4
    for a, r in zip(extras.hidden_states, ref.decoder_hidden_states):
        assert rel_err(a, to_np(r), dm) < 1e-4
    # attention maps [B, H, T, S]: compare rows of valid queries
    for ours, theirs, qmask in ((enc.attentions, ref.encoder_attentions, em),
                                (extras.attentions, ref.decoder_attentions, dm),
                                (extras.cross_attentions, ref.cross_attentions, dm)):
        assert len(ours) == len(theirs) == 2
        for a, r in zip(ours, theirs):
            a, r = np.moveaxis(np.asarray(a), 1, 2), np.moveaxis(to_np(r), 1, 2)  # [B, T, H, S]
            assert rel_err(a, r, qmask) < 1e-4
    # logits = logits_hidden @ W (+ b)
    W, bias = model.unembedding()
    assert bias is None
    np.testing.assert_allclose(extras.logits_hidden @ W, logits, rtol=1e-4, atol=1e-4)


def test_incremental_decoding_equals_full_forward(checkpoints):
    path, _ = checkpoints["t5_v1_0"]
    model = load_pretrained(path)
    b = make_batch(2, vocab=model.config.vocab_size)
    _, (full, _) = _jit_forward(model)(b)
    inc, cache = _incremental(model, b, b["decoder_input_ids"].shape[1])
    # cache layout: batch on axis 0 of every non-scalar leaf
    for leaf in jax.tree.leaves(cache):
        assert leaf.ndim == 0 or leaf.shape[0] == b["input_ids"].shape[0]
    # teacher-forced positions before any padding are identical
    assert rel_err(inc, full, b["decoder_attention_mask"]) < 1e-4


def test_scan_layers_and_remat_match_unscanned(checkpoints):
    path, _ = checkpoints["t5_v1_1"]
    base = load_pretrained(path)
    scanned = load_pretrained(path, scan_layers=True, remat="dots_saveable")
    # stacked params carry a leading "layers" logical axis
    q = scanned.encoder.layers.self_attn.q_proj.kernel
    assert q.shape[0] == 2 and L.logical_axes_of(q)[0] == "layers"
    b = make_batch(3, vocab=base.config.vocab_size)
    (e0, (l0, _)), (e1, (l1, _)) = _jit_forward(base)(b), _jit_forward(scanned)(b)
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    inc0, _ = _incremental(base, b, 3)
    inc1, cache1 = _incremental(scanned, b, 3)
    assert cache1["layers"]["self"]["k"].shape[:2] == (3, 2)  # [B, layers, H, L, Dh]
    np.testing.assert_allclose(inc1, inc0, rtol=1e-5, atol=1e-5)
    assert rel_err(inc0, l0[:, :3], b["decoder_attention_mask"][:, :3]) < 1e-4


def test_remat_gradients_match_torch(checkpoints):
    """Backward pass under full rematerialisation equals PyTorch autograd."""
    import torch

    path, tmodel = checkpoints["t5_v1_0"]
    b = make_batch(4, vocab=96)
    model = load_pretrained(path, remat="full")
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state):
        def loss(st):
            lg = nnx.merge(graphdef, st)(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                         decoder_input_ids=b["decoder_input_ids"])
            return jnp.mean(jax.nn.logsumexp(lg, -1))
        return jax.value_and_grad(loss)(state)

    value, grads = f(state)
    tmodel.zero_grad()
    lg = tmodel(**{k: torch.as_tensor(b[k], dtype=torch.long)
                   for k in ("input_ids", "attention_mask", "decoder_input_ids")}).logits
    tloss = torch.logsumexp(lg, -1).mean()
    tloss.backward()
    np.testing.assert_allclose(value, tloss.item(), rtol=1e-5)
    pairs = [(grads["embed_tokens"]["embedding"], tmodel.shared.weight.grad),
             (grads["decoder"]["layers"][1]["mlp"]["wo"]["kernel"],
              tmodel.decoder.block[1].layer[2].DenseReluDense.wo.weight.grad.T),
             (grads["encoder"]["relative_attention_bias"]["embedding"],
              tmodel.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.grad)]
    for ours, ref in pairs:
        assert rel_err(ours[...], to_np(ref)) < 1e-4
    tmodel.zero_grad()


def test_relative_position_bucket_matches_transformers():
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)[None, :] - np.zeros((1, 1), int)
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 20)):
            ours = L.relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                              num_buckets=nb, max_distance=md)
            ref = T5Attention._relative_position_bucket(torch.as_tensor(rel), bidirectional=bidirectional,
                                                        num_buckets=nb, max_distance=md)
            np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_config_validation_and_from_scratch():
    from kd_flax.models import T5Config, create_model, tiny_config

    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="swiglu-gated-x")
    with pytest.raises(ValueError, match="remat"):
        tiny_config("t5", remat="bogus_policy")
    with pytest.raises(ValueError, match="no field"):
        tiny_config("t5").replace(n_layers=3)
    cfg = tiny_config("mt5", dtype="bfloat16")
    m = create_model(cfg, nnx.Rngs(1))
    lg = nnx.jit(lambda m, a, d: m(input_ids=a, decoder_input_ids=d))(
        m, jnp.ones((1, 4), jnp.int32), jnp.zeros((1, 2), jnp.int32))
    assert lg.shape == (1, 2, cfg.vocab_size) and lg.dtype == jnp.float32
    assert m.embed_tokens.embedding[...].dtype == jnp.float32  # param_dtype stays float32
    # generation_config is kept as JSON text, so the graphdef hashes (a jit cache key)
    gd = nnx.graphdef(m)
    assert hash(gd) == hash(nnx.graphdef(m)) and m.generation_config["eos_token_id"] == cfg.eos_token_id
    m.generation_config = {**m.generation_config, "num_beams": 3}
    assert m.generation_config["num_beams"] == 3 and nnx.graphdef(m) != gd
    with pytest.raises(ValueError, match="generation_config"):
        m.generation_config = [("num_beams", 3)]


def test_dense_activation_quantization():
    """Dense(act_quant_bits=8) quantizes its input per tensor (symmetric, 8 bits) before the
    matmul: reference written from the formula in float64."""
    d = L.Dense(5, 3, act_quant_bits=8, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
    step = np.abs(x.astype(np.float64)).max() / 127
    xq = np.clip(np.round(x / step), -127, 127) * step
    ref = xq @ np.asarray(d.kernel[...], np.float64) + np.asarray(d.bias[...], np.float64)
    np.testing.assert_allclose(d(jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
    assert not np.allclose(L.Dense(5, 3, rngs=nnx.Rngs(0))(jnp.asarray(x)), ref, atol=1e-7)


@pytest.mark.parametrize("tied", [True, False])
def test_unembedding_override_keeps_the_head(tied):
    """decode(..., unembedding=model.unembedding()) — what generation passes — gives the logits of
    the model's own head; an untied W8A8 head keeps fake-quantizing its input activation."""
    from kd_flax.models import T5Config, create_model
    extra = {} if tied else dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                 scale_decoder_outputs=False)
    cfg = T5Config(vocab_size=48, d_model=16, d_kv=4, d_ff=32, encoder_layers=1, decoder_layers=1,
                   num_heads=2, act_quant_bits=8, **extra)
    model = create_model(cfg, nnx.Rngs(0))
    ids = np.arange(12, dtype=np.int32).reshape(2, 6) + 3
    enc = model.encode(ids)
    dec = np.full((2, 3), 5, np.int32)
    own, _ = model.decode(dec, enc)
    over, _ = model.decode(dec, enc, unembedding=model.unembedding())
    # A tied head's own logits multiply by the [V, D] embedding as stored, the override by its
    # [D, V] copy: the same sums, maybe in another order.
    np.testing.assert_allclose(np.asarray(over), np.asarray(own), rtol=1e-5, atol=1e-6)


def test_with_config_keeps_weights_and_changes_only_the_fields():
    """`models.with_config`: the one rebuild of a model under changed runtime fields (float
    stages, export dtype, evaluation's activation fake-quant)."""
    import jax
    import numpy as np
    from flax import nnx
    from kd_flax import models
    m = models.create_model(models.tiny_config("t5"), nnx.Rngs(3))
    m.generation_config = {"marker": 1}
    assert models.with_config(m, act_quant_bits=None) is m  # nothing changes: the same object
    q = models.with_config(m, act_quant_bits=8, act_quant_granularity="row")
    assert (q.config.act_quant_bits, q.config.act_quant_granularity) == (8, "row")
    assert q.config.replace(act_quant_bits=None, act_quant_granularity="tensor") == m.config
    assert q.generation_config == {"marker": 1}
    for a, b in zip(jax.tree.leaves(nnx.state(m)), jax.tree.leaves(nnx.state(q))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ids = np.array([[5, 6, 7, 1]], np.int32)
    out = dict(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=ids)
    assert np.abs(np.asarray(q(**out)) - np.asarray(m(**out))).max() > 0  # the fake-quant acts


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_dot_gradient_equals_autodiff(dtype):
    """`layers.dense_dot` (every Dense's matmul) writes its backward out, to keep the kernel's
    gradient in the kernel's layout; its values and gradients must be autodiff's of `x @ k`."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 8)), dtype)
    k = jnp.asarray(rng.normal(size=(8, 5)), dtype)
    r = jnp.asarray(rng.normal(size=(2, 3, 5)), dtype)
    plain = lambda x, k: jnp.sum((jnp.dot(x, k) * r).astype(jnp.float32))  # noqa: E731
    ours = lambda x, k: jnp.sum((L.dense_dot(x, k) * r).astype(jnp.float32))  # noqa: E731
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(jax.jit(L.dense_dot)(x, k), np.float32),
                               np.asarray(jnp.dot(x, k), np.float32), rtol=tol, atol=tol)
    for got, want in zip(jax.jit(jax.grad(ours, argnums=(0, 1)))(x, k), jax.grad(plain, argnums=(0, 1))(x, k)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_unembed_gradient_equals_autodiff(dtype, with_bias):
    """`layers.unembed` writes its backward out (to keep XLA from transposing the [tokens, V]
    cotangent); its gradients must be autodiff's of `h @ w + b`, tied through `.T` too."""
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    emb = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)  # a tied [V, D] embedding
    b = jnp.asarray(rng.normal(size=(11,)), jnp.float32) if with_bias else None
    r = jnp.asarray(rng.normal(size=(2, 3, 11)), jnp.float32)

    def plain(h, emb, b):
        out = jnp.dot(h.astype(dtype), emb.T.astype(dtype), preferred_element_type=jnp.float32)
        return jnp.sum((out if b is None else out + b) * r)

    def ours(h, emb, b):  # the head as [D, V]
        return jnp.sum(L.unembed(h, emb.T, b, dtype=dtype) * r)

    def ours_vocab_major(h, emb, b):  # the embedding as stored, [V, D]
        return jnp.sum(L.unembed(h, emb, b, dtype=dtype, vocab_major=True) * r)

    argnums = (0, 1, 2) if with_bias else (0, 1)
    want = jax.grad(plain, argnums=argnums)(h, emb, b)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for fn in (ours, ours_vocab_major):
        np.testing.assert_allclose(np.asarray(jax.jit(fn)(h, emb, b)), np.asarray(plain(h, emb, b)),
                                   rtol=tol, atol=tol)
        got = jax.jit(jax.grad(fn, argnums=argnums))(h, emb, b)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)
