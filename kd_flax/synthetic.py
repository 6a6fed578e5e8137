"""A synthetic translation task with several valid targets per source (for the CPU demo).

Why this task: SeqKD helps most when the training targets are *multi-modal* — the same
source has several correct translations and the gold data mixes them at random (Zhou et
al., 2020, "Understanding Knowledge Distillation in Non-autoregressive Machine
Translation"). A teacher commits to one mode per sentence; its pseudo-labels are
therefore simpler to learn than the gold mixture.

The "languages": source words are pseudo-words built from syllables; every source word
has `num_modes` target synonyms, and a sentence is translated in one *mode* (dialect),
drawn per sentence with unequal probabilities, so all words of a sentence use the same
synonym set. Word order: adjacent word pairs are swapped (a local reordering that needs
attention, not copying). Every test sentence carries all `num_modes` translations as
references (multi-reference BLEU).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

_SYLLABLES_SRC = ["ka", "lo", "mi", "nu", "pe", "ri", "sa", "to", "vu", "ze", "bo", "di"]
_SYLLABLES_TGT = ["ar", "el", "on", "ix", "us", "em", "ol", "ab", "ut", "yr", "ed", "ok"]


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    num_words: int = 120
    num_modes: int = 3
    mode_probs: tuple[float, ...] = (0.5, 0.3, 0.2)
    min_len: int = 3
    max_len: int = 8
    seed: int = 1234

    def __post_init__(self):
        if len(self.mode_probs) != self.num_modes or abs(sum(self.mode_probs) - 1) > 1e-6:
            raise ValueError(f"mode_probs must have num_modes={self.num_modes} entries summing to 1, "
                             f"got {self.mode_probs}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 ≤ min_len ≤ max_len, got {self.min_len}, {self.max_len}")

    # The lexicon is a pure function of the seed, so every split shares it.
    def lexicon(self) -> tuple[list[str], list[list[str]]]:
        rng = np.random.default_rng(self.seed)
        src = _unique_words(rng, _SYLLABLES_SRC, self.num_words)
        tgt_all = _unique_words(rng, _SYLLABLES_TGT, self.num_words * self.num_modes)
        tgt = [tgt_all[i * self.num_modes:(i + 1) * self.num_modes] for i in range(self.num_words)]
        return src, tgt

    def sample(self, n: int, split_seed: int) -> list[dict]:
        """`n` examples: {"src", "ref" (one mode, drawn by mode_probs), "refs" (all modes)}."""
        src_words, tgt_words = self.lexicon()
        rng = np.random.default_rng([self.seed, split_seed])
        # Zipf-like word frequencies, as in natural text.
        freq = 1.0 / np.arange(1, self.num_words + 1) ** 0.8
        freq /= freq.sum()
        out = []
        for _ in range(n):
            length = int(rng.integers(self.min_len, self.max_len + 1))
            ids = rng.choice(self.num_words, size=length, p=freq)
            mode = int(rng.choice(self.num_modes, p=np.asarray(self.mode_probs)))
            refs = [" ".join(_reorder([tgt_words[i][m] for i in ids])) for m in range(self.num_modes)]
            out.append({"src": " ".join(src_words[i] for i in ids), "ref": refs[mode], "refs": refs})
        return out


def _unique_words(rng, syllables, n):
    words: list[str] = []
    seen = set()
    while len(words) < n:
        k = int(rng.integers(2, 4))
        w = "".join(rng.choice(syllables, size=k))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def _reorder(words: list[str]) -> list[str]:
    out = list(words)
    for i in range(0, len(out) - 1, 2):
        out[i], out[i + 1] = out[i + 1], out[i]
    return out


def split_seed(name: str) -> int:
    """Each split name has its own sampling seed: train 1, dev 2, testK 100+K."""
    if name == "train":
        return 1
    if name == "dev":
        return 2
    if name.startswith("test") and name[4:].isdigit():
        return 100 + int(name[4:])
    raise ValueError(f"synthetic split {name!r} is unknown; allowed: train, dev, test0, test1, ...")


def write_split(out_dir: str, name: str, n: int, *, task: SyntheticTask | None = None) -> str:
    """Write one split as JSONL (`src`, `ref`, `refs`) and return its path.

    Written to a temp name and renamed, so a crash never leaves a partial file; an existing
    file is reused (its content is a pure function of the task, the split name and n).
    """
    from kd_flax import io_utils
    task = task or SyntheticTask()
    path = os.fspath(io_utils.join(out_dir, f"{name}-{n}.jsonl"))
    if not io_utils.exists(path):
        io_utils.atomic_write_text(path, "".join(json.dumps(ex, ensure_ascii=False) + "\n"
                                                 for ex in task.sample(n, split_seed=split_seed(name))))
    return path


def materialize(spec: str, out_dir: str) -> str:
    """`synthetic:<split>:<n>` → the path of that split written under `out_dir`."""
    parts = spec.split(":")
    if len(parts) != 3 or parts[0] != "synthetic" or not parts[2].isdigit():
        raise ValueError(f"data spec {spec!r}: expected synthetic:<split>:<n>, e.g. synthetic:train:2000")
    return write_split(out_dir, parts[1], int(parts[2]))
