"""Marian/OPUS-MT teacher, SeqInter (n-best, keep the candidate closest to the reference by chrF),
then an 8-bit fake-quant fine-tuning stage for the student (the Bergamot recipe).

Full run (e.g. Helsinki-NLP/opus-mt-en-ro saved as a local HF dir):
    python -m kd_flax.main pipeline --config configs/marian_enro.py:teacher=DIR,data=SPEC --workdir runs/enro
CPU smoke test:
    python -m kd_flax.main pipeline --config configs/marian_enro.py:tiny --workdir runs/enro_tiny
Variants: `float` (SeqInter student) and `int8` (then fine-tuned under W8A8 fake quantization).
"""

from kd_flax import config_base


def get_config(arg=None):
    args = config_base.parse_arg(arg, ("tiny", "mesh", "data", "teacher"), recipe="configs/marian_enro.py")
    tiny = "tiny" in args
    c = config_base.base_config()
    c.name = "marian_enro" + ("_tiny" if tiny else "")
    c.mesh = config_base.mesh_config(args.get("mesh", "cpu" if tiny else "gpu_1"))
    c.data.src_lang, c.data.tgt_lang = "en", "ro"
    if tiny:
        config_base.make_tiny(c, train=600, teacher_model=dict(
            model_type="marian", d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64))
        c.student.model = dict(model_type="marian", d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=0)
        c.generate.max_new_tokens = 16  # 4-best beam search for SeqInter: keep it short
        steps, q_steps = 20, 10
    else:
        c.data.train = args.get("data", "hf:wmt16:ro-en@train")
        c.data.dev, c.data.test = "hf:wmt16:ro-en@validation", ["hf:wmt16:ro-en@test"]
        c.teacher.path = args.get("teacher", "")
        # Bergamot-style "tiny" student: 6 encoder / 2 decoder layers, d 256.
        c.student.model = dict(model_type="marian", d_model=256, encoder_layers=6, decoder_layers=2,
                               encoder_attention_heads=8, decoder_attention_heads=8,
                               encoder_ffn_dim=1536, decoder_ffn_dim=1536, vocab_size=0)
        c.distill.batch_size = 256
        c.generate.batch_size, c.generate.max_new_tokens = 128, 256
        c.evaluate.num_beams = 4
        steps, q_steps = 200000, 20000
    c.student.init = "scratch"
    c.generate.num_beams = 4
    c.generate.num_return_sequences = 4
    c.generate.select = "chrf"       # SeqInter: the n-best candidate closest to the reference
    c.generate.write_nbest = True
    c.generate.filters.min_ref_chrf = 10.0 if not tiny else 0.0
    c.distill.steps = steps
    c.distill.stages = [{"targets": "pseudo", "steps": steps}]
    c.variants = {
        "float": {},
        # Bergamot's 8-bit fine-tuning stage, here as fake-quant W8A8 after the float stage.
        "int8": {"student": {"quant": {"weight_bits": 8, "act_bits": 8}},
                 "distill": {"stages": [{"targets": "pseudo", "steps": steps, "quant": False},
                                        {"targets": "pseudo", "steps": q_steps}]}},
    }
    return c
