"""The CPU demo: a synthetic multi-modal translation task, end to end in minutes on 2 cores.

    python -m kd_flax.main pipeline --config configs/demo_cpu.py --workdir runs/demo

The task (`kd_flax.synthetic`) has three valid translations per source; the gold data mixes
them at random, the teacher's pseudo-labels commit to one — the setting where SeqKD is
known to help (Zhou et al., 2020). A T5 teacher is trained from scratch, writes greedy
pseudo-labels for every training source, and six students are trained: on gold, on
SeqKD, SeqKD → gold, SeqKD → on-policy (the last third of the steps on the student's own
samples, scored by the teacher), and SeqKD under W8A8 and W4A8 fake quantization
(exported to integers). `report.md` and `report.png` compare them.

Argument `tiny`: a smaller, faster version (what the tests run). Argument `ct2` (needs
`pip install -e '.[deploy]'`): the W8A8 student is also converted to CTranslate2 int8 and
scored by CTranslate2, beside a `seqkd_ct2int8` student trained under CTranslate2's own int8
scheme (`student.quant.scheme=ctranslate2_int8`) — how much BLEU each loses in conversion.
Argument `topk`: the teacher job also stores its top-8 log-probs per pseudo-label token, and
two students train SeqKD + top-8 word-level KD, one with the teacher online, one from the cache.
"""

from kd_flax import config_base


def get_config(arg=None):
    args = config_base.parse_arg(arg, ("tiny", "mesh", "ct2", "topk"), recipe="configs/demo_cpu.py")
    tiny = "tiny" in args
    c = config_base.base_config()
    c.name = "demo_cpu" + ("_tiny" if tiny else "")
    c.mesh = config_base.mesh_config(args.get("mesh", "cpu"))
    n_train = 2000 if tiny else 20000
    c.data.train = f"synthetic:train:{n_train}"
    c.data.dev = "synthetic:dev:100" if tiny else "synthetic:dev:300"
    c.data.test = [f"synthetic:test{k}:{60 if tiny else 300}" for k in range(5)]
    c.data.src_lang, c.data.tgt_lang = "src", "tgt"
    # BPE learns every pseudo-word as one token: sentences are 3-8 words + EOS ≤ 9 tokens,
    # one bucket of 12, so each model compiles once.
    c.data.max_source_length = 12
    c.data.max_target_length = 12
    c.data.bucket_boundaries = (12,)

    c.teacher.init = "scratch"
    c.teacher.tokenizer_vocab_size = 1000
    c.teacher.tokenizer_kind = "bpe"
    c.teacher.model = dict(model_type="t5", d_model=32 if tiny else 64, d_ff=64 if tiny else 256,
                           num_layers=2, num_decoder_layers=2,
                           num_heads=4, d_kv=8 if tiny else 16, feed_forward_proj="relu",
                           tie_word_embeddings=True, vocab_size=0,  # 0 = the tokenizer's size
                           dropout_rate=0.0)  # 20k synthetic pairs, no overfitting to guard against
    c.finetune.steps = 60 if tiny else 2000
    c.finetune.batch_size = 32 if tiny else 64
    c.finetune.optimizer.learning_rate = 3e-3
    c.finetune.optimizer.warmup_steps = 10 if tiny else 100
    c.finetune.eval_every = 0
    c.finetune.checkpoint_every = 30 if tiny else 500
    c.finetune.keep_best_by = "loss"

    c.generate.max_new_tokens = 12
    c.generate.batch_size = 128 if tiny else 256
    c.generate.shard_size = 500 if tiny else 5000

    c.student.init = "scratch"
    c.student.model = dict(model_type="t5", d_model=16 if tiny else 32, d_ff=32 if tiny else 128,
                           num_layers=1, num_decoder_layers=1,
                           num_heads=2, d_kv=8 if tiny else 16,
                           feed_forward_proj="relu", tie_word_embeddings=True, vocab_size=0, dropout_rate=0.0)
    steps = 40 if tiny else 1500
    c.distill.steps = steps
    c.distill.batch_size = 32 if tiny else 64
    c.distill.optimizer.learning_rate = 3e-3
    c.distill.optimizer.warmup_steps = 10 if tiny else 100
    c.distill.eval_every = 0
    c.distill.checkpoint_every = 20 if tiny else 400
    c.distill.keep_best_by = "loss"
    c.distill.stages = [{"targets": "pseudo", "steps": steps}]

    c.evaluate.splits = ["test0", "test1", "test2", "test3", "test4"]
    c.evaluate.num_beams = 1
    c.evaluate.max_new_tokens = 12
    c.evaluate.batch_size = 64 if tiny else 300

    gold_steps = max(steps // 3, 1)
    c.variants = {
        "gold": {"distill": {"stages": [{"targets": "gold", "steps": steps}]}},
        "seqkd": {},
        "seqkd_then_gold": {"distill": {"stages": [{"targets": "pseudo", "steps": steps},
                                               {"targets": "gold", "steps": gold_steps}]}},
        "seqkd_w8a8": {"student": {"quant": {"weight_bits": 8, "act_bits": 8}}},
        "seqkd_w4a8": {"student": {"quant": {"weight_bits": 4, "act_bits": 8}}},
        # SeqKD, then on-policy (generalized KD, beta 0.5) for the last third: the same total steps.
        "seqkd_onpolicy": {"distill": {"stages": [{"targets": "pseudo", "steps": steps - steps // 3},
                                                  {"targets": "student", "steps": steps // 3}]}},
    }
    if "ct2" in args:
        c.variants["seqkd_w8a8"]["export"] = {"ctranslate2": "int8"}
        c.variants["seqkd_ct2int8"] = {"student": {"quant": {"weight_bits": 8, "act_bits": 8,
                                                             "scheme": "ctranslate2_int8"}},
                                       "export": {"ctranslate2": "int8"}}
    if "topk" in args:  # word-level top-k KD on the pseudo-labels: online teacher vs its stored top-8
        c.generate.store_topk = 8
        topk = {"ce_weight": 1.0, "kd_weight": 1.0, "kd_type": "topk", "topk": 8}
        c.variants["seqkd_topk_online"] = {"distill": {"loss": dict(topk, teacher="online")}}
        c.variants["seqkd_topk_cached"] = {"distill": {"loss": dict(topk, teacher="cached")}}
    return c
