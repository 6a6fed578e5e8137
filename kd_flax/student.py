"""The student: layer maps, a student copied from a teacher, or a fresh one.

DistilBART / DQ-BART build the student by copying a subset of the teacher's layers
(plus embeddings, position tables, norms and the LM head): the student starts close to
the teacher and distillation only has to repair the gaps. The chosen map is kept in a
`StudentInfo` and written into the exported config as `kd_flax_layer_map`, because the
hidden-state loss pairs student layer i with teacher layer `map[i]`.

Parameter paths follow docs/CONTRACTS.md: per-layer params live under
`encoder/layers/<i>/...` and `decoder/layers/<i>/...` (or, with `scan_layers=True`,
under `encoder/layers/...` with a leading layer axis).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from kd_flax.tree_paths import path_str

log = logging.getLogger(__name__)

STACKS = ("encoder", "decoder")


# ---------------------------------------------------------------------------
# Layer maps
# ---------------------------------------------------------------------------


def default_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers with the first and the last kept.

    `i * (T-1) / (S-1)` rounded half up: (12, 3) → [0, 6, 11] (DistilBART 12-3),
    (12, 6) → [0, 2, 4, 7, 9, 11] (DistilBART 12-6), (6, 3) → [0, 3, 5] (2.5 rounds up;
    DistilBART's hand-written table has [0, 2, 5] — pass it explicitly to match). A one-layer student gets the teacher's *first*
    layer, [0] (DistilBART's and DQ-BART's 6-1 / 12-1 choice: the bottom layer still
    reads the embeddings it was trained on, and in T5 it owns the relative-position bias).
    """
    if not isinstance(teacher_layers, (int, np.integer)) or teacher_layers < 1:
        raise ValueError(f"teacher_layers must be an int ≥ 1, got {teacher_layers!r}")
    if not isinstance(student_layers, (int, np.integer)) or not 1 <= student_layers <= teacher_layers:
        raise ValueError(f"student_layers must be an int in [1, teacher_layers={teacher_layers}], "
                         f"got {student_layers!r}")
    if student_layers == 1:
        return [0]
    step = (teacher_layers - 1) / (student_layers - 1)
    return [int(np.floor(i * step + 0.5)) for i in range(student_layers)]


def validate_layer_map(layer_map: Sequence[int], teacher_layers: int, student_layers: int,
                       name: str = "layer_map") -> list[int]:
    """Check an explicit map: `student_layers` ints, each in [0, teacher_layers)."""
    try:
        out = [int(i) for i in layer_map]
        if any(int(i) != i for i in layer_map):
            raise TypeError
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a list of ints, got {layer_map!r}") from None
    if len(out) != student_layers:
        raise ValueError(f"{name}: has {len(out)} entries {out} but the student has "
                         f"{student_layers} layers; give exactly one teacher layer per student layer")
    bad = [i for i in out if not 0 <= i < teacher_layers]
    if bad:
        raise ValueError(f"{name}: teacher layer indices {bad} out of range; allowed: "
                         f"0..{teacher_layers - 1} (the teacher has {teacher_layers} layers)")
    return out


@dataclasses.dataclass(frozen=True)
class StudentInfo:
    """How a student was made; `encoder`/`decoder` maps are None for non-copied students.

    Student layer i corresponds to teacher layer `encoder[i]` (`decoder[i]`) for the
    hidden-state and attention losses.
    """
    init: str
    encoder: tuple[int, ...] | None = None
    decoder: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"init": self.init,
                "encoder": None if self.encoder is None else list(self.encoder),
                "decoder": None if self.decoder is None else list(self.decoder)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentInfo":
        return cls(init=d.get("init", "layer_copy"),
                   encoder=None if d.get("encoder") is None else tuple(d["encoder"]),
                   decoder=None if d.get("decoder") is None else tuple(d["decoder"]))


def identity_info(model) -> StudentInfo:
    """Layer map of a teacher supervising a same-depth student: i ↔ i."""
    c = model.config
    return StudentInfo("identity", tuple(range(c.encoder_layers)), tuple(range(c.decoder_layers)))


# ---------------------------------------------------------------------------
# Building students
# ---------------------------------------------------------------------------


