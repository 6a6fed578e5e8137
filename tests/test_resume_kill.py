"""Training survives `kill -9`: the distill stage, killed mid-run and started again with the
same command, resumes from its last Orbax checkpoint and ends with exactly the weights of an
uninterrupted run (same data order; CPU is deterministic)."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(stage, workdir, teacher, extra=()):
    return [sys.executable, "-m", "kd_flax.main", stage, "--config", "configs/demo_cpu.py:tiny",
            "--workdir", workdir, "--variants=seqkd", "--config.teacher.init=pretrained",
            f"--config.teacher.path={teacher}", f"--config.teacher.tokenizer={teacher}",
            "--config.data.train=synthetic:train:128", "--config.distill.batch_size=8",
            "--config.distill.checkpoint_every=4", *extra]


ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", TOKENIZERS_PARALLELISM="false")


# On-policy (issue 15): half the steps sample from the student; resume must redraw the same
# steps and the same samples (the choice and the key are functions of seed and step).
ON_POLICY = ("--config.distill.on_policy.lmbda=0.5", "--config.distill.on_policy.max_new_tokens=8")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ON_POLICY], ids=["seqkd", "on_policy"])
def test_distill_resumes_after_kill9(tmp_path, tiny_teacher_dir, extra):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    subprocess.run(_cmd("generate", a, tiny_teacher_dir), cwd=ROOT, env=ENV, check=True, capture_output=True)
    shutil.copytree(a, b, symlinks=True)
    r = subprocess.run(_cmd("distill", a, tiny_teacher_dir, extra), cwd=ROOT, env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    ckpt = os.path.join(b, "variants", "seqkd", "distill", "0_pseudo", "ckpt")
    p = subprocess.Popen(_cmd("distill", b, tiny_teacher_dir, extra), cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Kill once the first checkpoint is committed (orbax renames it from a tmp name): the run
    # still has ~30 steps, a final save and the export ahead of it.
    while time.time() < deadline and p.poll() is None:
        steps = [int(d) for d in (os.listdir(ckpt) if os.path.isdir(ckpt) else []) if d.isdigit()]
        if steps:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not os.path.exists(os.path.join(b, "variants", "seqkd", "distill", "model"))

    r = subprocess.run(_cmd("distill", b, tiny_teacher_dir, extra), cwd=ROOT, env=ENV, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr  # continued from the checkpoint, not from scratch
    wa = load_file(os.path.join(a, "variants", "seqkd", "distill", "model", "model.safetensors"))
    wb = load_file(os.path.join(b, "variants", "seqkd", "distill", "model", "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
