"""Mesh presets as a config: `--config configs/mesh.py:tpu_v4_8` prints / reuses one.

Recipes take `mesh=PRESET` in their argument instead (e.g. `configs/t5_enfr_seqkd.py:mesh=tpu_v5e_16`);
the presets themselves live in `kd_flax.config_base.MESH_PRESETS` so code and configs share them.
Presets: cpu, gpu_1, gpu_8, tpu_v4_8, tpu_v5e_16, tpu_v5p_64.
"""

from kd_flax import config_base


def get_config(arg=None):
    return config_base.mesh_config(arg or "cpu")
