"""The `export` stage: the trained student as a Hugging Face dir, as integer weights and as a
CTranslate2 model.

- `hf`: `WORKDIR/export/hf/` — loads in transformers (`AutoModelForSeq2SeqLM.from_pretrained`).
  For a fake-quantized student these are the *dequantized* weights, i.e. exactly the
  weights its quantized forward used (activation quantization is not expressible in an HF
  checkpoint; the integer export below carries the weights a runtime would ship).
- `int`: `WORKDIR/export/int/model.safetensors` + metadata — int8 (int4 / int2 packed)
  weights and their scales, from `kd_flax.int_weights.export_quantized`; its real byte size is
  recorded, answering DQ-BART's "where is the compression?".
- `export.ctranslate2` (`float32`, `int8`, `int8_float32`, ...; empty = off):
  `WORKDIR/export/ct2/` — the HF dir converted by CTranslate2's own Transformers converter
  (`to_ctranslate2`), with the tokenizer files copied beside it. Needs
  `pip install 'kd_flax[deploy]'`. The converter reads the `hf` weights (dequantized for a
  fake-quant student) and, for `int8*`, re-quantizes them itself: per output row,
  `scale = 127 / max|row|`, `rint(w * scale)`, int8 (linear layers and embeddings; biases,
  norms, position tables and T5's relative-attention bias stay float).

`WORKDIR/export/summary.json` records parameter count and sizes (float32 bytes, exported bytes,
CTranslate2 bytes on disk).
"""

from __future__ import annotations

import os
import tempfile

import jax
from flax import nnx

from kd_flax import evaluate, int_weights, io_utils, quant

# CTranslate2's `quantization=` values (ctranslate2.specs.model_spec.ACCEPTED_MODEL_TYPES).
CT2_QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16",
                     "float16", "bfloat16")
CT2_PIP = "pip install 'kd_flax[deploy]'  (or: pip install ctranslate2==4.8.5)"
# Tokenizer files a kd_flax / HF dir may hold; the ones present are copied into the CT2 dir.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "spiece.model", "sentencepiece.bpe.model", "source.spm", "target.spm",
                   "vocab.json", "merges.txt", "generation_config.json")


def import_ctranslate2(key: str = "export.ctranslate2"):
    """`ctranslate2`, or an ImportError that says which key needs it and the pip command."""
    try:
        import ctranslate2
    except ImportError:
        raise ImportError(f"{key} needs CTranslate2, which is not installed: {CT2_PIP}") from None
    return ctranslate2


def check_ct2_quantization(value, key: str = "export.ctranslate2") -> str:
    if value not in CT2_QUANTIZATIONS:
        raise ValueError(f"{key}: {value!r} is not allowed; allowed: {list(CT2_QUANTIZATIONS)} "
                         f"(or '' for no CTranslate2 export)")
    return value


def to_ctranslate2(hf_dir, out_dir, quantization: str = "int8") -> str:
    """Converts an HF seq2seq dir (T5, mT5, BART, mBART, Marian) with CTranslate2's
    `TransformersConverter` into `out_dir` (local or gs://; replaced if present), copying
    the tokenizer files found in `hf_dir`. Returns `out_dir`."""
    check_ct2_quantization(quantization)
    ct2 = import_ctranslate2()
    with tempfile.TemporaryDirectory(prefix="kd_flax-ct2-") as tmp:
        src = os.path.join(tmp, "hf")
        io_utils.copy_tree(hf_dir, src)
        _ct2_config_fixups(src)
        files = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
        conv = ct2.converters.TransformersConverter(src, copy_files=files)
        local = os.path.join(tmp, "ct2") if io_utils.is_remote(out_dir) else os.fspath(out_dir)
        conv.convert(local, quantization=quantization, force=True)
        _ct2_decoder_start_fixup(local, io_utils.read_json(os.path.join(src, "config.json")))
        if io_utils.is_remote(out_dir):
            io_utils.rmtree(out_dir)
            io_utils.copy_tree(local, out_dir)
    return str(out_dir)


