"""Test setup: 8 fake CPU devices for the sharding tests, float32 everywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

# Must happen before the first JAX computation of the process.
jax.config.update("jax_num_cpu_devices", 8)
