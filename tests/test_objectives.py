"""kd_flax.objectives: the KD-loss table, LossSpec, and the row/token weighting (pad rows that
`data.batches` adds to fill a batch count in no term, in training nor in the dev loss)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kd_flax import config_base, losses, models, objectives
from kd_flax import student as S
from kd_flax import train as T

V = 48


def tiny(layers=2, seed=0):
    cfg = models.tiny_config("t5", vocab_size=V, d_model=16, d_kv=4, d_ff=32, num_heads=4,
                             encoder_layers=layers, decoder_layers=layers)
    return models.create_model(cfg, nnx.Rngs(seed))


def real_batch(seed, b=6, s=7, t=6):
    rng = np.random.default_rng(seed)
    src_len = rng.integers(2, s + 1, (b, 1))
    tgt_len = rng.integers(2, t + 1, (b, 1))
    src_mask = (np.arange(s)[None] < src_len).astype(np.int32)
    dec_mask = (np.arange(t)[None] < tgt_len).astype(np.int32)
    src = rng.integers(3, V, (b, s)).astype(np.int32) * src_mask
    lab = rng.integers(3, V, (b, t)).astype(np.int32) * dec_mask
    dec_in = np.concatenate([np.zeros((b, 1), np.int32), lab[:, :-1]], 1) * dec_mask
    return {"input_ids": src, "attention_mask": src_mask, "labels": lab, "decoder_input_ids": dec_in,
            "decoder_attention_mask": dec_mask, "loss_mask": dec_mask.astype(np.float32)}


def with_pad_rows(batch, n):
    """What `data.batches` does to fill a fixed batch: `n` copies of row 0, `loss_mask` 0."""
    out = {k: np.concatenate([v, np.repeat(v[:1], n, 0)]) for k, v in batch.items()}
    out["loss_mask"][-n:] = 0.0
    return out


def tcfg(**loss):
    base = {"ce_weight": 1.0, "label_smoothing": 0.1, "smoothing": "fairseq", "kd_weight": 0.0,
            "kd_type": "kl", "temperature": 2.0, "lam": 0.5, "beta": 0.5, "fused": False,
            "hidden_weight": 0.0, "attention_weight": 0.0}
    base.update(loss)
    return ml_collections.ConfigDict({
        "steps": 10, "batch_size": 8, "grad_accum": 1,
        "optimizer": {"name": "adamw", "learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant",
                      "weight_decay": 0.0, "grad_clip_norm": 0.0, "b1": 0.9, "b2": 0.98},
        "loss": base})


def params_of(m):
    return nnx.state(m, nnx.Param)


# ---------------------------------------------------------------------------- the table


def test_kd_table_is_the_one_list_of_kd_types():
    assert set(objectives.KD_LOSSES) == {"kl", "interpolated", "reverse_kl", "jsd", "topk"}
    with pytest.raises(ValueError, match=r"loss.kd_type: 'nope' is not allowed; allowed values: \['kl'"):
        objectives.LossSpec.from_config({"kd_type": "nope"})
    c = config_base.base_config()
    c.distill.loss.kd_type = "nope"
    with pytest.raises(config_base.ConfigError, match="distill.loss.kd_type: 'nope' is not allowed"):
        config_base.validate(c, check_paths=False)
    with pytest.raises(TypeError):  # read-only: a table, not a registry to patch at run time
        objectives.KD_LOSSES["mine"] = objectives.KD_LOSSES["kl"]


def test_kd_table_entries_call_the_pure_losses():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, V)).astype(np.float32), rng.normal(size=(2, 5, V)).astype(np.float32)
    labels = rng.integers(0, V, (2, 5)).astype(np.int32)
    w = (rng.random((2, 5)) > 0.3).astype(np.float32)
    spec = objectives.LossSpec(temperature=1.5, lam=0.3, beta=0.2, topk=4)
    teacher = objectives.TeacherOutput(logits=t)
    lp, ids = jax.lax.top_k(jax.nn.log_softmax(t), 4)
    want = {"kl": losses.kd_kl(s, t, w, temperature=1.5),
            "interpolated": losses.interpolated_kl(s, t, labels, w, lam=0.3, temperature=1.5),
            "reverse_kl": losses.reverse_kl(s, t, w, temperature=1.5),
            "jsd": losses.generalized_jsd(s, t, w, beta=0.2, temperature=1.5),
            "topk": losses.topk_kd(s, lp, ids, w, temperature=1.5)}
    for name, fn in objectives.KD_LOSSES.items():
        np.testing.assert_allclose(np.asarray(fn(s, teacher, labels, w, spec)), np.asarray(want[name]),
                                   rtol=1e-6, err_msg=name)
    # cached top-k wins over the logits
    cached = objectives.TeacherOutput(logits=t, topk_logprobs=lp[..., :2], topk_ids=ids[..., :2])
    np.testing.assert_allclose(np.asarray(objectives.KD_LOSSES["topk"](s, cached, labels, w, spec)),
                               np.asarray(losses.topk_kd(s, lp[..., :2], ids[..., :2], w, temperature=1.5)),
                               rtol=1e-6)


# ---------------------------------------------------------------------------- pad rows


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_ce_kd_on_a_padded_batch_matches_float64_numpy_over_real_rows():
    teacher, student = tiny(2, 0), tiny(1, 1)
    spec = objectives.LossSpec(ce_weight=1.0, kd_weight=0.5, temperature=2.0)
    b = with_pad_rows(real_batch(0), 2)
    terms = objectives.loss_terms(student, b, teacher, spec=spec)
    got = float(objectives.combine(terms, spec))
    fwd = {k: b[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    ls, lt = _log_softmax64(student(**fwd)), _log_softmax64(teacher(**fwd))
    w = b["decoder_attention_mask"] * b["loss_mask"]  # pad rows: 0
    nll = -np.take_along_axis(ls, b["labels"][..., None], -1)[..., 0]
    ce = (nll * w).sum() / w.sum()
    ps, pt = _log_softmax64(np.asarray(student(**fwd)) / 2.0), _log_softmax64(np.asarray(teacher(**fwd)) / 2.0)
    kl = 4.0 * (np.exp(pt) * (pt - ps)).sum(-1)
    kd = (kl * w).sum() / w.sum()
    np.testing.assert_allclose(got, ce + 0.5 * kd, rtol=1e-5)
    assert float(terms["ce"][1]) == w.sum() == real_batch(0)["decoder_attention_mask"].sum()


@pytest.mark.parametrize("loss", [
    {"kd_weight": 0.5},                                          # CE + word-level KD
    {"hidden_weight": 0.5, "attention_weight": 0.5},             # CE + hidden + attention maps
])
def test_pad_rows_change_neither_loss_nor_gradients(loss):
    """The same rows with two pad rows added (as `data.batches` fills a batch): the same loss
    and the same gradients, term by term."""
    teacher = tiny(2, 0)
    student, info = S.make_student(teacher, 1, 1, layer_map={"encoder": [1], "decoder": [1]})
    spec = objectives.LossSpec.from_config(tcfg(**loss).loss)
    g, p, rest = T.split_model(student)
    tg, tp, trest = T.split_model(teacher)

    def value_and_grad(batch):
        def f(params):
            terms = objectives.loss_terms(nnx.merge(g, params, rest), batch, nnx.merge(tg, tp, trest),
                                          spec=spec, layer_map=info)
            return objectives.combine(terms, spec), terms
        return jax.value_and_grad(f, has_aux=True)(p)

    b = real_batch(1)
    (l0, t0), g0 = value_and_grad(b)
    (l1, t1), g1 = value_and_grad(with_pad_rows(b, 2))
    assert set(t0) == {"ce"} | {k for k in ("kd", "hidden", "attention") if loss.get(k + "_weight")}
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for k in t0:
        np.testing.assert_allclose(np.asarray(t1[k]), np.asarray(t0[k]), rtol=1e-5, err_msg=k)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-4, atol=1e-7)


def test_train_and_eval_steps_ignore_pad_rows():
    """Through `train.make_train_step` / `make_eval_step` (the APIs the stages use): loss,
    terms, gradient norm and the dev loss agree with the batch without pad rows."""
    teacher, student = tiny(2, 0), tiny(1, 1)
    cfg = tcfg(kd_weight=0.5)
    step = T.make_train_step(student, cfg, teacher=teacher)
    b = real_batch(2)
    out = [step(T.init_train_state(params_of(student), cfg), batch, params_of(teacher))
           for batch in (b, with_pad_rows(b, 2))]
    (_, m0), (_, m1) = out
    # (the updated params are not compared: Adam's first step is lr·g/(|g|+eps), which turns
    # float noise in near-zero gradient entries into visible differences)
    for k in ("loss", "grad_norm", "ce", "kd"):
        np.testing.assert_allclose(np.asarray(m1[k]), np.asarray(m0[k]), rtol=1e-5, err_msg=k)
    ev = T.make_eval_step(student)
    e0, e1 = ev(params_of(student), b), ev(params_of(student), with_pad_rows(b, 2))
    np.testing.assert_allclose(np.asarray(e1), np.asarray(e0), rtol=1e-6)


def test_row_and_token_weights():
    b = with_pad_rows(real_batch(3, b=3), 1)
    np.testing.assert_array_equal(np.asarray(objectives.row_weights(b)), [1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(objectives.token_weights(b)),
                                  b["decoder_attention_mask"] * b["loss_mask"])
    per_row = dict(b, loss_mask=np.array([1, 0, 1, 1], np.float32))  # one weight a row also works
    np.testing.assert_array_equal(np.asarray(objectives.row_weights(per_row)), [1, 0, 1, 1])
    np.testing.assert_array_equal(np.asarray(objectives.token_weights(per_row))[1], 0)
    no_mask = {k: v for k, v in b.items() if k != "loss_mask"}  # all rows count
    np.testing.assert_array_equal(np.asarray(objectives.row_weights(no_mask)), [1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(objectives.token_weights(no_mask)), b["decoder_attention_mask"])


@pytest.mark.parametrize("kd_type", ["kl", "topk"])
def test_word_kd_skips_the_positions_ce_ignores(kd_type):
    """Labels of -100 (HF's ignore id) under a live decoder mask: CE skips those positions, and
    word-level KD skips them too — the same terms as masking them out; the hidden-state term
    keeps its own weights (the decoder mask)."""
    teacher = tiny(2, 0)
    student, info = S.make_student(teacher, 1, 1, layer_map={"encoder": [1], "decoder": [1]})
    spec = objectives.LossSpec(ce_weight=1.0, kd_weight=0.5, kd_type=kd_type, topk=4, temperature=1.0,
                               hidden_weight=0.5)
    b = real_batch(2)
    ignored = {k: v.copy() for k, v in b.items()}
    ignored["labels"][:, 1] = -100  # position 1 is live in every row of real_batch
    masked = {k: v.copy() for k, v in b.items()}
    masked["loss_mask"][:, 1] = 0.0
    t_ign = objectives.loss_terms(student, ignored, teacher, spec=spec, layer_map=info)
    t_msk = objectives.loss_terms(student, masked, teacher, spec=spec, layer_map=info)
    t_all = objectives.loss_terms(student, b, teacher, spec=spec, layer_map=info)
    for k in ("ce", "kd"):
        np.testing.assert_allclose(np.asarray(t_ign[k]), np.asarray(t_msk[k]), rtol=1e-5, err_msg=k)
    assert float(t_ign["kd"][1]) == float(t_all["kd"][1]) - b["decoder_attention_mask"][:, 1].sum()
    np.testing.assert_allclose(np.asarray(t_ign["hidden"]), np.asarray(t_all["hidden"]), rtol=1e-6)
