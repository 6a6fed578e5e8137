"""The config every recipe starts from, the mesh presets, and config validation.

Recipes in `configs/` call `base_config()` and change what they need, so every config
has the same keys; `validate()` then checks a finished config (after command-line
overrides) before any work starts and reports every problem in one message that
names the key and the allowed values.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections

from kd_flax.sharding import DEFAULT_RULES


def cfg_get(cfg, key: str, default=None):
    """`cfg[key]` or `default`, for ConfigDicts, plain dicts, None and objects alike (the one
    config accessor: stages, train and the teacher job read optional keys through it)."""
    if cfg is None:
        return default
    if hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def cfg_choice(cfg, key: str, allowed, where: str):
    """`cfg_get(cfg, key)`, or a ValueError naming `where.key` and the allowed values."""
    v = cfg_get(cfg, key)
    if v not in allowed:
        raise ValueError(f"{where}.{key}: {v!r} is not allowed; allowed values: {list(allowed)}")
    return v


# ---------------------------------------------------------------------------
# Mesh presets: mesh axes and the logical-axis → mesh-axis rules for each target.
# "data" carries the batch, "fsdp" shards parameters *and* the batch (ZeRO-3 style),
# "model" is tensor parallelism over heads / mlp / vocab.
# ---------------------------------------------------------------------------

# One rule set for every preset (kd_flax.sharding's defaults); presets differ in mesh shape.
_TP_RULES = DEFAULT_RULES

MESH_PRESETS: dict[str, dict[str, Any]] = {
    # CPU (and the tests' 8 fake devices): everything on the data axis.
    "cpu": {"axes": {"data": -1, "fsdp": 1, "model": 1}, "rules": _TP_RULES},
    "gpu_1": {"axes": {"data": 1, "fsdp": 1, "model": 1}, "rules": _TP_RULES},
    # One 8-GPU node: FSDP inside the node keeps T5-3B-sized teachers in memory.
    "gpu_8": {"axes": {"data": 1, "fsdp": 8, "model": 1}, "rules": _TP_RULES},
    # v4-8: 4 chips (8 TensorCores seen as 4 devices with megacore).
    "tpu_v4_8": {"axes": {"data": 1, "fsdp": 4, "model": 1}, "rules": _TP_RULES},
    # v5e-16: 16 chips, 16 GiB each: 2-way tensor parallel for 3B teachers.
    "tpu_v5e_16": {"axes": {"data": 2, "fsdp": 4, "model": 2}, "rules": _TP_RULES},
    # v5p-64: 32 chips (megacore): data × fsdp × model.
    "tpu_v5p_64": {"axes": {"data": 4, "fsdp": 4, "model": 2}, "rules": _TP_RULES},
}


def mesh_config(preset: str) -> ml_collections.ConfigDict:
    if preset not in MESH_PRESETS:
        raise ValueError(f"mesh preset {preset!r} is unknown; allowed: {sorted(MESH_PRESETS)}")
    p = MESH_PRESETS[preset]
    return ml_collections.ConfigDict(
        {"preset": preset, "axes": dict(p["axes"]), "rules": tuple(p["rules"])})


# ---------------------------------------------------------------------------
# The base config
# ---------------------------------------------------------------------------


def train_block(**overrides) -> dict:
    """The training sub-config shared by `finetune` (teacher) and `distill` (student)."""
    block = {
        "steps": 1000,
        "batch_size": 32,
        "grad_accum": 1,
        "eval_every": 500,
        "eval_max_examples": 500,
        "checkpoint_every": 500,
        "log_every": 50,
        "keep_best_by": "bleu",
        "dtype": "float32",
        "remat": False,
        "max_nan_steps": 10,
        "optimizer": {
            "name": "adamw",
            "learning_rate": 1e-3,
            "warmup_steps": 100,
            "schedule": "cosine",
            "weight_decay": 0.01,
            "grad_clip_norm": 1.0,
            "b1": 0.9,
            "b2": 0.98,
            "decay_rate": 0.8,  # adafactor's (b1/b2 are adamw's)
        },
        "loss": {
            "ce_weight": 1.0,
            "label_smoothing": 0.0,
            "smoothing": "fairseq",
            "kd_weight": 0.0,
            "kd_type": "kl",
            "temperature": 1.0,
            "lam": 0.5,
            "beta": 0.5,
            "fused": False,
            "topk": 8,
            "teacher": "online",
            "hidden_weight": 0.0,
            "attention_weight": 0.0,
        },
    }
    deep_update(block, overrides)
    return block


def base_config() -> ml_collections.ConfigDict:
    c = {
        "name": "custom",
        "seed": 0,
        "mesh": mesh_config("cpu").to_dict(),
        "data": {
            "train": "",
            "dev": "",
            "test": [],
            "src_lang": "en",
            "tgt_lang": "fr",
            "source_prefix": "",
            "max_source_length": 128,
            "max_target_length": 128,
            "bucket_boundaries": (16, 32, 64, 128),
            "max_train_examples": 0,
        },
        "teacher": {
            "path": "",
            "init": "pretrained",
            "model": {},
            "tokenizer": "",
            "tokenizer_vocab_size": 1000,
            "tokenizer_kind": "unigram",
            "dtype": "float32",
        },
        "finetune": train_block(steps=0),
        "generate": {
            "num_beams": 1,
            "num_return_sequences": 1,
            "max_new_tokens": 128,
            "length_penalty": 1.0,
            "early_stopping": True,
            "do_sample": False,
            "temperature": 1.0,
            "top_k": 0,
            "top_p": 1.0,
            "seed": 0,
            "batch_size": 32,
            "shard_size": 1000,
            "select": "best",
            "write_nbest": False,
            "store_topk": 0,  # K > 0: also store the teacher's top-K log-probs per target token
            "store_topk_target": "pseudo",  # ... of the chosen pseudo-label, or "gold" (the reference)
            "filters": {"max_length_ratio": 0.0, "min_score": -1e9, "min_ref_chrf": 0.0},
            # also "drop_unfinished" (OPTIONAL_KEYS): True drops pseudo-labels that hit
            # max_new_tokens without EOS
        },
        "student": {
            "init": "layer_copy",
            "path": "",
            "encoder_layers": 0,
            "decoder_layers": 0,
            "layer_map": {"encoder": [], "decoder": []},
            "model": {},
            "quant": {"weight_bits": 0, "act_bits": 0, "granularity": "channel", "scheme": "default"},
        },
        "distill": dict(train_block(), stages=[{"targets": "pseudo", "steps": 1000}],
                        # On-policy (generalized) KD, `kd_flax.on_policy`: lmbda = 0 is off;
                        # max_new_tokens 0 = data.max_target_length.
                        on_policy={"lmbda": 0.0, "beta": 0.5, "temperature": 1.0, "top_k": 0, "top_p": 1.0,
                                   "max_new_tokens": 0, "loss_temperature": 1.0, "seed": 0}),
        # also_num_beams: more beam widths scored beside num_beams (e.g. [1]: greedy too), each
        # as extra rows `<model>_greedy` / `<model>_beam<n>`.
        "evaluate": {"splits": [], "num_beams": 4, "also_num_beams": [], "max_new_tokens": 128,
                     "batch_size": 32, "models": ["teacher", "student"]},
        "export": {"formats": ["hf", "int"], "ctranslate2": ""},
        # Named variations of the student run, each a dict of dotted-key overrides
        # ("student.quant.weight_bits": 8, ...). Empty = one student named "student".
        "variants": {},
    }
    return ml_collections.ConfigDict(c)


def make_tiny(c: ml_collections.ConfigDict, *, train: int = 1000, max_len: int = 32,
              teacher_model: dict) -> None:
    """The CPU-sized setup every recipe's `tiny` variant shares: synthetic data, a teacher
    trained from scratch for a few steps, short student runs, greedy evaluation.

    Recipes then set their own student and variants; the tests run these end to end.
    """
    c.data.train, c.data.dev = f"synthetic:train:{train}", "synthetic:dev:50"
    c.data.test = ["synthetic:test0:40", "synthetic:test1:40"]
    c.data.max_source_length = c.data.max_target_length = max_len
    c.data.bucket_boundaries = (max_len,)
    c.teacher.init = "scratch"
    c.teacher.model = dict(teacher_model, vocab_size=0)  # 0 = the trained tokenizer's size
    c.finetune.steps, c.finetune.batch_size = 30, 16
    c.distill.batch_size = 16
    c.generate.batch_size, c.generate.max_new_tokens = 64, max_len
    c.evaluate.max_new_tokens, c.evaluate.batch_size = max_len, 40
    c.evaluate.num_beams = 1  # greedy keeps the CPU tests short; beam search is tested apart
    for blk in (c.finetune, c.distill):
        blk.eval_every, blk.checkpoint_every, blk.keep_best_by = 0, 10, "loss"
        blk.optimizer.warmup_steps = 5
    c.finetune.checkpoint_every = 0  # checkpoint only the student runs (resume is tested apart)


def deep_update(dst: dict, src: dict) -> dict:
    """`dst` with nested dict `src` merged in (dicts merged key by key, other values replaced)."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_update(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_arg(arg: str | None, allowed=None, *, recipe: str = "the recipe") -> dict[str, str]:
    """Parse a recipe argument `tiny,mesh=tpu_v4_8` into `{"tiny": "", "mesh": "tpu_v4_8"}`.

    `allowed`: the argument names the recipe knows; any other (a typo such as `tinyy`, which
    would otherwise silently build the full-size config) is a `ConfigError` listing them."""
    out: dict[str, str] = {}
    for part in (arg or "").split(","):
        part = part.strip()
        if not part:
            continue
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip()
    if allowed is not None:
        unknown = [k for k in out if k not in allowed]
        if unknown:
            raise ConfigError(f"{recipe}: unknown argument(s) {', '.join(unknown)}; "
                              f"allowed: {', '.join(allowed)}")
    return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> None:
    """Deep-merge a nested dict of overrides into a config (lists and leaves are replaced).

    Variants are written this way: `{"student": {"quant": {"weight_bits": 8}}}`.
    """
    flat = _flatten(overrides)
    for dotted, value in flat.items():
        node = config
        parts = dotted.split(".")
        for p in parts[:-1]:
            if p not in node:
                raise ValueError(f"override {dotted!r}: unknown key {p!r}")
            node = node[p]
        free = any(dotted.startswith(f + ".") for f in FREE_FORM)
        if parts[-1] not in node and not free:
            raise ValueError(f"override {dotted!r}: unknown key {parts[-1]!r}")
        with node.unlocked():
            node[parts[-1]] = value


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------

