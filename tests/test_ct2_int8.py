"""`student.quant.scheme = "ctranslate2_int8"`: kd_flax's fake-quant forward is what CTranslate2's
int8 runs (CTranslate2 itself converts and runs the student)."""

from __future__ import annotations

import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kd_flax import export, quant  # noqa: E402
from tests.ct2_fixtures import batch_from_texts, corpus, ct2_hyps, kd_flax_hyps, train_student  # noqa: E402

CT2_Q = {"scheme": "ctranslate2_int8", "weight_bits": 8, "act_bits": 8, "granularity": "channel"}
DEFAULT_Q = dict(CT2_Q, scheme="default")


def _ct2_convert(w_rows):
    """CTranslate2's own int8 quantization of a [out, in] weight: (int8 codes, scales)."""
    from ctranslate2.specs import common_spec
    spec = common_spec.LinearSpec()
    spec.weight = np.ascontiguousarray(w_rows, np.float32)
    spec.validate()
    spec._quantize("int8")
    return spec.weight.numpy(), spec.weight_scale.numpy()


def test_weight_codes_are_ctranslate2s_and_survive_its_requantization():
    w = np.random.default_rng(0).normal(size=(24, 16)).astype(np.float32)  # kd_flax kernel [in, out]
    w[:, 3] = 0.0  # an all-zero output row
    w[:, 7] = 0.0
    w[:4, 7] = [127.0, 0.5, 1.5, -2.5]  # scale 1: ties, rounded half to even (0, 2, -2)
    codes, scales = _ct2_convert(w.T)
    q, s, _ = quant._codes(jnp.asarray(w), 8, -1, "ctranslate2")
    np.testing.assert_array_equal(np.asarray(q).T, codes)
    assert codes[7, :4].tolist() == [127, 0, 2, -2]
    np.testing.assert_array_equal(np.asarray(s)[0], scales)
    # The export path: CTranslate2 re-quantizes kd_flax's dequantized weights to the same codes.
    (rule,) = [r for r in quant.rules_for(None, CT2_Q) if r.pattern.endswith("kernel")]
    wq = np.asarray(quant.apply_rule(jnp.asarray(w), rule))
    codes2, _ = _ct2_convert(wq.T)
    np.testing.assert_array_equal(codes2, codes)
    assert np.all(wq[:, 3] == 0)


def test_row_activation_quant_is_per_token_with_ste():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 8)).astype(np.float32))
    x = x.at[0, 1].set(0.0)
    y = quant.fake_quant_activation(x, 8, "row")
    amax = jnp.max(jnp.abs(x), -1, keepdims=True)
    codes = np.asarray(y * jnp.where(amax > 0, 127.0 / amax, 1.0))
    np.testing.assert_allclose(codes, np.rint(codes), atol=1e-4)  # on each row's own grid
    np.testing.assert_allclose(np.asarray(jnp.max(jnp.abs(y), -1)), np.asarray(amax[..., 0]), rtol=1e-6)
    assert float(jnp.abs(y[0, 1]).max()) == 0.0
    tensor = quant.fake_quant_activation(x, 8, "tensor")
    assert not np.array_equal(np.asarray(tensor), np.asarray(y))
    g = jax.grad(lambda v: jnp.sum(quant.fake_quant_activation(v, 8, "row") * 3.0))(x)
    np.testing.assert_array_equal(np.asarray(g), 3.0)
    with pytest.raises(ValueError, match="granularity"):
        quant.fake_quant_activation(x, 8, "channel")


def test_scheme_config_checks():
    from kd_flax import config_base
    assert quant.act_config(CT2_Q) == {"act_quant_bits": 8, "act_quant_granularity": "row"}
    assert quant.act_config(DEFAULT_Q)["act_quant_granularity"] == "tensor"
    cfg = config_base.base_config()
    cfg.student.quant.scheme = "ctranslate2_int8"
    cfg.student.quant.weight_bits = 4
    with pytest.raises(config_base.ConfigError, match="ctranslate2_int8.*weight_bits=8"):
        config_base.validate(cfg, check_paths=False)
    cfg.student.quant.scheme = "intgemm"
    with pytest.raises(config_base.ConfigError, match="student.quant.scheme"):
        config_base.validate(cfg, check_paths=False)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    d = tmp_path_factory.mktemp("t5_ct2_int8")
    model, tok = train_student("t5", d / "hf", steps=60, quant=CT2_Q)
    export.to_ctranslate2(d / "hf", d / "ct2", "int8")
    return model, tok, d


