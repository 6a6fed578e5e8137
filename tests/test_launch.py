"""launch/*.sh: syntax, --dry-run output, and the real code path against fake gcloud / srun /
nvidia-smi executables that record their arguments."""

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TPU = REPO / "launch" / "tpu.sh"
GPU = REPO / "launch" / "gpu.sh"
SLURM = REPO / "launch" / "slurm.sbatch"

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Records argv (fields \x1f-separated, one call a line) and answers like gcloud would.
printf '%s\x1f' "$@" >> "$FAKE_STATE/calls"; printf '\n' >> "$FAKE_STATE/calls"
case "$*" in
  "auth list"*) [ -n "${FAKE_ACCOUNT:-}" ] && echo "$FAKE_ACCOUNT"; exit 0 ;;
  "compute tpus tpu-vm describe"*)
    if [ -e "$FAKE_STATE/tpu" ]; then echo READY; exit 0; fi
    echo "ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND" >&2; exit 1 ;;
  "compute tpus tpu-vm create"*) touch "$FAKE_STATE/tpu" ;;
  "compute tpus queued-resources create"*) touch "$FAKE_STATE/qr" ;;
  "compute tpus queued-resources describe"*)
    n=$(cat "$FAKE_STATE/polls" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_STATE/polls"
    if [ "$n" -ge 1 ]; then touch "$FAKE_STATE/tpu"; echo ACTIVE; else echo WAITING_FOR_RESOURCES; fi ;;
  "compute tpus tpu-vm scp"*)
    # Record what would be copied (the argument after --recurse).
    while [ $# -gt 0 ]; do if [ "$1" = --recurse ]; then (cd "$2" && find . -maxdepth 2 | sort) > "$FAKE_STATE/copied"; fi; shift; done ;;
esac
exit 0
"""


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# The only programs the scripts (and the fakes) may find: a real gcloud / srun / nvidia-smi
# on this machine must never be reached from a test.
TOOLS = ("bash", "env", "git", "tar", "mktemp", "rm", "mkdir", "dirname", "sed", "sleep", "cat", "touch",
         "find", "sort", "wc", "seq", "python3")


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    d = tmp_path_factory.mktemp("tools")
    for name in TOOLS:
        path = shutil.which(name)
        if path:
            (d / name).symlink_to(path)
    return d


@pytest.fixture
def env(tmp_path, tools):
    """A PATH with the basic tools but no gcloud / srun / nvidia-smi unless a test adds fakes."""
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    e = {"PATH": f"{fakebin}:{tools}", "HOME": str(tmp_path / "home"), "FAKE_STATE": str(state),
         "TMPDIR": str(tmp_path), "KD_FLAX_POLL_SECONDS": "0", "LC_ALL": "C"}
    return e, fakebin, state


def _run(script, args, env, **kw):
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, **kw)


def _calls(state: Path) -> list[list[str]]:
    path = state / "calls"
    if not path.exists():
        return []
    return [line.split("\x1f")[:-1] for line in path.read_text().splitlines()]


def _dry_commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _ssh_command(call: list[str]) -> str:
    return call[call.index("--command") + 1]


TPU_ARGS = ["--name", "kd-tpu", "--zone", "us-central2-b", "--accelerator", "v4-16", "--project", "proj",
            "--stage", "distill", "--config", "configs/demo_cpu.py:tiny", "--workdir", "gs://bkt/run",
            "--config.distill.steps=7", "--config.data.source_prefix=it's a b"]


@pytest.mark.parametrize("script", [TPU, GPU, SLURM], ids=lambda p: p.name)
def test_bash_syntax(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert os.access(script, os.X_OK), f"{script} should be executable"


def test_tpu_dry_run_prints_every_command(env):
    e, _, state = env
    r = _run(TPU, TPU_ARGS + ["--dry-run"], e)
    assert r.returncode == 0, r.stderr
    cmds = _dry_commands(r.stdout)
    assert not _calls(state)  # nothing ran
    loc = ["--zone", "us-central2-b", "--project", "proj"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "kd-tpu", *loc, "--format=value(state)"]
    assert cmds[1] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "kd-tpu", *loc,
                       "--accelerator-type", "v4-16", "--version", "tpu-ubuntu2204-base"]
    scp = [c for c in cmds if c[4] == "scp"]
    assert len(scp) == 1 and "--recurse" in scp[0] and "--worker=all" in scp[0] and "kd-tpu:~/" in scp[0]
    ssh = [c for c in cmds if c[4] == "ssh"]
    assert all(c[5] == "kd-tpu" and "--worker=all" in c for c in ssh)
    assert any(".[tpu]" in _ssh_command(c) for c in ssh)
    main = shlex.split(_ssh_command(ssh[-1]).split("&&", 1)[1])
    assert main == ["~/kd_flax_venv/bin/python", "-m", "kd_flax.main", "distill", "--config",
                    "configs/demo_cpu.py:tiny", "--workdir", "gs://bkt/run", "--config.distill.steps=7",
                    "--config.data.source_prefix=it's a b"]


def test_tpu_dry_run_queued_spot(env):
    e, _, _ = env
    r = _run(TPU, TPU_ARGS[:4] + ["--accelerator", "v5litepod-16", "--queued", "--spot", "--config", "c.py",
                                  "--workdir", "gs://b/w", "--dry-run"], e)
    assert r.returncode == 0, r.stderr
    create = [c for c in _dry_commands(r.stdout) if "create" in c]
    assert create == [["gcloud", "compute", "tpus", "queued-resources", "create", "kd-tpu", "--node-id", "kd-tpu",
                       "--zone", "us-central2-b", "--accelerator-type", "v5litepod-16",
                       "--runtime-version", "v2-alpha-tpuv5-lite", "--spot"]]


def test_tpu_creates_copies_installs_runs_with_fake_gcloud(env, tmp_path):
    e, fakebin, state = env
    _exe(fakebin / "gcloud", FAKE_GCLOUD)
    r = _run(TPU, TPU_ARGS, dict(e, FAKE_ACCOUNT="me@example.com"))
    assert r.returncode == 0, r.stderr
    calls = _calls(state)
    kinds = [" ".join(c[:5]) if c[0] == "compute" else " ".join(c[:2]) for c in calls]
    assert kinds == ["auth list", "compute tpus tpu-vm describe kd-tpu", "compute tpus tpu-vm create kd-tpu",
                     "compute tpus tpu-vm ssh kd-tpu", "compute tpus tpu-vm scp --recurse",
                     "compute tpus tpu-vm ssh kd-tpu", "compute tpus tpu-vm ssh kd-tpu"]
    assert calls[0] == ["auth", "list", "--filter=status:ACTIVE", "--format=value(account)"]
    assert calls[2][5:] == ["--zone", "us-central2-b", "--project", "proj", "--accelerator-type", "v4-16",
                            "--version", "tpu-ubuntu2204-base"]
    for c in calls[3:]:
        assert "--worker=all" in c and c[c.index("--zone") + 1] == "us-central2-b"
    # The copy holds the repository's own files, not the venv or build outputs.
    copied = (state / "copied").read_text().split()
    assert "./setup.py" in copied and "./kd_flax/__init__.py" in copied and "./launch/tpu.sh" in copied
    assert not [p for p in copied if ".venv" in p or "egg-info" in p or "__pycache__" in p]
    assert ".[tpu]" in _ssh_command(calls[5])

    # The run command, executed by a shell as the worker would, gives kd_flax.main these args.
    home = Path(e["HOME"])
    (home / "kd_flax").mkdir(parents=True)
    (home / "kd_flax_venv" / "bin").mkdir(parents=True)
    _exe(home / "kd_flax_venv" / "bin" / "python", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_STATE/argv"\n')
    subprocess.run(["bash", "-c", _ssh_command(calls[6])], env=e, check=True, timeout=30)
    assert (state / "argv").read_text().splitlines() == [
        "-m", "kd_flax.main", "distill", "--config", "configs/demo_cpu.py:tiny", "--workdir", "gs://bkt/run",
        "--config.distill.steps=7", "--config.data.source_prefix=it's a b"]

    # Second launch: the TPU exists now → reused, not created again.
    (state / "calls").unlink()
    r = _run(TPU, TPU_ARGS + ["--stage", "evaluate"], dict(e, FAKE_ACCOUNT="me@example.com"))
    assert r.returncode == 0, r.stderr
    calls = _calls(state)
    assert not [c for c in calls if "create" in c]
    assert "reusing" in r.stderr
    assert " evaluate " in _ssh_command(calls[-1])


def test_tpu_queued_resource_waits_until_active(env):
    e, fakebin, state = env
    _exe(fakebin / "gcloud", FAKE_GCLOUD)
    args = ["--name", "q1", "--zone", "z1", "--accelerator", "v5p-8", "--queued", "--config", "c.py",
            "--workdir", "gs://b/w", "--detach"]
    r = _run(TPU, args, dict(e, FAKE_ACCOUNT="me@example.com"))
    assert r.returncode == 0, r.stderr
    calls = _calls(state)
    create = [c for c in calls if c[:4] == ["compute", "tpus", "queued-resources", "create"]]
    assert create == [["compute", "tpus", "queued-resources", "create", "q1", "--node-id", "q1", "--zone", "z1",
                       "--accelerator-type", "v5p-8", "--runtime-version", "v2-alpha-tpuv5"]]
    polls = [c for c in calls if c[:4] == ["compute", "tpus", "queued-resources", "describe"]]
    assert len(polls) == 2  # WAITING_FOR_RESOURCES, then ACTIVE
    last = _ssh_command(calls[-1])
    assert last.startswith("nohup ") and "kd_flax_pipeline.log" in last


def test_tpu_missing_gcloud_is_a_clear_error(env):
    e, _, _ = env
    r = _run(TPU, TPU_ARGS, e)
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0
    assert "gcloud not found" in r.stderr and "install" in r.stderr


def test_tpu_unauthenticated_is_a_clear_error(env):
    e, fakebin, state = env
    _exe(fakebin / "gcloud", FAKE_GCLOUD)
    r = _run(TPU, TPU_ARGS, e)  # FAKE_ACCOUNT unset: no active account
    assert r.returncode != 0
    assert "not authenticated" in r.stderr and "gcloud auth login" in r.stderr
    assert [c[:2] for c in _calls(state)] == [["auth", "list"]]  # nothing else attempted


def test_tpu_flag_errors(env):
    e, _, _ = env
    r = _run(TPU, ["--zone", "z", "--config", "c.py", "--dry-run"], e)
    assert r.returncode != 0 and "--name" in r.stderr and "--workdir" in r.stderr
    r = _run(TPU, TPU_ARGS + ["--stage", "train", "--dry-run"], e)
    assert r.returncode != 0 and "'train'" in r.stderr and "pipeline" in r.stderr
    r = _run(TPU, TPU_ARGS + ["--bogus"], e)
    assert r.returncode != 0 and "'--bogus'" in r.stderr
    args = [a for a in TPU_ARGS if a not in ("--accelerator", "v4-16")]
    r = _run(TPU, args + ["--dry-run"], e)
    assert r.returncode != 0 and "--accelerator" in r.stderr


def test_gpu_dry_run_and_fake_node(env, tmp_path):
    e, fakebin, state = env
    args = ["--config", "configs/demo_cpu.py", "--workdir", str(tmp_path / "wd"), "--stage", "generate",
            "--gpus", "2", "--venv", str(tmp_path / "venv"), "--config.generate.batch_size=8"]
    r = _run(GPU, args + ["--install", "--dry-run"], e)
    assert r.returncode == 0, r.stderr
    cmds = _dry_commands(r.stdout)
    assert cmds[0] == ["python3", "-m", "venv", str(tmp_path / "venv")]
    assert cmds[1] == [str(tmp_path / "venv/bin/pip"), "install", "-q", "-e", ".[cuda]"]
    run = cmds[2]
    assert run[0] == "env" and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in run and "CUDA_VISIBLE_DEVICES=0,1" in run
    py = run.index(str(tmp_path / "venv/bin/python"))
    assert run[py + 1:] == ["-m", "kd_flax.main", "generate", "--config", "configs/demo_cpu.py", "--workdir",
                            str(tmp_path / "wd"), "--config.generate.batch_size=8"]

    # No driver → clear error; with a (fake) driver and venv the stage command runs with the env set.
    r = _run(GPU, args, e)
    assert r.returncode != 0 and "nvidia-smi not found" in r.stderr
    _exe(fakebin / "nvidia-smi", "#!/usr/bin/env bash\nfor i in 0 1 2 3; do echo \"GPU $i: H100\"; done\n")
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    _exe(venv_bin / "python", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_STATE/argv"\n'
                              'env > "$FAKE_STATE/env"\n')
    r = _run(GPU, args, e)
    assert r.returncode == 0, r.stderr
    assert (state / "argv").read_text().splitlines()[:3] == ["-m", "kd_flax.main", "generate"]
    got_env = (state / "env").read_text()
    assert "CUDA_VISIBLE_DEVICES=0,1\n" in got_env and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9\n" in got_env
    r = _run(GPU, [a if a != "2" else "8" for a in args], e)
    assert r.returncode != 0 and "only 4 GPU" in r.stderr
    r = _run(GPU, ["--workdir", "w", "--dry-run"], e)
    assert r.returncode != 0 and "--config" in r.stderr


def test_slurm_template(env, tmp_path):
    e, fakebin, state = env
    text = SLURM.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --nodes=" in text
    e = dict(e, CONFIG="configs/demo_cpu.py:mesh=gpu_8", WORKDIR=str(tmp_path / "wd"), STAGE="distill",
             VENV=str(tmp_path / "venv"), SLURM_SUBMIT_DIR=str(REPO))
    r = _run(SLURM, ["--config.distill.steps=3"], dict(e, DRY_RUN="1"))
    assert r.returncode == 0, r.stderr
    (cmd,) = _dry_commands(r.stdout)
    assert cmd[0] == "srun" and "--ntasks-per-node=1" in cmd
    assert cmd[cmd.index(str(tmp_path / "venv/bin/python")):] == [
        str(tmp_path / "venv/bin/python"), "-m", "kd_flax.main", "distill", "--config",
        "configs/demo_cpu.py:mesh=gpu_8", "--workdir", str(tmp_path / "wd"), "--config.distill.steps=3"]
    # Real path: a fake srun records its argv and environment.
    _exe(fakebin / "srun", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_STATE/srun"\n'
                           'env > "$FAKE_STATE/env"\n')
    r = _run(SLURM, [], e)
    assert r.returncode == 0, r.stderr
    argv = (state / "srun").read_text().splitlines()
    assert argv[argv.index("kd_flax.main") + 1:] == ["distill", "--config", "configs/demo_cpu.py:mesh=gpu_8",
                                                     "--workdir", str(tmp_path / "wd")]
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9" in (state / "env").read_text()
    r = _run(SLURM, [], {k: v for k, v in e.items() if k != "CONFIG"})
    assert r.returncode != 0 and "CONFIG" in r.stderr
    r = _run(SLURM, [], dict(e, STAGE="bogus"))
    assert r.returncode != 0 and "'bogus'" in r.stderr
