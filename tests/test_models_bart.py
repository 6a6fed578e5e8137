"""BART / mBART / Marian against transformers (PyTorch) on tiny random checkpoints.

Each case builds a tiny random transformers model, saves it, loads it with
`kd_flax.models.load_pretrained` and checks logits, hidden states and attention maps
(padding in encoder and decoder inputs), cached incremental decoding, and the round trip
kd_flax → `save_pretrained` → transformers.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from kd_flax import decoding, models, sharding
from kd_flax.models import bart, hf, layers
from tests.model_fixtures import make_batch, make_hf_model, rel_err, to_np, torch_forward

TOL = 1e-4

# (id, model_type, extra transformers config): every architecture switch is covered.
# (Tied heads are covered by mBART and Marian, an untied one by BART.)
CASES = [
    ("bart_untied_head", "bart", dict(tie_word_embeddings=False, scale_embedding=True)),
    ("mbart", "mbart", dict(scale_embedding=True)),
    ("marian", "marian", dict(scale_embedding=True, activation_function="swish")),
    ("marian_separate_vocab", "marian", dict(scale_embedding=True, activation_function="swish",
                                             share_encoder_decoder_embeddings=False,
                                             decoder_vocab_size=80, pad_token_id=79,
                                             decoder_start_token_id=79)),
]


def _checkpoint(tmp_path, model_type, cfg):
    """Tiny HF checkpoint with a non-zero `final_logits_bias` (a buffer, so the fixture's
    perturbation does not reach it); returns (dir, eager-attention torch model)."""
    path, tm = make_hf_model(tmp_path, model_type, **cfg)
    with torch.no_grad():
        tm.final_logits_bias.normal_(0.0, 0.5)
    tm.save_pretrained(path)
    tm.set_attn_implementation("eager")  # attention maps are only returned by eager
    return path, tm


def _batch(tm, seed=0):
    c = tm.config
    pad = c.pad_token_id
    vocab = min(c.vocab_size, getattr(c, "decoder_vocab_size", None) or c.vocab_size)
    return make_batch(seed, batch=3, src_len=7, tgt_len=6, vocab=vocab, pad_id=pad,
                      start_id=c.decoder_start_token_id, low=3 if pad != vocab - 1 else 1)


def _incremental(model, b, max_length):
    """Feed `decoder_input_ids` one token at a time through the cache (one jit, `lax.scan`
    over the steps); returns (logits [B, T, V], final cache)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, b):
        m = nnx.merge(graphdef, state)
        enc = m.encode(b["input_ids"], b["attention_mask"])
        cache = m.init_cache(b["input_ids"].shape[0], max_length, enc, b["attention_mask"])

        def step(cache, tok):
            logits, cache = m.decode(tok[:, None], enc, b["attention_mask"], cache=cache)
            return cache, logits[:, 0]

        cache, logits = jax.lax.scan(step, cache, b["decoder_input_ids"].T)
        return jnp.swapaxes(logits, 0, 1), cache

    return run(state, {k: jnp.asarray(v) for k, v in b.items()})


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_transformers(tmp_path, case):
    _, model_type, cfg = case
    path, tm = _checkpoint(tmp_path, model_type, cfg)
    model = models.load_pretrained(path)
    assert isinstance(model, bart.BartModel) and model.config.model_type == model_type
    b = _batch(tm)
    ref = torch_forward(tm, b, output_hidden_states=True, output_attentions=True)

    enc = model.encode(jnp.asarray(b["input_ids"]), jnp.asarray(b["attention_mask"]),
                       output_hidden_states=True, output_attentions=True)
    logits, cache, ex = model.decode(
        jnp.asarray(b["decoder_input_ids"]), enc, jnp.asarray(b["attention_mask"]),
        decoder_attention_mask=jnp.asarray(b["decoder_attention_mask"]),
        output_hidden_states=True, output_attentions=True)
    assert cache is None and logits.dtype == jnp.float32
    # Every position is compared: with right padding no query row is fully masked.
    assert rel_err(logits, to_np(ref.logits)) < TOL
    assert rel_err(enc.last_hidden_state, to_np(ref.encoder_last_hidden_state)) < TOL
    for name, ours, theirs in (
            ("encoder_hidden_states", enc.hidden_states, ref.encoder_hidden_states),
            ("encoder_attentions", enc.attentions, ref.encoder_attentions),
            ("decoder_hidden_states", ex.hidden_states, ref.decoder_hidden_states),
            ("decoder_attentions", ex.attentions, ref.decoder_attentions),
            ("cross_attentions", ex.cross_attentions, ref.cross_attentions)):
        assert len(ours) == len(theirs), name
        for i, (a, t) in enumerate(zip(ours, theirs)):
            assert rel_err(a, to_np(t)) < TOL, (name, i)
    # logits_hidden / unembedding reproduce the logits
    w, bias = model.unembedding()
    np.testing.assert_allclose(np.asarray(ex.logits_hidden @ w + bias), np.asarray(logits),
                               rtol=1e-5, atol=1e-5)

    # incremental decoding with the cache == teacher forcing (valid positions)
    inc, cache = _incremental(model, b, 8)
    assert all(a.shape[0] == 3 for a in jax.tree.leaves(cache["layers"]))
    assert int(cache["index"]) == b["decoder_input_ids"].shape[1]
    assert rel_err(inc, logits, b["decoder_attention_mask"]) < TOL

    # round trip: kd_flax → save_pretrained → transformers, no missing/unexpected keys
    out = tmp_path / "roundtrip"
    models.save_pretrained(model, out)
    cls = type(tm)
    tm2, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    want_sd, got_sd = tm.state_dict(), tm2.state_dict()
    assert want_sd.keys() == got_sd.keys()
    for k in want_sd:
        if k == "model.shared.weight" and not tm.config.tie_word_embeddings:
            continue  # unused by transformers 5 when untied; kd_flax writes the encoder table
        torch.testing.assert_close(got_sd[k], want_sd[k], rtol=0, atol=0, msg=k)
    assert rel_err(to_np(torch_forward(tm2.eval(), b).logits), logits) < TOL
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == model_type


