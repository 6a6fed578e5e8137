"""kd_flax: sequence-level knowledge distillation for encoder-decoder models in JAX/Flax.

Version ranges: the lower bounds are the versions the test suite runs against
(Python 3.11: jax 0.10.2 is the newest jax that 3.11 can resolve, jax >= 0.11 needs
Python >= 3.12); the upper bounds cap the next release line of libraries whose APIs move
between minor releases (jax, flax, optax, orbax) or majors (transformers, datasets).
Raise a cap only after the suite passes on the new version.

Install:
    pip install -e .             # CPU (jax's CPU wheel is the default)
    pip install -e '.[tpu]'      # Cloud TPU VM (libtpu)
    pip install -e '.[cuda]'     # NVIDIA GPU (CUDA 12 wheels)
    pip install -e '.[deploy]'   # CTranslate2 export (export.ctranslate2)
    pip install torch==2.13.0 -e '.[test]'   # tests; torch==2.13.0 resolves to the CPU wheel
                                             # where one is offered (see docs/sections/install.md)
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

_HERE = Path(__file__).resolve().parent


def _version() -> str:
    # Read __version__ without importing kd_flax (its imports need jax installed).
    text = (_HERE / "kd_flax" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.MULTILINE)
    if match is None:
        raise RuntimeError("kd_flax/__init__.py: no __version__ = \"...\" line")
    return match.group(1)


JAX = "jax>=0.10.2,<0.11"

install_requires = [
    JAX,
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    # transformers 5.x: tokenizers, configs and PyTorch parity models (no Flax models there).
    "transformers>=5.0,<6",
    "datasets>=5.0,<6",
    "sacrebleu>=2.6,<3",
    "ml-collections>=1.1,<2",
    "tokenizers>=0.23.1,<0.24",  # the range transformers 5.23 accepts
    "safetensors>=0.8",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    # Core, not an extra: the demo (the README's first command) plots BLEU against size.
    "matplotlib>=3.8",
    "numpy>=2.0",
    # Imported directly (CLI flags, gs:// paths); orbax brings them too, but say so here.
    "absl-py>=2.0",
    "etils[epath]>=1.7",
    # gs:// workdirs (the Cloud TPU launch writes everything to a bucket): etils.epath's GCS
    # backend. Follows STORAGE_EMULATOR_HOST, as kd_flax makes tensorstore do.
    "gcsfs>=2024.2",
]

extras_require = {
    # Same jax line as the core requirement, with the accelerator runtime.
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
    # torch is only needed by the parity tests (transformers PyTorch models as references).
    # torch==2.13.0 is the tested version; `pip install torch==2.13.0` picks a local
    # +cpu wheel where one is offered (find-links / the PyTorch CPU index) and so does not
    # pull the multi-GB CUDA wheels of plain PyPI torch.
    "test": [
        "pytest>=8",
        "pytest-xdist>=3.5",
        "hypothesis>=6.100",
        "gcp-storage-emulator>=2024.8",  # the gs:// tests run the CLI against it
        "torch==2.13.0",
        "ctranslate2==4.8.5",  # tests/test_ct2.py runs CTranslate2 itself
    ],
    # Serving: `export.ctranslate2` converts the student with CTranslate2's own converter.
    "deploy": ["ctranslate2>=4.8.5,<5"],
}

setup(
    name="kd_flax",
    version=_version(),
    description="Sequence-level knowledge distillation for encoder-decoder models (T5, BART) in JAX/Flax",
    long_description=(_HERE / "README.md").read_text(encoding="utf-8")
    if (_HERE / "README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["kd_flax", "kd_flax.*"]),
    python_requires=">=3.11",
    install_requires=install_requires,
    extras_require=extras_require,
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
