"""Issue 12, provenance by content: a stage records the content of what it read (teacher
weights, tokenizer, corpus files, upstream records) and refuses, naming the changed input,
when any of it changed (`--force` redoes it, the teacher job included); records do not
depend on where the workdir is; a stage reads only finished upstream stages; failures are one
line naming the file or key.

The teacher job runs with the closed-form fake teacher of test_generate_job (no model)."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest

from kd_flax import config_base, io_utils, main, stages
from kd_flax import pseudo_labels as G
from kd_flax import workdir as workdir_lib
from kd_flax.workdir import Workdir

from test_generate_job import config as gen_config, fake_generate, make_corpus, make_loader, word_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture
def gen(tmp_path):
    """A teacher dir (word tokenizer + a fake weights file) and a TSV corpus."""
    word_tokenizer(tmp_path / "teacher")
    (tmp_path / "teacher" / "weights.bin").write_bytes(b"fake weights v1")
    make_corpus(tmp_path / "c.tsv")
    return tmp_path


def teacher_job(calls=None, fail_after=None):
    """The teacher job as `run_stage` calls it (`force` reaches it), with the fake teacher."""
    def fn(config, wd, force=False):
        def done(name):
            if calls is not None:
                calls.append(name)
            if fail_after is not None and len(calls) >= fail_after:
                raise RuntimeError("killed")
        return G.run(config, wd, force=force, generate_fn=fake_generate, load_fn=make_loader(),
                     on_shard_done=done, progress=False)
    return fn


def _touch(path, data: bytes):
    """Rewrite a file in place with new content (and a later mtime)."""
    st = os.stat(path)
    with open(path, "wb") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


# ----------------------------------------------------------------------------- silent wrong results


def test_teacher_changed_in_place_is_refused_then_force_redoes_it(gen):
    c, wd, calls = gen_config(gen), str(gen / "w"), []
    main.run_stage("generate", teacher_job(calls), c, wd, {})
    n = len(calls)
    main.run_stage("generate", teacher_job(calls), c, wd, {})
    assert len(calls) == n  # unchanged: skipped
    _touch(gen / "teacher" / "weights.bin", b"fake weights v2")
    with pytest.raises(main.StageRefused, match=r"changed: .*input teacher"):
        main.run_stage("generate", teacher_job(calls), c, wd, {})
    main.run_stage("generate", teacher_job(calls), c, wd, {}, force=True)
    assert len(calls) == 2 * n  # every shard redone
    manifest = json.load(open(gen / "w" / "generate" / "manifest.json"))
    assert manifest["teacher"]["checksum"] == io_utils.tree_checksum(gen / "teacher")


def test_distill_records_the_teacher_it_read(tmp_path, tiny_teacher_dir):
    """Online word-level KD after the teacher was retrained in place: refused."""
    teacher = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, teacher)
    c = _pretrained_demo(teacher)
    wd, noop = str(tmp_path / "w"), (lambda config, wd: None)
    main.run_stage("distill", noop, c, wd, {})
    main.run_stage("distill", noop, c, wd, {})
    with open(teacher / "model.safetensors", "r+b") as f:  # same size, other weights
        f.seek(-4, 2)
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(main.StageRefused, match="input teacher"):
        main.run_stage("distill", noop, c, wd, {})


def _pretrained_demo(teacher):
    c = config_base_recipe("demo_cpu", "tiny")
    with c.unlocked():
        c.teacher.init, c.teacher.path, c.teacher.tokenizer = "pretrained", str(teacher), str(teacher)
        c.finetune.steps = 0
    return c


def config_base_recipe(name, arg):
    import importlib
    sys.path.insert(0, ROOT)
    return importlib.import_module(f"configs.{name}").get_config(arg)


def test_a_stage_reads_only_finished_upstream_stages(tmp_path, tiny_teacher_dir):
    """Item 2: a killed finetune is not skipped over to the raw teacher.path, and no stage
    consumes an unfinished upstream one (here export over a distill still 'running')."""
    c = _pretrained_demo(tiny_teacher_dir)
    wd = Workdir(str(tmp_path))
    noop = lambda config, w: None  # noqa: E731
    workdir_lib.write_record(wd.stage_dir("finetune"), {"stage": "finetune", "status": "running",
                                                        "config_hash": "x"})
    with pytest.raises(main.StageRefused, match="finetune stage.* not finished"):
        main.run_stage("generate", noop, c, wd, {})
    workdir_lib.write_record(wd.stage_dir("distill"), {"stage": "distill", "status": "running",
                                                       "config_hash": "y"})
    with pytest.raises(main.StageRefused, match=r"reads the distill stage, which is not finished"):
        main.run_stage("export", noop, c, wd, {})
    assert not os.path.exists(wd.stage_dir("export"))


def test_corpus_changed_in_place_is_refused_done_or_resuming(gen):
    """Item 3: a finished generate over a changed corpus, and a resume over one."""
    c, wd = gen_config(gen), str(gen / "w")
    main.run_stage("generate", teacher_job(), c, wd, {})
    corpus = open(gen / "c.tsv").read()
    _touch(gen / "c.tsv", corpus.replace("cat", "dog").encode())
    with pytest.raises(main.StageRefused, match="input data.train"):
        main.run_stage("generate", teacher_job(), c, wd, {})
    # Interrupted after one shard, then the corpus changes: the job refuses to mix them.
    _touch(gen / "c.tsv", corpus.encode())
    calls = []
    with pytest.raises(RuntimeError, match="killed"):
        G.run(c, gen / "w2", generate_fn=fake_generate, load_fn=make_loader(), progress=False,
              on_shard_done=lambda n: (calls.append(n), (_ for _ in ()).throw(RuntimeError("killed"))))
    _touch(gen / "c.tsv", corpus.replace("mat", "hat").encode())
    with pytest.raises(G.GenerateError, match="data.train"):
        G.run(c, gen / "w2", generate_fn=fake_generate, load_fn=make_loader(), progress=False)


def test_student_vocabulary_smaller_than_tokenizer_refused_before_training(tmp_path, tiny_teacher_dir, monkeypatch):
    """Item 4: with SeqKD (no word-level KD) too, before any training step."""
    c = _pretrained_demo(tiny_teacher_dir)
    with c.unlocked():
        c.student.model.vocab_size = 100  # the tokenizer has 300
    monkeypatch.setattr(stages, "_train_stage", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=r"student.model.vocab_size: the student has 100 token "
                                         r"embeddings but its tokenizer has 300 tokens"):
        stages.run_distill(c, str(tmp_path))


def test_recipe_argument_typo_is_an_error_listing_the_valid_ones():
    """Item 5 (unknown --variants: tests/test_config.py::test_unknown_variant_is_refused)."""
    r = subprocess.run([sys.executable, "-m", "kd_flax.main", "distill", "--config",
                        "configs/demo_cpu.py:tinyy", "--workdir", "/nonexistent/w"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-1500:]
    assert "unknown argument(s) tinyy; allowed: tiny, mesh" in lines[0]
    for name in ("demo_cpu", "t5_enfr_seqkd", "bart_dqbart", "marian_enro"):
        with pytest.raises(config_base.ConfigError, match="allowed: tiny, mesh"):
            config_base_recipe(name, "tiny,meshh=cpu")


def test_changed_shard_is_refused_and_a_deleted_one_redone(gen):
    """Item 6: a shard emptied after the job finished is not read short without a word."""
    c, wd = gen_config(gen), str(gen / "w")
    main.run_stage("generate", teacher_job(), c, wd, {})
    part = gen / "w" / "generate" / "part-00001.jsonl"
    full = part.read_bytes()
    part.write_bytes(b"")
    with pytest.raises(ValueError, match=r"part-00001.jsonl has 0 records but the job wrote \d+"):
        G.load_pseudo_labels(wd)
    part.unlink()  # the recovery the message gives: delete it and run generate again
    main.run_stage("generate", teacher_job(), c, wd, {})
    assert part.read_bytes() == full
    assert len(G.load_pseudo_labels(wd)) == json.load(open(gen / "w" / "generate" / "manifest.json"))["counts"]["kept"]


# ----------------------------------------------------------------------------- recovery


def test_moved_workdir_resumes_the_teacher_job(gen):
    """Corpus inside the workdir, interrupted after 2 shards, moved: resumes at the new place."""
    a, b = gen / "a", gen / "b"
    os.makedirs(a / "data")
    shutil.copy(gen / "c.tsv", a / "data" / "c.tsv")
    c = gen_config(gen)
    with c.unlocked():
        c.data.train = str(a / "data" / "c.tsv")
    calls = []
    with pytest.raises(RuntimeError, match="killed"):
        main.run_stage("generate", teacher_job(calls, fail_after=2), c, str(a), {})
    shutil.move(a, b)
    with c.unlocked():
        c.data.train = str(b / "data" / "c.tsv")
    main.run_stage("generate", teacher_job(calls), c, str(b), {})
    manifest = json.load(open(b / "generate" / "manifest.json"))
    assert manifest["status"] == "done" and len(calls) == len(manifest["shards"])  # none redone


def test_sigterm_exits_143_and_the_stage_stays_resumable(tmp_path):
    def preempted(config, wd):
        io_utils.atomic_write_text(wd.stage_dir("distill", "ckpt", "4"), "checkpoint")
        stages._exit_preempted(type("R", (), {"preempted": True})(), wd.stage_dir("distill"))

    c = config_base_recipe("demo_cpu", "tiny")
    with pytest.raises(main.Preempted):
        main.run_stage("distill", preempted, c, str(tmp_path), {})
    assert workdir_lib.read_record(tmp_path / "distill")["status"] == "running"
    script = ("import sys; from absl import app; from kd_flax import main, workdir\n"
              "def run(*a, **k): raise workdir.Preempted('SIGTERM: checkpoint saved in X')\n"
              "main.run = run\n"
              "sys.argv = ['kd_flax.main', 'pipeline', '--config', 'configs/demo_cpu.py:tiny', '--workdir', 'W']\n"
              "app.run(main.main, flags_parser=main.parse_flags)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 143, r.stderr[-1500:]
    assert "preempted, re-run to resume" in r.stderr


def test_a_stage_that_produced_nothing_leaves_no_record(tmp_path):
    c = config_base_recipe("demo_cpu", "tiny")

    def bad(config, wd):
        raise ValueError("data.bucket_boundaries: bad")

    with pytest.raises(ValueError):
        main.run_stage("distill", bad, c, str(tmp_path), {})
    assert not os.path.exists(tmp_path / "distill" / "stage.json")
    with c.unlocked():
        c.data.bucket_boundaries = (8, 12)  # the corrected config runs
    main.run_stage("distill", lambda config, wd: {"ok": 1}, c, str(tmp_path), {})
    assert workdir_lib.read_record(tmp_path / "distill")["status"] == "done"


def test_one_process_per_workdir(tmp_path):
    wd = Workdir(str(tmp_path))
    with wd.lock():
        with pytest.raises(workdir_lib.WorkdirLocked, match=rf"held by pid {os.getpid()} on host"):
            with Workdir(str(tmp_path)).lock():
                pass
        with pytest.raises(workdir_lib.WorkdirLocked):
            main.run("export", config_base_recipe("demo_cpu", "tiny"), str(tmp_path))
    assert not os.path.exists(wd.lock_path)
    # A lock whose process is gone (kill -9) is taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    open(wd.lock_path, "w").write(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "since": 0}))
    with wd.lock() as holder:
        assert holder["pid"] == os.getpid()


def test_stray_temp_files_are_cleaned_on_resume(tmp_path):
    wd = Workdir(str(tmp_path))
    stray = [tmp_path / "distill" / ".stage.json.abc123.tmp",
             tmp_path / "distill" / "0_pseudo" / "ckpt" / "8.orbax-checkpoint-tmp-1700000000"]
    os.makedirs(stray[1])
    (stray[1] / "x").write_text("partial")
    stray[0].write_text("{")
    keep = tmp_path / "distill" / "stage.json"
    keep.write_text("{}")
    assert sorted(wd.clean_temps()) == sorted(map(str, stray))
    assert not any(p.exists() for p in stray) and keep.exists()


def test_tokenizer_is_saved_whole_and_a_damaged_one_is_retrained(tmp_path, monkeypatch):
    from kd_flax.models import tokenizer as tok_lib
    tok = word_tokenizer(tmp_path / "t")
    copied = []

    def dying_copy(src, dst):
        if len(copied) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        copied.append(os.path.basename(os.fspath(dst)))
        shutil.copy(src, dst)

    monkeypatch.setattr(io_utils, "copy_tree", dying_copy)
    with pytest.raises(OSError):
        tok_lib.save_tokenizer(tok, tmp_path / "half")
    assert copied and not (tmp_path / "half" / "tokenizer.json").exists()  # not trusted
    monkeypatch.undo()
    c = config_base_recipe("demo_cpu", "tiny")
    with c.unlocked():
        c.data.train = "synthetic:train:200"
    wd = Workdir(str(tmp_path / "w"))
    os.makedirs(wd.tokenizer_dir)
    open(os.path.join(wd.tokenizer_dir, "tokenizer.json"), "w").write('{"version": "1.0", "trunc')
    main.prepare(c, wd)
    io_utils.read_json(os.path.join(wd.tokenizer_dir, "tokenizer.json"))  # trained again


# ----------------------------------------------------------------------------- one-line errors


def test_damaged_inputs_are_named(tmp_path, tiny_teacher_dir):
    import gzip
    from kd_flax import corpus
    from kd_flax.models import load_pretrained, load_tokenizer
    gz = tmp_path / "train.src.gz"
    gz.write_bytes(gzip.compress(b"a b c\n" * 200)[:-30])
    with pytest.raises(ValueError, match=f"{gz}: truncated gzip file"):
        corpus.read_corpus(str(gz))
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(ValueError, match="plain.gz: not a valid gzip file"):
        corpus.read_corpus(str(tmp_path / "plain.gz"))
    t = tmp_path / "t"
    shutil.copytree(tiny_teacher_dir, t)
    st = t / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{st}: not a valid safetensors file"):
        load_pretrained(str(t))
    tj = t / "tokenizer.json"
    tj.write_bytes(tj.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{tj}: not valid JSON"):
        load_tokenizer(str(t))


def test_corpus_problems_are_caught(tmp_path):
    from kd_flax import corpus
    (tmp_path / "a.src").write_text("x\n" * 37)
    (tmp_path / "a.tgt").write_text("y\n" * 40)
    rep = corpus.read_corpus(f"{tmp_path}/a.src+{tmp_path}/a.tgt").report
    assert {b.message for b in rep.samples if b.kind == "length_mismatch"} == {f"{tmp_path}/a.src has only 37 lines"}


def test_empty_corpus_refused_by_generate(gen):
    (gen / "empty.tsv").write_text("\tno source\n\n")
    c = gen_config(gen)
    with c.unlocked():
        c.data.train = str(gen / "empty.tsv")
    with pytest.raises(G.GenerateError, match="empty.tsv has no valid lines"):
        main.run_stage("generate", teacher_job(), c, str(gen / "w"), {})
    assert not os.path.exists(gen / "w" / "generate")  # nothing produced, no record


def test_validator_catches_data_keys_up_front():
    c = config_base_recipe("demo_cpu", "tiny")
    with c.unlocked():
        c.data.max_source_length = 1
        c.data.bucket_boundaries = (-4, 8)
    with pytest.raises(config_base.ConfigError) as e:
        config_base.validate(c, check_paths=False)
    assert "data.max_source_length: 1 out of range" in str(e.value)
    assert "data.bucket_boundaries: (-4, 8) is not allowed" in str(e.value)


def test_os_errors_are_one_line_naming_the_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io_utils.os, "fsync", full)
    with pytest.raises(OSError) as e:
        io_utils.atomic_write_json(target, {"a": 1})
    assert main.error_line(e.value) == f"error: {target}: No space left on device"
    assert os.listdir(tmp_path) == []  # no temp file left
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    for wd, why in ((tmp_path / "file" / "w", "Not a directory"), ("/sys/kd_flax_ro", "not permitted")):
        r = subprocess.run([sys.executable, "-m", "kd_flax.main", "export", "--config", "configs/demo_cpu.py:tiny",
                            "--workdir", str(wd), "--variants=seqkd"], cwd=ROOT, env=ENV,
                           capture_output=True, text=True)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-1500:]
        assert str(wd) in lines[0] and (why is None or why in lines[0]), lines[0]
