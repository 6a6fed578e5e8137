"""Generation speed: kd_flax vs transformers PyTorch `generate` (and CTranslate2), same CPU.

T5-small shape (d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128, T5 v1.0), random
weights built with transformers, saved as safetensors and loaded (converted) into kd_flax.
Batch 32 x 32 source tokens, exactly 32 new tokens (min_new_tokens = max_new_tokens = 32),
float32, greedy and beam 4. tokens/s = batch * 32 / seconds (the best hypothesis' tokens).
CTranslate2 (float32, same converted checkpoint) runs too when it is installed
(`pip install ctranslate2`); issue 4's beam target is measured against it.

    python benchmarks/generate_speed.py                 # full size (a few minutes on 2 cores)
    python benchmarks/generate_speed.py --small         # quick smoke run
    python benchmarks/generate_speed.py --skip-torch    # kd_flax only
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout


def t5_config(small: bool):
    import transformers as tf

    size = (dict(vocab_size=1024, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4) if small else
            dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8))
    return tf.T5Config(**size, num_decoder_layers=size["num_layers"], feed_forward_proj="relu",
                       dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)


def make_models(small: bool):
    """The benchmark's random T5 (seed 0) as transformers PyTorch model, saved as safetensors,
    and converted into kd_flax: ``(config, hf_model, checkpoint_dir, kd_flax_model)``."""
    import torch
    import transformers as tf

    from kd_flax.models import load_pretrained

    torch.manual_seed(0)
    config = t5_config(small)
    hf_model = tf.T5ForConditionalGeneration(config).eval()
    tmp = tempfile.mkdtemp(prefix="kd_gen_bench_")
    hf_model.save_pretrained(tmp, safe_serialization=True)
    return config, hf_model, tmp, load_pretrained(tmp)


def timed(fn, runs: int) -> tuple[float, float, float]:
    """(first call seconds incl. compilation / warm-up, median wall seconds and median process CPU
    seconds of `runs` further calls). CPU seconds (all threads) help on a shared machine: with
    --threads 2 on an otherwise idle 2-core CPU, wall ~ CPU / 2."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return first, statistics.median(walls), statistics.median(cpus)


def save_id_tokenizer(hf_dir: str, vocab_size: int) -> None:
    """Writes into `hf_dir` a word-level tokenizer whose token i is "t{i}" (0 <pad>, 1 </s>,
    2 <unk>): it maps the random model's ids 1:1, for engines that take tokens (CTranslate2's
    converter wants a tokenizer, its Translator token strings)."""
    import transformers as tf
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                               unk_token="<unk>").save_pretrained(hf_dir)


