"""Stage plumbing: `finetune` (the teacher on gold pairs) and `distill` (the student on
pseudo-labels and/or gold, one sub-stage per `distill.stages` entry).

`kd_flax.train` holds the state, optimizer, step, loop and checkpoints; this module turns a
config and a workdir into calls of it: which model, which data, which teacher, which rules.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from kd_flax import on_policy, sharding
from kd_flax import workdir as workdir_lib
from kd_flax.config_base import STAGE_TARGETS, cfg_get as _get
from kd_flax.objectives import LossSpec
from kd_flax.train import (init_train_state, load_best_params, make_eval_step, make_train_step,
                           model_batch, split_model, train, _merge)
from kd_flax.workdir import Workdir

log = logging.getLogger(__name__)


def _train_overrides(tcfg) -> dict:
    """Model-config fields the train block controls (compute dtype, remat)."""
    out = {"dtype": _get(tcfg, "dtype", "float32")}
    if _get(tcfg, "remat", False):
        out["remat"] = _get(tcfg, "remat")
    return out


def _tokenized(examples, tokenizer, config):
    from kd_flax import data as data_lib
    return data_lib.tokenize_examples(examples, tokenizer, max_source_length=config.data.max_source_length,
                                      max_target_length=config.data.max_target_length,
                                      source_prefix=config.data.source_prefix)


def _batch_fn(examples, model_config, tcfg, config):
    from kd_flax import data as data_lib
    per_step = int(tcfg.batch_size) * int(_get(tcfg, "grad_accum", 1) or 1)

    def make(start_step: int):
        return data_lib.batches(examples, per_step, int(config.seed), start_step,
                                pad_id=model_config.pad_token_id, eos_id=model_config.eos_token_id,
                                decoder_start_id=model_config.decoder_start_token_id,
                                bucket_boundaries=tuple(config.data.bucket_boundaries),
                                max_source_length=config.data.max_source_length,
                                max_target_length=config.data.max_target_length)
    return make


def _evaluator(graph, tokenizer, dev, config, tcfg, *, quant_rules=None, mesh=None, rules=None):
    """`params -> {"loss", "bleu", "chrf"}` on the dev set (loss on all of it, decoding on
    the first `eval_max_examples` sentences, by one Translator per train stage)."""
    from kd_flax import data as data_lib, metrics
    from kd_flax.translate import Translator

    if not dev:
        return None
    eval_step = make_eval_step(graph, quant_rules=quant_rules)
    n_dec = int(_get(tcfg, "eval_max_examples", 200) or len(dev))
    dec = dev[:n_dec]
    refs = metrics.references_from_examples([list(e.refs) if e.refs else e.ref for e in dec])
    translator = None  # built at the first evaluation; later ones pass their weights (no recompile)

    def run(params):
        nonlocal translator
        model = _merge(graph, params)
        c = model.config
        s, n = 0.0, 0.0
        for b in data_lib.batches(dev, int(tcfg.batch_size), 0, 0, pad_id=c.pad_token_id, eos_id=c.eos_token_id,
                                  decoder_start_id=c.decoder_start_token_id,
                                  bucket_boundaries=tuple(config.data.bucket_boundaries),
                                  max_source_length=config.data.max_source_length,
                                  max_target_length=config.data.max_target_length, num_epochs=1):
            ls, ln = jax.device_get(eval_step(params, {k: jnp.asarray(v) for k, v in model_batch(b).items()}))
            s, n = s + float(ls), n + float(ln)
        if quant_rules:
            from kd_flax import quant
            model = _merge(graph, quant.quantize_params(params, quant_rules))
        if translator is None:
            translator = Translator(model, tokenizer, dict(max_new_tokens=int(config.data.max_target_length),
                                                           num_beams=1, length_penalty=1.0), mesh, rules,
                                    batch_size=int(tcfg.batch_size), source_prefix=config.data.source_prefix,
                                    max_source_length=config.data.max_source_length,
                                    bucket_boundaries=tuple(config.data.bucket_boundaries))
        hyps = translator.translate([e.src for e in dec], state=nnx.state(model))
        return {"loss": s / max(n, 1e-9), "bleu": metrics.corpus_bleu(hyps, refs).score,
                "chrf": metrics.corpus_chrf(hyps, refs).score}
    return run


def _with(tcfg, overrides: dict):
    """A copy of train block `tcfg` with nested `overrides` applied (`tcfg` itself if none)."""
    import ml_collections
    from kd_flax.config_base import deep_update
    if not overrides:
        return tcfg
    d = tcfg.to_dict() if hasattr(tcfg, "to_dict") else dict(tcfg)
    deep_update(d, overrides)
    return ml_collections.ConfigDict(d)


def _train_stage(model, tokenizer, train_examples, dev, config, tcfg, stage_dir, *, teacher=None,
                 info=None, quant_rules=None, log=print):
    """Train `model` in place on `train_examples` with train block `tcfg`; returns the TrainResult."""
    mesh, rules = sharding.mesh_from_config(config.mesh)
    graphdef, params, rest = split_model(model)
    graph = (graphdef, rest)
    t_params = None
    if teacher is not None:
        t_graph, t_params, t_rest = split_model(teacher)
        teacher = (t_graph, t_rest)
        if mesh is not None:
            t_params = jax.device_put(t_params, sharding.param_shardings(t_params, mesh, rules))
    step = make_train_step(graph, tcfg, teacher=teacher, quant_rules=quant_rules, mesh=mesh, rules=rules,
                           layer_map=info)
    state = init_train_state(params, tcfg, seed=int(config.seed), mesh=mesh, rules=rules)
    result = train(step, state, tcfg, workdir=stage_dir,
                   batches=_batch_fn(train_examples, model.config, tcfg, config), teacher_params=t_params,
                   evaluate=_evaluator(graph, tokenizer, dev, config, tcfg, quant_rules=quant_rules,
                                       mesh=mesh, rules=rules), log=log)
    params = result.state.params
    if not result.preempted:  # the best evaluated params, if any evaluation ran
        best = load_best_params(stage_dir, params)
        params = best if best is not None else params
    nnx.update(model, params)
    return result


def _finish_model(model, tokenizer, out_dir, info=None):
    """The trained model as an HF dir (with its tokenizer and, for a student, its layer map).
    What it was trained with goes into the stage's record (`stage.json`), not beside it."""
    from kd_flax import models
    from kd_flax import student as student_lib
    models.save_pretrained(model, out_dir, tokenizer=tokenizer)
    if info is not None and jax.process_index() == 0:
        student_lib.save_layer_map(out_dir, info)


