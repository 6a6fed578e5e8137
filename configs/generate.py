"""Pseudo-label generation with a given teacher: the `generate` stage on its own.

    python -m kd_flax.main generate --workdir OUT \
        --config configs/generate.py:teacher=DIR,data=train.{lang}.gz,src=en,tgt=fr,beams=4,n=4

Argument keys (all optional except teacher and data, which may also be given later as
`--config.teacher.path=...` / `--config.data.train=...`):
  teacher   HF checkpoint dir of the teacher (its tokenizer is read from the same dir)
  data      corpus spec (file.tsv, file.jsonl, train.{lang}.gz, a.en+b.fr, hf:NAME@SPLIT)
  src, tgt  language codes ({lang} templates, `translation` records)
  prefix    task prefix, e.g. "translate English to French:" (a space is added after a final ':')
  max_len   max source tokens (and max new tokens)
  beams     beam size; n: n-best size (num_return_sequences)
  select    best | bleu | chrf (SeqInter: keep the candidate closest to the reference)
  sample    1 to sample instead of beam search
  batch, shard   batch size and examples per output shard
  mesh      a mesh preset from kd_flax.config_base.MESH_PRESETS
"""

from kd_flax import config_base

_INT_KEYS = {"max_len": None, "beams": "num_beams", "n": "num_return_sequences",
             "batch": "batch_size", "shard": "shard_size"}
ALLOWED = ("teacher", "data", "src", "tgt", "prefix", "max_len", "beams", "n", "select",
           "sample", "batch", "shard", "mesh", "nbest")


def get_config(arg=None):
    args = config_base.parse_arg(arg)
    unknown = sorted(set(args) - set(ALLOWED))
    if unknown:
        raise ValueError(f"configs/generate.py: unknown argument key(s) {unknown}; "
                         f"allowed: {list(ALLOWED)}")
    c = config_base.base_config()
    c.name = "generate"
    c.mesh = config_base.mesh_config(args.get("mesh", "cpu"))
    c.teacher.init = "pretrained"
    c.teacher.path = args.get("teacher", "")
    c.data.train = args.get("data", "")
    c.data.src_lang = args.get("src", c.data.src_lang)
    c.data.tgt_lang = args.get("tgt", c.data.tgt_lang)
    prefix = args.get("prefix", "")
    # The argument parser strips spaces; T5 prefixes end in ": ", so give the space back.
    c.data.source_prefix = prefix + " " if prefix.endswith(":") else prefix
    for key, target in _INT_KEYS.items():
        if key not in args:
            continue
        try:
            value = int(args[key])
        except ValueError:
            raise ValueError(f"configs/generate.py: {key}={args[key]!r} must be an int") from None
        if value < 1:
            raise ValueError(f"configs/generate.py: {key}={value} must be >= 1")
        if key == "max_len":
            c.data.max_source_length = c.data.max_target_length = value
            c.generate.max_new_tokens = value
        else:
            c.generate[target] = value
    if "beams" in args and "n" not in args:
        c.generate.num_return_sequences = 1
    if "select" in args:
        if args["select"] not in ("best", "bleu", "chrf"):
            raise ValueError(f"configs/generate.py: select={args['select']!r}; allowed: best, bleu, chrf")
        c.generate.select = args["select"]
    if "sample" in args:
        if args["sample"] not in ("", "0", "1", "true", "false"):
            raise ValueError(f"configs/generate.py: sample={args['sample']!r}; allowed: 0, 1")
        c.generate.do_sample = args["sample"] in ("", "1", "true")
    if "nbest" in args:
        c.generate.write_nbest = args["nbest"] in ("", "1", "true")
    return c
