"""The `evaluate` stage and batched translation.

- `translate(model, tokenizer, sources, *, batch_size, num_beams, max_new_tokens, ...)` →
  list of strings: sources are tokenized, sorted into length buckets and padded to the bucket
  length and to a fixed batch size, so `kd_flax.decoding.generate` compiles once per bucket.
  Shared by the train loop (dev BLEU) and this stage.
- `run(config, workdir)`: the `evaluate` stage. Decodes every test split with every model of
  `config.evaluate.models` and writes `workdir/evaluate/results.json`, `report.md` and the
  hypotheses (`hyps/<model>/<split>.txt`), each written atomically.

Scores come from `kd_flax.metrics` (sacreBLEU itself), tables from `kd_flax.report`.
"""

from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Callable, Sequence

import numpy as np

from kd_flax.metrics import SpeedMeter, corpus_bleu, corpus_chrf, references_from_examples, split_stats
from kd_flax.report import report_markdown

# ---------------------------------------------------------------------------
# translate: bucketed batch decoding
# ---------------------------------------------------------------------------


def bucket_length(n: int, boundaries: Sequence[int]) -> int:
    """The smallest boundary ≥ n (boundaries in any order); see `data.bucket_length`."""
    from kd_flax import data
    bounds = sorted(int(b) for b in boundaries)
    if not bounds or bounds[0] <= 0:
        raise ValueError(f"bucket_boundaries: expected positive lengths, got {tuple(boundaries)}")
    return data.bucket_length(n, bounds)


