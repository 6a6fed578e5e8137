"""Distillation train-step speed: kd_flax vs an equivalent transformers PyTorch step, same CPU.

Student T5-small shape (d 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128), teacher T5-base
shape (d 768, 12+12 layers, 12 heads, d_ff 3072), random weights, batch 16 × 32 source / 32
target tokens, float32. One step = teacher forward (no grad) + student forward +
(CE + T²·KL(teacher ‖ student)) + backward + global-norm clipping + AdamW. Also the kd_flax
step with W8A8 fake quantization (weights by `quant.rules_for(student, {"weight_bits": 8})`, activations 8-bit
dynamic per tensor at every Dense input) and its overhead over the float step. And the on-policy
(GKD) step (`on_policy.lmbda = 1`: the student samples `tgt_len` tokens per source with its
current params, the teacher scores them teacher-forced, generalized JSD, backward, AdamW)
against the off-policy step, with the part of it spent sampling (the sampler jitted alone).

    python benchmarks/train_speed.py                 # full size (a few minutes on 2 cores)
    python benchmarks/train_speed.py --small         # a quick smoke run
Tokens/s counts source + target tokens of the batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def shapes(small: bool):
    if small:
        s = dict(vocab_size=1024, d_model=128, d_kv=32, d_ff=256, encoder_layers=2, decoder_layers=2, num_heads=4)
        t = dict(vocab_size=1024, d_model=192, d_kv=32, d_ff=384, encoder_layers=3, decoder_layers=3, num_heads=6)
    else:
        s = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, encoder_layers=6, decoder_layers=6, num_heads=8)
        t = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, encoder_layers=12, decoder_layers=12,
                 num_heads=12)
    return s, t


def make_batch(args, vocab, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    b, s, t = args.batch, args.src_len, args.tgt_len
    labels = rng.integers(2, vocab, (b, t)).astype(np.int32)
    return {
        "input_ids": rng.integers(2, vocab, (b, s)).astype(np.int32),
        "attention_mask": np.ones((b, s), np.int32),
        "labels": labels,
        "decoder_input_ids": np.concatenate([np.zeros((b, 1), np.int32), labels[:, :-1]], 1),
        "decoder_attention_mask": np.ones((b, t), np.int32),
    }


def time_steps(fn, warmup: int, steps: int) -> tuple[float, float]:
    """(first call seconds incl. compilation, median seconds of the timed calls)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def step_config(loss: dict):
    """The benchmarks' train block: AdamW, constant LR, clipping, the given `loss` block."""
    import ml_collections
    return ml_collections.ConfigDict({
        "steps": 1000, "grad_accum": 1,
        "optimizer": {"name": "adamw", "learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant",
                      "weight_decay": 0.01, "grad_clip_norm": 1.0, "b1": 0.9, "b2": 0.999},
        "loss": loss,
    })


def time_train_step(args, step, student, cfg, batch, tp):
    """(first s, median s, last metrics, the compiled step) of `step` from `student`'s params."""
    import jax
    from flax import nnx

    from kd_flax import train
    state = [train.init_train_state(nnx.state(student, nnx.Param), cfg)]
    dev_batch = {k: jax.numpy.asarray(v) for k, v in batch.items()}

    def one():
        state[0], m = step(state[0], dev_batch, tp)
        jax.block_until_ready(m)
        return m

    first, med = time_steps(one, args.warmup, args.steps)
    return first, med, one(), step._jitted.lower(state[0], dev_batch, tp).compile()


def bench_kd_flax(args, s_kw, t_kw, batch, *, w8a8: bool, on_policy: bool = False):
    from flax import nnx

    from kd_flax import models, quant, train

    teacher = models.create_model(models.T5Config(**t_kw, dropout_rate=0.0), nnx.Rngs(0))
    s_cfg = models.T5Config(**s_kw, dropout_rate=0.0, act_quant_bits=8 if w8a8 else None)
    student = models.create_model(s_cfg, nnx.Rngs(1))
    cfg = step_config({"ce_weight": 1.0, "kd_weight": 1.0, "kd_type": "kl", "temperature": args.temperature})
    if on_policy:  # every step on-policy, samples as long as the off-policy targets
        cfg.on_policy = {"lmbda": 1.0, "beta": 0.5, "max_new_tokens": args.tgt_len}
    rules = quant.rules_for(student, {"weight_bits": 8 if w8a8 else 0})
    step = train.make_train_step(student, cfg, teacher=teacher, quant_rules=rules)
    tp = nnx.state(teacher, nnx.Param)
    sample_s = time_sampling(args, student, batch) if on_policy else None
    first, med, m, compiled = time_train_step(args, step, student, cfg, batch, tp)
    loss = float(m["loss"][0])
    # the step's work as XLA counts it, for the floor printed at the end
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get("flops", 0.0)
    return first, med, loss, flops, sample_s


def time_sampling(args, student, batch) -> float:
    """Median seconds of the on-policy sampler alone (jitted as in the step, params constant)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from kd_flax import on_policy
    spec = on_policy.OnPolicySpec(lmbda=1.0, max_new_tokens=args.tgt_len)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)

    @jax.jit
    def sample(p, ids, mask, key):
        return on_policy.sample_targets(nnx.merge(graphdef, p, rest), ids, mask, key, spec)

    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    key = jax.random.key(0)
    return time_steps(lambda: jax.block_until_ready(sample(params, ids, mask, key)), args.warmup, args.steps)[1]


def matmul_gflops(m=512, k=512, n=32128, repeats=10) -> float:
    """This CPU's fp32 matmul rate through XLA: the best of `repeats` [m,k] x [k,n] dots."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    a = jnp.asarray(np.random.default_rng(0).random((m, k), np.float32))
    b = jnp.asarray(np.random.default_rng(1).random((k, n), np.float32))
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best / 1e9