def _stack_like(src: nnx.Module, dst: nnx.Module):
    """Copy an unscanned model's params into a `scan_layers=True` model."""
    flat = dict(nnx.to_flat_state(nnx.state(src)))
    state = nnx.state(dst)
    for path, var in nnx.to_flat_state(state):
        if "layers" in path:
            i = path.index("layers") + 1
            n = var.get_value().shape[0]
            var.set_value(jnp.stack([flat[path[:i] + (j,) + path[i:]].get_value() for j in range(n)]))
        else:
            var.set_value(flat[path].get_value())
    nnx.update(dst, state)


def test_scan_and_remat_match_unscanned():
    cfg = models.tiny_config("mbart")
    ref_model = models.create_model(cfg, nnx.Rngs(0))
    ref_model.final_logits_bias.set_value(
        jax.random.normal(jax.random.key(3), ref_model.final_logits_bias.get_value().shape))
    model = models.create_model(cfg.replace(scan_layers=True, remat="full"), nnx.Rngs(1))
    leaf = model.encoder.layers.fc1.kernel
    assert leaf.get_value().shape[0] == cfg.encoder_layers
    assert layers.logical_axes_of(leaf) == ("layers", "embed", "mlp")
    _stack_like(ref_model, model)
    # the same tensors come out of save_pretrained either way
    a, s = hf.export_tensors(ref_model), hf.export_tensors(model)
    assert a.keys() == s.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], s[k])

    b = make_batch(1, vocab=cfg.vocab_size, pad_id=cfg.pad_token_id,
                   start_id=cfg.decoder_start_token_id, low=3)
    args = {k: jnp.asarray(v) for k, v in b.items()}
    want = ref_model(**args)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def loss_and_grad(params, rest):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(**args)
            return logits.mean(), logits
        return jax.value_and_grad(loss, has_aux=True)(params)

    (_, got), grads = loss_and_grad(params, rest)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    # gradients flow through scan + remat into the stacked params
    g = grads["encoder"]["layers"]["fc1"]["kernel"].get_value()
    assert g.shape[0] == cfg.encoder_layers
    assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) > 0

    # cached decoding in scanned mode: leaves stay batch-first, heads-major ([B, layers, H, L, Dh])
    inc, cache = _incremental(model, b, 6)
    assert cache["layers"]["self"]["v"].shape[:4] == (3, cfg.decoder_layers, cfg.decoder_attention_heads, 6)
    assert cache["layers"]["cross"]["k"].shape[-1] == b["input_ids"].shape[1]  # cross keys: [B, layers, H, Dh, S]
    assert rel_err(inc, want, b["decoder_attention_mask"]) < TOL


