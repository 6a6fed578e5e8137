"""Test setup: 8 fake CPU devices for the sharding tests, float32 everywhere."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI caches compiled programs in WORKDIR/.xla_cache by default; tests compile afresh
# (tests/test_compile_cache.py covers the cache).
os.environ.setdefault("KD_FLAX_COMPILATION_CACHE", "none")

import jax  # noqa: E402

# Must happen before the first JAX computation of the process.
jax.config.update("jax_num_cpu_devices", 8)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory):
    """A tiny random T5 teacher saved as an HF dir, with a BPE tokenizer trained on the
    synthetic demo task (the CLI tests point `teacher.path` at it)."""
    from flax import nnx

    from kd_flax import synthetic
    from kd_flax.models import create_model, save_pretrained, tiny_config, train_tokenizer

    d = tmp_path_factory.mktemp("teacher")
    examples = synthetic.SyntheticTask().sample(400, split_seed=1)
    tok = train_tokenizer([e["src"] for e in examples] + [e["ref"] for e in examples], 300, kind="bpe")
    cfg = tiny_config("t5", vocab_size=len(tok), d_model=32, num_heads=2, d_kv=16, d_ff=64)
    save_pretrained(create_model(cfg, nnx.Rngs(3)), str(d), tokenizer=tok)
    return str(d)