def _ct2_decoder_start_fixup(ct2_dir: str, hf_cfg: dict) -> None:
    """mBART: CTranslate2's loader writes no decoder start token unless `config.json` names a
    tokenizer class other than `MBartTokenizer` (kd_flax's names none), so CT2 would start the
    decoder from the first `target_prefix` token (mBART-25's language code) where transformers
    and kd_flax start from `decoder_start_token_id` (mBART-50: `</s>`, then the language code
    forced as the first token, which CT2 takes as `target_prefix`). Writes that start token."""
    start = hf_cfg.get("decoder_start_token_id")
    if hf_cfg.get("model_type") != "mbart" or start is None:
        return
    vocab = io_utils.read_json(os.path.join(ct2_dir, "shared_vocabulary.json"))
    path = os.path.join(ct2_dir, "config.json")
    io_utils.atomic_write_json(path, {**io_utils.read_json(path), "decoder_start_token": vocab[int(start)]})


# fairseq-era keys CTranslate2's BART loader reads from config.json (facebook/bart-* and
# mbart-* configs carry them; transformers 5 no longer defines them, kd_flax does not write them).
_CT2_BART_KEYS = {"bart": {"normalize_before": False, "normalize_embedding": True, "add_final_layer_norm": False},
                  "mbart": {"normalize_before": True, "normalize_embedding": True, "add_final_layer_norm": True}}


def _ct2_config_fixups(hf_dir: str) -> None:
    """Adds what CTranslate2's converter expects to a local copy of `config.json`, and refuses
    a Marian model CTranslate2 would run differently: CT2 starts Marian's decoder from a zero
    embedding (HF's `<pad>` row is zero and never trained), so a non-zero `<pad>` row would
    change every translation."""
    import numpy as np
    from safetensors.numpy import load_file
    path = os.path.join(hf_dir, "config.json")
    cfg = io_utils.read_json(path)
    mt = cfg.get("model_type")
    for k, v in _CT2_BART_KEYS.get(mt, {}).items():
        cfg.setdefault(k, v)
    io_utils.atomic_write_json(path, cfg)
    if mt == "marian":
        tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
        pad = int(cfg["pad_token_id"])
        for name, w in tensors.items():
            if name.endswith("embed_tokens.weight") or name == "model.shared.weight":
                amax = float(np.max(np.abs(w[pad])))
                if amax != 0.0:
                    raise ValueError(
                        f"export.ctranslate2: this Marian model's <pad> embedding row ({name}[{pad}]) is not "
                        f"zero (max |x| = {amax:.3g}); CTranslate2 starts the decoder from a zero embedding, "
                        f"so it would not translate like the model. Zero that row (as HF's padding_idx keeps it) "
                        f"and re-train or re-evaluate before converting.")


def student_to_ctranslate2(model, tokenizer, out_dir, quantization: str) -> str:
    """Saves `model` (its weights as they are: quantize them first) as an HF dir in a temporary
    folder and converts it with :func:`to_ctranslate2` into `out_dir`."""
    from kd_flax.models import save_pretrained
    with tempfile.TemporaryDirectory(prefix="kd_flax-ct2-hf-") as tmp:
        save_pretrained(model, tmp, tokenizer=tokenizer)
        return to_ctranslate2(tmp, out_dir, quantization)