def _flat(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflat(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return out


def _layer_position(path: tuple) -> tuple[str, int] | None:
    """(stack, index of the 'layers' component) when `path` is a per-layer param."""
    for k in range(1, len(path)):
        if path[k] == "layers" and path[k - 1] in STACKS:
            return path[k - 1], k
    return None


def copy_layers(student, teacher, layer_map: dict[str, Sequence[int]]) -> None:
    """Overwrite `student`'s params in place with the teacher's chosen layers.

    Non-layer params (embeddings, position tables, final norms, LM head, and anything
    stack-level) are copied as they are. A per-layer param the chosen teacher layer lacks
    (T5's relative-attention bias exists only in layer 0) is taken from teacher layer 0.
    """
    t_flat = _flat(nnx.to_pure_dict(nnx.state(teacher, nnx.Param)))
    s_state = nnx.state(student, nnx.Param)
    s_flat = _flat(nnx.to_pure_dict(s_state))
    new = {}
    for path, s_val in s_flat.items():
        pos = _layer_position(path)
        if pos is None:
            src_path, t_val = path, t_flat.get(path)
        else:
            stack, k = pos
            lmap = list(layer_map[stack])
            if k + 1 < len(path) and isinstance(path[k + 1], (int, np.integer)):
                i = int(path[k + 1])
                src_path = path[:k + 1] + (lmap[i],) + path[k + 2:]
                t_val = t_flat.get(src_path)
                if t_val is None and lmap[i] != 0:
                    src_path = path[:k + 1] + (0,) + path[k + 2:]
                    t_val = t_flat.get(src_path)
            else:  # scan_layers: leading layer axis
                src_path, t_val = path, t_flat.get(path)
                if t_val is not None:
                    t_val = jnp.take(jnp.asarray(t_val), jnp.asarray(lmap), axis=0)
        if t_val is None:
            raise ValueError(f"layer copy: the teacher has no parameter {path_str(src_path)} for the "
                             f"student's {path_str(path)}; is the student the teacher's family?")
        if tuple(np.shape(t_val)) != tuple(np.shape(s_val)):
            raise ValueError(f"layer copy: shape mismatch for {path_str(path)}: student "
                             f"{tuple(np.shape(s_val))} vs teacher {path_str(src_path)} "
                             f"{tuple(np.shape(t_val))}; layer copy needs equal widths "
                             f"(use student.init='scratch' for a different shape)")
        new[path] = jnp.asarray(t_val, dtype=jnp.asarray(s_val).dtype)
    nnx.replace_by_pure_dict(s_state, _unflat(new))
    nnx.update(student, s_state)


def make_student(teacher, encoder_layers: int | None = None, decoder_layers: int | None = None,
                 layer_map: dict[str, Sequence[int] | None] | None = None, *,
                 overrides: dict[str, Any] | None = None, seed: int = 0):
    """A student of the teacher's family with fewer layers, initialised by layer copy.

    Args:
      teacher: a kd_flax model (`T5Model`, `BartModel`).
      encoder_layers / decoder_layers: student depths (None = the teacher's).
      layer_map: `{"encoder": [...], "decoder": [...]}`; a missing/None/empty entry uses
        `default_layer_map`.
      overrides: extra config fields for the student (`dtype`, `remat`, `act_quant_bits`...);
        widths must stay equal to the teacher's for layer copy.
    Returns:
      `(student, StudentInfo)`.
    """
    from kd_flax import models

    tc = teacher.config
    n_t = {"encoder": tc.encoder_layers, "decoder": tc.decoder_layers}
    n_s = {"encoder": encoder_layers or tc.encoder_layers,
           "decoder": decoder_layers or tc.decoder_layers}
    layer_map = dict(layer_map or {})
    unknown = set(layer_map) - set(STACKS)
    if unknown:
        raise ValueError(f"layer_map: unknown keys {sorted(unknown)}; allowed: {list(STACKS)}")
    maps = {}
    for stack in STACKS:
        if n_s[stack] > n_t[stack]:
            raise ValueError(f"{stack}_layers={n_s[stack]} exceeds the teacher's {n_t[stack]} "
                             f"{stack} layers; layer copy needs a shallower student")
        m = layer_map.get(stack)
        maps[stack] = (default_layer_map(n_t[stack], n_s[stack]) if m is None or len(m) == 0
                       else validate_layer_map(m, n_t[stack], n_s[stack], f"layer_map.{stack}"))
    cfg = tc.replace(encoder_layers=n_s["encoder"], decoder_layers=n_s["decoder"], **(overrides or {}))
    student = models.create_model(cfg, nnx.Rngs(seed))
    copy_layers(student, teacher, maps)
    return student, StudentInfo("layer_copy", tuple(maps["encoder"]), tuple(maps["decoder"]))


def scratch_student(config, *, seed: int = 0):
    """A freshly initialised student from a model config (any family/vocabulary)."""
    from kd_flax import models

    return models.create_model(config, nnx.Rngs(seed)), StudentInfo("scratch")


def check_kd_compatible(student, teacher, *, word_level: bool = True, hidden: bool = False,
                        attention: bool = False, info: StudentInfo | None = None) -> None:
    """Fail early when the configured token/hidden-level losses cannot pair the two models.

    Sequence-level KD needs only text, so any student works; word-level KD compares the
    two output distributions token by token and needs the same vocabulary; hidden/attention
    losses need equal widths/heads and a layer map.
    """
    sc, tc = student.config, teacher.config
    if word_level and sc.vocab_size != tc.vocab_size:
        raise ValueError(
            f"word-level KD needs the same vocabulary: student vocab_size={sc.vocab_size}, "
            f"teacher vocab_size={tc.vocab_size}; use sequence-level KD only (loss.kd_weight=0) "
            f"or a student with the teacher's tokenizer")
    if hidden or attention:
        if info is None or info.encoder is None or info.decoder is None:
            raise ValueError("hidden/attention losses need a layer map (student.init='layer_copy' "
                             "or an explicit student.layer_map)")
        for stack in STACKS:
            m = getattr(info, stack)
            n_s = getattr(sc, f"{stack}_layers")
            n_t = getattr(tc, f"{stack}_layers")
            validate_layer_map(m, n_t, n_s, f"layer_map.{stack}")
    if hidden and sc.d_model != tc.d_model:
        raise ValueError(f"hidden-state loss needs equal widths: student d_model={sc.d_model}, "
                         f"teacher d_model={tc.d_model}; set loss.hidden_weight=0")
    if attention:
        sh = getattr(sc, "num_heads", None) or getattr(sc, "encoder_attention_heads", None)
        th = getattr(tc, "num_heads", None) or getattr(tc, "encoder_attention_heads", None)
        if sh != th:
            raise ValueError(f"attention loss needs equal head counts: student {sh}, teacher {th}; "
                             f"set loss.attention_weight=0")


def check_vocab(model, tokenizer) -> None:
    """The student must have an embedding for every token its tokenizer can emit, whatever
    the loss (SeqKD and gold training too): refused before training, naming the key."""
    n_tok, n_emb = len(tokenizer), int(model.config.vocab_size)
    if n_emb < n_tok:
        raise ValueError(f"student.model.vocab_size: the student has {n_emb} token embeddings but its "
                         f"tokenizer has {n_tok} tokens; set student.model.vocab_size=0 (the "
                         f"tokenizer's size) or a value >= {n_tok}")


# ---------------------------------------------------------------------------
# Metadata next to checkpoints / in exported configs
# ---------------------------------------------------------------------------

LAYER_MAP_KEY = "kd_flax_layer_map"


def save_layer_map(model_dir: str, info: StudentInfo) -> None:
    """Add `kd_flax_layer_map` to `model_dir/config.json` (HF ignores unknown keys)."""
    from kd_flax import io_utils
    path = io_utils.join(model_dir, "config.json")
    cfg = io_utils.read_json(path)
    cfg[LAYER_MAP_KEY] = info.to_dict()
    io_utils.atomic_write_json(path, cfg)


def load_layer_map(model_dir: str) -> StudentInfo | None:
    """The `StudentInfo` recorded in `model_dir/config.json`, or None."""
    from kd_flax import io_utils
    path = io_utils.join(model_dir, "config.json")
    if not io_utils.exists(path):
        return None
    d = io_utils.read_json(path).get(LAYER_MAP_KEY)
    return None if d is None else StudentInfo.from_dict(d)


# ---------------------------------------------------------------------------
# The student a config asks for
# ---------------------------------------------------------------------------

# Model-config fields that change how a model runs, not what it is (safe over any checkpoint).
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat", "scan_layers", "act_quant_bits", "act_quant_granularity")


def build_student(config, teacher, teacher_tokenizer, *, overrides=None):
    """The student the config asks for → `(model, tokenizer, StudentInfo)`."""
    from kd_flax import models, quant
    sc = config.student
    over = dict(sc.model.to_dict() if hasattr(sc.model, "to_dict") else sc.model)
    over.update(overrides or {})
    over.update(quant.act_config(sc.quant))  # act_quant_bits / act_quant_granularity
    lm = sc.layer_map.to_dict() if hasattr(sc.layer_map, "to_dict") else dict(sc.layer_map or {})
    if sc.init == "layer_copy":
        model, info = make_student(teacher, sc.encoder_layers or None, sc.decoder_layers or None,
                                               layer_map=lm, overrides=over, seed=int(config.seed))
        return model, teacher_tokenizer, info
    if sc.init == "pretrained":
        # The checkpoint defines the architecture; of `student.model` only the runtime fields
        # apply (a recipe's scratch-student shape must not break a switch to a checkpoint).
        ignored = sorted(k for k in over if k not in _RUNTIME_FIELDS)
        if ignored:
            log.warning("student.init='pretrained': student.model keys %s ignored (the checkpoint %s "
                        "defines the architecture)", ignored, sc.path)
        model = models.load_pretrained(sc.path, **{k: v for k, v in over.items() if k in _RUNTIME_FIELDS})
        return model, models.load_tokenizer(sc.path), StudentInfo("pretrained")
    if sc.init == "scratch":
        layers = {k: v for k, v in (("encoder_layers", sc.encoder_layers), ("decoder_layers", sc.decoder_layers)) if v}
        if "model_type" in over:  # an HF-style config of any family; ids from the tokenizer
            fields = {k: over.pop(k) for k in list(over) if k in ("dtype", "remat", "act_quant_bits",
                                                                  "act_quant_granularity")}
            cfg = models.config_from_dict(over, teacher_tokenizer, **fields).replace(**layers)
        else:  # the teacher's architecture with some fields changed
            cfg = teacher.config.replace(**over, **layers)
        model, info = scratch_student(cfg, seed=int(config.seed))
        return model, teacher_tokenizer, info
    raise ValueError(f"student.init: {sc.init!r} is not allowed; allowed: layer_copy, scratch, pretrained")
