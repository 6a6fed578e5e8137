"""The `export` stage: the trained student as a Hugging Face dir and as integer weights.

- `hf`: `WORKDIR/export/hf/` — loads in transformers (`AutoModelForSeq2SeqLM.from_pretrained`).
  For a fake-quantized student these are the *dequantized* weights, i.e. exactly the
  weights its quantized forward used (activation quantization is not expressible in an HF
  checkpoint; the integer export below carries the weights a runtime would ship).
- `int`: `WORKDIR/export/int/model.safetensors` + metadata — int8 (int4 / int2 packed)
  weights and their scales, from `kd_flax.int_weights.export_quantized`; its real byte size is
  recorded, answering DQ-BART's "where is the compression?".

`WORKDIR/export/summary.json` records parameter count and sizes (float32 bytes, exported bytes).
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from kd_flax import evaluate, int_weights, io_utils, quant


def run(config, workdir) -> dict:
    from kd_flax.models import load_pretrained, load_tokenizer, save_pretrained
    from kd_flax.workdir import Workdir

    wd = Workdir.of(workdir)
    src, out = wd.student_dir, wd.export_dir
    model = load_pretrained(src)
    tokenizer = load_tokenizer(src)
    n_params, float_bytes = evaluate.param_bytes(model)
    graphdef, state = nnx.split(model)
    rules = quant.rules_for(model, config.student.quant)
    summary = {"source": src, "params": n_params, "float32_bytes": float_bytes,
               "weight_bits": int(config.student.quant.weight_bits),
               "act_bits": int(config.student.quant.act_bits)}
    if "hf" in config.export.formats:
        hf_state = quant.quantize_params(state, rules) if rules else state
        save_pretrained(nnx.merge(graphdef, hf_state), os.path.join(out, "hf"), tokenizer=tokenizer)
    if "int" in config.export.formats:
        if rules is None:
            summary["int_bytes"] = None  # nothing to quantize: the HF export is the artifact
        else:
            exported = int_weights.export_quantized(state, rules)
            int_weights.save_quantized(exported, os.path.join(out, "int", "model.safetensors"))
            summary["int_bytes"] = int(int_weights.exported_nbytes(exported))
    if jax.process_index() == 0:
        io_utils.atomic_write_json(os.path.join(out, "summary.json"), summary)
    return summary
