"""Student construction: layer maps, layer copy (also scanned), vocabulary checks."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from kd_flax import models
from kd_flax import student as S


def _flat(model):
    return S._flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------- layer maps


@pytest.mark.parametrize("t,s,expected", [
    (12, 3, [0, 6, 11]),            # DistilBART 12-3
    (12, 6, [0, 2, 4, 7, 9, 11]),   # DistilBART 12-6
    (12, 1, [0]),                   # one layer: the first (DistilBART / DQ-BART x-1)
    (6, 1, [0]),
    (6, 2, [0, 5]),
    (6, 3, [0, 3, 5]),             # 2.5 rounds up (DistilBART's table has [0, 2, 5])
    (4, 4, [0, 1, 2, 3]),
    (3, 2, [0, 2]),
])
def test_default_layer_map(t, s, expected):
    assert S.default_layer_map(t, s) == expected


def test_default_layer_map_properties():
    for t in range(1, 25):
        for s in range(1, t + 1):
            m = S.default_layer_map(t, s)
            assert len(m) == s and m[0] == 0 and all(a < b for a, b in zip(m, m[1:]))
            if s > 1:
                assert m[-1] == t - 1


@pytest.mark.parametrize("args", [(0, 1), (3, 0), (3, 4), (3.0, 1)])
def test_default_layer_map_invalid(args):
    with pytest.raises(ValueError, match="layers"):
        S.default_layer_map(*args)


def test_validate_layer_map():
    assert S.validate_layer_map([0, 3, 5], 6, 3) == [0, 3, 5]
    with pytest.raises(ValueError, match=r"layer_map.*2 entries.*3 layers"):
        S.validate_layer_map([0, 5], 6, 3)
    with pytest.raises(ValueError, match=r"\[6\] out of range; allowed: 0\.\.5"):
        S.validate_layer_map([0, 2, 6], 6, 3)
    with pytest.raises(ValueError, match="out of range"):
        S.validate_layer_map([-1, 2, 3], 6, 3)
    with pytest.raises(ValueError, match="list of ints"):
        S.validate_layer_map([0, 1.5, 3], 6, 3)


# ---------------------------------------------------------------------------- layer copy


def _check_copied(student, teacher, info):
    t, s = _flat(teacher), _flat(student)
    n_layer = 0
    for path, v in s.items():
        pos = S._layer_position(path)
        if pos is None:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(t[path]), err_msg=str(path))
            continue
        stack, k = pos
        lmap = list(getattr(info, stack))
        if isinstance(path[k + 1], int):
            src = path[:k + 1] + (lmap[path[k + 1]],) + path[k + 2:]
            np.testing.assert_array_equal(np.asarray(v), np.asarray(t[src]), err_msg=str(path))
        else:
            np.testing.assert_array_equal(np.asarray(v), np.asarray(t[path])[np.asarray(lmap)],
                                          err_msg=str(path))
        n_layer += 1
    assert n_layer > 0


@pytest.mark.parametrize("family,scan", [("t5", False), ("t5", True), ("bart", False)])
def test_layer_copy_equals_chosen_teacher_layers(family, scan):
    cfg = models.tiny_config(family, encoder_layers=4, decoder_layers=3, scan_layers=scan)
    teacher = models.create_model(cfg, nnx.Rngs(1))
    student, info = S.make_student(teacher, 2, 1, layer_map={"encoder": [1, 3]})
    assert info.encoder == (1, 3) and info.decoder == (0,)
    assert student.config.encoder_layers == 2 and student.config.decoder_layers == 1
    _check_copied(student, teacher, info)
    if family == "t5":  # the relative-position bias (stack level in kd_flax) is copied too
        t, s = _flat(teacher), _flat(student)
        rel = [p for p in s if "relative_attention_bias" in p]
        assert rel and all(np.array_equal(s[p], t[p]) for p in rel)
    # the student runs
    ids = np.array([[5, 6, 7, 1], [8, 9, 1, 0]], np.int32)
    mask = (ids != 0).astype(np.int32) if family == "t5" else np.ones_like(ids)
    logits = student(input_ids=ids, attention_mask=mask, decoder_input_ids=ids)
    assert logits.shape == (2, 4, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()


def test_full_depth_copy_reproduces_teacher():
    teacher = models.create_model(models.tiny_config("t5", encoder_layers=2, decoder_layers=2), nnx.Rngs(2))
    student, info = S.make_student(teacher)
    ids = np.array([[5, 6, 7, 1]], np.int32)
    a = teacher(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=ids)
    b = student(input_ids=ids, attention_mask=np.ones_like(ids), decoder_input_ids=ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_make_student_errors():
    teacher = models.create_model(models.tiny_config("t5", encoder_layers=3, decoder_layers=2), nnx.Rngs(0))
    with pytest.raises(ValueError, match="decoder_layers=3 exceeds"):
        S.make_student(teacher, 2, 3)
    with pytest.raises(ValueError, match=r"layer_map\.encoder.*out of range"):
        S.make_student(teacher, 2, 1, layer_map={"encoder": [0, 3]})
    with pytest.raises(ValueError, match="unknown keys"):
        S.make_student(teacher, 2, 1, layer_map={"enc": [0, 1]})
    with pytest.raises(ValueError, match="shape mismatch"):
        S.make_student(teacher, 2, 1, overrides={"d_ff": 48})


def test_kd_compatibility_messages():
    teacher = models.create_model(models.tiny_config("t5"), nnx.Rngs(0))
    other, _ = S.scratch_student(models.tiny_config("bart", vocab_size=99), seed=1)
    with pytest.raises(ValueError, match=r"student vocab_size=99.*teacher vocab_size=128"):
        S.check_kd_compatible(other, teacher)
    S.check_kd_compatible(other, teacher, word_level=False)  # SeqKD needs only text
    narrow, _ = S.scratch_student(models.tiny_config("t5", d_model=16, d_kv=4), seed=1)
    with pytest.raises(ValueError, match="d_model=16.*d_model=32"):
        S.check_kd_compatible(narrow, teacher, hidden=True, info=S.identity_info(narrow))
    with pytest.raises(ValueError, match="need a layer map"):
        S.check_kd_compatible(narrow, teacher, hidden=True, info=S.StudentInfo("scratch"))


def test_layer_map_saved_in_exported_config(tmp_path):
    teacher = models.create_model(models.tiny_config("t5", encoder_layers=3, decoder_layers=3), nnx.Rngs(0))
    student, info = S.make_student(teacher, 2, 2)
    models.save_pretrained(student, tmp_path)
    S.save_layer_map(tmp_path, info)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["kd_flax_layer_map"] == {"init": "layer_copy", "encoder": [0, 2], "decoder": [0, 2]}
    assert S.load_layer_map(tmp_path) == info
    # the exported student still loads (HF ignores the extra key)
    again = models.load_pretrained(tmp_path)
    assert again.config.encoder_layers == 2