def _kd_flax_forward(model, tok, src):
    b = batch_from_texts(tok, src, src, model.config.decoder_start_token_id, length=12)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                   decoder_input_ids=b["decoder_input_ids"])
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), -1)), b


def _ct2_teacher_forced(tr, tok, src, b):
    """CTranslate2's argmax after every gold prefix (greedy, one step) and its log-probs of the
    gold tokens (`score_batch`), positions where `decoder_attention_mask` is set."""
    labels, mask = b["labels"], b["decoder_attention_mask"]
    toks = [tok.convert_ids_to_tokens(x) for x in tok(src)["input_ids"]]
    argmax = np.full(labels.shape, -1)
    for t in range(labels.shape[1]):
        rows = [i for i in range(len(src)) if mask[i, t]]
        if not rows:
            break
        prefixes = [tok.convert_ids_to_tokens([int(v) for v in labels[i, :t]]) for i in rows]
        res = tr.translate_batch([toks[i] for i in rows], target_prefix=prefixes, beam_size=1,
                                 max_decoding_length=t + 1, return_end_token=True)
        for i, r in zip(rows, res):
            ids = tok.convert_tokens_to_ids(r.hypotheses[0])
            argmax[i, t] = ids[t]
    gold = [tok.convert_ids_to_tokens([int(v) for v in labels[i][mask[i] > 0]]) for i in range(len(src))]
    logp = [np.asarray(s.log_probs) for s in tr.score_batch(toks, gold)]
    return argmax, logp


def _agreement(lp, b, ct_argmax, ct_logp):
    mask = b["decoder_attention_mask"] > 0
    same = (lp.argmax(-1) == ct_argmax)[mask]
    n = mask.sum(-1)  # the gold tokens (EOS included); score_batch also scores one more EOS
    diffs = np.concatenate([np.abs(ct_logp[i][: n[i]] - lp[i, np.arange(n[i]), b["labels"][i, : n[i]]])
                            for i in range(len(ct_logp))])
    return float(same.mean()), int(same.size), float(diffs.mean())


def test_ctranslate2_int8_scheme_matches_ctranslate2_int8(student):
    from kd_flax import models
    model, tok, d = student
    tr = ctranslate2.Translator(str(d / "ct2"), device="cpu", compute_type="int8")
    src = corpus(32, 7)
    ct_argmax, ct_logp = _ct2_teacher_forced(tr, tok, src, _kd_flax_forward(model, tok, src)[1])
    lp, b = _kd_flax_forward(model, tok, src)
    same, n, dlogp = _agreement(lp, b, ct_argmax, ct_logp)
    # The same weights under kd_flax's default 8-bit fake-quant (per-tensor activations, its
    # own weight rounding): what a default-scheme student is trained and scored with.
    dflt = models.load_pretrained(d / "hf", **quant.act_config(DEFAULT_Q))
    dflt_lp, _ = _kd_flax_forward(_requantized(dflt, DEFAULT_Q), tok, src)
    same_d, _, dlogp_d = _agreement(dflt_lp, b, ct_argmax, ct_logp)
    print(f"\nteacher-forced vs CTranslate2 int8 ({n} positions): ctranslate2_int8 argmax {same:.4f}, "
          f"mean |dlogp| {dlogp:.2e}; default argmax {same_d:.4f}, mean |dlogp| {dlogp_d:.2e}")
    assert same >= 0.99
    assert dlogp < dlogp_d / 10  # the scheme is CTranslate2's arithmetic, the default is not
    assert same >= same_d
    kd = kd_flax_hyps(model, tok, src, 1)
    ct = ct2_hyps(d / "ct2", tok, src, 1, compute_type="int8")
    assert any(len(h) > 2 for h in kd)
    whole = np.mean([a == c for a, c in zip(kd, ct)])
    whole_d = np.mean([a == c for a, c in zip(kd_flax_hyps(dflt, tok, src, 1), ct)])
    print(f"greedy sentences identical to CTranslate2 int8: ctranslate2_int8 {whole:.4f}, default {whole_d:.4f}")
    assert whole >= 0.95


