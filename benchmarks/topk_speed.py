"""Top-k KD train step: online teacher vs the generate job's cached top-k (issue 14), same CPU.

Student T5-small shape (d 512, 6+6 layers), teacher T5-base shape (d 768, 12+12 layers),
random weights, batch 16 × 32 source / 32 target tokens, float32, loss CE + top-k KD
(`loss.kd_type="topk"`, K=8 by default). Online: the step runs the teacher forward and takes
its top-k; cached: the batch carries `teacher_topk_logprobs` / `teacher_topk_ids` (float16 on
disk, float32 / int32 in the batch, as `kd_flax.data.batches` builds them) and the teacher is
never built. Each variant runs in its own process, so the peak RSS (`ru_maxrss`) is that
variant's alone: the online one holds the teacher's weights, the cached one does not. Also
XLA's compiled peak of the step (arguments + outputs + temp - aliased).

    python benchmarks/topk_speed.py            # full size (about 3 minutes on 2 cores)
    python benchmarks/topk_speed.py --small    # a quick smoke run

Prints each round's two rows and the median of the rounds' speed-ups (`--rounds`, default 3).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_speed import make_batch, shapes, step_args, step_config, time_train_step  # noqa: E402

MiB = 2 ** 20


def cached_topk(batch, vocab: int, k: int, seed=1):
    """Random sorted top-k log-probs with distinct ids, rounded through float16 as stored."""
    import numpy as np
    rng = np.random.default_rng(seed)
    b, t = batch["labels"].shape
    lp = np.sort(np.log(rng.dirichlet(np.ones(k) * 0.3, size=(b, t)) * 0.9 + 1e-6), -1)[..., ::-1]
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(b * t)]).reshape(b, t, k)
    return {"teacher_topk_logprobs": lp.astype(np.float16).astype(np.float32),
            "teacher_topk_ids": ids.astype(np.int32)}


def run_variant(args, variant: str) -> dict:
    from flax import nnx

    from kd_flax import models, train

    s_kw, t_kw = shapes(args.small)
    batch = make_batch(args, s_kw["vocab_size"])
    student = models.create_model(models.T5Config(**s_kw, dropout_rate=0.0), nnx.Rngs(1))
    cfg = step_config({"ce_weight": 1.0, "kd_weight": 1.0, "kd_type": "topk", "topk": args.k,
                       "temperature": args.temperature, "teacher": variant})
    if variant == "online":
        teacher = models.create_model(models.T5Config(**t_kw, dropout_rate=0.0), nnx.Rngs(0))
        tp = nnx.state(teacher, nnx.Param)
    else:
        teacher, tp = None, None
        batch.update(cached_topk(batch, s_kw["vocab_size"], args.k))
    step = train.make_train_step(student, cfg, teacher=teacher)
    first, med, m, compiled = time_train_step(args, step, student, cfg, batch, tp)
    mem = compiled.memory_analysis()
    xla_peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes)
    return {"first_s": first, "step_s": med, "loss": float(m["loss"][0]), "xla_peak": xla_peak,
            "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main():
    p = step_args(__doc__)
    p.add_argument("--k", type=int, default=8, help="top-k size (loss.topk / generate.store_topk)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3, help="online/cached pairs, run alternately")
    p.add_argument("--variant", choices=("online", "cached"), help=argparse.SUPPRESS)  # the child process
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args, args.variant)))
        return
    s_kw, t_kw = shapes(args.small)
    print(f"student d={s_kw['d_model']} {s_kw['encoder_layers']}+{s_kw['decoder_layers']}, teacher "
          f"d={t_kw['d_model']} {t_kw['encoder_layers']}+{t_kw['decoder_layers']}, vocab {s_kw['vocab_size']}, "
          f"batch {args.batch} x {args.src_len}/{args.tgt_len}, K={args.k}, fp32 CPU")
    print(f"{'round':<6}{'variant':<8}{'step s':>9}{'first s':>9}{'XLA peak MiB':>14}{'RSS peak MiB':>14}  loss")
    speedups, rows = [], {}
    # Rounds alternate the two variants, so that a slow spell of a shared machine lands on both
    # rather than on one; the median round's ratio is the figure.
    for r in range(args.rounds):
        for variant in ("online", "cached"):
            child = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--variant", variant]
            out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
            rows[variant] = row = json.loads(out.strip().splitlines()[-1])
            print(f"{r + 1:<6}{variant:<8}{row['step_s']:>9.3f}{row['first_s']:>9.2f}{row['xla_peak'] / MiB:>14.1f}"
                  f"{row['rss_peak'] / MiB:>14.1f}  {row['loss']:.4f}", flush=True)
        speedups.append(rows["online"]["step_s"] / rows["cached"]["step_s"])
    on, ca = rows["online"], rows["cached"]
    print(f"cached / online: XLA peak {ca['xla_peak'] / on['xla_peak']:.3f}, RSS peak "
          f"{ca['rss_peak'] / on['rss_peak']:.3f}; step speed-up per round "
          f"{', '.join(f'{x:.2f}x' for x in speedups)}, median {statistics.median(speedups):.2f}x")


if __name__ == "__main__":
    main()
