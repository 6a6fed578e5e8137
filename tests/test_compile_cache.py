"""`--compilation_cache_dir`: JAX's persistent compilation cache. A second process with the
same cache loads the compiled executable instead of compiling it (issue 16: each bucket shape
cost 12-23 s of XLA compile per model on a 2-core CPU)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROG = """
import sys, time, jax, jax.numpy as jnp
from kd_flax import main
main.enable_compilation_cache(sys.argv[1], min_compile_secs=0.0)
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0 + 1.0)
print(float(f(jnp.ones((64, 64)))), sum("compilation_cache/cache_hits" in e for e in events))
"""


def test_second_process_reuses_the_cached_executable(tmp_path):
    d = str(tmp_path / "cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1")
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", PROG, d], cwd=ROOT, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        value, hits = r.stdout.split()
        outs.append((value, int(hits), sorted(os.listdir(d))))
    assert outs[0][2], "nothing was written to the cache"
    assert outs[0][1] == 0 and outs[1][1] >= 1  # the first compiles, the second loads
    assert outs[0][0] == outs[1][0] and outs[0][2] == outs[1][2]


def test_the_cli_caches_in_the_workdir_by_default(tmp_path):
    from kd_flax import main
    wd = str(tmp_path / "wd")
    assert main.compilation_cache_dir(None, wd) == os.path.join(wd, ".xla_cache")
    assert main.compilation_cache_dir(None, "gs://bucket/run") is None  # remote: only when asked
    assert main.compilation_cache_dir("gs://bucket/xla", "gs://bucket/run") == "gs://bucket/xla"
    for off in ("none", "", "off"):
        assert main.compilation_cache_dir(off, wd) is None
    assert main.compilation_cache_dir(str(tmp_path / "c"), wd) == str(tmp_path / "c")