def _requantized(model, qcfg):
    from flax import nnx
    nnx.update(model, quant.quantize_params(nnx.state(model, nnx.Param), quant.rules_for(model, qcfg)))
    return model


def test_evaluate_scores_the_ctranslate2_model(student, tmp_path, monkeypatch):
    """`evaluate` with `export.ctranslate2` set converts the student itself (evaluate runs before
    export) and adds the row `student_ct2_int8`: size on disk, BLEU, chrF, sentences/s. Its
    `student` row decodes the saved student (whose config.json keeps no activation fields) under
    the scheme's per-row activation fake-quant, i.e. the very forward CTranslate2 int8 runs."""
    import json
    import shutil

    import sacrebleu

    from kd_flax import config_base, evaluate, translate
    model, tok, d = student
    decoded = []

    class Recording(translate.Translator):
        def __init__(self, m, *a, **kw):
            decoded.append(m)
            super().__init__(m, *a, **kw)

    monkeypatch.setattr(translate, "Translator", Recording)
    wd = tmp_path / "wd"
    shutil.copytree(d / "hf", wd / "distill" / "model")
    src = corpus(24, 11)
    split = tmp_path / "test0.jsonl"
    split.write_text("".join(json.dumps({"src": s, "ref": s}) + "\n" for s in src))
    config = config_base.base_config()
    config.data.test = [str(split)]
    config.data.bucket_boundaries = (16,)
    config.student.quant.update(CT2_Q)
    config.export.ctranslate2 = "int8"
    config.evaluate.update(splits=[], models=["student"], num_beams=1, max_new_tokens=12, batch_size=8)
    res = evaluate.run(config, str(wd))
    row = res["models"]["student_ct2_int8"]
    out = wd / "evaluate"
    assert row["size_mb"] * 2**20 == (out / "ct2" / "model.bin").stat().st_size
    assert row["size_mb"] < row["parameters"] * 4 / 2**20 / 2  # int8 codes: well under float32
    assert row["weight_bits"] == 8 and row["engine"] == "ctranslate2"
    assert row["speed"]["sentences_per_s"] > 0
    hyps = (out / "hyps" / "student_ct2_int8" / "test0.txt").read_text().split("\n")[: len(src)]
    # The same sentences CTranslate2 gives for the fixture's own int8 conversion of the student.
    direct = ct2_hyps(d / "ct2", tok, src, 1, compute_type="int8")
    assert hyps == [tok.decode(h, skip_special_tokens=True).strip() for h in direct]
    # CTranslate2 leaves EOS out of its hypotheses: 12 tokens (max_new_tokens) means no EOS came.
    hit = sum(len(h) >= 12 for h in direct)
    assert row["hit_max_new_tokens"] == {"count": hit, "share": pytest.approx(hit / len(src))}
    assert row["bleu"]["per_split"] == [pytest.approx(sacrebleu.corpus_bleu(hyps, [src]).score)]
    assert row["chrf"]["per_split"] == [pytest.approx(sacrebleu.corpus_chrf(hyps, [src]).score)]
    assert sum(len(h.split()) > 1 for h in hyps) >= len(hyps) // 2  # sentences, not EOS or noise tokens
    report = (out / "report.md").read_text()
    assert "| student_ct2_int8" in report
    # The student row: the trained (in-memory) model's forward, activation fake-quant included,
    # and so CTranslate2's sentences, all of them (the demo's 1463/1500 came from float activations).
    (m,) = decoded
    assert (m.config.act_quant_bits, m.config.act_quant_granularity) == (8, "row")
    np.testing.assert_allclose(_kd_flax_forward(m, tok, src)[0], _kd_flax_forward(model, tok, src)[0], atol=2e-5)
    assert (out / "hyps" / "student" / "test0.txt").read_text().split("\n")[: len(src)] == hyps
    print(f"\nevaluate: student BLEU {res['models']['student']['bleu']['mean']:.1f} "
          f"({res['models']['student']['size_mb'] * 2**20:.0f} B), student_ct2_int8 BLEU {row['bleu']['mean']:.1f} "
          f"({row['size_mb'] * 2**20:.0f} B, {row['speed']['sentences_per_s']:.0f} sentences/s)")
