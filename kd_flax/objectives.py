"""The training objective: the `loss` block as a `LossSpec`, the KD losses as a table by
name, every configured term as a `(sum, count)` pair, and their weighted combination.

`kd_flax.losses` stays pure (arrays in, `(sum, count)` out); this module decides which of
its functions a config asks for and what they are fed:

* **Which rows and tokens count.** Every term is weighted by the batch's row mask times its
  token mask (`token_weights`, `row_weights`). `data.batches` fills a fixed-size batch with
  copies of a real row and marks them `loss_mask = 0`; those rows add nothing to any term
  (CE, KD, hidden, attention) nor to the dev loss. A batch without `loss_mask` counts
  every row.
* **KD by name.** `KD_LOSSES[kd_type](logits, teacher, labels, weights, spec)` — one
  signature for every KD loss (`teacher` is a `TeacherOutput`); `LossSpec` accepts exactly
  the table's names. A new KD loss is one adapter and one table entry.

Models come in merged (`nnx.merge` inside the differentiated function is the caller's
business — `kd_flax.train` also applies the weight fake-quant rules there).
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kd_flax import fused_kd, losses
from kd_flax.config_base import cfg_choice, cfg_get
from kd_flax.models.layers import split_dropout_rng

TERMS = ("ce", "kd", "hidden", "attention")


# ---------------------------------------------------------------------------
# Which rows and tokens count
# ---------------------------------------------------------------------------


def token_weights(batch) -> jax.Array:
    """`[B, T]` float32 label weights: `decoder_attention_mask` times `loss_mask` (which is
    `[B, T]` as `data.batches` writes it, or one weight per row `[B]`)."""
    w = jnp.asarray(batch["decoder_attention_mask"]).astype(jnp.float32)
    lm = batch.get("loss_mask")
    if lm is None:
        return w
    lm = jnp.asarray(lm).astype(jnp.float32)
    return w * (lm[:, None] if lm.ndim == 1 else lm)


def row_weights(batch) -> jax.Array:
    """`[B]` float32: 1 on real rows, 0 on pad rows (a row whose `loss_mask` is all zero);
    all ones without `loss_mask`. Source-side terms (encoder hidden states and attention)
    are weighted by it."""
    lm = batch.get("loss_mask")
    if lm is None:
        return jnp.ones(jnp.shape(batch["input_ids"])[:1], jnp.float32)
    lm = jnp.asarray(lm).astype(jnp.float32)
    return lm if lm.ndim == 1 else (jnp.sum(lm, axis=-1) > 0).astype(jnp.float32)


# ---------------------------------------------------------------------------
# The KD losses by name
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherOutput:
    """What a KD loss may use of the teacher: its logits `[B, T, V]` (online teacher) and/or
    its top-k log-probs and ids `[B, T, k]` (cached with the pseudo-labels)."""
    logits: Any = None
    topk_logprobs: Any = None
    topk_ids: Any = None

    def topk(self, k: int):
        """(log-probs, ids) of the teacher's top k: the cached ones, else from its logits."""
        if self.topk_logprobs is not None:
            return self.topk_logprobs, self.topk_ids
        return jax.lax.top_k(jax.nn.log_softmax(self.logits.astype(jnp.float32)), k)


def _kl(logits, teacher, labels, w, spec):
    return losses.kd_kl(logits, teacher.logits, w, temperature=spec.temperature)


def _interpolated(logits, teacher, labels, w, spec):
    return losses.interpolated_kl(logits, teacher.logits, labels, w, lam=spec.lam, temperature=spec.temperature)


def _reverse_kl(logits, teacher, labels, w, spec):
    return losses.reverse_kl(logits, teacher.logits, w, temperature=spec.temperature)


def _jsd(logits, teacher, labels, w, spec):
    return losses.generalized_jsd(logits, teacher.logits, w, beta=spec.beta, temperature=spec.temperature)


def _topk(logits, teacher, labels, w, spec):
    lp, ids = teacher.topk(spec.topk)
    return losses.topk_kd(logits, lp, ids, w, temperature=spec.temperature)


KDLoss = Callable[..., tuple[jax.Array, jax.Array]]

#: `kd_type -> fn(student_logits, teacher: TeacherOutput, labels, weights, spec) -> (sum, count)`.
KD_LOSSES: types.MappingProxyType[str, KDLoss] = types.MappingProxyType({
    "kl": _kl,                      # Hinton: T² KL(teacher || student)
    "interpolated": _interpolated,  # Kim & Rush: KL(λ·onehot(y) + (1-λ)·teacher || student)
    "reverse_kl": _reverse_kl,      # mode-seeking: T² KL(student || teacher)
    "jsd": _jsd,                    # generalized JSD with mixture weight β
    "topk": _topk,                  # against the teacher's top-k (cached or online)
})