def _exit_preempted(result, where):
    if result.preempted:  # the checkpoint is saved; a rerun resumes from it
        raise workdir_lib.Preempted(f"SIGTERM: checkpoint saved in {where}")


def _gold(config, spec):
    from kd_flax import corpus as corpus_lib
    if not spec:
        return []
    ex = corpus_lib.read_corpus(spec, src_lang=config.data.src_lang, tgt_lang=config.data.tgt_lang)
    n = int(_get(config.data, "max_train_examples", 0) or 0)
    return list(ex)[:n] if n and spec == config.data.train else list(ex)


def run_finetune(config, workdir) -> dict:
    """Stage `finetune`: train the teacher on gold data (from scratch or from `teacher.path`).

    Writes `workdir/finetune/{ckpt,best,tb}` and the teacher as an HF dir in
    `workdir/finetune/model` (with its tokenizer).
    """
    from kd_flax import models
    wd = Workdir.of(workdir)
    stage_dir = wd.stage_dir("finetune")
    tok_path = config.teacher.tokenizer or config.teacher.path
    if not tok_path:
        raise ValueError("teacher.tokenizer: no tokenizer (set teacher.tokenizer or teacher.path)")
    tokenizer = models.load_tokenizer(tok_path)
    over = _train_overrides(config.finetune)
    if config.teacher.init == "scratch":
        model = models.create_model(models.config_from_dict(config.teacher.model.to_dict()
                                                  if hasattr(config.teacher.model, "to_dict")
                                                  else dict(config.teacher.model), tokenizer, **over),
                                    nnx.Rngs(int(config.seed)))
    else:
        model = models.load_pretrained(config.teacher.path, **over)
    train_ex = _tokenized(_gold(config, config.data.train), tokenizer, config)
    dev = _tokenized(_gold(config, config.data.dev), tokenizer, config)
    result = _train_stage(model, tokenizer, train_ex, dev, config, config.finetune, stage_dir)
    _exit_preempted(result, stage_dir)
    model = models.with_config(model, dtype="float32")
    _finish_model(model, tokenizer, wd.trained_teacher_dir)
    return {"steps": int(config.finetune.steps), "best": result.best, "evals": result.evals,
            **result.throughput()}


