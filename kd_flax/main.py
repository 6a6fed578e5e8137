"""The one CLI: `python -m kd_flax.main STAGE --config FILE[:ARG] --workdir DIR [--config.key=value ...]`.

Stages: finetune, generate, distill, evaluate, export, pipeline (all of them, in order).

Every stage writes into `WORKDIR/<stage>/` (per variant under `WORKDIR/variants/<name>/`
for the student stages) and records a `stage.json`: the hash of the config it depends on
(its own keys plus the upstream stages' hashes). A stage that finished with the same hash
is skipped; a stage whose config changed is refused with the changed keys named (pass
`--force` to redo it); an interrupted stage resumes (each stage resumes its own work).
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from kd_flax import config_base, io_utils
from kd_flax import workdir as workdir_lib
from kd_flax.workdir import STAGES, STUDENT_STAGES, Workdir

_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/demo_cpu.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (local path or gs://...)")
_FORCE = flags.DEFINE_bool("force", False, "redo a stage whose config changed instead of refusing")
_VARIANTS = flags.DEFINE_list("variants", None, "student variants to run (default: all in the config)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "multi-process: host:port of process 0 (else auto-detected on TPU pods / SLURM)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")
_COMPILE_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.environ.get("KD_FLAX_COMPILATION_CACHE"),
    "JAX's persistent compilation cache (local or gs://): a rerun, a resume or another variant "
    "of the same shapes loads each compiled step instead of recompiling it. Default: "
    "$KD_FLAX_COMPILATION_CACHE, else WORKDIR/.xla_cache for a local workdir (off for gs://); "
    "'none' = off")


StageRefused = workdir_lib.StageRefused
Preempted = workdir_lib.Preempted


# ---------------------------------------------------------------------------
# Which config keys each stage depends on (its hash also folds in upstream hashes).
# ---------------------------------------------------------------------------

def _stage_keys(stage: str, cfg: dict) -> dict:
    data = cfg["data"]
    if stage == "finetune":
        return {"seed": cfg["seed"], "data": data, "teacher": cfg["teacher"], "finetune": cfg["finetune"]}
    if stage == "generate":
        return {"teacher": cfg["teacher"], "generate": cfg["generate"],
                "data": {k: data[k] for k in ("train", "src_lang", "tgt_lang", "source_prefix",
                                               "max_source_length", "max_train_examples",
                                               "bucket_boundaries")}}
    if stage == "distill":
        return {"seed": cfg["seed"], "student": cfg["student"], "distill": cfg["distill"], "data": data}
    if stage == "evaluate":
        rec = {"evaluate": cfg["evaluate"], "test": data["test"]}
        if cfg["export"].get("ctranslate2"):  # the student_ct2_* row (absent: records stay as they were)
            rec["ctranslate2"] = cfg["export"]["ctranslate2"]
        return rec
    if stage == "export":
        return {"export": cfg["export"], "quant": cfg["student"]["quant"]}
    raise ValueError(stage)


_UPSTREAM = {"finetune": (), "generate": ("finetune",), "distill": ("generate",),
             "evaluate": ("finetune", "distill"), "export": ("distill",)}


def stage_record(stage: str, cfg: dict, hashes: dict[str, str], inputs: dict[str, str] | None = None) -> dict:
    return workdir_lib.new_record(stage, _stage_keys(stage, cfg),
                                  {u: hashes[u] for u in _UPSTREAM[stage] if u in hashes}, inputs)


def distill_prefix_hashes(config, wd: Workdir, hashes: dict[str, str], *, write_cache: bool = True) -> list[str]:
    """One hash per `distill.stages` entry i: the distill stage's own hash (`stage_record`:
    its keys, upstream hashes and input digests) computed as if `distill.stages` ended at
    entry i. Sub-stage i of two variants with the same prefix hash trains to the same params;
    the last entry's is the distill stage's hash."""
    out = []
    q = config.student.quant
    quantized = bool(q.weight_bits or q.act_bits)
    for i in range(len(config.distill.stages)):
        c = config.copy_and_resolve_references()
        prefix = [dict(st) for st in config.distill.stages][:i + 1]
        with c.unlocked():
            if not (quantized and any(st.get("quant", True) for st in prefix)):
                # A float prefix trains the same whatever student.quant says for later stages:
                # [float SeqKD, W8A8 fine-tuning] reuses plain SeqKD's sub-stage 0.
                c.student.quant = config_base.base_config().student.quant
                prefix = [{k: v for k, v in st.items() if k != "quant"} for st in prefix]
            c.distill.stages = prefix
        out.append(stage_record("distill", wd.portable(c.to_dict()), hashes,
                                stage_inputs("distill", c, wd, write_cache=write_cache))["config_hash"])
    return out


def stage_inputs(stage: str, config, wd: Workdir, *, write_cache: bool = True) -> dict[str, str]:
    """Content digests of the files `stage` reads, by role: the teacher's weights and
    tokenizer, the corpus files, a pretrained student. An input that does not exist yet is
    left out (the stage itself then fails naming it); an unfinished finetune is refused."""
    d, out = config.data, {}

    def digest(role, path):
        if path and io_utils.exists(path):
            out[role] = wd.digest(path, write_cache=write_cache)

    def corpus(role, spec):
        h = wd.corpus_digest(spec, src_lang=d.get("src_lang") or None, tgt_lang=d.get("tgt_lang") or None,
                             write_cache=write_cache)
        if h:
            out[role] = h

    def teacher(tokenizer):
        try:
            t_dir = wd.teacher_dir(config)
        except StageRefused:
            raise
        except ValueError:
            return  # no teacher yet: the stage fails naming teacher.path
        digest("teacher", t_dir)
        tok = tokenizer(t_dir)
        if tok and os.fspath(tok) != os.fspath(t_dir):
            digest("tokenizer", tok)

    if stage == "finetune":
        if config.teacher.init != "scratch":
            digest("teacher", config.teacher.path)
        if (config.teacher.tokenizer or None) != (config.teacher.path or None):
            digest("tokenizer", config.teacher.tokenizer)
        corpus("data.train", d.train)
        corpus("data.dev", d.dev)
    elif stage == "generate":
        teacher(lambda t: config.teacher.get("tokenizer") or t)  # what pseudo_labels.run reads
        corpus("data.train", d.train)
    elif stage == "distill":
        teacher(lambda t: wd.teacher_tokenizer_dir(config))
        if any(dict(st).get("targets") in ("gold", "student") for st in config.distill.stages):
            corpus("data.train", d.train)
        corpus("data.dev", d.dev)
        if config.student.init == "pretrained":
            digest("student", config.student.path)
    elif stage == "evaluate":
        for i, spec in enumerate(d.test if isinstance(d.test, (list, tuple)) else [d.test]):
            corpus(f"data.test[{i}]", spec)
        if "teacher" in config.evaluate.models:
            teacher(lambda t: wd.teacher_tokenizer_dir(config))
    return out


def _check_upstream_finished(stage: str, wd: Workdir) -> None:
    """A stage consumes only finished upstream stages (an unfinished one's outputs are partial)."""
    for u in _UPSTREAM[stage]:
        rec = wd.record(u)
        if rec is not None and rec.get("status") != "done":
            raise StageRefused(
                f"stage {stage!r} reads the {u} stage, which is not finished "
                f"({io_utils.join(wd.stage_dir(u), workdir_lib.RECORD)}: status {rec.get('status')!r}); "
                f"run {u} to the end first (same command, or `pipeline`)")


def _produced_nothing(directory) -> bool:
    """True when a stage's directory holds no output: only its record, the teacher job's
    manifest, TensorBoard logs, hidden temp files."""
    p = io_utils.as_path(directory)
    if not p.exists():
        return True
    stack = [p]
    while stack:
        d = stack.pop()
        for f in d.iterdir():
            if f.name.startswith(".") or f.name in (workdir_lib.RECORD, "manifest.json", "tb"):
                continue
            if f.is_dir():
                stack.append(f)
            else:
                return False
    return True


def _outputs_gone(stage: str, directory) -> bool:
    """A finished stage some of whose outputs were deleted since (it is run again, to redo them)."""
    if stage == "generate":
        from kd_flax import pseudo_labels
        return bool(pseudo_labels.missing_shards(directory))
    return False


def run_stage(stage: str, fn: Callable[[Any, Workdir], Any], config, workdir, hashes: dict[str, str],
              *, force: bool = False, is_writer: bool = True) -> str:
    """Run one stage with skip / refuse / resume bookkeeping; returns its config hash.

    `workdir`: a `Workdir` (a variant's view for the student stages) or a path. The record
    holds the stage's config keys, its upstream records' hashes and the content digests of
    what it reads (`stage_inputs`); `force` also reaches a stage function that takes it (the
    teacher job), and distill gets its sub-stages' `distill_prefix_hashes`. A stage that fails
    having produced nothing leaves no record behind."""
    import inspect
    wd = Workdir.of(workdir)
    directory = wd.stage_dir(stage)
    _check_upstream_finished(stage, wd)
    rec = stage_record(stage, wd.portable(config.to_dict()), hashes,
                       stage_inputs(stage, config, wd, write_cache=is_writer))
    old = workdir_lib.check_record(workdir_lib.read_record(directory), rec, directory, force=force,
                                   remove=(lambda: io_utils.rmtree(directory)) if is_writer else (lambda: None))
    hashes[stage] = rec["config_hash"]
    if old is not None and old.get("status") == "done" and not _outputs_gone(stage, directory):
        logging.info("stage %s: done already (config %s), skipped", stage, rec["config_hash"])
        return rec["config_hash"]
    if is_writer:
        workdir_lib.write_record(directory, dict(rec, status="running", started=time.time()))
    t0 = time.time()
    params = inspect.signature(fn).parameters
    kw = {"force": force} if "force" in params else {}
    if "prefix_hashes" in params:
        kw["prefix_hashes"] = distill_prefix_hashes(config, wd, hashes, write_cache=is_writer)
    try:
        result = fn(config, wd, **kw)
    except BaseException:
        if is_writer and _produced_nothing(directory):
            io_utils.rmtree(directory)  # nothing to resume: no record binds the next run
        raise
    _sync(f"stage-{stage}-done")
    if is_writer:
        workdir_lib.write_record(directory, dict(rec, status="done", seconds=round(time.time() - t0, 1),
                                                 result=result if isinstance(result, dict) else None))
    return rec["config_hash"]


def _sync(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------
# Stage functions (imported lazily: `generate` should not import the trainer, etc.)
# ---------------------------------------------------------------------------

def _stage_fn(stage: str) -> Callable[[Any, Workdir], Any]:
    if stage == "finetune":
        from kd_flax import stages
        return stages.run_finetune
    if stage == "generate":
        from kd_flax import pseudo_labels
        return pseudo_labels.run
    if stage == "distill":
        from kd_flax import stages
        return stages.run_distill
    if stage == "evaluate":
        from kd_flax import evaluate
        return evaluate.run
    if stage == "export":
        from kd_flax import export
        return export.run
    raise ValueError(stage)


def variant_configs(config) -> dict[str, Any]:
    """{name: config with that variant's overrides}; one 'student' when none are defined."""
    variants = config.variants.to_dict() if hasattr(config.variants, "to_dict") else dict(config.variants)
    if not variants:
        return {"": config}
    out = {}
    for name, overrides in variants.items():
        c = config.copy_and_resolve_references()
        with c.unlocked():
            config_base.apply_overrides(c, overrides)
        out[name] = c
    return out


def prepare(config, workdir, *, is_writer: bool = True) -> None:
    """Materialise `synthetic:` data specs and, for a teacher trained from scratch, its tokenizer.

    Both are pure functions of the config, so re-running reuses what is there. The config is
    updated in place to point at the files (under WORKDIR/data and WORKDIR/tokenizer).
    """
    from kd_flax import synthetic
    wd = Workdir.of(workdir)

    def data_file(spec: str) -> str:
        if not spec.startswith("synthetic:"):
            return spec
        if is_writer:
            return synthetic.materialize(spec, wd.data_dir)
        return os.path.join(wd.data_dir, _synthetic_name(spec)) if not wd.remote \
            else f"{wd.data_dir}/{_synthetic_name(spec)}"

    with config.unlocked():
        for key in ("train", "dev"):
            config.data[key] = data_file(config.data[key])
        config.data.test = [data_file(t) for t in config.data.test]
        if config.teacher.init == "scratch" and not config.teacher.tokenizer:
            tok_dir = wd.tokenizer_dir
            if is_writer and not _tokenizer_complete(tok_dir):
                from kd_flax import corpus as corpus_lib
                from kd_flax.models import train_tokenizer
                texts = []
                for ex in corpus_lib.read_corpus(config.data.train, src_lang=config.data.src_lang,
                                               tgt_lang=config.data.tgt_lang):
                    texts.append(ex.src)
                    if ex.ref:
                        texts.append(ex.ref)
                family = config.teacher.model.get("model_type", "t5")
                # BART/mBART ids: <s>=0 <pad>=1 </s>=2; T5 and Marian: <pad>=0 </s>=1.
                style = "bart" if family in ("bart", "mbart") else "t5"
                train_tokenizer(texts, config.teacher.tokenizer_vocab_size, path=tok_dir,
                                kind=config.teacher.tokenizer_kind, style=style)
            config.teacher.tokenizer = tok_dir
    _sync("prepare-done")


def _tokenizer_complete(tok_dir) -> bool:
    """A tokenizer `prepare` saved in full (`save_tokenizer` writes tokenizer.json last) and
    whose tokenizer.json parses; a half-written one is trained again."""
    path = io_utils.join(tok_dir, "tokenizer.json")
    if not io_utils.exists(path):
        return False
    try:
        io_utils.read_json(path)
    except ValueError:
        logging.warning("%s is damaged; training the tokenizer again", path)
        return False
    return True


def _synthetic_name(spec: str) -> str:
    _, split, n = spec.split(":")
    return f"{split}-{n}.jsonl"


def run(stage: str, config, workdir, *, force: bool = False, variants: list[str] | None = None) -> dict:
    """Run one stage (or the pipeline) programmatically; returns {stage or variant/stage: hash}."""
    import jax
    config_base.validate(config)
    wd = Workdir.of(workdir)
    vconfigs = variant_configs(config)
    unknown = [v for v in variants or () if v not in vconfigs]
    if unknown:
        raise config_base.ConfigError(
            f"--variants: {', '.join(unknown)} not in the config; allowed: {', '.join(n for n in vconfigs if n)}"
            if any(vconfigs) else f"--variants: {', '.join(unknown)}: the config defines no variants")
    is_writer = jax.process_index() == 0
    with (wd.lock() if is_writer else _no_lock()):
        if is_writer:
            for path in wd.clean_temps():
                logging.info("removed %s (left by an interrupted run)", path)
        return _run_locked(stage, config, wd, force=force, variants=variants, is_writer=is_writer)


@contextlib.contextmanager
def _no_lock():
    yield None


def _run_locked(stage: str, config, wd: Workdir, *, force: bool, variants, is_writer: bool) -> dict:
    prepare(config, wd, is_writer=is_writer)
    hashes: dict[str, str] = {}
    wanted = STAGES if stage == "pipeline" else (stage,)
    # Upstream hashes come from the stage records already in the workdir.
    for s in STAGES:
        old = wd.record(s)
        if old and s not in wanted and old.get("status") == "done":
            hashes[s] = old["config_hash"]
    results: dict[str, str] = {}
    for s in wanted:
        if s not in STUDENT_STAGES:
            if s == "finetune" and config.teacher.init != "scratch" and config.finetune.steps <= 0:
                continue  # a pretrained teacher used as is
            results[s] = run_stage(s, _stage_fn(s), config, wd, hashes, force=force, is_writer=is_writer)
    student_stages = [s for s in wanted if s in STUDENT_STAGES]
    if student_stages:
        vconfigs = variant_configs(config)
        if "" not in vconfigs and "evaluate" in student_stages:
            # With variants, the teacher is evaluated once here and each variant only its student.
            if "teacher" in config.evaluate.models:
                tcfg = config.copy_and_resolve_references()
                with tcfg.unlocked():
                    tcfg.evaluate.models = ["teacher"]
                results["evaluate"] = run_stage("evaluate", _stage_fn("evaluate"), tcfg, wd, hashes,
                                                force=force, is_writer=is_writer)
            for vcfg in vconfigs.values():
                with vcfg.unlocked():
                    vcfg.evaluate.models = [m for m in vcfg.evaluate.models if m != "teacher"]
        for name, vcfg in vconfigs.items():
            if variants and name not in variants:
                continue
            vwd = wd.for_variant(name)
            vhashes = dict(hashes)
            for s in STUDENT_STAGES:
                old = vwd.record(s)
                if old and s not in student_stages and old.get("status") == "done":
                    vhashes[s] = old["config_hash"]
            for s in student_stages:
                key = f"{name}/{s}" if name else s
                results[key] = run_stage(s, _stage_fn(s), vcfg, vwd, vhashes, force=force, is_writer=is_writer)
    if stage == "pipeline" and is_writer:
        from kd_flax import report
        report.write_report(config, wd)
    return results


def error_line(e: BaseException) -> str:
    """The CLI's message for a failed run: ``error: ...`` naming the file or key. An
    ``OSError`` (read-only or not-a-directory workdir, disk full) is named by its file."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError) or \
            (isinstance(e, FileNotFoundError) and e.filename):
        where = e.filename or ""
        return f"error: {where}{': ' if where else ''}{e.strerror or e}"
    return f"error: {e}"


def _maybe_init_distributed() -> None:
    import jax
    if (_COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")) and \
            os.environ.get("JAX_PLATFORMS", "") == "cpu":
        # Several CPU processes (the multi-host test, or a CPU cluster) talk through gloo.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if _COORDINATOR.value:
        jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                                   num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or \
            int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()  # TPU pod slice / SLURM / env: auto-detected


def compilation_cache_dir(flag: str | None, workdir: str) -> str | None:
    """The cache directory `main` uses: the flag's ('none' or '' = off), else WORKDIR/.xla_cache
    for a local workdir. On by default because a recipe's variants recompile the same programs:
    each bucket shape costs ~10 s of XLA compile per train step on a 2-core CPU, 16 shapes per
    student in the Multi30k recipe. Off for gs:// by default (each entry would be a GCS object)."""
    if flag is not None:
        return None if flag.strip().lower() in ("", "none", "off") else flag
    from kd_flax import io_utils
    return None if io_utils.is_remote(workdir) else os.path.join(io_utils.abspath(workdir), ".xla_cache")


def enable_compilation_cache(directory: str, min_compile_secs: float = 1.0) -> None:
    """Keep every XLA executable that took >= `min_compile_secs` to compile in `directory`,
    keyed by the program, its shardings, the devices and the jax/XLA versions: a later process
    (a rerun, a resume after preemption, the next variant of the same shapes) loads it."""
    import jax
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str]) -> None:
    usage = (f"usage: python -m kd_flax.main STAGE --config FILE[:ARG] --workdir DIR [--config.key=value ...]\n"
             f"  STAGE: one of {', '.join(STAGES + ('pipeline',))}")
    if len(argv) != 2 or argv[1] not in STAGES + ("pipeline",):
        sys.exit(f"error: expected one STAGE, got {argv[1:]}\n{usage}")
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.exit(f"error: --config and --workdir are required\n{usage}")
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
        # Orbax and XLA log every checkpoint step at INFO; keep the console for progress bars
        # and, where stderr is no terminal (no bars), kd_flax's periodic progress lines.
        logging.set_verbosity(logging.WARNING)
        from kd_flax.metrics import PROGRESS_LOGGER
        std_logging.getLogger(PROGRESS_LOGGER).setLevel(std_logging.INFO)
    _maybe_init_distributed()
    cache_dir = compilation_cache_dir(_COMPILE_CACHE.value, _WORKDIR.value)
    if cache_dir:
        enable_compilation_cache(cache_dir)
    try:
        results = run(argv[1], _CONFIG.value, _WORKDIR.value, force=_FORCE.value, variants=_VARIANTS.value)
    except Preempted as e:
        sys.stderr.write(f"{e}: preempted, re-run to resume\n")
        sys.exit(143)  # 128 + SIGTERM: a scheduler must not take this for success
    except (ValueError, OSError) as e:  # ConfigError, StageRefused, FileNotFoundError too
        sys.exit(error_line(e))
    logging.info("finished: %s", results)