# Subtrees whose keys are free-form (HF-style model config overrides, variants).
FREE_FORM = ("teacher.model", "student.model", "variants", "mesh.axes")

CHOICES = {
    "teacher.init": ("pretrained", "scratch"),
    "teacher.dtype": ("float32", "bfloat16"),
    "teacher.tokenizer_kind": ("unigram", "bpe"),
    "student.init": ("layer_copy", "scratch", "pretrained"),
    "student.quant.weight_bits": (0, 2, 4, 8),
    "student.quant.act_bits": (0, 8),
    "student.quant.granularity": ("channel", "tensor"),
    "student.quant.scheme": ("default", "ctranslate2_int8"),
    "generate.select": ("best", "bleu", "chrf"),
    "generate.store_topk_target": ("pseudo", "gold"),
    "export.formats[]": ("hf", "int"),
    "export.ctranslate2": ("", "float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                           "float16", "bfloat16"),
    "evaluate.models[]": ("teacher", "student"),
}
for _blk in ("finetune", "distill"):
    CHOICES.update({
        f"{_blk}.keep_best_by": ("bleu", "chrf", "loss"),
        f"{_blk}.dtype": ("float32", "bfloat16"),
        f"{_blk}.optimizer.name": ("adamw", "adafactor"),
        f"{_blk}.optimizer.schedule": ("constant", "linear", "cosine", "rsqrt"),
        f"{_blk}.loss.smoothing": ("fairseq", "uniform"),
        f"{_blk}.loss.teacher": ("online", "cached"),
    })
# `{finetune,distill}.loss.kd_type` is checked against `objectives.KD_LOSSES` in `validate`
# (objectives imports this module, so the table is read there, not here).

# `distill.stages[i].targets`: the teacher's pseudo-labels, the gold targets, or the student's
# own samples scored by the teacher (every step on-policy, `kd_flax.on_policy`).
STAGE_TARGETS = ("pseudo", "gold", "student")

# (low, high, low_inclusive, high_inclusive)
RANGES = {
    "generate.num_beams": (1, None, True, True),
    "generate.num_return_sequences": (1, None, True, True),
    "generate.max_new_tokens": (1, None, True, True),
    "generate.temperature": (0, None, False, True),
    "generate.top_k": (0, None, True, True),
    "generate.store_topk": (0, None, True, True),
    "generate.top_p": (0, 1, False, True),
    "generate.batch_size": (1, None, True, True),
    "generate.shard_size": (1, None, True, True),
    "data.max_source_length": (2, None, True, True),  # a source token and EOS
    "data.max_target_length": (1, None, True, True),
    "evaluate.num_beams": (1, None, True, True),
    "evaluate.batch_size": (1, None, True, True),
    "distill.on_policy.lmbda": (0, 1, True, True),
    "distill.on_policy.beta": (0, 1, True, True),
    "distill.on_policy.temperature": (0, None, False, True),
    "distill.on_policy.top_k": (0, None, True, True),
    "distill.on_policy.top_p": (0, 1, False, True),
    "distill.on_policy.max_new_tokens": (0, None, True, True),
    "distill.on_policy.loss_temperature": (0, None, False, True),
}
for _blk in ("finetune", "distill"):
    RANGES.update({
        f"{_blk}.steps": (0, None, True, True),
        f"{_blk}.batch_size": (1, None, True, True),
        f"{_blk}.grad_accum": (1, None, True, True),
        f"{_blk}.eval_every": (0, None, True, True),
        f"{_blk}.checkpoint_every": (0, None, True, True),
        f"{_blk}.optimizer.learning_rate": (0, None, False, True),
        f"{_blk}.optimizer.warmup_steps": (0, None, True, True),
        f"{_blk}.optimizer.decay_rate": (0, 1, False, True),
        f"{_blk}.loss.label_smoothing": (0, 1, True, False),
        f"{_blk}.loss.temperature": (0, None, False, True),
        f"{_blk}.loss.lam": (0, 1, True, True),
        f"{_blk}.loss.beta": (0, 1, False, False),
        f"{_blk}.loss.kd_weight": (0, None, True, True),
        f"{_blk}.loss.ce_weight": (0, None, True, True),
        f"{_blk}.loss.hidden_weight": (0, None, True, True),
        f"{_blk}.loss.attention_weight": (0, None, True, True),
        f"{_blk}.loss.topk": (1, None, True, True),
    })


class ConfigError(ValueError):
    """A config problem; the message names every bad key and what is allowed."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict) and not any(key == f for f in FREE_FORM):
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def flat_keys(d: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a nested dict, inner nodes included (`student`, `student.quant`, ...)."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            out.append(key)
            out += flat_keys(v, key)
    return out


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) or (isinstance(value, str))
    return True


def _type_name(default: Any) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, (list, tuple)):
        return "list"
    return type(default).__name__


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith(("hf:", "synthetic:"))


def _path_exists(spec: str) -> bool:
    """A data spec or model path exists: plain path, `a+b` pair, or `{lang}` template."""
    if _is_remote(spec):
        return True
    if "{lang}" in spec:
        return True  # checked with the languages by data.py, which names the file
    return all(os.path.exists(p) for p in spec.split("+"))


def _model_key_problems(cfg: dict) -> list[str]:
    """Unknown keys in teacher.model / student.model (HF-style keys or config fields of the family)."""
    import dataclasses
    import difflib
    from kd_flax.models import hf
    out = []
    tmt = (cfg.get("teacher", {}).get("model") or {}).get("model_type")
    for blk in ("teacher", "student"):
        d = cfg.get(blk, {}).get("model") or {}
        if not isinstance(d, dict) or not d:
            continue
        mt = d.get("model_type", tmt)
        try:
            cls = hf.get_family(mt).config_cls
        except (ValueError, TypeError):  # get_family: unknown/absent (or unhashable) model_type
            continue  # reported where the model is built
        allowed = {f.name for f in dataclasses.fields(cls)} | {"model_type", "architectures"}
        # The family's defaults for a model_type it registered: cannot fail short of a bug.
        allowed |= set(cls.from_hf({"model_type": mt}).to_hf())
        for k in sorted(set(d) - allowed):
            close = difflib.get_close_matches(k, sorted(allowed), n=3, cutoff=0.6)
            out.append(f"{blk}.model.{k}: unknown key for model_type {mt!r}; closest valid keys: "
                       f"{close or sorted(allowed)[:10]}")
    return out


def _value_problems(key: str, value, default, choices: dict, label: str | None = None) -> list[str]:
    """Type, choice and range problems of `value` at `key` (reported as `label`, default `key`)."""
    label = label or key
    if not _type_ok(value, default):
        return [f"{label}: expected {_type_name(default)}, got {type(value).__name__} {value!r}"]
    out = []
    if key in choices and value not in choices[key]:
        out.append(f"{label}: {value!r} is not allowed; allowed values: {list(choices[key])}")
    if key + "[]" in choices and isinstance(value, (list, tuple)):
        bad = [v for v in value if v not in choices[key + "[]"]]
        if bad:
            out.append(f"{label}: {bad} not allowed; allowed values: {list(choices[key + '[]'])}")
    if key in RANGES and isinstance(value, (int, float)):
        lo, hi, lo_inc, hi_inc = RANGES[key]
        bad = (lo is not None and (value < lo or (value == lo and not lo_inc))) or (
            hi is not None and (value > hi or (value == hi and not hi_inc)))
        if bad:
            lb = "[" if lo_inc else "("
            rb = "]" if hi_inc else ")"
            out.append(f"{label}: {value!r} out of range; allowed: {lb}{lo}, {'∞' if hi is None else hi}{rb}")
    return out


def _stage_optimizer_problems(i: int, opt, base: dict, choices: dict) -> list[str]:
    """`distill.stages[i].optimizer`: keys of `distill.optimizer`, values checked as there."""
    where = f"distill.stages[{i}].optimizer"
    allowed = sorted(k.rsplit(".", 1)[1] for k in base if k.startswith("distill.optimizer."))
    if not isinstance(opt, dict):
        return [f"{where}: expected a dict of distill.optimizer keys {allowed}, got {opt!r}"]
    out = []
    for k, v in opt.items():
        key = f"distill.optimizer.{k}"
        if key not in base:
            out.append(f"{where}.{k}: unknown optimizer key; allowed: {allowed}")
        else:
            out += _value_problems(key, v, base[key], choices, label=f"{where}.{k}")
    return out


# Keys a config may set that base_config() leaves out, with the default their absence means:
# added after workdirs existed, so the stage records (hashes) of configs without them stay as they were.
OPTIONAL_KEYS = {"generate.filters.drop_unfinished": False}


def validate(config: ml_collections.ConfigDict, *, check_paths: bool = True) -> None:
    """Check keys, types, choices, ranges and paths; raise one ConfigError listing all problems."""
    cfg = config.to_dict()
    base = dict(_flatten(base_config().to_dict()), **OPTIONAL_KEYS)
    flat = _flatten(cfg)
    problems: list[str] = []
    from kd_flax.objectives import KD_LOSSES
    choices = dict(CHOICES, **{f"{blk}.loss.kd_type": tuple(KD_LOSSES) for blk in ("finetune", "distill")})

    for key in sorted(set(flat) - set(base)):
        if not any(key.startswith(f + ".") or key == f for f in FREE_FORM):
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            siblings = sorted(k.rsplit(".", 1)[-1] for k in base
                              if (k.rsplit(".", 1)[0] if "." in k else "") == parent)
            problems.append(f"{key}: unknown key; allowed keys here: {siblings}")
    for key in sorted(set(base) - set(flat) - set(OPTIONAL_KEYS)):
        problems.append(f"{key}: missing (recipes must start from kd_flax.config_base.base_config())")

    for key, value in flat.items():
        if key in base:
            problems += _value_problems(key, value, base[key], choices)

    # Cross-key rules.
    from kd_flax.decoding import check_search  # the one check, shared with decoding and the teacher job
    g = cfg["generate"]
    try:
        check_search(g["num_beams"], g["num_return_sequences"], g["do_sample"], prefix="generate.")
    except ValueError as e:
        problems.append(str(e))
    if cfg["generate"]["select"] in ("bleu", "chrf") and cfg["generate"]["num_return_sequences"] < 2:
        problems.append("generate.select: 'bleu'/'chrf' (SeqInter) needs generate.num_return_sequences ≥ 2")
    for i, st in enumerate(cfg["distill"]["stages"]):
        if not isinstance(st, dict) or not {"targets", "steps"} <= set(st) <= {"targets", "steps", "quant",
                                                                                "optimizer"}:
            problems.append(f"distill.stages[{i}]: expected {{'targets': {'|'.join(map(repr, STAGE_TARGETS))}, "
                            f"'steps': int, optional 'quant': bool, optional 'optimizer': "
                            f"{{distill.optimizer keys}}}}, got {st!r}")
        elif st["targets"] not in STAGE_TARGETS or not isinstance(st["steps"], int) or st["steps"] < 0 \
                or not isinstance(st.get("quant", True), bool):
            problems.append(f"distill.stages[{i}]: targets must be one of {list(STAGE_TARGETS)}, steps an int "
                            f"≥ 0 and quant a bool, got {st!r}")
        elif "optimizer" in st:
            problems += _stage_optimizer_problems(i, st["optimizer"], base, choices)
    q = cfg["student"]["quant"]
    if q.get("scheme") == "ctranslate2_int8" and (q["weight_bits"], q["act_bits"], q["granularity"]) != (8, 8, "channel"):
        problems.append(f"student.quant.scheme: 'ctranslate2_int8' is CTranslate2's int8 (int8 weights per "
                        f"output row, int8 activations per token): needs weight_bits=8, act_bits=8, "
                        f"granularity='channel', got weight_bits={q['weight_bits']}, act_bits={q['act_bits']}, "
                        f"granularity={q['granularity']!r}")
    for blk in ("finetune", "distill"):
        loss = cfg[blk]["loss"]
        if loss["fused"] and loss["kd_weight"] > 0 and loss["kd_type"] != "kl":
            problems.append(f"{blk}.loss.fused: the fused (chunked) KD loss computes forward KL only; "
                            f"set {blk}.loss.kd_type='kl' or fused=False (got kd_type={loss['kd_type']!r})")
        if loss["teacher"] == "cached" and (loss["kd_type"] != "topk" or loss["hidden_weight"] > 0
                                            or loss["attention_weight"] > 0):
            problems.append(f"{blk}.loss.teacher: 'cached' (the generate job's top-k log-probs) serves "
                            f"kd_type='topk' alone; set {blk}.loss.kd_type='topk' and hidden_weight = "
                            f"attention_weight = 0, or teacher='online'")
    for name, ov in cfg["variants"].items():
        if not isinstance(ov, dict):
            problems.append(f"variants.{name}: expected a dict of dotted-key overrides, got {ov!r}")
            continue
        for dotted in _flatten(ov):
            if dotted not in base and not any(dotted.startswith(f + ".") for f in FREE_FORM):
                problems.append(f"variants.{name}: override key {dotted!r} is not a config key")
    problems += _model_key_problems(cfg)
    axes = cfg["mesh"]["axes"]
    if not isinstance(axes, dict) or not all(isinstance(v, int) for v in axes.values()):
        problems.append(f"mesh.axes: expected a dict of axis name → int size (-1 = the rest), got {axes!r}")
    ab = cfg["evaluate"]["also_num_beams"]
    if not isinstance(ab, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                     for b in ab) or len(set(ab)) != len(ab) \
            or cfg["evaluate"]["num_beams"] in ab:
        problems.append(f"evaluate.also_num_beams: {ab!r} is not allowed; allowed: distinct beam widths "
                        f">= 1 other than evaluate.num_beams ({cfg['evaluate']['num_beams']}), e.g. [1]")
    bb = cfg["data"]["bucket_boundaries"]
    if not isinstance(bb, (list, tuple)) or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1
                                                     for b in bb):
        problems.append(f"data.bucket_boundaries: {bb!r} is not allowed; allowed: a tuple of ints >= 1")
    if cfg["teacher"]["init"] == "pretrained" and not cfg["teacher"]["path"]:
        problems.append("teacher.path: required when teacher.init='pretrained' (an HF checkpoint dir)")
    if cfg["teacher"]["init"] == "scratch" and cfg["finetune"]["steps"] <= 0:
        problems.append("finetune.steps: must be > 0 when teacher.init='scratch' (the teacher is trained here)")
    if cfg["student"]["init"] == "pretrained" and not cfg["student"]["path"]:
        problems.append("student.path: required when student.init='pretrained'")

    if check_paths:
        for key in ("teacher.path", "student.path", "teacher.tokenizer", "data.train", "data.dev"):
            v = flat.get(key)
            if isinstance(v, str) and v and not _path_exists(v):
                problems.append(f"{key}: path {v!r} does not exist")
        for v in cfg["data"]["test"] if isinstance(cfg["data"]["test"], (list, tuple)) else [cfg["data"]["test"]]:
            if isinstance(v, str) and v and not _path_exists(v):
                problems.append(f"data.test: path {v!r} does not exist")

    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def config_hash(obj: Any) -> str:
    """A stable hash of a config subtree (dict / ConfigDict / value)."""
    if isinstance(obj, ml_collections.ConfigDict):
        obj = obj.to_dict()
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += diff_keys(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
        return [prefix or "<root>"]
    return []