def stage_model(model, rules, quantized: bool):
    """`(model, weight rules)` one `distill.stages` entry trains with. A `quant: False` stage
    trains in float: no weight fake-quant rules and the same params under a graph with
    activation fake-quant off (`act_quant_bits=None`); a quantized stage keeps both."""
    from kd_flax import models
    if quantized:
        return model, rules
    return models.with_config(model, act_quant_bits=None), None


def _student_needs_teacher(sc) -> bool:
    """The student is built from the teacher: its layers (layer_copy) or its architecture
    (scratch without `student.model.model_type`)."""
    model = sc.model.to_dict() if hasattr(sc.model, "to_dict") else dict(sc.model or {})
    return sc.init == "layer_copy" or (sc.init == "scratch" and "model_type" not in model)


def _done(record: dict | None) -> bool:
    return record is not None and record.get("status") == "done"


def _reusable_sub_stage(wd: Workdir, name: str, prefix_hash: str) -> str | None:
    """A finished sub-stage `name` (`distill/<i>_<targets>`) with `prefix_hash` in another
    variant of the same workdir (or its non-variant `distill`), as a path below the root."""
    own = wd.stage_dir("distill", name)
    for view in [Workdir(wd.root)] + [Workdir(wd.root, v) for v in wd.variants()]:
        path = view.stage_dir("distill", name)
        rec = workdir_lib.read_record(path) if path != own else None
        if rec and rec.get("status") == "done" and rec.get("prefix_hash") == prefix_hash:
            return path[len(wd.root):].lstrip("/")
    return None


def _reuse_sub_stage(wd: Workdir, name: str, source: str) -> None:
    """Copies sub-stage `source` (checkpoints, best, logs) into this view's `distill/<name>`,
    its record last (a copy cut short leaves no record: the next run copies again)."""
    from kd_flax import io_utils
    sub, src = wd.stage_dir("distill", name), wd.path(source)
    log.info("distill/%s: reusing %s (same config)", name, source)
    io_utils.rmtree(sub)  # an interrupted run's own partial checkpoints
    for f in io_utils.listdir(src):
        if f != workdir_lib.RECORD:
            io_utils.copy_tree(io_utils.join(src, f), io_utils.join(sub, f))
    workdir_lib.write_record(sub, dict(workdir_lib.read_record(src), reused_from=source))


