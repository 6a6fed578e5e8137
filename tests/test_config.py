"""Configs and the CLI's stage bookkeeping (no models: stage functions are stand-ins)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from kd_flax import config_base, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ["demo_cpu", "t5_enfr_seqkd", "bart_dqbart", "marian_enro", "multi30k_enfr"]


def load_recipe(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("arg", ["tiny", None])
def test_recipes_validate(name, arg):
    c = load_recipe(name, arg)
    # Full recipes point at user paths (teacher dirs, hub datasets); tiny ones are self-contained.
    if arg == "tiny" or name == "demo_cpu":
        config_base.validate(c)
    else:
        with c.unlocked():
            c.teacher.path = ROOT  # any existing dir stands in for the user's checkpoint
        config_base.validate(c, check_paths=False)
    for vname, overrides in c.variants.to_dict().items():
        vc = main.variant_configs(c)[vname]
        for dotted, value in config_base._flatten(overrides).items():
            node = vc
            for p in dotted.split("."):
                node = node[p]
            got = node.to_dict() if hasattr(node, "to_dict") else node
            assert got == value


@pytest.mark.parametrize("preset", sorted(config_base.MESH_PRESETS))
def test_mesh_presets(preset):
    m = config_base.mesh_config(preset)
    assert set(m.axes) == {"data", "fsdp", "model"}
    logical = {r[0] for r in m.rules}
    assert {"batch", "embed", "heads", "mlp", "vocab", "kv", "length"} <= logical


def test_unknown_mesh_preset():
    with pytest.raises(ValueError, match="allowed: .*tpu_v4_8"):
        config_base.mesh_config("tpu_v9")


def _errors(c):
    with pytest.raises(config_base.ConfigError) as e:
        config_base.validate(c)
    return str(e.value)


def test_validation_names_key_and_allowed_values():
    import ml_collections
    d = load_recipe("demo_cpu", "tiny").to_dict()
    d["distill"]["optimizer"]["learning_rate"] = "fast"  # a recipe written with a wrong type
    c = ml_collections.ConfigDict(d)
    with c.unlocked():
        c.distill.loss.lam = 1.5
        c.distill.loss.kd_type = "kullback"
        c.student.quant.weight_bits = 3
        c.generate.top_p = 0.0
        c.student.bogus = 1
        c.teacher.path = "/nonexistent/teacher"
        c.teacher.init = "pretrained"
    msg = _errors(c)
    assert "distill.loss.lam: 1.5 out of range; allowed: [0, 1]" in msg
    assert "distill.loss.kd_type: 'kullback' is not allowed; allowed values: ['kl', 'interpolated'" in msg
    assert "student.quant.weight_bits: 3 is not allowed; allowed values: [0, 2, 4, 8]" in msg
    assert "generate.top_p: 0.0 out of range; allowed: (0, 1]" in msg
    assert "distill.optimizer.learning_rate: expected float, got str" in msg
    assert "student.bogus: unknown key; allowed keys here:" in msg
    assert "teacher.path: path '/nonexistent/teacher' does not exist" in msg


def test_optional_keys_validate_and_typos_are_refused():
    """generate.filters.drop_unfinished is not in base_config() (older workdirs keep their stage
    hashes) but a recipe may set it; a misspelling is still an unknown key."""
    c = load_recipe("demo_cpu", "tiny")
    assert "drop_unfinished" not in c.generate.filters
    with c.unlocked():
        c.generate.filters.drop_unfinished = True
    config_base.validate(c, check_paths=False)
    with c.unlocked():
        c.generate.filters.drop_unfinishd = True
    assert "generate.filters.drop_unfinishd: unknown key" in _errors(c)


def test_validation_cross_keys():
    c = load_recipe("demo_cpu", "tiny")
    with c.unlocked():
        c.generate.select = "chrf"
        c.distill.stages = [{"targets": "silver", "steps": 3}]
        c.variants = {"x": {"student": {"nope": 1}}}
    msg = _errors(c)
    assert "SeqInter" in msg and "num_return_sequences" in msg
    assert "distill.stages[0]" in msg
    assert "variants.x: override key 'student.nope' is not a config key" in msg


def test_hash_and_diff():
    a = {"x": 1, "y": {"z": [1, 2]}}
    b = {"x": 1, "y": {"z": [1, 3]}}
    assert config_base.config_hash(a) != config_base.config_hash(b)
    assert config_base.config_hash(a) == config_base.config_hash(json.loads(json.dumps(a)))
    assert config_base.diff_keys(a, b) == ["y.z"]


def test_stage_bookkeeping(tmp_path):
    c = load_recipe("demo_cpu", "tiny")
    calls = []

    def fake_stage(config, workdir):
        calls.append(config.generate.num_beams)
        return {"ok": True}

    hashes = {}
    wd = str(tmp_path)
    main.run_stage("generate", fake_stage, c, wd, hashes)
    assert calls == [1]
    rec = json.load(open(tmp_path / "generate" / "stage.json"))
    assert rec["status"] == "done" and rec["result"] == {"ok": True}
    # Same config: skipped.
    main.run_stage("generate", fake_stage, c, wd, {})
    assert calls == [1]
    # Changed decoding setting: refused, naming the key.
    with c.unlocked():
        c.generate.num_beams = 4
    with pytest.raises(main.StageRefused, match="generate.num_beams"):
        main.run_stage("generate", fake_stage, c, wd, {})
    # --force redoes it.
    main.run_stage("generate", fake_stage, c, wd, {}, force=True)
    assert calls == [1, 4]
    # An interrupted stage (status running) is run again, to resume.
    rec = json.load(open(tmp_path / "generate" / "stage.json"))
    rec["status"] = "running"
    (tmp_path / "generate" / "stage.json").write_text(json.dumps(rec))
    main.run_stage("generate", fake_stage, c, wd, {})
    assert calls == [1, 4, 4]


def test_upstream_change_invalidates_downstream(tmp_path):
    c = load_recipe("demo_cpu", "tiny")
    wd = str(tmp_path)
    noop = lambda config, workdir: None  # noqa: E731
    h = {}
    main.run_stage("generate", noop, c, wd, h)
    main.run_stage("distill", noop, c, wd, h)
    with c.unlocked():
        c.generate.max_new_tokens = 7
    h = {}
    main.run_stage("generate", noop, c, wd, h, force=True)
    with pytest.raises(main.StageRefused, match="upstream.generate"):
        main.run_stage("distill", noop, c, wd, h)


def test_cli_errors_are_one_clear_line(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "kd_flax.main"]
    r = subprocess.run(base + ["distil", "--config", "configs/demo_cpu.py:tiny", "--workdir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "STAGE: one of finetune, generate, distill" in r.stderr
    r = subprocess.run(base + ["distill", "--config", "configs/demo_cpu.py:tiny", "--workdir", str(tmp_path),
                               "--config.distill.loss.temperature=-1"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "distill.loss.temperature: -1.0 out of range; allowed: (0, ∞]" in r.stderr
    assert "Traceback" not in r.stderr


def test_moved_workdir_keeps_stage_hashes(tmp_path):
    """Files `prepare` writes inside the workdir don't tie stage hashes to its location."""
    import shutil
    calls = []
    fake = lambda config, wd: calls.append(wd.root)  # noqa: E731
    c = load_recipe("demo_cpu", "tiny")
    a, b = tmp_path / "a", tmp_path / "b"
    with c.unlocked():
        c.data.train = str(a / "data" / "train.jsonl")
    main.run_stage("generate", fake, c, str(a), {})
    shutil.copytree(a, b)
    with c.unlocked():
        c.data.train = str(b / "data" / "train.jsonl")
    main.run_stage("generate", fake, c, str(b), {})
    assert calls == [str(a)]  # the copy at b was recognised as done