def test_sharded_forward_matches_single_device():
    cfg = models.tiny_config("marian", share_encoder_decoder_embeddings=False,
                             tie_word_embeddings=False)
    model = models.create_model(cfg, nnx.Rngs(0))
    for _, var in nnx.to_flat_state(nnx.state(model)):
        axes = layers.logical_axes_of(var)
        assert axes is not None and len(axes) == var.get_value().ndim
    b = make_batch(2, vocab=cfg.vocab_size, pad_id=cfg.pad_token_id,
                   start_id=cfg.decoder_start_token_id, low=1)
    b = {k: jnp.asarray(np.concatenate([v] * 3)[:8]) for k, v in b.items()}  # batch 8
    want = model(**b)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    rules = sharding.DEFAULT_RULES
    sharded = sharding.shard_model(model, mesh, rules)
    graphdef, state = nnx.split(sharded)
    in_sh = sharding.batch_sharding(mesh, rules)

    @jax.jit
    def fwd(state, batch):
        return nnx.merge(graphdef, state)(**batch)

    with jax.set_mesh(mesh):
        got = fwd(state, {k: jax.device_put(v, in_sh) for k, v in b.items()})
    spec = state["decoder"]["layers"][0]["fc1"]["kernel"].get_value().sharding.spec
    assert tuple(spec) == ("fsdp", "model")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_sinusoidal_table_matches_transformers():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    for dim in (16, 7):
        emb = MarianSinusoidalPositionalEmbedding(50, dim)
        np.testing.assert_array_equal(bart.sinusoidal_table(50, dim), to_np(emb.create_weight()))


def test_config_round_trip_and_errors():
    import transformers as tf

    for model_type in bart.MODEL_TYPES:
        c = models.tiny_config(model_type)
        hf_dict = c.to_hf()
        cls = {"bart": tf.BartConfig, "mbart": tf.MBartConfig, "marian": tf.MarianConfig}[model_type]
        back = bart.BartConfig.from_hf(cls(**hf_dict).to_dict())
        assert back.replace(hf_extra=()) == c.replace(hf_extra=())
    # HF extras (OPUS-MT generation settings) survive and become generation defaults
    c = bart.BartConfig.from_hf(dict(models.tiny_config("marian").to_hf(), num_beams=4,
                                     bad_words_ids=[[98]]))
    assert c.to_hf()["num_beams"] == 4
    assert models.create_model(c).generation_config["bad_words_ids"] == [[98]]
    # Marian never generates <pad> by default (CTranslate2 cannot: it drops that row); BART may
    assert models.create_model(models.tiny_config("marian")).generation_config["bad_words_ids"] == [[98]]
    assert decoding.resolve_settings(models.create_model(models.tiny_config("marian")),
                                     max_new_tokens=2).suppress_tokens == (98,)
    assert "bad_words_ids" not in models.create_model(models.tiny_config("bart")).generation_config
    # mBART with no decoder_start_token_id starts from </s>
    assert bart.BartConfig.from_hf(dict(models.tiny_config("mbart").to_hf(),
                                        decoder_start_token_id=None)).decoder_start_token_id == 2
    with pytest.raises(ValueError, match="model_type"):
        bart.BartConfig.from_hf({"model_type": "t5"})
    with pytest.raises(ValueError, match="activation_function"):
        models.tiny_config("bart", activation_function="nope")
    with pytest.raises(ValueError, match="encoder_attention_heads"):
        models.tiny_config("bart", encoder_attention_heads=5)
    with pytest.raises(ValueError, match="no field"):
        models.tiny_config("bart").replace(n_layers=3)
    model = models.create_model(models.tiny_config("bart", max_position_embeddings=8))
    ids = jnp.ones((1, 9), jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.encode(ids, jnp.ones_like(ids))
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(input_ids=ids[:, :4])


@pytest.mark.parametrize("model_type", ["bart", "mbart", "marian"])
def test_from_scratch_config_forces_the_tokenizers_eos(model_type):
    """A BART-family model built for a kd_flax tokenizer (pad 0, eos 1, unk 2) forces that EOS
    at the length limit, not HF's default id 2 (BART's </s>, here <unk>); an explicit value
    (None: no forcing) is kept."""
    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def __len__(self):
            return 100

    spec = dict(model_type=model_type, d_model=16, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    cfg = models.config_from_dict(spec, Tok())
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.forced_eos_token_id) == (0, 1, 1)
    assert models.config_from_dict(dict(spec, forced_eos_token_id=None), Tok()).forced_eos_token_id is None
    settings = decoding.resolve_settings(models.create_model(cfg, nnx.Rngs(0)), max_new_tokens=4)
    assert settings.forced_eos_token_id == (1,)
