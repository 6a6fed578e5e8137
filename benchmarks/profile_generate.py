"""Where `decoding.generate` spends its time: an XLA profile of one call, summed by op kind.

Same model and batch as `generate_speed.py` (T5-small shape, random weights, batch 32 x 32 source
tokens, exactly 32 new tokens, fp32). Prints thread time per op kind ("ynn_fusion" = matmuls run by
YNNPACK, "dot" = XLA's own dots, "custom-call" = top_k, gather fusions = the beam reorder) and the
most expensive single ops (find them by name in `jax.jit(...).lower(...).compile().as_text()`).

    python benchmarks/profile_generate.py --beams 4
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce python benchmarks/profile_generate.py
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--small", action="store_true", help="tiny model (smoke run)")
    p.add_argument("--top", type=int, default=15, help="how many op kinds and single ops to list")
    args = p.parse_args()

    import jax
    import numpy as np

    from generate_speed import make_models
    from kd_flax import decoding

    config, _, tmp, model = make_models(args.small)
    ids = np.random.default_rng(0).integers(2, config.vocab_size, (32, 32)).astype(np.int32)

    head = model.unembedding()  # laid out once, outside the profiled call (as a Translator keeps it)

    def run():
        jax.block_until_ready(decoding.generate(model, ids, np.ones_like(ids), num_beams=args.beams,
                                                max_new_tokens=32, min_new_tokens=32, unembedding=head))

    run()  # compile outside the trace
    trace_dir = os.path.join(tmp, "trace")
    with jax.profiler.trace(trace_dir):
        run()
    data = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
    by_kind, by_op, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "Eigen" not in line.name and "PjRt" not in line.name:  # XLA's worker threads only
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "end:")) or "Await" in ev.name:
                    continue
                by_kind[re.sub(r"\.\d+$", "", ev.name)] += ev.duration_ns
                by_op[ev.name] += ev.duration_ns
                calls[ev.name] += 1
    total = sum(by_kind.values())
    print(f"beam {args.beams}: {total / 1e6:.0f} ms of XLA thread time in one generate call")
    print("by op kind:")
    for name, ns in by_kind.most_common(args.top):
        print(f"  {ns / 1e6:8.1f} ms  {100 * ns / total:5.1f} %  {name}")
    print("single ops (calls = loop steps for ops inside the decoding loop):")
    for name, ns in by_op.most_common(args.top):
        print(f"  {ns / 1e6:8.1f} ms  {calls[name]:4d} calls  {name}")


if __name__ == "__main__":
    main()