def ct2_translate(ct2_dir, tokenizer, texts, *, num_beams: int, max_new_tokens: int, batch_size: int,
                  max_source_length: int, source_prefix: str = "", forced_bos_token_id=None,
                  min_new_tokens: int = 0, meter=None, compute_type: str = "default") -> list[str]:
    """`texts` translated by CTranslate2 (CPU) with kd_flax's decoding settings: the same source
    ids (`data.encode_texts`: prefix, truncation, final EOS), beam size, `max_new_tokens`,
    `min_new_tokens` (CTranslate2's `min_decoding_length`, whose default 1 would forbid an EOS
    first where kd_flax and transformers allow it), length penalty 1, batches of `batch_size`
    in input order; `forced_bos_token_id` as CTranslate2's `target_prefix` (mBART's target
    language code); the best hypothesis decoded with `skip_special_tokens`. `meter` (`metrics.SpeedMeter`) gets each batch's sentences, tokens
    and wall time (no batch compiles: CTranslate2 has no compile step)."""
    import time

    from kd_flax.data import encode_texts
    ct2 = import_ctranslate2("evaluate (export.ctranslate2)")
    tr = ct2.Translator(os.fspath(ct2_dir), device="cpu", compute_type=compute_type)
    ids, _ = encode_texts(list(texts), tokenizer, max_source_length, prefix=source_prefix or "")
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = [tokenizer.convert_ids_to_tokens([int(i) for i in x]) for x in ids[start:start + batch_size]]
        prefix = (None if forced_bos_token_id is None
                  else [tokenizer.convert_ids_to_tokens([int(forced_bos_token_id)])] * len(chunk))
        t0 = time.perf_counter()
        res = tr.translate_batch(chunk, target_prefix=prefix, beam_size=num_beams,
                                 max_decoding_length=max_new_tokens, min_decoding_length=min_new_tokens,
                                 length_penalty=1.0)
        seconds = time.perf_counter() - t0
        hyps = [tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in res]
        out.extend(t.strip() for t in tokenizer.batch_decode(hyps, skip_special_tokens=True))
        if meter is not None:
            # CTranslate2's hypotheses leave EOS out: max_new_tokens of them means none came.
            meter.add(len(chunk), sum(len(h) for h in hyps), seconds,
                      hit_max=sum(len(h) >= max_new_tokens for h in hyps))
    return out


def ct2_quant_bits(quantization: str):
    """Weight bits of a CTranslate2 quantization (8 for `int8*`, 16 for `int16`; None = float)."""
    return 8 if quantization.startswith("int8") else 16 if quantization == "int16" else None


def dir_bytes(path) -> int:
    """Bytes of every file below `path` (local or gs://)."""
    p = io_utils.as_path(path)
    if not p.is_dir():
        return int(p.stat().length) if p.exists() else 0  # epath's StatResult, local or gs://
    return sum(dir_bytes(c) for c in p.iterdir())


def ctranslate2_setting(config) -> str:
    """`export.ctranslate2` ('' = off), checked."""
    from kd_flax.config_base import cfg_get
    value = cfg_get(cfg_get(config, "export"), "ctranslate2", "") or ""
    return check_ct2_quantization(value) if value else ""


def run(config, workdir) -> dict:
    from kd_flax.models import load_pretrained, load_tokenizer, save_pretrained
    from kd_flax.workdir import Workdir

    wd = Workdir.of(workdir)
    src, out = wd.student_dir, wd.export_dir
    ct2_quant = ctranslate2_setting(config)
    if ct2_quant:
        import_ctranslate2()  # fail before any work
    model = load_pretrained(src)
    tokenizer = load_tokenizer(src)
    n_params, float_bytes = evaluate.param_bytes(model)
    graphdef, state = nnx.split(model)
    rules = quant.rules_for(model, config.student.quant)
    summary = {"source": src, "params": n_params, "float32_bytes": float_bytes,
               "weight_bits": int(config.student.quant.weight_bits),
               "act_bits": int(config.student.quant.act_bits)}
    hf_dir = os.path.join(out, "hf")
    if "hf" in config.export.formats or ct2_quant:
        hf_state = quant.quantize_params(state, rules) if rules else state
        save_pretrained(nnx.merge(graphdef, hf_state), hf_dir, tokenizer=tokenizer)
    if "int" in config.export.formats:
        if rules is None:
            summary["int_bytes"] = None  # nothing to quantize: the HF export is the artifact
        else:
            exported = int_weights.export_quantized(state, rules)
            int_weights.save_quantized(exported, os.path.join(out, "int", "model.safetensors"))
            summary["int_bytes"] = int(int_weights.exported_nbytes(exported))
    if ct2_quant and jax.process_index() == 0:
        ct2_dir = os.path.join(out, "ct2")
        to_ctranslate2(hf_dir, ct2_dir, ct2_quant)
        summary["ctranslate2"] = {"quantization": ct2_quant, "bytes": dir_bytes(os.path.join(ct2_dir, "model.bin"))}
    if jax.process_index() == 0:
        io_utils.atomic_write_json(os.path.join(out, "summary.json"), summary)
    return summary
