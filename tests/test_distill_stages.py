"""`stages.run_distill`: what each `distill.stages` entry trains with (bug 2: a
`quant: False` stage used to be fake-quantized like the others)."""

import json

import jax
import numpy as np
from flax import nnx

from kd_flax import models, quant, stages, synthetic, train
from test_config import load_recipe


def _corpus(path, n, seed):
    with open(path, "w") as f:
        for e in synthetic.SyntheticTask().sample(n, split_seed=seed):
            f.write(json.dumps({"src": e["src"], "ref": e["ref"]}) + "\n")
    return str(path)


def test_float_stage_trains_unquantized_then_the_quant_stage_quantized(tmp_path, tiny_teacher_dir, monkeypatch):
    """marian_enro's "float, then 8-bit" recipe on the demo student (W8A8): the `quant: False`
    stage's forward is the unquantized model's (no weight rules, no activation fake-quant),
    the quantized stage's is not, and it starts from what the float stage trained."""
    c = load_recipe("demo_cpu", "tiny")
    c.teacher.init, c.teacher.path, c.teacher.tokenizer = "pretrained", tiny_teacher_dir, tiny_teacher_dir
    c.data.train = _corpus(tmp_path / "train.jsonl", 16, 1)
    c.data.dev = _corpus(tmp_path / "dev.jsonl", 4, 2)
    c.student.quant.weight_bits, c.student.quant.act_bits = 8, 8
    c.distill.stages = [{"targets": "gold", "steps": 1, "quant": False}, {"targets": "gold", "steps": 1}]

    seen = []

    def fake_train_stage(model, tokenizer, train_ex, dev, config, tcfg, stage_dir, *, quant_rules=None, **kw):
        cfg = model.config
        params = nnx.state(model, nnx.Param)
        ids = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 5)).astype(np.int32)
        x = dict(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=ids)
        g, _, rest = nnx.split(model, nnx.Param, ...)
        run = nnx.merge(g, quant.quantize_params(params, quant_rules) if quant_rules else params, rest)

        def built(act_bits, rules):  # the same params in a fresh model of the given kind
            m = models.create_model(cfg.replace(act_quant_bits=act_bits), nnx.Rngs(0))
            nnx.update(m, quant.quantize_params(params, rules) if rules else params)
            return np.asarray(m(**x))

        seen.append({"out": np.asarray(run(**x)), "float": built(None, None),
                     "w8a8": built(8, quant.default_rules(8)),
                     "start": jax.tree.map(np.asarray, nnx.to_pure_dict(params))})
        nnx.update(model, jax.tree.map(lambda p: p + 0.01, params))  # "training"
        seen[-1]["end"] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        return train.TrainResult(state=None, losses=[], start_step=0, evals=[], best=None)

    monkeypatch.setattr(stages, "_train_stage", fake_train_stage)
    monkeypatch.setattr(stages, "_finish_model", lambda *a, **k: None)
    stages.run_distill(c, str(tmp_path / "run"))

    float_stage, quant_stage = seen
    np.testing.assert_allclose(float_stage["out"], float_stage["float"], rtol=1e-6, atol=1e-6)
    assert np.abs(float_stage["out"] - float_stage["w8a8"]).max() > 1e-4
    np.testing.assert_allclose(quant_stage["out"], quant_stage["w8a8"], rtol=1e-6, atol=1e-6)
    assert np.abs(quant_stage["out"] - quant_stage["float"]).max() > 1e-4
    for a, b in zip(jax.tree.leaves(quant_stage["start"]), jax.tree.leaves(float_stage["end"])):
        np.testing.assert_array_equal(a, b)


def test_seqkd_then_on_policy_stage_records_its_on_policy_steps(tmp_path, tiny_teacher_dir):
    """`stages=[gold, student]`: the student stage trains every step on the student's own
    samples scored by the (kept) teacher; the first stage none; both recorded in stage.json."""
    c = load_recipe("demo_cpu", "tiny")
    c.teacher.init, c.teacher.path, c.teacher.tokenizer = "pretrained", tiny_teacher_dir, tiny_teacher_dir
    c.data.train = _corpus(tmp_path / "train.jsonl", 16, 1)
    c.data.dev = _corpus(tmp_path / "dev.jsonl", 4, 2)
    c.distill.batch_size, c.distill.checkpoint_every, c.distill.log_every = 8, 0, 1
    c.distill.on_policy.max_new_tokens = 6
    c.distill.stages = [{"targets": "gold", "steps": 2}, {"targets": "student", "steps": 3}]
    out = stages.run_distill(c, str(tmp_path / "run"))
    assert [(s["targets"], s["on_policy_steps"]) for s in out["stages"]] == [("gold", 0), ("student", 3)]
    rec = json.load(open(tmp_path / "run" / "distill" / "1_student" / "stage.json"))
    assert rec["result"]["on_policy_steps"] == 3 and rec["status"] == "done"


