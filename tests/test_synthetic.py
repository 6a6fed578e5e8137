"""The demo's synthetic multi-modal task: deterministic, several valid targets, safe files."""

import json

import pytest

from kd_flax import synthetic


def test_sample_is_deterministic_and_multimodal():
    task = synthetic.SyntheticTask()
    a, b = task.sample(50, split_seed=7), task.sample(50, split_seed=7)
    assert a == b and a != task.sample(50, split_seed=8)
    src_words, tgt_words = task.lexicon()
    for ex in a:
        words = ex["src"].split()
        assert task.min_len <= len(words) <= task.max_len
        assert len(ex["refs"]) == task.num_modes and ex["ref"] in ex["refs"]
        ids = [src_words.index(w) for w in words]
        for m, ref in enumerate(ex["refs"]):
            # One synonym set (mode) per sentence, adjacent word pairs swapped.
            expect = [tgt_words[i][m] for i in ids]
            for i in range(0, len(expect) - 1, 2):
                expect[i], expect[i + 1] = expect[i + 1], expect[i]
            assert ref.split() == expect
    # Gold data mixes the modes with the configured probabilities.
    modes = [ex["refs"].index(ex["ref"]) for ex in task.sample(3000, split_seed=1)]
    freq = [modes.count(m) / len(modes) for m in range(task.num_modes)]
    assert all(abs(f - p) < 0.04 for f, p in zip(freq, task.mode_probs))


def test_materialize_writes_once_and_validates(tmp_path):
    path = synthetic.materialize("synthetic:test3:20", str(tmp_path))
    rows = [json.loads(line) for line in open(path)]
    assert len(rows) == 20 and rows == synthetic.SyntheticTask().sample(20, synthetic.split_seed("test3"))
    assert synthetic.materialize("synthetic:test3:20", str(tmp_path)) == path
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="synthetic:<split>:<n>"):
        synthetic.materialize("synthetic:train", str(tmp_path))
    with pytest.raises(ValueError, match="allowed: train, dev, test0"):
        synthetic.split_seed("holdout")
    with pytest.raises(ValueError, match="mode_probs"):
        synthetic.SyntheticTask(mode_probs=(0.5, 0.5))
