"""The `evaluate` stage.

`run(config, workdir)` decodes every test split with every model of `config.evaluate.models`
(one `kd_flax.translate.Translator` per model, dropped before the next is loaded) and writes
`workdir/evaluate/results.json`, `report.md` and the hypotheses (`hyps/<model>/<split>.txt`),
each written atomically.

Scores come from `kd_flax.metrics` (sacreBLEU itself), tables from `kd_flax.report`.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import Any, Callable, Sequence

from kd_flax.metrics import SpeedMeter, corpus_bleu, corpus_chrf, references_from_examples, split_stats
from kd_flax.report import report_markdown

# ---------------------------------------------------------------------------
# The evaluate stage
# ---------------------------------------------------------------------------


def split_name(spec: str) -> str:
    """A short name for a test-set spec: `synthetic:test0:60` → test0, `hf:x@test` → test,
    `/data/newstest2014.en-fr.jsonl.gz` → newstest2014.en-fr, `a.en+a.fr` → a."""
    spec = str(spec)
    if spec.startswith("synthetic:"):
        return spec.split(":")[1]
    if spec.startswith("hf:"):
        return spec.rsplit("@", 1)[1] if "@" in spec else spec[3:].replace("/", "_")
    names = []
    for part in spec.split("+"):
        name = os.path.basename(part.rstrip("/"))
        for ext in (".gz", ".jsonl", ".json", ".tsv", ".txt"):
            if name.endswith(ext):
                name = name[: -len(ext)]
        names.append(name.replace("{lang}", "").strip("."))
    if len(names) == 1:
        return names[0]
    # A parallel-file pair (`a.en+a.fr`): the dot-separated components all parts share.
    common = os.path.commonprefix([n.split(".") for n in names])
    return ".".join(common) or names[0]


def select_splits(test_specs: Sequence[str] | str, wanted: Sequence[str]) -> list[tuple[str, str]]:
    """`(name, spec)` for the test specs in `data.test`, restricted to `evaluate.splits` (all
    when empty). A wanted entry matches a spec itself, its `split_name`, or that name without
    a trailing `-COUNT` (materialised `synthetic:test0:60` files are `test0-60.jsonl`).
    Unknown names fail naming the available ones."""
    specs = [test_specs] if isinstance(test_specs, str) else list(test_specs)
    specs = [s for s in specs if s]
    named: dict[str, str] = {}
    for s in specs:
        name = split_name(s)
        base, k = name, 2
        while name in named:  # two specs with the same base name: keep both
            name, k = f"{base}_{k}", k + 1
        named[name] = s
    if not named:
        raise ValueError("data.test: no test sets configured; evaluate needs at least one")
    if not wanted:
        return list(named.items())
    aliases: dict[str, tuple[str, str]] = {}
    for name, spec in named.items():
        for alias in (spec, name, re.sub(r"-\d+$", "", name)):
            aliases.setdefault(alias, (name, spec))
    missing = [w for w in wanted if w not in aliases]
    if missing:
        raise ValueError(f"evaluate.splits: {missing} not found in data.test; available split "
                         f"names: {sorted(named)}")
    return [(w if w != aliases[w][1] else aliases[w][0], aliases[w][1]) for w in wanted]


def read_split(spec: str, config) -> tuple[list[str], list[list[str]] | None]:
    """Sources and per-sentence reference lists of one test set, read by
    `kd_flax.corpus.read_corpus` (all its formats, gzip, gs://). Multi-reference rows carry
    `refs`; otherwise the single `ref` is used. Returns refs=None when a line has none."""
    from kd_flax import corpus as corpus_lib
    corpus = corpus_lib.read_corpus(spec, src_lang=config.data.src_lang, tgt_lang=config.data.tgt_lang)
    sources = [ex.src for ex in corpus]
    refs = [list(ex.refs) if ex.refs else ([ex.ref] if ex.ref else []) for ex in corpus]
    if not sources:
        raise ValueError(f"data.test: {spec} has no usable lines ({corpus.report.summary()})")
    return sources, (None if any(not r for r in refs) else refs)


def model_dirs(config, workdir) -> dict[str, str]:
    """Which model dirs `evaluate.models` names, in this workdir (a variant's view of it).

    teacher: the one the finetune stage trained here, else `teacher.path`; student: the
    distill stage's model.
    """
    from kd_flax import io_utils
    from kd_flax.workdir import Workdir
    wd = Workdir.of(workdir)
    out = {}
    for name in config.evaluate.models:
        if name == "teacher":
            try:
                path = wd.teacher_dir(config)
            except ValueError as e:
                raise ValueError(f"evaluate.models: 'teacher' has no model: {e}") from None
        elif name == "student":
            path = wd.student_dir
            if not io_utils.exists(path):
                raise ValueError(f"evaluate.models: 'student' has no model at {path}; run the distill "
                                 f"stage first")
        else:
            raise ValueError(f"evaluate.models: {name!r} is not allowed; allowed: teacher, student")
        out[name] = str(path)
    return out


def param_bytes(model, quant_cfg=None) -> tuple[int, int]:
    """(#parameters, bytes): float leaves at their dtype; the leaves that
    `quant.rules_for(model, quant_cfg)` quantizes count their rule's bits each."""
    from flax import nnx
    import jax
    from kd_flax import quant
    from kd_flax.tree_paths import path_str
    state = nnx.state(model, nnx.Param)
    rules = quant.rules_for(model, quant_cfg)
    # Which leaves the rules cover — by path, not by whether values change: weights already
    # on the quantization grid (a fake-quant-trained student) still ship as integers.
    quantized = quant.matched_paths(state, rules) if rules else {}
    n, size = 0, 0.0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        n += leaf.size
        rule = quantized.get(path_str(path))
        size += leaf.size * (rule.bits / 8 if rule is not None else leaf.dtype.itemsize)
    return int(n), int(math.ceil(size))


def apply_weight_quant(model, quant_cfg) -> bool:
    """Quantize `model`'s weights in place as training did (`quant.rules_for`; idempotent
    when the saved weights are already on the grid). False when there is nothing to do."""
    from flax import nnx
    from kd_flax import quant
    rules = quant.rules_for(model, quant_cfg)
    if not rules:
        return False
    nnx.update(model, quant.quantize_params(nnx.state(model, nnx.Param), rules))
    return True


def with_act_quant(model, quant_cfg):
    """`model` under the activation fake-quant its `student.quant` block trained with
    (`quant.act_config`: `act_quant_bits`, `act_quant_granularity`), the same weights (their
    shardings kept); `model` itself when its config already has them. A saved HF dir does not
    keep these runtime fields (`models.load_pretrained` gives float activations), so without
    this an `act_bits=8` student would be scored with float activations: weight-only W8."""
    from kd_flax import models, quant
    return models.with_config(model, **(quant.act_config(quant_cfg) if quant_cfg is not None else {}))


def _load(path: str, config, mesh, rules):
    from kd_flax import models
    model = models.load_pretrained(path, mesh=mesh, rules=rules)
    if hasattr(models, "load_tokenizer"):
        tokenizer = models.load_tokenizer(path)
    else:
        import transformers
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def run(config, workdir, *, load_fn: Callable | None = None,
        generate_fn: Callable | None = None) -> dict:
    """The `evaluate` stage: decode each test split with each model, score, write results.

    Writes (process 0 only) `workdir/evaluate/results.json`, `report.md` and
    `hyps/<model>/<split>.txt`. Returns the results dict. `load_fn(path) -> (model,
    tokenizer)` and `generate_fn` replace the real loader / decoder (tests).
    """
    import jax
    from kd_flax import io_utils
    from kd_flax.translate import Translator
    from kd_flax.workdir import Workdir

    ev = config.evaluate
    splits = select_splits(config.data.test, list(ev.splits))
    dirs = model_dirs(config, workdir)
    mesh = rules = None
    if load_fn is None:
        from kd_flax import sharding as shd
        mesh, rules = shd.mesh_from_config(config.mesh)
        load_fn = lambda p: _load(p, config, mesh, rules)  # noqa: E731

    from kd_flax import export
    ct2_quant = export.ctranslate2_setting(config) if "student" in dirs else ""
    if ct2_quant:
        export.import_ctranslate2()  # fail before any decoding
    data = {name: read_split(spec, config) for name, spec in splits}
    out_dir = Workdir.of(workdir).stage_dir("evaluate")
    writer = jax.process_index() == 0
    results: dict[str, Any] = {"splits": [n for n, _ in splits],
                               "settings": {"num_beams": ev.num_beams,
                                            "also_num_beams": list(ev.get("also_num_beams", [])),
                                            "max_new_tokens": ev.max_new_tokens,
                                            "batch_size": ev.batch_size, "tgt_lang": config.data.tgt_lang},
                               "models": {}}
    for mname, mpath in dirs.items():
        model, tokenizer = load_fn(mpath)
        qcfg = config.student.quant if mname == "student" else None
        bits = int(qcfg.weight_bits or 0) if qcfg is not None else 0
        from flax import nnx
        # A stand-in model (tests) has no nnx parameters to quantize or count.
        if isinstance(model, nnx.Module):
            model = with_act_quant(model, qcfg)  # the activation fake-quant it trained with
            apply_weight_quant(model, qcfg)
        n_params, n_bytes = param_bytes(model, qcfg) if isinstance(model, nnx.Module) else (0, 0)
        for beams in [ev.num_beams] + list(ev.get("also_num_beams", [])):
            row = mname + beam_suffix(beams, ev.num_beams)
            meter = SpeedMeter()
            translator = Translator(model, tokenizer, dict(num_beams=beams, max_new_tokens=ev.max_new_tokens,
                                                           length_penalty=1.0), mesh, rules,
                                    batch_size=ev.batch_size, source_prefix=config.data.source_prefix,
                                    max_source_length=config.data.max_source_length,
                                    bucket_boundaries=tuple(config.data.bucket_boundaries), generate_fn=generate_fn)
            bleu, chrf, per_split, sigs = _score(functools.partial(translator.translate, meter=meter), data, row,
                                                 config, out_dir if writer else None)
            results["models"][row] = _model_row(mpath, n_params, n_bytes, bits, bleu, chrf, per_split, meter, sigs)
            results["models"][row]["num_beams"] = beams
            del translator
        if mname == "student" and ct2_quant:
            _score_ct2(results, model, tokenizer, ct2_quant, data, config, out_dir, writer)
        del model  # nothing else holds it: the next model gets the device memory
    if writer:
        io_utils.atomic_write_json(os.path.join(out_dir, "results.json"), _jsonable(results))
        io_utils.atomic_write_text(os.path.join(out_dir, "report.md"), report_markdown(results))
    return results


def beam_suffix(beams: int, main_beams: int) -> str:
    """Row-name suffix of a model decoded with `beams` (`evaluate.also_num_beams`): none for
    `evaluate.num_beams` itself, `_greedy` for 1, `_beam<n>` otherwise."""
    if beams == main_beams:
        return ""
    return "_greedy" if beams == 1 else f"_beam{beams}"


def _score(translate: Callable, data, mname: str, config, out_dir):
    """BLEU and chrF per split of `translate(sources) -> hyps`; the hyps are written under
    `out_dir/hyps/<mname>/` (None: not written)."""
    from kd_flax import io_utils
    bleu, chrf, per_split = [], [], {}
    b = c = None
    for sname, (sources, refs) in data.items():
        if refs is None:
            raise ValueError(f"data.test: split {sname!r} has sentences without a reference; "
                             f"evaluation needs `ref` or `refs` for every line")
        hyps = translate(sources)
        streams = references_from_examples(refs)
        b = corpus_bleu(hyps, streams, trg_lang=_sacrebleu_lang(config.data.tgt_lang))
        c = corpus_chrf(hyps, streams)
        bleu.append(b.score)
        chrf.append(c.score)
        per_split[sname] = {"bleu": b.score, "chrf": c.score, "num_refs": len(streams),
                            "sentences": len(sources), "bleu_details": b.details}
        if out_dir is not None:
            io_utils.atomic_write_text(os.path.join(out_dir, "hyps", mname, f"{sname}.txt"),
                                       "".join(h + "\n" for h in hyps))
    return bleu, chrf, per_split, {"bleu": b.signature, "chrf": c.signature}


def _model_row(path, n_params, n_bytes, bits, bleu, chrf, per_split, meter, signatures) -> dict:
    bs, cs = split_stats(bleu), split_stats(chrf)
    return {"path": path, "parameters": n_params, "size_mb": n_bytes / 2**20, "weight_bits": bits or None,
            "bleu": {"mean": bs.mean, "std": bs.std, "per_split": bleu},
            "chrf": {"mean": cs.mean, "std": cs.std, "per_split": chrf},
            "splits": per_split, "speed": meter.summary(),
            "hit_max_new_tokens": meter.hit_max_new_tokens(), "signatures": signatures}


def _score_ct2(results, model, tokenizer, quantization, data, config, out_dir, writer) -> None:
    """The row `student_ct2_<quantization>`: the (weight-quantized) student converted by
    CTranslate2 into `out_dir/ct2/` (evaluate runs before export, so it converts the student
    itself) and decoded by CTranslate2 on CPU with the same settings as kd_flax's rows; size is
    `model.bin` on disk."""
    import jax
    from kd_flax import decoding, export
    ev = config.evaluate
    name = f"student_ct2_{quantization}"
    ct2_dir = os.path.join(out_dir, "ct2")
    if writer:
        export.student_to_ctranslate2(model, tokenizer, ct2_dir, quantization)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("kd_flax evaluate ct2")
    meter = SpeedMeter()
    # kd_flax's minimum length (generation_config's min_length / min_new_tokens; 0 by default)
    min_new = decoding.resolve_settings(model, max_new_tokens=ev.max_new_tokens).min_new_tokens
    translate = lambda src: export.ct2_translate(  # noqa: E731
        ct2_dir, tokenizer, src, num_beams=ev.num_beams, max_new_tokens=ev.max_new_tokens,
        batch_size=ev.batch_size, max_source_length=config.data.max_source_length,
        source_prefix=config.data.source_prefix,
        forced_bos_token_id=getattr(model.config, "forced_bos_token_id", None), min_new_tokens=min_new,
        meter=meter)
    bleu, chrf, per_split, sigs = _score(translate, data, name, config, out_dir if writer else None)
    row = _model_row(ct2_dir, results["models"]["student"]["parameters"],
                     export.dir_bytes(os.path.join(ct2_dir, "model.bin")), export.ct2_quant_bits(quantization),
                     bleu, chrf, per_split, meter, sigs)
    row.update(engine="ctranslate2", quantization=quantization)
    results["models"][name] = row


def _sacrebleu_lang(lang: str) -> str:
    # sacrebleu only changes tokenization for these target languages.
    return lang if lang in ("zh", "ja", "ko") else ""


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


