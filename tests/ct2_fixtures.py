"""Tiny *trained* students for the CTranslate2 tests: a tokenizer trained on a toy copy task,
a student per family (T5 with asymmetric depths, BART, Marian, mBART-50 style with a target
language code) trained a few dozen steps so its next-token distributions are peaked, saved as
an HF dir. ``from tests.ct2_fixtures import
trained_student``."""

from __future__ import annotations

import os

import numpy as np

LANG = "fr_XX"  # the mBART student's target-language code (forced as the first token)
WORDS = [a + b for a in ("ka", "lo", "mi", "nu", "pe", "ri") for b in ("s", "t", "n", "r", "x")]


def corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) for _ in range(n)]


def _tokenizer(model_type: str):
    from kd_flax.models import train_tokenizer
    texts = corpus(400, 0)
    if model_type == "t5":
        return train_tokenizer(texts, 48, kind="bpe", style="t5")
    if model_type == "marian":  # Marian: </s>=0, <unk>=1, ..., <pad> the last id (as OPUS-MT)
        tok = train_tokenizer(texts, 47, kind="bpe", style="t5",
                              special_tokens={"pad_token": "</s>", "eos_token": "</s>"})
        tok.add_special_tokens({"pad_token": "<pad>"})
        return tok
    return train_tokenizer(texts, 48, kind="bpe", style="bart", extra_tokens=[LANG] if model_type == "mbart" else ())


def _config(model_type: str, tok):
    from kd_flax import models
    v = len(tok)
    # Asymmetric depths (the shape CTranslate2 issue 847 reports); one decoder layer also keeps
    # the train step's compile short.
    common = dict(vocab_size=v, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  encoder_layers=2, decoder_layers=1)
    if model_type == "t5":
        return models.tiny_config("t5", decoder_start_token_id=tok.pad_token_id, **common)
    if model_type == "marian":
        return models.tiny_config("marian", decoder_start_token_id=tok.pad_token_id, forced_eos_token_id=None,
                                  **common)
    # mBART-50: decoding starts from </s>, the language code is forced as the first token.
    lang = tok.convert_tokens_to_ids(LANG) if model_type == "mbart" else None
    return models.tiny_config(model_type, bos_token_id=tok.bos_token_id, decoder_start_token_id=tok.eos_token_id,
                              forced_bos_token_id=lang, forced_eos_token_id=None, **common)


def batch_from_texts(tok, src, tgt, start_id: int, length: int = 10, first_label=None):
    """A copy-task batch; `first_label` replaces the target's first token (mBART: `<s>` -> the
    language code, so the labels are `LANG X </s>` after the `</s>` start)."""
    enc = tok(src, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    lab = tok(tgt, padding="max_length", max_length=length, truncation=True, return_tensors="np")
    labels = lab["input_ids"].astype(np.int32)
    if first_label is not None:
        labels[:, 0] = first_label
    mask = lab["attention_mask"].astype(np.int32)
    dec_in = np.concatenate([np.full((len(src), 1), start_id, np.int32), labels[:, :-1]], axis=1)
    labels = np.where(mask > 0, labels, 0)
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32),
            "decoder_input_ids": dec_in, "labels": labels, "decoder_attention_mask": mask}


def train_student(model_type: str, out_dir, *, steps: int = 60, quant=None, seed: int = 0):
    """Trains a tiny `model_type` student to copy word sequences; saves it (HF dir + tokenizer)
    to `out_dir`; returns `(model, tokenizer)`. `quant`: a `student.quant`-like dict (scheme,
    weight_bits, act_bits) to train under fake-quant (the model config's activation fields come from `quant.act_config`,
    the weight rules from `quant.rules_for`, as a pipeline student's do)."""
    from flax import nnx
    from kd_flax import config_base, models, quant as quant_lib, train
    tok = _tokenizer(model_type)
    cfg = _config(model_type, tok)
    if quant:
        cfg = cfg.replace(**quant_lib.act_config(quant))
    model = models.create_model(cfg, nnx.Rngs(seed))
    rules = quant_lib.rules_for(model, quant) if quant else None
    block = config_base.base_config().distill
    block.optimizer.learning_rate, block.optimizer.warmup_steps = 1e-2, 5
    block.loss.label_smoothing = 0.0
    block.steps = steps
    step = train.make_train_step(model, block, quant_rules=rules)
    state = train.init_train_state(nnx.state(model, nnx.Param), block)
    texts = corpus(32 * steps, seed + 1)
    for i in range(steps):
        src = texts[32 * i: 32 * (i + 1)]
        b = batch_from_texts(tok, src, src, cfg.decoder_start_token_id, first_label=cfg.forced_bos_token_id)
        state, _ = step(state, b)
        if model_type == "marian":  # trained with the zero start row CTranslate2 decodes from
            state = state.replace(params=zero_pad_row(state.params, cfg.pad_token_id))
    nnx.update(model, state.params)
    if rules:
        nnx.update(model, quant_lib.quantize_params(nnx.state(model, nnx.Param), rules))
    models.save_pretrained(model, os.fspath(out_dir), tokenizer=tok)
    return model, tok


def zero_pad_row(params, pad_id: int):
    """`params` (an nnx.State) with every token table's `<pad>` row zeroed: HF Marian keeps it at
    zero (padding_idx) and CTranslate2 starts Marian's decoder from a zero embedding; a
    kd_flax-trained row is not zero, so training re-zeroes it after every step."""
    import jax
    from kd_flax.tree_paths import path_str

    def fix(path, x):
        return x.at[pad_id].set(0.0) if path_str(path).endswith("embed_tokens/embedding") else x
    return jax.tree_util.tree_map_with_path(fix, params)


def kd_flax_hyps(model, tok, src, beams):
    """kd_flax's token ids per sentence (up to EOS), `beams`-beam search, 12 new tokens."""
    from kd_flax.translate import Translator
    tr = Translator(model, tok, dict(num_beams=beams, max_new_tokens=12, length_penalty=1.0), batch_size=len(src))
    enc = tok(src, padding=True, return_tensors="np")
    seqs, _, _ = tr(enc["input_ids"], enc["attention_mask"])
    hyps = []
    for s in seqs[:, 0]:
        s = [int(x) for x in s]
        hyps.append(s[: s.index(tok.eos_token_id)] if tok.eos_token_id in s else s)
    return hyps


def ct2_hyps(ct2_dir, tok, src, beams, compute_type="float32", forced_bos_token_id=None):
    """CTranslate2's token ids per sentence for the same search (`min_decoding_length=0`: an EOS
    first is allowed, as in kd_flax); `forced_bos_token_id` is passed as `target_prefix` and
    stays in the hypothesis, where kd_flax has it too."""
    import ctranslate2
    tr = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type=compute_type)
    toks = [tok.convert_ids_to_tokens(x) for x in tok(src)["input_ids"]]
    prefix = None if forced_bos_token_id is None else [tok.convert_ids_to_tokens([forced_bos_token_id])] * len(toks)
    res = tr.translate_batch(toks, target_prefix=prefix, beam_size=beams, max_decoding_length=12,
                             min_decoding_length=0, length_penalty=1.0)
    return [tok.convert_tokens_to_ids(r.hypotheses[0]) for r in res]
