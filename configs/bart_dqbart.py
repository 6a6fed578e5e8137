"""DQ-BART: layer-copy student (12→3, and 6→1) + word-level KD + hidden/attention MSE, W8A8 and W2A8.

Full run (BART-large teacher fine-tuned on the task, as an HF dir):
    python -m kd_flax.main pipeline --config configs/bart_dqbart.py:teacher=DIR,data=SPEC,mesh=gpu_8 --workdir runs/dqbart
CPU smoke test:
    python -m kd_flax.main pipeline --config configs/bart_dqbart.py:tiny --workdir runs/dqbart_tiny

The student copies teacher layers [0, 6, 11] (encoder and decoder, 12→3) — DistilBART's map —
and is trained on the gold targets with  CE + KL·T² (word-level KD, online teacher) + hidden-state
MSE + attention MSE (through the layer map), under distillation-aware fake quantization: weights
re-quantized from the full-precision copy every step (DQ-BART), activations 8-bit.
Variants: `w8a8_12to3`, `w2a8_12to3` (ternary weights), `w8a8_6to1`.
"""

from kd_flax import config_base


def get_config(arg=None):
    args = config_base.parse_arg(arg, ("tiny", "mesh", "data", "teacher"), recipe="configs/bart_dqbart.py")
    tiny = "tiny" in args
    c = config_base.base_config()
    c.name = "bart_dqbart" + ("_tiny" if tiny else "")
    c.mesh = config_base.mesh_config(args.get("mesh", "cpu" if tiny else "gpu_8"))
    if tiny:
        c.data.src_lang, c.data.tgt_lang = "src", "tgt"
        # A 4-layer stand-in for BART-large's 12 (copied 4→2 with map [0, 3]).
        config_base.make_tiny(c, teacher_model=dict(
            model_type="bart", d_model=32, encoder_layers=4, decoder_layers=4, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64))
        enc, dec, big_map, small = 2, 2, [0, 3], {"enc": 1, "dec": 1, "map": [0]}
        steps = 20
    else:
        c.data.train = args.get("data", "hf:xsum@train")
        c.data.dev, c.data.test = "hf:xsum@validation", ["hf:xsum@test"]
        c.data.max_source_length, c.data.max_target_length = 512, 64
        c.data.bucket_boundaries = (128, 256, 512)
        c.teacher.path = args.get("teacher", "")
        enc, dec, big_map, small = 3, 3, [0, 6, 11], {"enc": 1, "dec": 1, "map": [0]}
        c.distill.batch_size = 64
        c.generate.batch_size, c.generate.max_new_tokens = 64, 64
        c.evaluate.num_beams, c.evaluate.max_new_tokens = 6, 64
        steps = 50000
        c.distill.eval_every, c.distill.checkpoint_every = 2000, 2000
        c.distill.optimizer.learning_rate = 3e-5

    c.student.init = "layer_copy"
    c.student.encoder_layers, c.student.decoder_layers = enc, dec
    c.student.layer_map = {"encoder": big_map, "decoder": big_map}
    c.student.quant = {"weight_bits": 8, "act_bits": 8, "granularity": "channel", "scheme": "default"}
    c.distill.steps = steps
    c.distill.stages = [{"targets": "gold", "steps": steps}]  # DQ-BART trains on the task data
    c.distill.loss.kd_weight = 1.0
    c.distill.loss.kd_type = "kl"
    c.distill.loss.temperature = 1.0
    c.distill.loss.hidden_weight = 1.0
    c.distill.loss.attention_weight = 1.0
    c.variants = {
        "w8a8": {},
        "w2a8": {"student": {"quant": {"weight_bits": 2}}},
        "w8a8_small": {"student": {"encoder_layers": small["enc"], "decoder_layers": small["dec"],
                                   "layer_map": {"encoder": small["map"], "decoder": small["map"]}}},
    }
    return c