def test_stage_optimizer_overrides_distill_optimizer(tmp_path, tiny_teacher_dir, monkeypatch):
    """A gold stage after SeqKD with its own `optimizer` (lower LR, no warmup): merged over
    `distill.optimizer` for that stage only; an unknown key is a ConfigError naming it."""
    import pytest
    from kd_flax import config_base
    from kd_flax import train as T
    c = load_recipe("demo_cpu", "tiny")
    c.teacher.init, c.teacher.path, c.teacher.tokenizer = "pretrained", tiny_teacher_dir, tiny_teacher_dir
    c.data.train = _corpus(tmp_path / "train.jsonl", 16, 1)
    c.data.dev = _corpus(tmp_path / "dev.jsonl", 4, 2)
    c.distill.optimizer.learning_rate, c.distill.optimizer.warmup_steps = 3e-3, 5
    c.distill.stages = [{"targets": "gold", "steps": 10},
                        {"targets": "gold", "steps": 10, "optimizer": {"learning_rate": 1e-4, "warmup_steps": 0}}]
    config_base.validate(c, check_paths=False)
    seen = []

    def fake_train_stage(model, tokenizer, train_ex, dev, config, tcfg, stage_dir, **kw):
        seen.append(tcfg)
        return train.TrainResult(state=None, losses=[], start_step=0, evals=[], best=None)

    monkeypatch.setattr(stages, "_train_stage", fake_train_stage)
    monkeypatch.setattr(stages, "_finish_model", lambda *a, **k: None)
    stages.run_distill(c, str(tmp_path / "run"))
    first, gold = (s.optimizer for s in seen)
    assert (first.learning_rate, first.warmup_steps) == (3e-3, 5)
    assert (gold.learning_rate, gold.warmup_steps) == (1e-4, 0)
    assert gold.schedule == first.schedule == c.distill.optimizer.schedule  # the rest: distill.optimizer's
    assert gold.weight_decay == c.distill.optimizer.weight_decay
    s0, s1 = T.make_schedule(first, 10), T.make_schedule(gold, 10)
    assert float(s0(0)) < 3e-3 and abs(float(s1(0)) - 1e-4) < 1e-9  # no warmup: the peak at step 0
    assert c.distill.optimizer.learning_rate == 3e-3  # the block itself is untouched

    c.distill.stages = [{"targets": "gold", "steps": 1, "optimizer": {"lr": 1e-4}}]
    with pytest.raises(config_base.ConfigError, match=r"distill\.stages\[0\]\.optimizer\.lr: unknown optimizer key; "
                                                      r"allowed: \[.*'learning_rate'.*\]"):
        config_base.validate(c, check_paths=False)
    c.distill.stages = [{"targets": "gold", "steps": 1, "optimizer": {"schedule": "cosin", "warmup_steps": -1}}]
    with pytest.raises(config_base.ConfigError, match=r"stages\[0\]\.optimizer\.schedule: 'cosin' is not allowed"):
        config_base.validate(c, check_paths=False)


def test_variant_reuses_an_identical_distill_sub_stage(tmp_path, tiny_teacher_dir, caplog):
    """Variant b = [pseudo 3, gold 2] copies the [pseudo 3] sub-stage variant a trained with
    the same config (its record names the source) and ends bit for bit where b trained alone
    ends; variant c, the same stage at another learning rate, trains its own."""
    import logging
    import os
    import shutil
    from safetensors.numpy import load_file
    from kd_flax import main

    c = load_recipe("demo_cpu", "tiny")
    c.teacher.init, c.teacher.path, c.teacher.tokenizer = "pretrained", tiny_teacher_dir, tiny_teacher_dir
    c.finetune.steps = 0
    c.data.train = _corpus(tmp_path / "train.jsonl", 16, 1)
    c.data.dev = _corpus(tmp_path / "dev.jsonl", 4, 2)
    c.distill.batch_size = 8
    pseudo = {"targets": "pseudo", "steps": 3}
    c.variants = {"a": {"distill": {"stages": [pseudo]}},
                  "b": {"distill": {"stages": [pseudo, {"targets": "gold", "steps": 2}]}},
                  "c": {"distill": {"stages": [pseudo], "optimizer": {"learning_rate": 1e-4}}}}
    shared, alone = str(tmp_path / "shared"), str(tmp_path / "alone")
    fresh = c.copy_and_resolve_references  # a run points the config at its workdir's data files
    main.run("generate", fresh(), shared)
    shutil.copytree(shared, alone)  # the same pseudo-labels, nothing distilled yet
    with caplog.at_level(logging.INFO, logger="kd_flax.stages"):
        main.run("distill", fresh(), shared, variants=["a", "b", "c"])
    main.run("distill", fresh(), alone, variants=["b"])

    def record(root, v, name):
        return json.load(open(os.path.join(root, "variants", v, "distill", name, "stage.json")))

    a0, b0, c0 = (record(shared, v, "0_pseudo") for v in "abc")
    assert b0["reused_from"] == "variants/a/distill/0_pseudo" and b0["prefix_hash"] == a0["prefix_hash"]
    assert "distill/0_pseudo: reusing variants/a/distill/0_pseudo (same config)" in caplog.text
    assert "reused_from" not in record(shared, "b", "1_gold") and "reused_from" not in record(alone, "b", "0_pseudo")
    assert "reused_from" not in c0 and c0["prefix_hash"] != a0["prefix_hash"]
    assert record(alone, "b", "0_pseudo")["prefix_hash"] == b0["prefix_hash"]  # the hash is the workdir's own
    # The last sub-stage's prefix hash is the distill stage's own hash.
    stage = json.load(open(os.path.join(shared, "variants", "b", "distill", "stage.json")))
    assert record(shared, "b", "1_gold")["prefix_hash"] == stage["config_hash"]
    # b's result reports the reused sub-stage with a's training figures (what the report shows).
    b_stages = stage["result"]["stages"]
    assert b_stages[0]["reused_from"] == "variants/a/distill/0_pseudo" and b_stages[0]["steps_run"] == 3
    assert b_stages[1]["steps_run"] == 2 and b_stages[1].get("reused_from") is None

    def weights(root, v):
        return load_file(os.path.join(root, "variants", v, "distill", "model", "model.safetensors"))

    reused, trained = weights(shared, "b"), weights(alone, "b")
    assert reused.keys() == trained.keys()
    assert all(np.array_equal(reused[k], trained[k]) for k in trained)
    assert any(not np.array_equal(weights(shared, "a")[k], trained[k]) for k in trained)  # b trained on after a
