"""kd_flax: sequence-level knowledge distillation for encoder-decoder models in JAX/Flax."""

__version__ = "0.1.0"