# ---------------------------------------------------------------------------
# The `loss` block
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The `loss` block, read once (static for jit)."""
    ce_weight: float = 1.0
    label_smoothing: float = 0.0
    smoothing: str = "fairseq"
    kd_weight: float = 0.0
    kd_type: str = "kl"
    temperature: float = 1.0
    lam: float = 0.5
    beta: float = 0.5
    fused: bool = False
    topk: int = 8
    teacher: str = "online"  # "cached": top-k KD against the generate job's stored top-k
    hidden_weight: float = 0.0
    attention_weight: float = 0.0

    @classmethod
    def from_config(cls, lcfg) -> "LossSpec":
        if lcfg is None:
            return cls()
        kw = {f.name: cfg_get(lcfg, f.name, f.default) for f in dataclasses.fields(cls)}
        cfg_choice(kw, "kd_type", tuple(KD_LOSSES), "loss")
        cfg_choice(kw, "smoothing", ("fairseq", "uniform"), "loss")
        cfg_choice(kw, "teacher", ("online", "cached"), "loss")
        spec = cls(**kw)
        if spec.teacher == "cached" and (spec.kd_type != "topk" or spec.hidden_weight > 0
                                         or spec.attention_weight > 0):
            raise ValueError(f"loss.teacher='cached' serves kd_type='topk' alone (no hidden/attention "
                             f"terms), got kd_type={spec.kd_type!r}, hidden_weight={spec.hidden_weight}, "
                             f"attention_weight={spec.attention_weight}")
        if spec.fused and spec.kd_type != "kl" and spec.kd_weight > 0:
            raise ValueError(f"loss.fused=True supports loss.kd_type='kl' only, got {spec.kd_type!r}")
        return spec

    @property
    def needs_teacher(self) -> bool:
        """An online teacher model: not for SeqKD alone nor for KD against the cached top-k."""
        return (self.kd_weight > 0 and self.teacher == "online") or self.hidden_weight > 0 \
            or self.attention_weight > 0

    @property
    def weights(self) -> dict[str, float]:
        return {"ce": self.ce_weight, "kd": self.kd_weight, "hidden": self.hidden_weight,
                "attention": self.attention_weight}


# ---------------------------------------------------------------------------
# Forward passes and the terms
# ---------------------------------------------------------------------------


def forward(model, batch, *, hidden: bool = False, attn: bool = False, logits_hidden: bool = False,
            dropout_rng=None):
    """Teacher-forced forward: `(logits, encoder output, decoder extras or None)`.
    `logits_hidden=True` returns the extras with the pre-unembedding states (fused KD).
    `dropout_rng`: a key to run the model with dropout (train steps only; None: deterministic)."""
    enc_rng, dec_rng = split_dropout_rng(dropout_rng)
    enc = model.encode(batch["input_ids"], batch["attention_mask"],
                       output_hidden_states=hidden, output_attentions=attn, dropout_rng=enc_rng)
    extras = hidden or attn or logits_hidden
    out = model.decode(batch["decoder_input_ids"], enc, batch["attention_mask"],
                       decoder_attention_mask=batch.get("decoder_attention_mask"),
                       output_hidden_states=hidden or logits_hidden, output_attentions=attn, dropout_rng=dec_rng)
    if extras:
        logits, _, dec = out
    else:
        (logits, _), dec = out, None
    return logits, enc, dec


def _add(a, b):
    return (a[0] + b[0], a[1] + b[1])


def _layer_terms(s_outs, t_outs, layer_map, *, hidden: bool, attn: bool, weights: dict):
    """Hidden-state and attention-map MSE over the mapped layers of both stacks.

    `s_outs`/`t_outs`: `(encoder output, decoder extras)`. `weights`: query weights per stack
    (`"encoder"`: source mask × row mask, `"decoder"`: the token weights) and key masks
    (`"src_keys"`, `"dec_keys"`: the attention masks)."""
    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    h_term, a_term = zero, zero
    sg = jax.lax.stop_gradient
    keys = {"encoder": weights["src_keys"], "decoder": weights["dec_keys"]}
    for stack, s_out, t_out in zip(("encoder", "decoder"), s_outs, t_outs):
        q_w = weights[stack]
        for i, j in enumerate(getattr(layer_map, stack)):
            if hidden:
                # hidden_states[0] is the embedding output; [i + 1] is layer i's output.
                h_term = _add(h_term, losses.hidden_mse(s_out.hidden_states[i + 1],
                                                        sg(t_out.hidden_states[j + 1]), q_w))
            if attn:
                a_term = _add(a_term, losses.attention_mse(s_out.attentions[i], sg(t_out.attentions[j]),
                                                           q_w, keys[stack]))
                if stack == "decoder":
                    a_term = _add(a_term, losses.attention_mse(
                        s_out.cross_attentions[i], sg(t_out.cross_attentions[j]), q_w, weights["src_keys"]))
    return h_term, a_term


def loss_terms(student, batch, teacher=None, *, spec: LossSpec, layer_map=None,
               dropout_rng=None) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Every configured loss term of `student` on `batch` as a `(sum, count)` pair (float32
    scalars), weighted by `token_weights` / `row_weights` (pad rows count nowhere).

    Args:
      student, teacher: merged models (the teacher's params already constant; None when the
        loss needs no online teacher, e.g. CE alone or KD against cached top-k).
      batch: `input_ids, attention_mask, decoder_input_ids, labels, decoder_attention_mask`,
        optionally `loss_mask`, `teacher_topk_logprobs`, `teacher_topk_ids`.
      layer_map: a `student.StudentInfo` (which teacher layer each student layer mimics)
        for the hidden / attention terms.
      dropout_rng: the student's dropout key (the train step's; None: deterministic). The
        teacher always runs without dropout.
    """
    hidden, attn = spec.hidden_weight > 0, spec.attention_weight > 0
    fused = spec.fused and spec.kd_weight > 0
    logits, enc, dec = forward(student, batch, hidden=hidden, attn=attn, logits_hidden=fused,
                               dropout_rng=dropout_rng)
    labels = batch["labels"]
    tok_w = token_weights(batch)
    terms = {}
    if spec.ce_weight > 0:
        terms["ce"] = losses.cross_entropy(logits, labels, tok_w, label_smoothing=spec.label_smoothing,
                                           smoothing=spec.smoothing)
    cached_topk = spec.kd_type == "topk" and "teacher_topk_logprobs" in batch
    if spec.teacher == "cached" and spec.kd_weight > 0 and not cached_topk:
        raise ValueError("loss.teacher='cached' needs batches with teacher_topk_logprobs / teacher_topk_ids "
                         "(the generate job's top-k cache, kd_flax.topk_cache)")
    online = spec.needs_teacher and not (cached_topk and not hidden and not attn)
    t_out = TeacherOutput(topk_logprobs=batch.get("teacher_topk_logprobs") if cached_topk else None,
                          topk_ids=batch.get("teacher_topk_ids") if cached_topk else None)
    if online:
        if teacher is None:
            raise ValueError("the loss needs an online teacher (kd_weight/hidden_weight/"
                             "attention_weight > 0) but no teacher was given")
        t_logits, t_enc, t_dec = forward(teacher, batch, hidden=hidden, attn=attn, logits_hidden=fused)
        t_out = dataclasses.replace(t_out, logits=jax.lax.stop_gradient(t_logits))
    if spec.kd_weight > 0:
        # Word-level KD skips the positions CE ignores (negative label ids, HF's -100). Written
        # as `cross_entropy` writes its own weights, so that XLA sees one masked log-softmax of
        # the student's logits where CE and KD both need it, not two passes over [tokens, V].
        kd_w = tok_w * (labels >= 0)
        if fused:
            w_s, b_s = student.unembedding()
            w_t, b_t = teacher.unembedding()
            terms["kd"] = fused_kd.fused_kd_kl(dec.logits_hidden, w_s, t_dec.logits_hidden, w_t, kd_w,
                                             temperature=spec.temperature, student_bias=b_s, teacher_bias=b_t)
        else:
            terms["kd"] = KD_LOSSES[spec.kd_type](logits, t_out, labels, kd_w, spec)
    if hidden or attn:
        if layer_map is None:
            raise ValueError("hidden/attention losses need layer_map (a student.StudentInfo)")
        src = jnp.asarray(batch["attention_mask"]).astype(jnp.float32)
        weights = {"encoder": src * row_weights(batch)[:, None], "decoder": tok_w, "src_keys": src,
                   "dec_keys": jnp.asarray(batch["decoder_attention_mask"]).astype(jnp.float32)}
        h_term, a_term = _layer_terms((enc, dec), (t_enc, t_dec), layer_map, hidden=hidden, attn=attn,
                                      weights=weights)
        if hidden:
            terms["hidden"] = h_term
        if attn:
            terms["attention"] = a_term
    return terms


def dev_loss(model, batch) -> tuple[jax.Array, jax.Array]:
    """The dev-set loss: plain token cross-entropy (no smoothing) as `(sum, count)`, pad
    rows excluded (what `keep_best_by="loss"` compares)."""
    logits, _, _ = forward(model, batch)
    return losses.cross_entropy(logits, batch["labels"], token_weights(batch))


def combine(terms, spec: LossSpec, counts=None) -> jax.Array:
    """Σ_t w_t · sum_t / count_t (counts default to the terms' own; 0/0 → 0)."""
    weights = spec.weights
    total = jnp.zeros((), jnp.float32)
    for k, (s, n) in terms.items():
        n = n if counts is None else counts[k]
        total = total + weights[k] * losses.mean((s, n))
    return total
