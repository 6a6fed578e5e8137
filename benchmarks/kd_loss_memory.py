"""Peak memory and time of fused_kd_kl vs kd_kl on materialised logits.

Both sides compute value_and_grad w.r.t. the student hidden states and unembedding of
the summed word-level KD loss; the unfused side builds ``h @ W`` for both models and
calls ``kd_kl``. Memory comes from XLA's compiled memory analysis (no execution
needed): ``temp`` is the scratch space, ``peak`` = argument + output + temp - alias
(on CPU, XLA's own ``peak_memory_in_bytes`` counts only arguments + outputs, so it is not used).
Time is the median of ``--repeats`` runs after one warm-up run, as wall-clock seconds and
as process CPU seconds (all threads); on a shared machine the CPU time is the steadier
figure, since other processes stretch the wall time but not the work done.

    python benchmarks/kd_loss_memory.py                      # V=32128, 8192 tokens, d=512
    python benchmarks/kd_loss_memory.py --tokens 1024 --vocab 4096 --chunk 256,512
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from kd_flax import fused_kd, losses

MiB = 2**20


def _inputs(tokens: int, vocab: int, d: int, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 4)
    hs = jax.random.normal(k[0], (tokens, d), jnp.float32)
    ws = jax.random.normal(k[1], (d, vocab), jnp.float32) * d**-0.5
    ht = jax.random.normal(k[2], (tokens, d), jnp.float32)
    wt = jax.random.normal(k[3], (d, vocab), jnp.float32) * d**-0.5
    return hs, ws, ht, wt


def unfused_loss(hs, ws, ht, wt, temperature):
    return losses.kd_kl(hs @ ws, ht @ wt, temperature=temperature)[0]


def fused_loss(hs, ws, ht, wt, temperature, chunk_size):
    return fused_kd.fused_kd_kl(hs, ws, ht, wt, temperature=temperature, chunk_size=chunk_size)[0]


def measure(loss_fn, args, repeats: int):
    """(memory in bytes, median wall s, median process CPU s, value) of jit(value_and_grad)."""
    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
    compiled = fn.lower(*args).compile()
    stats = compiled.memory_analysis()
    mem = {
        "temp": stats.temp_size_in_bytes,
        "peak": stats.argument_size_in_bytes + stats.output_size_in_bytes
        + stats.temp_size_in_bytes - stats.alias_size_in_bytes,
    }
    jax.block_until_ready(compiled(*args))  # warm-up
    wall, cpu = [], []
    value = None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        value, _ = jax.block_until_ready(compiled(*args))
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return mem, statistics.median(wall), statistics.median(cpu), float(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="number of tokens (batch x length)")
    parser.add_argument("--vocab", type=int, default=32128, help="vocabulary size V")
    parser.add_argument("--d", type=int, default=512, help="hidden size of both models")
    parser.add_argument("--chunk", default="1024", help="comma-separated chunk sizes to try")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median) after a warm-up")
    parser.add_argument("--skip-unfused", action="store_true", help="only measure the fused loss")
    args = parser.parse_args(argv)
    chunks = [int(c) for c in args.chunk.split(",") if c.strip()]

    inputs = _inputs(args.tokens, args.vocab, args.d)
    print(
        f"backend={jax.default_backend()} devices={jax.device_count()} tokens={args.tokens} "
        f"V={args.vocab} d={args.d} float32 T={args.temperature}  "
        f"(one [tokens, V] float32 logits matrix = {args.tokens * args.vocab * 4 / MiB:.0f} MiB)"
    )
    print(f"{'variant':<18}{'temp MiB':>10}{'peak MiB':>10}{'wall s':>9}{'cpu s':>9}"
          f"{'peak ratio':>12}{'wall ratio':>12}{'cpu ratio':>11}  loss")
    rows = []
    if not args.skip_unfused:
        rows.append(("kd_kl (unfused)", lambda *a: unfused_loss(*a, args.temperature)))
    for chunk in chunks:
        rows.append((f"fused chunk={chunk}", lambda *a, c=chunk: fused_loss(*a, args.temperature, c)))
    base = None
    for name, fn in rows:
        mem, wall, cpu, val = measure(fn, inputs, args.repeats)
        base = base or (None if args.skip_unfused else (mem["peak"], wall, cpu))
        ratios = (mem["peak"] / base[0], wall / base[1], cpu / base[2]) if base else (float("nan"),) * 3
        print(f"{name:<18}{mem['temp'] / MiB:>10.1f}{mem['peak'] / MiB:>10.1f}{wall:>9.3f}{cpu:>9.3f}"
              f"{ratios[0]:>12.3f}{ratios[1]:>12.3f}{ratios[2]:>11.3f}  {val:.6g}")
    if not args.skip_unfused:
        print("targets: peak ratio <= 0.125, time ratio <= 1.3")


if __name__ == "__main__":
    main()
