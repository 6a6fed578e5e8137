"""The one CLI: `python -m kd_flax.main STAGE --config FILE[:ARG] --workdir DIR [--config.key=value ...]`.

Stages: finetune, generate, distill, evaluate, export, pipeline (all of them, in order).

Every stage writes into `WORKDIR/<stage>/` (per variant under `WORKDIR/variants/<name>/`
for the student stages) and records a `stage.json`: the hash of the config it depends on
(its own keys plus the upstream stages' hashes). A stage that finished with the same hash
is skipped; a stage whose config changed is refused with the changed keys named (pass
`--force` to redo it); an interrupted stage resumes (each stage resumes its own work).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from kd_flax import config_base, io_utils

STAGES = ("finetune", "generate", "distill", "evaluate", "export")
STUDENT_STAGES = ("distill", "evaluate", "export")

_CONFIG = config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/demo_cpu.py:tiny")
_WORKDIR = flags.DEFINE_string("workdir", None, "output directory (local path or gs://...)")
_FORCE = flags.DEFINE_bool("force", False, "redo a stage whose config changed instead of refusing")
_VARIANTS = flags.DEFINE_list("variants", None, "student variants to run (default: all in the config)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "multi-process: host:port of process 0 (else auto-detected on TPU pods / SLURM)")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "multi-process: number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "multi-process: this process's index")


class StageRefused(RuntimeError):
    pass


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
        return {"evaluate": cfg["evaluate"], "test": data["test"]}
    if stage == "export":
        return {"export": cfg["export"], "quant": cfg["student"]["quant"]}
    raise ValueError(stage)


_UPSTREAM = {"finetune": (), "generate": ("finetune",), "distill": ("generate",),
             "evaluate": ("finetune", "distill"), "export": ("distill",)}


def stage_record(stage: str, cfg: dict, hashes: dict[str, str]) -> dict:
    keys = _stage_keys(stage, cfg)
    upstream = {u: hashes[u] for u in _UPSTREAM[stage] if u in hashes}
    return {"stage": stage, "config": keys, "upstream": upstream,
            "config_hash": config_base.config_hash({"keys": keys, "upstream": upstream})}


def _read_json(path: str) -> dict | None:
    return io_utils.read_json(path) if io_utils.exists(path) else None


def _write_json(path: str, obj: dict) -> None:
    io_utils.atomic_write_json(path, json.loads(json.dumps(obj, default=str)))


def _portable(cfg: dict, root: str) -> dict:
    """The config with the workdir written as $WORKDIR, so files that `prepare` put inside the
    workdir (synthetic data, a trained tokenizer) do not make the hash depend on where it is."""
    root = root if io_utils.is_remote(root) else os.path.abspath(root)
    return json.loads(json.dumps(cfg, default=str).replace(json.dumps(root)[1:-1], "$WORKDIR"))


def run_stage(stage: str, fn: Callable[[Any, str], Any], config, workdir: str,
              hashes: dict[str, str], *, force: bool = False, is_writer: bool = True,
              root: str | None = None) -> str:
    """Run one stage with skip / refuse / resume bookkeeping; returns its config hash.

    `root` is the top workdir (variants run in subdirectories of it)."""
    rec = stage_record(stage, _portable(config.to_dict(), root or workdir), hashes)
    path = os.path.join(workdir, stage, "stage.json")
    old = _read_json(path)
    if old is not None and old.get("config_hash") != rec["config_hash"]:
        changed = config_base.diff_keys({"config": old.get("config"), "upstream": old.get("upstream")},
                                        {"config": rec["config"], "upstream": rec["upstream"]})
        if not force:
            raise StageRefused(
                f"stage {stage!r} in {os.path.join(workdir, stage)} was produced with a different config; "
                f"changed: {', '.join(changed) or '(upstream)'}. Use another --workdir, or --force to redo it.")
        logging.warning("--force: redoing stage %s (changed: %s)", stage, changed)
        _remove_tree(os.path.join(workdir, stage))
        old = None
    hashes[stage] = rec["config_hash"]
    if old is not None and old.get("status") == "done":
        logging.info("stage %s: done already (config %s), skipped", stage, rec["config_hash"])
        return rec["config_hash"]
    if is_writer:
        _write_json(path, dict(rec, status="running", started=time.time()))
    t0 = time.time()
    result = fn(config, workdir)
    _sync(f"stage-{stage}-done")
    if is_writer:
        _write_json(path, dict(rec, status="done", seconds=round(time.time() - t0, 1),
                               result=result if isinstance(result, dict) else None))
    return rec["config_hash"]


def _remove_tree(path: str) -> None:
    p = io_utils.as_path(path)
    if p.exists():
        p.rmtree()


def _sync(name: str) -> None:
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------
# Stage functions (imported lazily: `generate` should not import the trainer, etc.)
# ---------------------------------------------------------------------------

def _stage_fn(stage: str) -> Callable[[Any, str], Any]:
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


def variant_workdir(workdir: str, name: str) -> str:
    """Student stages of a variant live in WORKDIR/variants/NAME; shared stages are linked in."""
    if not name:
        return workdir
    vdir = os.path.join(workdir, "variants", name)
    if "://" not in workdir:
        os.makedirs(vdir, exist_ok=True)
        for shared in ("finetune", "generate", "data"):
            link = os.path.join(vdir, shared)
            try:
                os.symlink(os.path.join("..", "..", shared), link)
            except FileExistsError:
                pass  # made by an earlier run, or by another process of this one (multi-host)
    return vdir


def prepare(config, workdir: str, *, is_writer: bool = True) -> None:
    """Materialise `synthetic:` data specs and, for a teacher trained from scratch, its tokenizer.

    Both are pure functions of the config, so re-running reuses what is there. The config is
    updated in place to point at the files (under WORKDIR/data and WORKDIR/tokenizer).
    """
    from kd_flax import synthetic
    if not io_utils.is_remote(workdir):
        workdir = os.path.abspath(workdir)  # `_portable` recognises these paths in stage hashes
    data_dir = os.path.join(workdir, "data")
    with config.unlocked():
        for key in ("train", "dev"):
            if config.data[key].startswith("synthetic:"):
                config.data[key] = synthetic.materialize(config.data[key], data_dir) if is_writer \
                    else os.path.join(data_dir, _synthetic_name(config.data[key]))
        tests = list(config.data.test)
        config.data.test = [synthetic.materialize(t, data_dir) if t.startswith("synthetic:") and is_writer
                            else os.path.join(data_dir, _synthetic_name(t)) if t.startswith("synthetic:") else t
                            for t in tests]
        if config.teacher.init == "scratch" and not config.teacher.tokenizer:
            tok_dir = os.path.join(workdir, "tokenizer")
            if is_writer and not os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
                from kd_flax import data as data_lib
                from kd_flax.models import train_tokenizer
                texts = []
                for ex in data_lib.read_corpus(config.data.train, src_lang=config.data.src_lang,
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


def _synthetic_name(spec: str) -> str:
    _, split, n = spec.split(":")
    return f"{split}-{n}.jsonl"


def run(stage: str, config, workdir: str, *, force: bool = False, variants: list[str] | None = None) -> dict:
    """Run one stage (or the pipeline) programmatically; returns {stage or variant/stage: hash}."""
    import jax
    config_base.validate(config)
    is_writer = jax.process_index() == 0
    prepare(config, workdir, is_writer=is_writer)
    hashes: dict[str, str] = {}
    wanted = STAGES if stage == "pipeline" else (stage,)
    # Upstream hashes come from the stage records already in the workdir.
    for s in STAGES:
        old = _read_json(os.path.join(workdir, s, "stage.json"))
        if old and s not in wanted:
            hashes[s] = old["config_hash"]
    results: dict[str, str] = {}
    for s in wanted:
        if s not in STUDENT_STAGES:
            if s == "finetune" and config.teacher.init != "scratch" and config.finetune.steps <= 0:
                continue  # a pretrained teacher used as is
            results[s] = run_stage(s, _stage_fn(s), config, workdir, hashes, force=force, is_writer=is_writer)
    student_stages = [s for s in wanted if s in STUDENT_STAGES]
    if student_stages:
        vconfigs = variant_configs(config)
        if "" not in vconfigs and "evaluate" in student_stages:
            # With variants, the teacher is evaluated once here and each variant only its student.
            if "teacher" in config.evaluate.models:
                tcfg = config.copy_and_resolve_references()
                with tcfg.unlocked():
                    tcfg.evaluate.models = ["teacher"]
                results["evaluate"] = run_stage("evaluate", _stage_fn("evaluate"), tcfg, workdir, hashes,
                                                force=force, is_writer=is_writer)
            for vcfg in vconfigs.values():
                with vcfg.unlocked():
                    vcfg.evaluate.models = [m for m in vcfg.evaluate.models if m != "teacher"]
        for name, vcfg in vconfigs.items():
            if variants and name not in variants:
                continue
            vdir = variant_workdir(workdir, name)
            vhashes = dict(hashes)
            for s in STUDENT_STAGES:
                old = _read_json(os.path.join(vdir, s, "stage.json"))
                if old and s not in student_stages:
                    vhashes[s] = old["config_hash"]
            for s in student_stages:
                key = f"{name}/{s}" if name else s
                results[key] = run_stage(s, _stage_fn(s), vcfg, vdir, vhashes, force=force,
                                         is_writer=is_writer, root=workdir)
    if stage == "pipeline" and is_writer:
        from kd_flax import report
        report.write_report(config, workdir)
    return results


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


def main(argv: list[str]) -> None:
    usage = (f"usage: python -m kd_flax.main STAGE --config FILE[:ARG] --workdir DIR [--config.key=value ...]\n"
             f"  STAGE: one of {', '.join(STAGES + ('pipeline',))}")
    if len(argv) != 2 or argv[1] not in STAGES + ("pipeline",):
        sys.exit(f"error: expected one STAGE, got {argv[1:]}\n{usage}")
    if _CONFIG.value is None or not _WORKDIR.value:
        sys.exit(f"error: --config and --workdir are required\n{usage}")
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
        # Orbax and XLA log every checkpoint step at INFO; keep the console for progress bars.
        logging.set_verbosity(logging.WARNING)
    _maybe_init_distributed()
    try:
        results = run(argv[1], _CONFIG.value, _WORKDIR.value, force=_FORCE.value, variants=_VARIANTS.value)
    except (config_base.ConfigError, StageRefused, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    logging.info("finished: %s", results)


if __name__ == "__main__":
    app.run(main)