# ---------------------------------------------------------------------------
# Command-line errors: one line naming what is wrong, exit status 2
# ---------------------------------------------------------------------------


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def _load_recipe(spec: str):
    """`FILE[:ARG]` -> its `get_config(ARG)`; a missing or broken file is a one-line error."""
    import importlib.util
    import traceback
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise config_base.ConfigError(f"--config {spec}: no such file {path!r}")
    try:
        module_spec = importlib.util.spec_from_file_location("kd_flax_recipe", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is reported, in one line
        frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == os.path.abspath(path)]
        where = f"{path}:{frames[-1].lineno}" if frames else path
        raise config_base.ConfigError(f"--config {spec}: {where}: {type(e).__name__}: {e}") from None


def _explain_override(config, key: str, value: str) -> str | None:
    """What is wrong with `--config.KEY=VALUE` against the loaded config, or None if nothing."""
    import difflib
    node, walked = config, []
    for part in key.split("."):
        children = node.keys() if hasattr(node, "keys") else []
        if part not in children:
            everything = list(config_base.flat_keys(config.to_dict()))
            here = ".".join(walked + [part])
            close = difflib.get_close_matches(here, everything, n=3, cutoff=0.6)
            if not close:
                close = [k for k in everything if k.startswith(".".join(walked) + ".")][:6] if walked else []
            hint = f"; closest valid keys: {', '.join(close)}" if close else ""
            return f"--config.{key}: no such key{hint}"
        node, walked = node[part], walked + [part]
    default = node
    kinds = {bool: ("True", "False"), int: None, float: None}
    if isinstance(default, bool):
        if value not in kinds[bool] + ("true", "false", "1", "0"):
            return f"--config.{key}={value}: expected True or False"
    elif isinstance(default, (int, float)):
        try:
            type(default)(value)
        except ValueError:
            return f"--config.{key}={value}: expected {'an int' if isinstance(default, int) else 'a number'}, got {value!r}"
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (exit 2) for a bad `--config` file, an unknown
    `--config.KEY`, or a value of the wrong type, instead of ml_collections' tracebacks."""
    try:
        spec = _flag_value(argv, "config")
        if spec is not None:
            config = _load_recipe(spec)
            for a in argv[1:]:
                if a.startswith("--config.") and "=" in a:
                    key, value = a[len("--config."):].split("=", 1)
                    problem = _explain_override(config, key, value)
                    if problem:
                        raise config_base.ConfigError(problem)
        return flags.FLAGS(argv)
    except config_base.ConfigError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - absl / ml_collections parse errors, as one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.stderr.write(f"error: {msg}\n")
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
