"""On-policy distillation for encoder-decoders (generalized KD, Agarwal et al., ICLR 2024).

On an on-policy step the student samples a target for each source of the batch with its
current (fake-quantized, if configured) parameters, under ``stop_gradient``; the teacher
scores the sampled sequence teacher-forced, and the loss is the generalized JSD between
the two token distributions over the sampled positions (EOS included, pad after EOS
masked, as ``kd_flax.decoding`` writes samples).

The ``distill.on_policy`` (or train block ``on_policy``) keys:

* ``lmbda``: fraction of steps that train on student samples (0 = off-policy only; the
  step then compiles exactly the off-policy step).
* ``beta``: generalized JSD weight. 0 = forward ``KL(teacher || student)`` (``kd_kl``),
  1 = reverse ``KL(student || teacher)`` (``reverse_kl``), between = the mixture JSD in log
  space (``losses.generalized_jsd``, TRL's ``generalized_jsd_loss`` convention).
* ``temperature``, ``top_k``, ``top_p``: sampling warpers; ``loss_temperature`` the loss's.
* ``max_new_tokens``: length of the sampled targets.
* ``seed``: the stream that picks on-policy steps, ``bernoulli(fold_in(key(seed), step),
  lmbda)``: a function of (seed, step) only, so resume and multi-process agree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kd_flax import decoding, losses, objectives, processing
from kd_flax.config_base import cfg_get


@dataclasses.dataclass(frozen=True)
class OnPolicySpec:
    lmbda: float = 0.0
    beta: float = 0.5
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 32
    loss_temperature: float = 1.0
    seed: int = 0

    @classmethod
    def from_config(cls, c) -> "OnPolicySpec":
        if c is None:
            return cls()
        kw = {f.name: type(f.default)(cfg_get(c, f.name, f.default)) for f in dataclasses.fields(cls)}
        spec = cls(**kw)
        if not 0.0 <= spec.lmbda <= 1.0:
            raise ValueError(f"on_policy.lmbda must be in [0, 1], got {spec.lmbda}")
        if not 0.0 <= spec.beta <= 1.0:
            raise ValueError(f"on_policy.beta must be in [0, 1], got {spec.beta}")
        if spec.active and spec.max_new_tokens < 1:  # the distill stage resolves 0 to data.max_target_length
            raise ValueError(f"on_policy.max_new_tokens must be >= 1 when lmbda > 0, got {spec.max_new_tokens}")
        processing.check_sampling(spec.temperature, spec.top_k, spec.top_p)
        return spec

    @property
    def active(self) -> bool:
        return self.lmbda > 0


def is_on_policy_step(spec: OnPolicySpec, step) -> jax.Array:
    """bool scalar: whether `step` trains on student samples (a function of seed and step)."""
    if spec.lmbda >= 1.0:
        return jnp.ones((), bool)
    key = jax.random.fold_in(jax.random.key(spec.seed), step)
    return jax.random.bernoulli(key, spec.lmbda)


def on_policy_steps(spec: OnPolicySpec, n: int) -> list[bool]:
    """The choices of steps 0..n-1 (host side, for reports and tests)."""
    if n <= 0 or not spec.active:
        return [False] * max(n, 0)
    f = jax.jit(jax.vmap(lambda s: is_on_policy_step(spec, s)))
    return [bool(x) for x in jax.device_get(f(jnp.arange(n)))]


def gjsd(student_logits, teacher_logits, mask, *, beta: float, temperature: float = 1.0):
    """Generalized JSD as `(sum, count)`: beta 0 → kd_kl, 1 → reverse_kl, else the mixture."""
    if beta == 0.0:
        return losses.kd_kl(student_logits, teacher_logits, mask, temperature=temperature)
    if beta == 1.0:
        return losses.reverse_kl(student_logits, teacher_logits, mask, temperature=temperature)
    return losses.generalized_jsd(student_logits, teacher_logits, mask, beta=beta, temperature=temperature)


def token_ids(model, spec: OnPolicySpec) -> decoding.GenerationSettings:
    """The model's EOS / pad / decoder-start ids, resolved as `decoding.generate` resolves them."""
    return decoding.resolve_settings(model, max_new_tokens=spec.max_new_tokens)


def sample_targets(model, input_ids, attention_mask, rng, spec: OnPolicySpec, ids=None):
    """Student samples `[B, L]` (pad after EOS) and their lengths `[B]` (EOS included).
    Traceable; the caller passes constant (stop_gradient) params. `ids`: `token_ids(model, spec)`."""
    ids = token_ids(model, spec) if ids is None else ids
    if hasattr(model, "eval"):
        model.eval()
    b = input_ids.shape[0]
    enc = model.encode(input_ids, attention_mask)
    cache = model.init_cache(b, spec.max_new_tokens, enc, attention_mask)
    head = model.unembedding()

    def tokens_to_logits(tokens, cache):
        logits, new_cache = model.decode(tokens, enc, attention_mask, cache=cache, unembedding=head)
        return logits[:, -1], new_cache

    out = decoding.sample(tokens_to_logits, jnp.full((b,), ids.decoder_start_token_id, jnp.int32), cache, rng,
                          max_new_tokens=spec.max_new_tokens, eos_token_id=ids.eos_token_id,
                          pad_token_id=ids.pad_token_id,
                          temperature=spec.temperature, top_k=spec.top_k, top_p=spec.top_p)
    return out.sequences[:, 0], out.lengths[:, 0]


def student_batch(batch, seqs, lengths, start_id: int):
    """The teacher-forced batch of the sampled targets: same sources, `labels = seqs`,
    decoder inputs shifted right from `start_id`, mask = positions < length, pad rows kept 0."""
    seqs = jax.lax.stop_gradient(seqs)
    b, L = seqs.shape
    dec_in = jnp.concatenate([jnp.full((b, 1), start_id, seqs.dtype), seqs[:, :-1]], axis=1)
    mask = (jnp.arange(L)[None, :] < lengths[:, None]).astype(jnp.int32)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "decoder_input_ids": dec_in, "labels": seqs, "decoder_attention_mask": mask,
            "loss_mask": jnp.broadcast_to(objectives.row_weights(batch)[:, None], (b, L))}


def loss_on_samples(student, teacher, sbatch, spec: OnPolicySpec, dropout_rng=None):
    """`(sum, count)` of the generalized JSD on a sampled batch (teacher constant; the student
    with dropout when `dropout_rng` is given; the samples themselves are drawn without)."""
    s_logits, _, _ = objectives.forward(student, sbatch, dropout_rng=dropout_rng)
    t_logits, _, _ = objectives.forward(teacher, sbatch)
    w = objectives.token_weights(sbatch)
    return gjsd(s_logits, jax.lax.stop_gradient(t_logits), w, beta=spec.beta, temperature=spec.loss_temperature)