def bench_torch(args, s_kw, t_kw, batch):
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    def hf_cfg(kw):
        return transformers.T5Config(vocab_size=kw["vocab_size"], d_model=kw["d_model"], d_kv=kw["d_kv"],
                                     d_ff=kw["d_ff"], num_layers=kw["encoder_layers"],
                                     num_decoder_layers=kw["decoder_layers"], num_heads=kw["num_heads"],
                                     dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)

    teacher = transformers.T5ForConditionalGeneration(hf_cfg(t_kw)).eval()
    student = transformers.T5ForConditionalGeneration(hf_cfg(s_kw)).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=0.01)
    tb = {k: torch.from_numpy(v).long() for k, v in batch.items()}
    T = args.temperature

    def one():
        with torch.no_grad():
            t_logits = teacher(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                               decoder_input_ids=tb["decoder_input_ids"]).logits
        s_logits = student(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                           decoder_input_ids=tb["decoder_input_ids"]).logits
        v = s_logits.shape[-1]
        n = tb["decoder_attention_mask"].sum()
        ce = F.cross_entropy(s_logits.reshape(-1, v), tb["labels"].reshape(-1), reduction="sum") / n
        kl = F.kl_div(F.log_softmax(s_logits / T, -1).reshape(-1, v), F.log_softmax(t_logits / T, -1).reshape(-1, v),
                      log_target=True, reduction="sum") * T * T / n
        loss = ce + kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        return loss.item()

    first, med = time_steps(one, args.warmup, args.steps)
    return first, med, one()


def step_args(doc: str) -> argparse.ArgumentParser:
    """The arguments every train-step benchmark takes: shapes, batch, timed and untimed steps."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes for a smoke run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--src_len", type=int, default=32)
    p.add_argument("--tgt_len", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    return p


def main():
    p = step_args(__doc__)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--skip", default="", help="comma list of: torch, float, w8a8, on_policy")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    s_kw, t_kw = shapes(args.small)
    batch = make_batch(args, s_kw["vocab_size"])
    tokens = args.batch * (args.src_len + args.tgt_len)
    rows = {}
    if "torch" not in skip:
        rows["transformers (PyTorch)"] = bench_torch(args, s_kw, t_kw, batch)
    if "float" not in skip:
        rows["kd_flax float32"] = bench_kd_flax(args, s_kw, t_kw, batch, w8a8=False)
    if "w8a8" not in skip:
        rows["kd_flax W8A8 fake-quant"] = bench_kd_flax(args, s_kw, t_kw, batch, w8a8=True)
    if "on_policy" not in skip:
        rows["kd_flax on-policy (GKD)"] = bench_kd_flax(args, s_kw, t_kw, batch, w8a8=False, on_policy=True)
    import jax
    import torch
    print(f"\nstudent {s_kw}\nteacher {t_kw}\nbatch {args.batch} x {args.src_len}/{args.tgt_len} tokens, "
          f"float32, jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
          f"({args.threads} threads), median of {args.steps} steps after {args.warmup} warmup\n")
    print("| step | first call s | s/step | tokens/s | loss |")
    print("| --- | --- | --- | --- | --- |")
    for name, (first, med, loss, *_) in rows.items():
        print(f"| {name} | {first:.1f} | {med:.3f} | {tokens / med:.0f} | {loss:.3f} |")
    if "transformers (PyTorch)" in rows and "kd_flax float32" in rows:
        r = rows["transformers (PyTorch)"][1] / rows["kd_flax float32"][1]
        print(f"\nkd_flax / PyTorch tokens/s: {r:.2f}x (target >= 1.5x)")
        if rows["kd_flax float32"][3]:
            gflop, need = rows["kd_flax float32"][3] / 1e9, rows["transformers (PyTorch)"][1] / 1.5
            print(f"kd_flax step: {gflop:.0f} GFLOP (XLA cost analysis) -> {gflop / rows['kd_flax float32'][1]:.0f} "
                  f"GFLOP/s achieved; 1.5x PyTorch needs {need:.2f} s/step = {gflop / need:.0f} GFLOP/s; "
                  f"XLA fp32 matmul alone on this CPU: {matmul_gflops():.0f} GFLOP/s")
    if "kd_flax float32" in rows and "kd_flax W8A8 fake-quant" in rows:
        o = rows["kd_flax W8A8 fake-quant"][1] / rows["kd_flax float32"][1] - 1
        print(f"W8A8 fake-quant overhead: {100 * o:+.1f}% (target <= 10%)")
    if "kd_flax float32" in rows and "kd_flax on-policy (GKD)" in rows:
        on, off = rows["kd_flax on-policy (GKD)"][1], rows["kd_flax float32"][1]
        samp = rows["kd_flax on-policy (GKD)"][4]
        print(f"on-policy step / off-policy step: {on / off:.2f}x ({on:.3f} vs {off:.3f} s); sampling "
              f"{args.tgt_len} tokens alone: {samp:.3f} s = {100 * samp / on:.0f}% of the on-policy step")


if __name__ == "__main__":
    main()