def bench_ctranslate2(hf_dir: str, config, ids, args) -> dict:
    """CTranslate2 float32 on the same checkpoint: {beams: (median wall s, median CPU s)}.

    Converted by `kd_flax.export.to_ctranslate2` after `save_id_tokenizer`; the source rows
    are passed as token strings with the EOS that T5 inputs end with.
    """
    import ctranslate2

    from kd_flax import export

    save_id_tokenizer(hf_dir, config.vocab_size)
    out_dir = export.to_ctranslate2(hf_dir, os.path.join(hf_dir, "ct2"), "float32")
    translator = ctranslate2.Translator(out_dir, device="cpu", compute_type="float32",
                                        intra_threads=args.threads, inter_threads=1)
    source = [[f"t{i}" for i in row] + ["</s>"] for row in ids.tolist()]
    out = {}
    for beams in args.beams:
        def run_ct2():
            res = translator.translate_batch(source, beam_size=beams, max_batch_size=0,
                                             max_decoding_length=args.new_tokens,
                                             min_decoding_length=args.new_tokens)
            assert min(len(r.hypotheses[0]) for r in res) == args.new_tokens
        _, sec, cpu = timed(run_ct2, args.runs)
        out[beams] = (sec, cpu)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny model (smoke run)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--src-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="timed runs per setting (median reported)")
    p.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-ct2", action="store_true", help="do not run CTranslate2 even when installed")
    args = p.parse_args()

    import jax
    import numpy as np
    import torch
    import transformers as tf

    from kd_flax import decoding

    torch.set_num_threads(args.threads)
    config, hf_model, tmp, model = make_models(args.small)

    rng = np.random.default_rng(0)
    ids = rng.integers(2, config.vocab_size, (args.batch, args.src_len)).astype(np.int32)
    mask = np.ones_like(ids)
    n_tok = args.batch * args.new_tokens
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    print(f"T5 {'small-tiny' if args.small else 'small'}-shaped, batch {args.batch} x {args.src_len} src, "
          f"{args.new_tokens} new tokens, fp32, jax {jax.__version__} ({jax.device_count()} device(s)), "
          f"torch {torch.__version__} threads={args.threads}, transformers {tf.__version__}")

    # The LM head laid out once, outside the timed calls, as a kd_flax Translator keeps it.
    head = jax.block_until_ready(model.unembedding())
    results = {}
    for beams in args.beams:
        def run_kd():
            out = decoding.generate(model, ids, mask, num_beams=beams, early_stopping=True, unembedding=head, **kw)
            jax.block_until_ready(out)
            assert int(np.asarray(out.lengths).min()) == args.new_tokens
        first, sec, cpu = timed(run_kd, args.runs)
        results[("kd_flax", beams)] = (n_tok / sec, n_tok / cpu)
        print(f"  kd_flax       beam {beams}: {n_tok / sec:8.1f} tok/s  ({sec:.2f} s/batch wall, {cpu:.2f} "
              f"CPU-s/batch -> {n_tok / cpu:.1f} tok per CPU-s; first call {first:.1f} s incl. compile)",
              flush=True)

        if not args.skip_torch:
            t_ids, t_mask = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)

            def run_hf():
                with torch.no_grad():
                    extra = dict(early_stopping=True) if beams > 1 else {}
                    out = hf_model.generate(input_ids=t_ids, attention_mask=t_mask, num_beams=beams,
                                            do_sample=False, **extra, **kw)
                assert out.shape[1] == args.new_tokens + 1
            first, sec, cpu = timed(run_hf, max(1, args.runs - 1))
            results[("transformers", beams)] = (n_tok / sec, n_tok / cpu)
            print(f"  transformers  beam {beams}: {n_tok / sec:8.1f} tok/s  ({sec:.2f} s/batch wall, {cpu:.2f} "
                  f"CPU-s/batch -> {n_tok / cpu:.1f} tok per CPU-s)", flush=True)

    if args.skip_ct2:
        pass
    elif importlib.util.find_spec("ctranslate2") is None:
        print("  CTranslate2 not installed (pip install ctranslate2): skipped")
    else:
        for beams, (sec, cpu) in bench_ctranslate2(tmp, config, ids, args).items():
            results[("ctranslate2", beams)] = (n_tok / sec, n_tok / cpu)
            print(f"  CTranslate2   beam {beams}: {n_tok / sec:8.1f} tok/s  ({sec:.2f} s/batch wall, {cpu:.2f} "
                  f"CPU-s/batch -> {n_tok / cpu:.1f} tok per CPU-s; float32, intra_threads={args.threads})",
                  flush=True)

    for peer in ("transformers", "ctranslate2"):
        if any((peer, b) in results for b in args.beams):
            print(f"ratios kd_flax / {peer} (wall tok/s; CPU-time tok/s):")
        for beams in args.beams:
            if (peer, beams) in results:
                (kw_, kc), (pw, pc) = results[("kd_flax", beams)], results[(peer, beams)]
                print(f"  beam {beams}: {kw_ / pw:.2f}x wall, {kc / pc:.2f}x CPU time")
    if not args.small:  # issue 4's targets (full size only)
        if ("kd_flax", 4) in results and ("ctranslate2", 4) in results:
            ratio = results[("kd_flax", 4)][0] / results[("ctranslate2", 4)][0]
            print(f"target beam 4 >= CTranslate2 float32: {ratio:.2f}x -> {'met' if ratio >= 1.0 else 'NOT met'}")
        if ("kd_flax", 1) in results and ("transformers", 1) in results:
            ratio = results[("kd_flax", 1)][0] / results[("transformers", 1)][0]
            print(f"target greedy >= 1.5x transformers: {ratio:.2f}x -> {'met' if ratio >= 1.5 else 'NOT met'}")
    return results


if __name__ == "__main__":
    main()