def test_cli_config_mistakes_are_one_line_exit_2(tmp_path):
    """Issue 11, bug 5: a bad override, a bad value type, a missing or broken config file ->
    one line naming what is wrong (and the closest valid keys), exit status 2, no traceback."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(arg=None):\n    return 1 / 0\n")
    base = [sys.executable, "-m", "kd_flax.main", "distill", "--workdir", str(tmp_path / "w")]
    demo = ["--config", "configs/demo_cpu.py"]
    cases = [
        (demo + ["--config.student.no_such_key=1"], ["--config.student.no_such_key: no such key", "student."]),
        (demo + ["--config.distill.stepz=3"], ["no such key", "distill.steps"]),
        (demo + ["--config.distill.steps=abc"], ["--config.distill.steps=abc: expected an int"]),
        (["--config", "configs/nosuch.py"], ["--config configs/nosuch.py: no such file"]),
        (["--config", str(broken)], [f"{broken}:2: ZeroDivisionError"]),
    ]
    for args, wanted in cases:
        r = subprocess.run(base + args, cwd=ROOT, capture_output=True, text=True, env=env)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2, (args, r.returncode, r.stderr[-1500:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr[-1500:])
        for w in wanted:
            assert w in lines[0], (args, lines[0])
    assert not (tmp_path / "w").exists()  # nothing was started


def test_unknown_variant_is_refused(tmp_path):
    c = load_recipe("demo_cpu", "tiny")
    with pytest.raises(config_base.ConfigError, match=r"--variants: nosuch not in the config; allowed: gold, seqkd, seqkd_onpolicy, seqkd_then_gold, seqkd_w4a8"):
        main.run("distill", c, str(tmp_path), variants=["nosuch"])


def test_unknown_model_keys_rejected_with_closest():
    """issue 16: `num_layer` (for `num_layers`) in teacher.model was silently dropped."""
    import pytest
    from kd_flax import config_base as cb
    c = cb.base_config()
    c.teacher.model = {"model_type": "t5", "num_layer": 1, "d_model": 64}
    c.student.model = {"num_layers": 1, "d_modl": 32}
    with pytest.raises(cb.ConfigError) as e:
        cb.validate(c, check_paths=False)
    msg = str(e.value)
    assert "teacher.model.num_layer: unknown key" in msg and "'num_layers'" in msg
    assert "student.model.d_modl: unknown key" in msg and "'d_model'" in msg
    assert "num_layers:" not in msg.replace("num_layer:", "")


def test_model_key_check_does_not_swallow_bugs(monkeypatch):
    """A bug in a family's from_hf/to_hf surfaces instead of silently disabling the HF-key check;
    an unknown or absent model_type is still left to the model builder."""
    from kd_flax.models import t5

    def broken(self):
        raise RuntimeError("to_hf bug")

    monkeypatch.setattr(t5.T5Config, "to_hf", broken)
    with pytest.raises(RuntimeError, match="to_hf bug"):
        config_base._model_key_problems({"teacher": {"model": {"model_type": "t5", "num_layers": 1}}})
    assert config_base._model_key_problems({"teacher": {"model": {"model_type": "nope", "x": 1}},
                                            "student": {"model": {"x": 1}}}) == []


def test_float_prefix_hash_ignores_later_quantization(tmp_path):
    """[float SeqKD, W8A8 fine-tuning] shares plain SeqKD's sub-stage 0 hash (so it is reused);
    a quantized first stage, another stage length or another loss does not."""
    from kd_flax.workdir import Workdir
    wd = Workdir.of(str(tmp_path))

    def hashes(stages, **quant):
        c = load_recipe("demo_cpu", "tiny")
        with c.unlocked():
            c.distill.stages = stages
            c.student.quant.update(quant)
        return main.distill_prefix_hashes(c, wd, {"generate": "g"}, write_cache=False)

    plain = hashes([{"targets": "pseudo", "steps": 3}])
    w8a8 = hashes([{"targets": "pseudo", "steps": 3, "quant": False}, {"targets": "pseudo", "steps": 2}],
                  weight_bits=8, act_bits=8)
    assert w8a8[0] == plain[0] and w8a8[1] != plain[0]
    assert hashes([{"targets": "pseudo", "steps": 3}], weight_bits=8, act_bits=8)[0] != plain[0]
    assert hashes([{"targets": "pseudo", "steps": 4}])[0] != plain[0]
    assert hashes([{"targets": "pseudo", "steps": 3, "quant": False}])[0] == plain[0]  # no bits: the flag is moot
