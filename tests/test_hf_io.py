"""Hugging Face checkpoint interop: save → transformers loads → same logits; load errors
name the tensor; sharded safetensors index; generation config; tokenizers."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from kd_flax.models import create_model, hf, load_pretrained, load_tokenizer, save_pretrained, tiny_config, train_tokenizer
from tests.model_fixtures import make_batch, make_hf_model, rel_err, to_np, torch_forward


def _flat(model):
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}


@pytest.fixture(scope="module")
def v10_ckpt(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("hfio"), "t5")


@pytest.mark.parametrize("overrides", [{}, {"feed_forward_proj": "gated-gelu"}], ids=["v1_0", "v1_1"])
def test_save_pretrained_loads_in_transformers(tmp_path, overrides, caplog):
    import transformers

    cfg = tiny_config("t5", vocab_size=96, **overrides)
    model = create_model(cfg, nnx.Rngs(3))
    model.generation_config = {**model.generation_config, "num_beams": 4, "max_new_tokens": 17}
    tok = train_tokenizer(["a cat sat on the mat", "two dogs run in a park", "the sun is hot"] * 10, 60)
    save_pretrained(model, tmp_path / "out", tokenizer=tok)
    with caplog.at_level(logging.WARNING):
        tmodel, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [r for r in caplog.records if "missing" in r.getMessage().lower()]
    assert tmodel.generation_config.num_beams == 4 and tmodel.generation_config.max_new_tokens == 17
    tmodel.eval()
    b = make_batch(5, vocab=96)
    ours = nnx.jit(lambda m, b: m(**b))(model, {k: jnp.asarray(v) for k, v in b.items()})
    assert rel_err(ours, to_np(torch_forward(tmodel, b).logits), b["decoder_attention_mask"]) < 1e-4
    # back into kd_flax: identical parameters and generation config
    again = load_pretrained(tmp_path / "out")
    assert again.config == cfg
    assert again.generation_config["num_beams"] == 4
    a, c = _flat(model), _flat(again)
    assert a.keys() == c.keys() and all(np.array_equal(a[k], c[k]) for k in a)
    # the tokenizer saved beside the model reloads through AutoTokenizer
    t2 = load_tokenizer(tmp_path / "out")
    assert t2("a cat").input_ids == tok("a cat").input_ids and t2("a cat").input_ids[-1] == t2.eos_token_id


def test_scanned_model_exports_same_tensors(v10_ckpt, tmp_path):
    path, _ = v10_ckpt
    plain, scanned = load_pretrained(path), load_pretrained(path, scan_layers=True)
    t0, t1 = hf.export_tensors(plain), hf.export_tensors(scanned)
    assert t0.keys() == t1.keys()
    assert all(np.array_equal(t0[k], t1[k]) for k in t0)
    ref = load_file(path / "model.safetensors")
    assert set(ref) == set(t0) and all(np.array_equal(ref[k], t0[k]) for k in ref)


def _copy_ckpt(src, dst, tensors, config_patch=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config_patch or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_load_errors_name_the_tensor(v10_ckpt, tmp_path):
    path, _ = v10_ckpt
    tensors = load_file(path / "model.safetensors")
    name = "decoder.block.1.layer.1.EncDecAttention.k.weight"

    missing = dict(tensors)
    del missing[name]
    with pytest.raises(ValueError, match="missing.*" + name.replace(".", r"\.")):
        load_pretrained(_copy_ckpt(path, tmp_path / "missing", missing))

    extra = dict(tensors, **{"encoder.block.9.layer.0.SelfAttention.q.weight": tensors[name]})
    with pytest.raises(ValueError, match=r"unexpected.*encoder\.block\.9\.layer\.0\.SelfAttention\.q\.weight"):
        load_pretrained(_copy_ckpt(path, tmp_path / "extra", extra))

    bad = dict(tensors, **{name: tensors[name][:, :-1].copy()})
    with pytest.raises(ValueError, match=name.replace(".", r"\.") + ".*shape"):
        load_pretrained(_copy_ckpt(path, tmp_path / "shape", bad))

    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        load_pretrained(_copy_ckpt(path, tmp_path / "arch", tensors, {"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="no field"):
        load_pretrained(path, num_layerz=3)
    with pytest.raises(ValueError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_sharded_index_and_dtype(v10_ckpt, tmp_path):
    path, tmodel = v10_ckpt
    tensors = load_file(path / "model.safetensors")
    names = sorted(tensors)
    dst = tmp_path / "sharded"
    dst.mkdir()
    (dst / "config.json").write_text((path / "config.json").read_text())
    (dst / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 0, "num_beams": 3}))
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, dst / fname)
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    a, c = _flat(load_pretrained(path)), _flat(load_pretrained(dst))
    assert all(np.array_equal(a[k], c[k]) for k in a)
    bf = load_pretrained(dst, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    assert bf.generation_config["num_beams"] == 3
    assert all(v.get_value().dtype == jnp.bfloat16 for _, v in nnx.to_flat_state(nnx.state(bf)))
    b = make_batch(6, vocab=96)
    lg = nnx.jit(lambda m, b: m(**b))(bf, {k: jnp.asarray(v) for k, v in b.items()})
    assert lg.dtype == jnp.float32
    assert rel_err(lg, to_np(torch_forward(tmodel, b).logits), b["decoder_attention_mask"]) < 5e-2


def test_tokenizer_bpe_bart_style(tmp_path):
    tok = train_tokenizer(["hello world", "hello there", "world peace"] * 10, 40, tmp_path / "tok",
                          kind="bpe", style="bart")
    t2 = load_tokenizer(tmp_path / "tok")
    ids = t2("hello world").input_ids
    assert ids[0] == t2.bos_token_id == 0 and ids[-1] == t2.eos_token_id == 2 and t2.pad_token_id == 1
    assert t2.decode(ids, skip_special_tokens=True) == "hello world"
    with pytest.raises(ValueError, match="kind"):
        train_tokenizer(["x"], 40, kind="wordpiece")


def test_remote_code_path_copies_each_file(v10_ckpt, monkeypatch):
    """Non-local paths (gs://) go through etils.epath + a temp copy per safetensors file;
    exercised here by treating the local dir as remote."""
    path, _ = v10_ckpt
    copies = []
    orig = hf._LocalCopy.__enter__

    def spy(self):
        local = orig(self)
        copies.append(local)
        return local

    monkeypatch.setattr(hf, "_is_local", lambda p: False)
    monkeypatch.setattr(hf._LocalCopy, "__enter__", spy)
    a, c = _flat(load_pretrained(path)), None
    monkeypatch.undo()
    c = _flat(load_pretrained(path))
    assert len(copies) == 1 and copies[0] != str(path / "model.safetensors")
    assert all(np.array_equal(a[k], c[k]) for k in a)
