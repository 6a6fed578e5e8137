"""Where a Multi30k training step's time goes, on this CPU: configs/multi30k_enfr.py's teacher
and student, real bucket shapes, float32 vs bfloat16, dropout on vs off, and the step split
into forward, forward + backward, and the whole step (clipping + optimizer update).

    python benchmarks/multi30k_step.py                  # the cpu size's models
    python benchmarks/multi30k_step.py --model student --batch 64

Prints one line per setting: median ms per step, source + target tokens/s, and the share of
the step each part takes. Random token ids (the shapes, not the values, set the cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe_model(which: str, vocab: int, dtype: str, dropout: bool):
    import importlib.util
    from flax import nnx
    from kd_flax import models
    spec = importlib.util.spec_from_file_location("m30k", os.path.join(ROOT, "configs", "multi30k_enfr.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("cpu,data=" + ROOT)  # any dir: only the model shapes are read
    d = dict(c[which].model.to_dict(), vocab_size=vocab)
    rate = d.get("dropout_rate", 0.0) if dropout else 0.0
    d["dropout_rate"] = rate

    class Tok:  # config_from_dict reads the special ids from a tokenizer
        pad_token_id, eos_token_id, unk_token_id = 0, 1, 2

        def __len__(self):
            return vocab
    cfg = models.config_from_dict(d, Tok(), dtype=dtype)
    return models.create_model(cfg, nnx.Rngs(0)), rate


def batch(b: int, s: int, t: int, vocab: int):
    import numpy as np
    rng = np.random.default_rng(0)
    labels = rng.integers(3, vocab, (b, t)).astype(np.int32)
    return {"input_ids": rng.integers(3, vocab, (b, s)).astype(np.int32), "attention_mask": np.ones((b, s), np.int32),
            "labels": labels, "decoder_input_ids": np.concatenate([np.zeros((b, 1), np.int32), labels[:, :-1]], 1),
            "decoder_attention_mask": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32)}


def median_s(fn, steps: int) -> float:
    fn()  # compile
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("teacher", "student"), default="teacher")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--shapes", default="16x16,24x24,32x32", help="source x target lengths")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()

    import jax
    import ml_collections
    from flax import nnx
    from kd_flax import objectives, train
    cfg = ml_collections.ConfigDict({
        "steps": 1000, "grad_accum": 1,
        "optimizer": {"name": "adamw", "learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant",
                      "weight_decay": 0.01, "grad_clip_norm": 1.0, "b1": 0.9, "b2": 0.98},
        "loss": {"ce_weight": 1.0, "label_smoothing": 0.1}})
    spec = objectives.LossSpec.from_config(cfg.loss)
    print(f"{args.model} of configs/multi30k_enfr.py (cpu), batch {args.batch}, vocab {args.vocab}, "
          f"{jax.device_count()} device(s)")
    for shape in args.shapes.split(","):
        s_len, t_len = (int(x) for x in shape.split("x"))
        b = {k: jax.numpy.asarray(v) for k, v in batch(args.batch, s_len, t_len, args.vocab).items()}
        n_tok = args.batch * (s_len + t_len)
        for dtype in ("float32", "bfloat16"):
            for dropout in (True, False):
                model, rate = recipe_model(args.model, args.vocab, dtype, dropout)
                if dropout and rate == 0.0:
                    continue  # the recipe's model has none: the next line covers it
                graphdef, params, rest = nnx.split(model, nnx.Param, ...)
                key = jax.random.key(0) if rate else None

                def loss(p, key=key):
                    m = nnx.merge(graphdef, p, rest)
                    terms = objectives.loss_terms(m, b, None, spec=spec, dropout_rng=key)
                    return objectives.combine(terms, spec)

                fwd = jax.jit(loss)
                grad = jax.jit(jax.grad(loss))
                step = train.make_train_step(model, cfg)
                state = [train.init_train_state(params, cfg)]

                def full():
                    state[0], m = step(state[0], b, None)
                    jax.block_until_ready(m)
                t_f = median_s(lambda: jax.block_until_ready(fwd(params)), args.steps)
                t_g = median_s(lambda: jax.block_until_ready(grad(params)), args.steps)
                t_s = median_s(full, args.steps)
                print(f"  {s_len:>2}x{t_len:<2} {dtype:8s} dropout {rate:.1f}: step {t_s * 1e3:6.0f} ms, "
                      f"{n_tok / t_s:6.0f} tokens/s | forward {100 * t_f / t_s:3.0f}%, backward "
                      f"{100 * (t_g - t_f) / t_s:3.0f}%, clip + optimizer + rest {100 * (t_s - t_g) / t_s:3.0f}%",
                      flush=True)


if __name__ == "__main__":
    main()