def make_batches(lengths: Sequence[int], batch_size: int,
                 boundaries: Sequence[int]) -> list[tuple[int, list[int]]]:
    """Group sentence indices into `(bucket_len, indices)` batches of at most `batch_size`.

    Sentences are sorted by length (stable) so each batch is padded only to its bucket; the
    set of distinct `(batch_size, bucket_len)` shapes — one compilation each — is at most the
    number of buckets.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: must be ≥ 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(bucket_length(lengths[i], boundaries), []).append(i)
    out = []
    for blen in sorted(groups):
        idx = groups[blen]
        out += [(blen, idx[s:s + batch_size]) for s in range(0, len(idx), batch_size)]
    return out


def _generated_tokens(seqs: np.ndarray, eos_id: int | None, pad_id: int | None) -> int:
    """Tokens produced per row up to and including EOS (pad after EOS is not counted)."""
    total = 0
    for row in seqs:
        if eos_id is not None and (row == eos_id).any():
            total += int(np.argmax(row == eos_id)) + 1
        elif pad_id is not None:
            total += int((row != pad_id).sum())
        else:
            total += row.size
    return total


def translate(model, tokenizer, sources: Sequence[str], *, batch_size: int, num_beams: int = 1,
              max_new_tokens: int, source_prefix: str = "", max_source_length: int | None = None,
              bucket_boundaries: Sequence[int] = (16, 32, 64, 128), length_penalty: float = 1.0,
              mesh=None, rules=None, meter: SpeedMeter | None = None,
              generate_fn: Callable | None = None, **generate_kwargs) -> list[str]:
    """Decode `sources` with `model` (beam search if num_beams > 1) → one string per source.

    Sources are tokenized (with `source_prefix`, truncated to `max_source_length`), bucketed
    by length and padded to `(batch_size, bucket_len)` so each bucket compiles once; padding
    rows are dropped. With a `mesh`, batches are placed with the batch axis sharded by
    `rules` (batch_size is rounded up to a multiple of the batch shards). The best sequence
    (`sequences[:, 0]`) is decoded with `skip_special_tokens=True`. `meter` receives each
    batch's sentences, generated tokens and wall time. `generate_fn` defaults to
    `kd_flax.decoding.generate`; extra keyword arguments go to it.
    """
    import jax
    import jax.numpy as jnp

    if isinstance(sources, str):
        raise ValueError("sources: expected a list of strings, got one string")
    if num_beams < 1:
        raise ValueError(f"num_beams: must be ≥ 1, got {num_beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be ≥ 1, got {max_new_tokens}")
    if not sources:
        return []
    if generate_fn is None:
        from kd_flax.decoding import generate as generate_fn

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = getattr(getattr(model, "config", None), "pad_token_id", 0)
    eos_id = getattr(getattr(model, "config", None), "eos_token_id", tokenizer.eos_token_id)

    texts = [source_prefix + s for s in sources]
    enc = tokenizer(texts, add_special_tokens=True, truncation=max_source_length is not None,
                    max_length=max_source_length)["input_ids"]
    lengths = [max(len(ids), 1) for ids in enc]

    sharding = None
    if mesh is not None:
        from kd_flax import sharding as shd
        sharding = shd.batch_sharding(mesh, rules if rules is not None else shd.DEFAULT_RULES)
        shards = _batch_shards(sharding)
        batch_size = -(-batch_size // shards) * shards

    out: list[str | None] = [None] * len(sources)
    # Shapes already decoded for this meter (one model across splits): warm up each only once.
    seen_shapes = meter.seen_shapes if meter is not None else set()
    for blen, idx in make_batches(lengths, batch_size, bucket_boundaries):
        ids = np.full((batch_size, blen), pad_id, dtype=np.int32)
        mask = np.zeros((batch_size, blen), dtype=np.int32)
        mask[:, 0] = 1  # padding rows attend to one pad token: no all-masked softmax rows
        for r, i in enumerate(idx):
            ids[r, :len(enc[i])] = enc[i]
            mask[r, :len(enc[i])] = 1
        if sharding is not None:
            input_ids = jax.make_array_from_callback(ids.shape, sharding, lambda s: ids[s])
            attention_mask = jax.make_array_from_callback(mask.shape, sharding, lambda s: mask[s])
            generate_kwargs.update(mesh=mesh, rules=rules)
        else:
            input_ids, attention_mask = jnp.asarray(ids), jnp.asarray(mask)

        def decode():
            result = generate_fn(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                 num_beams=num_beams, length_penalty=length_penalty, **generate_kwargs)
            return _to_host(result.sequences)[: len(idx), 0]

        if meter is not None and (batch_size, blen) not in seen_shapes:
            decode()  # compile (or fetch from the jit cache) outside the timed call
        seen_shapes.add((batch_size, blen))
        t0 = time.perf_counter()
        seqs = decode()
        seconds = time.perf_counter() - t0
        texts_out = tokenizer.batch_decode(seqs.tolist(), skip_special_tokens=True)
        for r, i in enumerate(idx):
            out[i] = texts_out[r].strip()
        if meter is not None:
            meter.add(len(idx), _generated_tokens(seqs, eos_id, pad_id), seconds)
    return out  # type: ignore[return-value]


def _batch_shards(sharding) -> int:
    """How many ways a NamedSharding splits axis 0."""
    spec = sharding.spec[0] if len(sharding.spec) else None
    if spec is None:
        return 1
    names = spec if isinstance(spec, tuple) else (spec,)
    return int(np.prod([sharding.mesh.shape[n] for n in names]))


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array → the full numpy array on every process."""
    import jax
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


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
    name = os.path.basename(spec.split("+")[0].rstrip("/"))
    for ext in (".gz", ".jsonl", ".json", ".tsv", ".txt"):
        if name.endswith(ext):
            name = name[: -len(ext)]
    return name.replace("{lang}", "").strip(".")


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
    `kd_flax.data.read_corpus` (all its formats, gzip, gs://). Multi-reference rows carry
    `refs`; otherwise the single `ref` is used. Returns refs=None when a line has none."""
    from kd_flax import data
    corpus = data.read_corpus(spec, src_lang=config.data.src_lang, tgt_lang=config.data.tgt_lang)
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
    from kd_flax.workdir import Workdir

    ev = config.evaluate
    splits = select_splits(config.data.test, list(ev.splits))
    dirs = model_dirs(config, workdir)
    mesh = rules = None
    if load_fn is None:
        from kd_flax import sharding as shd
        mesh, rules = shd.mesh_from_config(config.mesh)
        load_fn = lambda p: _load(p, config, mesh, rules)  # noqa: E731

    data = {name: read_split(spec, config) for name, spec in splits}
    out_dir = Workdir.of(workdir).stage_dir("evaluate")
    writer = jax.process_index() == 0
    results: dict[str, Any] = {"splits": [n for n, _ in splits],
                               "settings": {"num_beams": ev.num_beams, "max_new_tokens": ev.max_new_tokens,
                                            "batch_size": ev.batch_size, "tgt_lang": config.data.tgt_lang},
                               "models": {}}
    for mname, mpath in dirs.items():
        model, tokenizer = load_fn(mpath)
        qcfg = config.student.quant if mname == "student" else None
        bits = int(qcfg.weight_bits or 0) if qcfg is not None else 0
        from flax import nnx
        # A stand-in model (tests) has no nnx parameters to quantize or count.
        if isinstance(model, nnx.Module):
            apply_weight_quant(model, qcfg)
        n_params, n_bytes = param_bytes(model, qcfg) if isinstance(model, nnx.Module) else (0, 0)
        meter = SpeedMeter()
        bleu, chrf, per_split = [], [], {}
        for sname, (sources, refs) in data.items():
            if refs is None:
                raise ValueError(f"data.test: split {sname!r} has sentences without a reference; "
                                 f"evaluation needs `ref` or `refs` for every line")
            hyps = translate(model, tokenizer, sources, batch_size=ev.batch_size, num_beams=ev.num_beams,
                             max_new_tokens=ev.max_new_tokens, source_prefix=config.data.source_prefix,
                             max_source_length=config.data.max_source_length,
                             bucket_boundaries=tuple(config.data.bucket_boundaries),
                             mesh=mesh, rules=rules, meter=meter, generate_fn=generate_fn)
            streams = references_from_examples(refs)
            b = corpus_bleu(hyps, streams, trg_lang=_sacrebleu_lang(config.data.tgt_lang))
            c = corpus_chrf(hyps, streams)
            bleu.append(b.score)
            chrf.append(c.score)
            per_split[sname] = {"bleu": b.score, "chrf": c.score, "num_refs": len(streams),
                                "sentences": len(sources), "bleu_details": b.details}
            if writer:
                io_utils.atomic_write_text(os.path.join(out_dir, "hyps", mname, f"{sname}.txt"),
                                           "".join(h + "\n" for h in hyps))
        bs, cs = split_stats(bleu), split_stats(chrf)
        results["models"][mname] = {
            "path": mpath, "parameters": n_params, "size_mb": n_bytes / 2**20, "weight_bits": bits or None,
            "bleu": {"mean": bs.mean, "std": bs.std, "per_split": bleu},
            "chrf": {"mean": cs.mean, "std": cs.std, "per_split": chrf},
            "splits": per_split, "speed": meter.summary(),
            "signatures": {"bleu": b.signature, "chrf": c.signature},
        }
        del model
    if writer:
        io_utils.atomic_write_json(os.path.join(out_dir, "results.json"), _jsonable(results))
        io_utils.atomic_write_text(os.path.join(out_dir, "report.md"), report_markdown(results))
    return results


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


