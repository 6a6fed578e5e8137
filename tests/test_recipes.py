"""Every recipe's `tiny` variant runs the whole pipeline end to end on CPU.

One or two student variants per recipe keep the suite short; the report, the exports and
the stage records are checked, and a re-run skips every finished stage.
"""

import json
import os

import pytest

from kd_flax import main
from test_config import load_recipe

CASES = {
    # recipe: variants to run (the ones that exercise the most code)
    "demo_cpu": ["seqkd_then_gold", "seqkd_w4a8"],
    "t5_enfr_seqkd": ["gold_then_seqkd"],
    "bart_dqbart": ["w2a8"],          # layer copy + word-level KD + hidden/attention MSE + ternary
    "marian_enro": ["int8"],          # SeqInter n-best selection + float then W8A8 stage
    "multi30k_enfr": ["seqkd_wordkd_top8_long"],  # the teacher's stored top-8, greedy + beam rows
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(CASES))
def test_tiny_recipe_pipeline(recipe, tmp_path):
    workdir = str(tmp_path / recipe)
    variants = CASES[recipe]
    main.run("pipeline", load_recipe(recipe, "tiny"), workdir, variants=variants)

    for stage in ("generate",) + (("finetune",) if os.path.exists(os.path.join(workdir, "finetune")) else ()):
        assert json.load(open(os.path.join(workdir, stage, "stage.json")))["status"] == "done"
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| teacher" in report
    for v in variants:
        vdir = os.path.join(workdir, "variants", v)
        for stage in ("distill", "evaluate", "export"):
            assert json.load(open(os.path.join(vdir, stage, "stage.json")))["status"] == "done", (v, stage)
        assert f"| {v}" in report
        summary = json.load(open(os.path.join(vdir, "export", "summary.json")))
        assert os.path.exists(os.path.join(vdir, "export", "hf", "config.json"))
        if summary["weight_bits"]:
            # The integer export is smaller than the float32 weights.
            assert 0 < summary["int_bytes"] < summary["float32_bytes"]
    assert os.path.exists(os.path.join(workdir, "report.png"))

    if recipe == "marian_enro":
        # SeqInter: 4-best lists were kept and the chosen hypothesis is one of them.
        import glob
        rec = json.loads(open(sorted(glob.glob(os.path.join(workdir, "generate", "part-*.jsonl")))[0]).readline())
        assert len(rec["hyps"]) == 4 and rec["hyp"] in rec["hyps"]

    # Everything is done: a re-run skips all stages (stage records unchanged).
    before = {p: os.path.getmtime(p) for p in _stage_files(workdir)}
    main.run("pipeline", load_recipe(recipe, "tiny"), workdir, variants=variants)
    assert {p: os.path.getmtime(p) for p in _stage_files(workdir)} == before


def _stage_files(workdir):
    out = []
    for root, _, files in os.walk(workdir):
        out += [os.path.join(root, f) for f in files if f == "stage.json"]
    return sorted(out)


@pytest.mark.slow
def test_pretrained_student_pipeline(tmp_path, tiny_teacher_dir):
    """student.init="pretrained": the student starts from an HF checkpoint dir (here a tiny T5 of
    its own shape, not the recipe's scratch student) and is distilled, evaluated and exported."""
    import numpy as np
    from safetensors.numpy import load_file

    c = load_recipe("demo_cpu", "tiny")
    c.teacher.init, c.teacher.path, c.teacher.tokenizer = "pretrained", tiny_teacher_dir, tiny_teacher_dir
    c.student.init, c.student.path = "pretrained", tiny_teacher_dir
    c.data.train = "synthetic:train:64"
    workdir = str(tmp_path / "run")
    main.run("pipeline", c, workdir, variants=["seqkd"])

    out = os.path.join(workdir, "variants", "seqkd")
    for stage in ("distill", "evaluate", "export"):
        assert json.load(open(os.path.join(out, stage, "stage.json")))["status"] == "done", stage
    start = load_file(os.path.join(tiny_teacher_dir, "model.safetensors"))
    final = load_file(os.path.join(out, "distill", "model", "model.safetensors"))
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in start.items()}
    cfg = json.load(open(os.path.join(out, "distill", "model", "config.json")))
    assert cfg["d_model"] == 32  # the pretrained student's shape, not the recipe's scratch student
    assert any(not np.array_equal(final[k], start[k]) for k in start)  # and it was trained


SHARED_M30K = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                           "data", "multi30k")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_M30K, "train.en.gz")),
                    reason="the shared Multi30k files are not beside this checkout")
def test_multi30k_recipe_reads_the_real_files(tmp_path):
    """`data=DIR` on the real six files (the first 400 training pairs, tiny models): every split
    read, the report names the stages with their throughput and both decodings."""
    workdir = str(tmp_path / "m30k")
    config = load_recipe("multi30k_enfr", f"tiny,data={SHARED_M30K}")
    main.run("pipeline", config, workdir, variants=["seqkd"])
    results = json.load(open(os.path.join(workdir, "variants", "seqkd", "evaluate", "results.json")))
    assert results["splits"] == ["test_2016_flickr"]
    assert results["models"]["student"]["splits"]["test_2016_flickr"]["sentences"] == 1000
    assert set(results["models"]) == {"student", "student_greedy"}
    fin = json.load(open(os.path.join(workdir, "finetune", "stage.json")))["result"]
    assert fin["steps_run"] == config.finetune.steps and fin["target_tokens_per_s"] > 0
    report = open(os.path.join(workdir, "report.md")).read()
    assert "| seqkd_greedy" in report and "| teacher_greedy" in report
    assert "## Stages" in report and "| generate (pseudo-labels)" in report
    assert "| seqkd: distill pseudo (10 steps)" in report
