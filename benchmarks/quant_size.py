"""Integer export size of a T5-small-shaped student: float32 vs int8 / int4 / ternary (2-bit).

    python benchmarks/quant_size.py [--model-type t5] [--granularity channel]

Random weights (sizes do not depend on values). Quantized with `quant.default_rules(bits)`
(Dense kernels per output channel, token embeddings per row; norms, biases and position
tables stay float32), exported with `int_weights.export_quantized`, and measured with
`int_weights.exported_nbytes` (packed int4/int2 codes + scales + the float leaves). Also checks
that dequantizing the export gives exactly the fake-quant weights.
"""

import argparse
import time

import jax
import numpy as np
from flax import nnx

from kd_flax import int_weights, quant
from kd_flax.models import T5Config, create_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--granularity", default="channel", choices=["channel", "tensor"])
    args = ap.parse_args()
    model = create_model(T5Config(), nnx.Rngs(0))  # T5-small: d 512, 6+6 layers, vocab 32128
    params = nnx.state(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    n = sum(int(np.prod(x.shape)) for x in leaves)
    fp32 = sum(int(np.prod(x.shape)) * 4 for x in leaves)
    print(f"T5-small shape: {n / 1e6:.1f}M parameters, float32 {fp32 / 2**20:.1f} MiB")
    print(f"| weights | export MiB | vs float32 | export s | dequantize == fake-quant |")
    print(f"| --- | ---: | ---: | ---: | --- |")
    for bits, name in ((8, "int8"), (4, "int4"), (2, "ternary (2-bit)")):
        rules = quant.default_rules(bits, granularity=args.granularity)
        t0 = time.perf_counter()
        exported = int_weights.export_quantized(params, rules)
        seconds = time.perf_counter() - t0
        size = int_weights.exported_nbytes(exported)
        fq = quant.quantize_params(params, rules)
        same = all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(int_weights.dequantize(exported, like=params)), jax.tree.leaves(fq)))
        print(f"| {name} | {size / 2**20:.1f} | {fp32 / size:.1f}× smaller | {seconds:.1f} | {same} |")


if __name__ == "__main__":
    main()
