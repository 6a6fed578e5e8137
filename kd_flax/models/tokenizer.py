"""Small tokenizers for tests and demos, saved in Hugging Face format.

``train_tokenizer`` trains a SentencePiece-style (Metaspace) unigram or BPE model with the
``tokenizers`` library and wraps it as a ``transformers.PreTrainedTokenizerFast`` that
``AutoTokenizer.from_pretrained(path)`` reloads. Special tokens follow the model family:
T5 style ``<pad>=0, </s>=1, <unk>=2`` (EOS appended to every sequence) or BART style
``<s>=0, <pad>=1, </s>=2, <unk>=3`` (``<s> … </s>``).
"""

from __future__ import annotations

import os
from typing import Iterable

KINDS = ("unigram", "bpe")
STYLES = ("t5", "bart")


def _special_tokens(style: str) -> dict:
    if style == "t5":
        return {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int, path=None, *, kind: str = "unigram",
                    style: str = "t5", special_tokens: dict | None = None,
                    extra_tokens: Iterable[str] = ()):
    """Train a tokenizer on ``texts`` and return a ``PreTrainedTokenizerFast``.

    kind: ``"unigram"`` or ``"bpe"``; style: ``"t5"`` (pad/eos/unk, EOS appended) or
    ``"bart"`` (bos/pad/eos/unk, ``<s> X </s>``; also right for mBART/Marian demos).
    ``special_tokens`` overrides the role → token strings (keys ``pad_token``, ``eos_token``,
    ``unk_token``, ``bos_token``); ``extra_tokens`` (e.g. language codes) are added after
    them. When ``path`` is given the tokenizer is saved there in HF format.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"train_tokenizer: kind={kind!r}; allowed: {list(KINDS)}")
    if style not in STYLES:
        raise ValueError(f"train_tokenizer: style={style!r}; allowed: {list(STYLES)}")
    if not isinstance(vocab_size, int) or vocab_size < 8:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size!r} must be an int >= 8")
    roles = _special_tokens(style)
    if special_tokens:
        bad = set(special_tokens) - {"pad_token", "eos_token", "unk_token", "bos_token"}
        if bad:
            raise ValueError(f"train_tokenizer: special_tokens keys {sorted(bad)} not allowed; "
                             "allowed: bos_token, eos_token, pad_token, unk_token")
        roles.update(special_tokens)
    order = ["pad_token", "eos_token", "unk_token"] if style == "t5" else \
        ["bos_token", "pad_token", "eos_token", "unk_token"]
    specials = [roles[r] for r in order if r in roles] + list(extra_tokens)
    texts = [t for t in texts]
    if not texts:
        raise ValueError("train_tokenizer: texts is empty")

    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                          unk_token=roles["unk_token"], show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token=roles["unk_token"]))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer=trainer)

    eos, eos_id = roles["eos_token"], tok.token_to_id(roles["eos_token"])
    if style == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, eos_id)])
    else:
        bos, bos_id = roles["bos_token"], tok.token_to_id(roles["bos_token"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
            special_tokens=[(bos, bos_id), (eos, eos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **roles,
                                   additional_special_tokens=list(extra_tokens) or None)
    if path is not None:
        save_tokenizer(fast, path)
    return fast


def save_tokenizer(tokenizer, path) -> None:
    """``tokenizer.save_pretrained`` into a local or ``gs://`` directory. transformers writes
    local files only, so it writes into a temporary directory and each file is copied into
    place atomically (a reader never sees a half-written tokenizer.json)."""
    import tempfile

    from kd_flax import io_utils

    with tempfile.TemporaryDirectory(prefix="kd_flax-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        io_utils.makedirs(path)
        # tokenizer.json last: its presence marks a complete directory (a run killed midway
        # leaves no tokenizer.json, so the next one saves again instead of trusting a half).
        for name in sorted(os.listdir(tmp), key=lambda n: n == "tokenizer.json"):
            io_utils.copy_tree(os.path.join(tmp, name), io_utils.join(path, name))


def load_tokenizer(path):
    """``transformers.AutoTokenizer.from_pretrained(path)`` for a local or ``gs://`` HF directory."""
    from transformers import AutoTokenizer

    from kd_flax import io_utils

    if not io_utils.is_dir(path):
        raise ValueError(f"load_tokenizer: {os.fspath(path)!r} is not a directory")
    tok_json = io_utils.join(path, "tokenizer.json")
    if io_utils.exists(tok_json):
        io_utils.read_json(tok_json)  # a truncated file: ValueError naming it, not a parser panic
    with io_utils.local_dir(path) as local:
        try:
            return AutoTokenizer.from_pretrained(local)
        except Exception as e:  # noqa: BLE001 - transformers/tokenizers raise many kinds
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"load_tokenizer: {os.fspath(path)}: not a loadable tokenizer ({msg})") from None