def run_distill(config, workdir, *, prefix_hashes: list[str] | None = None) -> dict:
    """Stage `distill`: the student on pseudo-labels (`workdir/generate`) and/or gold data,
    one sub-stage per `distill.stages` entry (e.g. QuillBot's pseudo then gold), each resumable.

    Writes `workdir/distill/<i>_<targets>/{ckpt,best,tb}` and the final student as an HF dir in
    `workdir/distill/model` (tokenizer + `kd_flax_layer_map` in its config.json).

    `prefix_hashes` (`main.distill_prefix_hashes`, which `main.run_stage` passes): one per
    sub-stage, kept in its record; an unfinished sub-stage whose prefix hash a finished one of
    another variant has is copied from it (`reused_from`) instead of trained again.
    """
    from kd_flax import models, pseudo_labels, quant
    from kd_flax import student as student_lib

    dc = config.distill
    wd = Workdir.of(workdir)
    spec = LossSpec.from_config(dc.loss)
    stages = [dict(st) for st in dc.stages]
    # On-policy steps (lmbda > 0, or a `targets: "student"` stage) need the teacher to score
    # the student's samples token by token.
    op_cfg = dict(_get(dc, "on_policy", {}) or {})
    op_cfg["max_new_tokens"] = int(op_cfg.get("max_new_tokens") or config.data.max_target_length)
    on_policy_used = float(op_cfg.get("lmbda", 0.0)) > 0 or any(st["targets"] == "student" for st in stages)
    load_teacher = spec.needs_teacher or on_policy_used or _student_needs_teacher(config.student)
    t_dir = wd.teacher_dir(config, must_exist=load_teacher)
    t_tok_dir = wd.teacher_tokenizer_dir(config, must_exist=load_teacher)
    t_tok = models.load_tokenizer(t_tok_dir)
    teacher = models.load_pretrained(t_dir, **_train_overrides(dc)) if load_teacher else None
    model, tokenizer, info = student_lib.build_student(config, teacher, t_tok, overrides=_train_overrides(dc))
    student_lib.check_vocab(model, tokenizer)
    if teacher is not None:
        student_lib.check_kd_compatible(model, teacher, word_level=spec.kd_weight > 0 or on_policy_used,
                                        hidden=spec.hidden_weight > 0, attention=spec.attention_weight > 0,
                                        info=info)
    cache = None
    if spec.teacher == "cached" and spec.kd_weight > 0:  # top-k KD on the generate job's cache
        from kd_flax.topk_cache import DistillCache
        cache = DistillCache.open(config, wd, spec.topk, teacher_dir=t_dir, tokenizer=tokenizer,
                                  vocab_size=model.config.vocab_size)
    if not (spec.needs_teacher or on_policy_used):
        teacher = None  # SeqKD alone: the teacher's knowledge is in the pseudo-labels
    rules = quant.rules_for(model, config.student.quant)
    dev = _tokenized(_gold(config, config.data.dev), tokenizer, config)
    is_writer = jax.process_index() == 0
    results = []
    for i, st in enumerate(stages):
        name = f"{i}_{st['targets']}"
        sub = wd.stage_dir("distill", name)
        if prefix_hashes and is_writer and not _done(workdir_lib.read_record(sub)):
            source = _reusable_sub_stage(wd, name, prefix_hashes[i])
            if source is not None:
                _reuse_sub_stage(wd, name, source)
        if prefix_hashes and jax.process_count() > 1:  # the others read what process 0 copied
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"distill-{name}-reuse")
        if st["targets"] == "pseudo":
            raw = pseudo_labels.load_pseudo_labels(wd.pseudo_label_dir)
        elif st["targets"] in ("gold", "student"):  # a student stage uses the sources only
            raw = _gold(config, config.data.train)
        else:
            raise ValueError(f"distill.stages[{i}].targets: {st['targets']!r}; allowed: {list(STAGE_TARGETS)}")
        stage_op = dict(op_cfg, lmbda=1.0) if st["targets"] == "student" else op_cfg
        # A stage's `optimizer` entries override `distill.optimizer` (e.g. a gold stage's own LR/warmup).
        tcfg = _with(dc, {"steps": int(st["steps"]), "on_policy": stage_op,
                          "optimizer": dict(st.get("optimizer") or {})})
        s_model, s_rules = stage_model(model, rules, bool(st.get("quant", True)))
        sub_rec = workdir_lib.read_record(sub)
        done = _done(sub_rec)  # finished earlier (or reused): its final params
        train_ex = _tokenized(raw, tokenizer, config)
        if cache is not None and st["targets"] != "student":  # a student stage's targets are sampled
            train_ex = cache.attach(train_ex, st["targets"], f"distill.stages[{i}]")
        result = _train_stage(s_model, tokenizer, train_ex, [] if done else dev, config,
                              tcfg, sub, teacher=teacher, info=info, quant_rules=s_rules)
        if s_model is not model:  # the next stage starts from what this one trained
            nnx.update(model, nnx.state(s_model, nnx.Param))
        n_on = sum(on_policy.on_policy_steps(on_policy.OnPolicySpec.from_config(stage_op), int(st["steps"])))
        speed = result.throughput()
        if done:  # trained earlier, or by the variant it was reused from: that run's figures
            speed = {k: (sub_rec.get("result") or {}).get(k) for k in speed}
            speed["reused_from"] = sub_rec.get("reused_from")
        else:
            _exit_preempted(result, sub)
            if is_writer:
                workdir_lib.write_record(sub, {"stage": f"distill/{name}", "status": "done",
                                               "prefix_hash": prefix_hashes[i] if prefix_hashes else None,
                                               "result": {"steps": st["steps"], "best": result.best,
                                                          "on_policy_steps": n_on, **speed}})
        results.append({"targets": st["targets"], "steps": st["steps"], "best": result.best,
                        "on_policy_steps": n_on, "evals": result.evals, **speed})
    model = models.with_config(model, dtype="float32")
    _finish_model(model, tokenizer, wd.student_dir, info=info)
    return {"stages": results, "layer_map": info.to_dict()}
