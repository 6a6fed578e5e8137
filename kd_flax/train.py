"""Train state, optimizer, the sharded train step, and the training loop with checkpoints.

The step is one `jax.jit` over a `TrainState` (student params + optimizer state + counters;
the teacher's params are a separate, non-differentiated argument and never enter the state
or its checkpoints). Its loss is `kd_flax.objectives` over the config's `loss` block; every
term is a `(sum, count)` pair and the division happens once, globally, so the mean is exact
across devices and gradient-accumulation micro-steps.

Batches are dicts of `[B, ...]` arrays: `input_ids, attention_mask, decoder_input_ids,
labels, decoder_attention_mask`, `loss_mask` (0 on the pad rows `data.batches` adds; they
count in no term), optionally `teacher_topk_logprobs`, `teacher_topk_ids` `[B, T, k]` for
cached top-k KD.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from kd_flax import losses, objectives, on_policy, quant, sharding
from kd_flax.config_base import cfg_choice as _choice, cfg_get as _get
from kd_flax.objectives import LossSpec, combine
from kd_flax.tree_paths import path_str

log = logging.getLogger(__name__)

STAGE_DIRS = ("ckpt", "best", "tb", "model")


# ---------------------------------------------------------------------------
# Train state and optimizer
# ---------------------------------------------------------------------------


@struct.dataclass
class TrainState:
    """Everything a checkpoint holds. `step` counts consumed batches (skipped ones too)."""
    step: jax.Array
    params: Any            # nnx.State of the student's nnx.Param variables
    opt_state: Any
    nan_skips: jax.Array   # total updates skipped for a non-finite loss/grad
    nan_streak: jax.Array  # consecutive skips (the loop stops at max_nan_steps)
    rng: jax.Array         # uint32[2]; per-step keys are fold_in(rng, step)


def decay_mask(params):
    """True where weight decay applies: not on biases (`bias`, BART's `final_logits_bias`)
    nor on any norm's params."""
    def keep(path, _):
        names = path_str(path).split("/")
        return not (names[-1].endswith("bias") or any("norm" in n for n in names))
    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then constant / linear→0 / cosine→0 / rsqrt decay."""
    lr = float(_get(opt_cfg, "learning_rate", 1e-3))
    warm = int(_get(opt_cfg, "warmup_steps", 0) or 0)
    kind = _choice(opt_cfg, "schedule", ("constant", "linear", "cosine", "rsqrt"), "optimizer")
    decay_steps = max(int(total_steps) - warm, 1)

    def schedule(count):
        step = jnp.asarray(count, jnp.float32)
        warmup = jnp.minimum(1.0, (step + 1.0) / warm) if warm > 0 else 1.0
        progress = jnp.clip((step - warm) / decay_steps, 0.0, 1.0)
        if kind == "constant":
            decay = 1.0
        elif kind == "linear":
            decay = 1.0 - progress
        elif kind == "cosine":
            decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        else:  # rsqrt: flat during warmup, then 1/sqrt(step) (T5's schedule)
            decay = jnp.sqrt(max(warm, 1) / jnp.maximum(step + 1.0, max(warm, 1)))
        return lr * warmup * decay

    return schedule


def make_optimizer(cfg) -> optax.GradientTransformation:
    """AdamW (`b1`, `b2`) or Adafactor (`decay_rate`, optax's 0.8 by default) from a train
    block (`cfg.optimizer`, `cfg.steps`), with global-norm clipping and weight decay masked
    off norms and biases."""
    o = _get(cfg, "optimizer")
    if o is None:
        raise ValueError("train config: missing the 'optimizer' block")
    name = _choice(o, "name", ("adamw", "adafactor"), "optimizer")
    sched = make_schedule(o, int(_get(cfg, "steps", 1) or 1))
    wd = float(_get(o, "weight_decay", 0.0) or 0.0)
    if name == "adamw":
        tx = optax.adamw(sched, b1=float(_get(o, "b1", 0.9)), b2=float(_get(o, "b2", 0.999)),
                         eps=1e-8, weight_decay=wd, mask=decay_mask)
    else:
        # Adafactor's second-moment decay is `1 - t**-decay_rate`, not Adam's b2: its own key.
        tx = optax.adafactor(sched, decay_rate=float(_get(o, "decay_rate", 0.8)),
                             weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    clip = float(_get(o, "grad_clip_norm", 0.0) or 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip > 0 else tx


def init_train_state(params, cfg, *, seed: int = 0, mesh=None, rules=None) -> TrainState:
    """A fresh state for `params` (an nnx.State of Params), placed on `mesh` when given."""
    tx = make_optimizer(cfg)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                       nan_skips=jnp.zeros((), jnp.int32), nan_streak=jnp.zeros((), jnp.int32),
                       rng=jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32))
    # Fresh buffers: the state is donated, and optax/jnp may share one zeros buffer between
    # leaves (or with the model the params came from).
    state = jax.tree.map(lambda x: jnp.array(x, copy=True), state)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh, rules))
    return state


# ---------------------------------------------------------------------------
# Shardings
# ---------------------------------------------------------------------------


def _replicated(mesh):
    return jax.sharding.NamedSharding(sharding.auto_axes(mesh), jax.sharding.PartitionSpec())


def state_shardings(state: TrainState, mesh, rules) -> TrainState:
    """Params by the logical rules; optimizer leaves shaped like a param follow that param
    (matched by path suffix, so Adam's mu/nu shard like the weights); the rest replicated."""
    p_sh = sharding.param_shardings(state.params, mesh, rules)
    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(state.params)[0],
                                jax.tree.leaves(p_sh)):
        by_path[tuple(path_str(path).split("/"))] = (np.shape(leaf), sh)
    rep = _replicated(mesh)

    def opt_leaf(path, leaf):
        names = tuple(path_str(path).split("/"))
        for k in range(len(names)):
            hit = by_path.get(names[k:])
            if hit is not None and hit[0] == np.shape(leaf):
                return hit[1]
        return rep

    o_sh = jax.tree_util.tree_map_with_path(opt_leaf, state.opt_state)
    return TrainState(step=rep, params=p_sh, opt_state=o_sh, nan_skips=rep, nan_streak=rep, rng=rep)


# ---------------------------------------------------------------------------
# The train step
# ---------------------------------------------------------------------------


def split_model(model):
    """`(graphdef, params, rest)`: params are trained, `rest` (non-Param state such as
    position tables) is closed over as a constant."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def _graph(g):
    """A Module or a graphdef → `(graphdef, rest-or-None)`."""
    if g is None:
        return None, None
    if isinstance(g, nnx.Module):
        graphdef, _, rest = split_model(g)
        return graphdef, rest
    if isinstance(g, tuple):
        return g
    return g, None


def _merge(graph, params):
    graphdef, rest = graph
    return nnx.merge(graphdef, params) if rest is None else nnx.merge(graphdef, params, rest)


def forward_model(graph, params, quant_rules=None):
    """The model the loss runs: `params` merged into `graph`, weight-fake-quantized by
    `quant_rules` first (DQ-BART: the full-precision params are trained, their quantized
    copies used forward; gradients pass straight through)."""
    return _merge(graph, quant.quantize_params(params, quant_rules) if quant_rules else params)


def _where_tree(pred, new, old):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


class TrainStep:
    """`step(state, batch, teacher_params=None) -> (state, metrics)`; jitted on first call.

    Shardings come from the first state seen (params by logical rules, batch on the data
    axes); the state argument is donated. Metrics are `(sum, count)` pairs. Compiled with
    `sharding.train_compiler_options()` (XLA's default CPU fusions, region-analysis copy
    insertion), not `sharding.compiler_options()` (which suit decoding loops): on this 2-core
    CPU the Multi30k teacher's step took 459 instead of 594 ms per batch of 64 x 16/16 tokens
    without those, the T5-small top-k KD step 2.45 s either way (benchmarks/multi30k_step.py,
    benchmarks/topk_speed.py).
    """

    def __init__(self, fn, tx, *, mesh=None, rules=None):
        self._fn, self.tx, self.mesh, self.rules = fn, tx, sharding.auto_axes(mesh), rules
        self._jitted = None
        self._batch_sh = None

    def _build(self, state, teacher_params):
        if self.mesh is None:
            self._jitted = jax.jit(self._fn, donate_argnums=(0,), compiler_options=sharding.train_compiler_options())
            return

        st_sh = state_shardings(state, self.mesh, self.rules)
        self._batch_sh = sharding.batch_sharding(self.mesh, self.rules, ndim=2)
        t_sh = (None if teacher_params is None
                else sharding.param_shardings(teacher_params, self.mesh, self.rules))
        rep = _replicated(self.mesh)
        self._jitted = jax.jit(self._fn, in_shardings=(st_sh, self._batch_sh, t_sh),
                               out_shardings=(st_sh, rep), donate_argnums=(0,),
                               compiler_options=sharding.train_compiler_options())

    def __call__(self, state, batch, teacher_params=None):
        if self._jitted is None:
            self._build(state, teacher_params)
        if self._batch_sh is None:
            batch = {k: jnp.asarray(v) for k, v in batch.items()}
        else:  # each process holds its rows of the global batch (data.batches slices per host)
            batch = {k: jax.make_array_from_process_local_data(self._batch_sh, np.asarray(v))
                     for k, v in batch.items()}
        if self.mesh is None:
            return self._jitted(state, batch, teacher_params)
        with jax.set_mesh(self.mesh):
            return self._jitted(state, batch, teacher_params)


def accumulate(terms_fn, loss_fn, params, batch, accum: int, rng=None):
    """`(loss, terms, grads)` of `loss_fn(terms_fn(params, batch, rng), None)` over the whole
    batch, computed in `accum` strided micro-batches (one `lax.scan`) when `accum > 1`.

    `terms_fn(params, batch, rng) -> {name: (sum, count)}`; `loss_fn(terms, counts)` turns them
    into the scalar loss, normalising by `counts` (the whole batch's) when given, so the summed
    micro-batch losses and grads equal the full-batch ones up to float rounding. `rng`: the
    step's dropout key (None: deterministic); micro-batch `i` gets `fold_in(rng, i)`.
    """
    if accum == 1:
        def f(p):
            terms = terms_fn(p, batch, rng)
            return loss_fn(terms, None), terms
        (loss, terms), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, terms, grads
    b = batch["input_ids"].shape[0]
    if b % accum:
        raise ValueError(f"grad_accum={accum} must divide the batch size {b}")
    # Counts depend only on the masks, so this forward is dead code XLA removes.
    counts = {k: n for k, (_, n) in terms_fn(params, batch, None).items()}
    # Strided micro-batches: each device keeps a slice of every micro-batch.
    micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1), batch)

    def body(carry, inp):
        g_acc, l_acc, t_acc = carry
        mb, i = inp

        def f(p):
            terms = terms_fn(p, mb, None if rng is None else jax.random.fold_in(rng, i))
            return loss_fn(terms, counts), terms
        (l, terms), g = jax.value_and_grad(f, has_aux=True)(params)
        t_acc = {k: (t_acc[k][0] + terms[k][0], t_acc[k][1] + terms[k][1]) for k in terms}
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, t_acc), None

    zero_terms = {k: (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)) for k in counts}
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), zero_terms)
    (grads, loss, terms), _ = jax.lax.scan(body, init, (micro, jnp.arange(accum)))
    return loss, terms, grads


DROPOUT_STREAM = 1  # the student's dropout key: fold_in(the step's key, DROPOUT_STREAM)


def make_train_step(student_graphdef, cfg, *, teacher=None, quant_rules=None, mesh=None, rules=None,
                    layer_map=None) -> TrainStep:
    """The jitted train step for a train block `cfg` (`loss`, `optimizer`, `grad_accum`, `steps`).

    Args:
      student_graphdef: the student model (its non-Param state is closed over), a graphdef of
        a params-only model, or `(graphdef, rest)` from `split_model`.
      teacher: the teacher's graphdef (or the teacher model) for online KD / hidden / attention
        losses; its params are passed to each call, never differentiated or stored.
      quant_rules: weight fake-quant rules (`kd_flax.quant`), applied inside the loss.
      mesh, rules: shard the step (`kd_flax.sharding`); None = single device.
      layer_map: a `student.StudentInfo` for the hidden / attention losses.
    """
    spec = LossSpec.from_config(_get(cfg, "loss"))
    accum = int(_get(cfg, "grad_accum", 1) or 1)
    tx = make_optimizer(cfg)
    s_graph, t_graphdef = _graph(student_graphdef), _graph(teacher)
    if spec.needs_teacher and t_graphdef[0] is None and not (spec.kd_type == "topk" and spec.hidden_weight == 0
                                                          and spec.attention_weight == 0):
        raise ValueError("loss: kd_weight/hidden_weight/attention_weight > 0 need teacher=...")

    def term_fn(p, b, tp, key):
        teacher_model = None if tp is None or t_graphdef[0] is None else _merge(t_graphdef, jax.lax.stop_gradient(tp))
        return objectives.loss_terms(forward_model(s_graph, p, quant_rules), b, teacher_model, spec=spec,
                                     layer_map=layer_map, dropout_rng=key)

    def grads_and_terms(params, batch, tp, drop_key):
        return accumulate(lambda p, b, k: term_fn(p, b, tp, k), lambda t, n: combine(t, spec, n), params, batch,
                          accum, drop_key)

    op = on_policy.OnPolicySpec.from_config(_get(cfg, "on_policy"))
    if op.active and t_graphdef[0] is None:
        raise ValueError("on_policy.lmbda > 0 needs teacher=... (the teacher scores the student's samples)")

    def on_policy_grads(params, batch, tp, key, drop_key):
        # The student samples with its current (fake-quantized) params, no gradient through it.
        sampler = forward_model(s_graph, jax.lax.stop_gradient(params), quant_rules)
        ids = on_policy.token_ids(sampler, op)
        seqs, lengths = on_policy.sample_targets(sampler, batch["input_ids"], batch["attention_mask"], key, op,
                                                 ids)
        sbatch = on_policy.student_batch(batch, seqs, lengths, ids.decoder_start_token_id)
        teacher_model = _merge(t_graphdef, jax.lax.stop_gradient(tp))

        def jsd_terms(p, b, k):
            return {"on_policy_jsd": on_policy.loss_on_samples(forward_model(s_graph, p, quant_rules),
                                                               teacher_model, b, op, dropout_rng=k)}
        def jsd_loss(terms, counts):
            s, n = terms["on_policy_jsd"]
            return losses.mean((s, n if counts is None else counts["on_policy_jsd"]))
        loss, terms, grads = accumulate(jsd_terms, jsd_loss, params, sbatch, accum, drop_key)
        return loss, terms["on_policy_jsd"], grads

    def compute_grads(params, batch, tp, step, rng):
        """`(loss, terms, grads, on_flag, on_policy_term)` of one step (no optimizer update).

        The step's key is `fold_in(rng, step)` (a restored state redraws the same): on-policy
        samples use it, the student's dropout `fold_in(key, DROPOUT_STREAM)` (the models use it
        only where a dropout rate is > 0; the teacher and the sampler never)."""
        z = jnp.zeros((), jnp.float32)
        key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
        drop_key = jax.random.fold_in(key, DROPOUT_STREAM)
        if not op.active:  # lmbda = 0: exactly the off-policy step
            loss, terms, grads = grads_and_terms(params, batch, tp, drop_key)
            return loss, terms, grads, z, (z, z)
        is_on = on_policy.is_on_policy_step(op, step)

        def off(params):
            loss, terms, grads = grads_and_terms(params, batch, tp, drop_key)
            return loss, terms, grads, (z, z)

        def on(params):
            loss, kd, grads = on_policy_grads(params, batch, tp, key, drop_key)
            shape = jax.eval_shape(lambda p: grads_and_terms(p, batch, tp, None)[1], params)
            terms = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shape)
            return loss, terms, grads, kd

        loss, terms, grads, op_term = jax.lax.cond(is_on, on, off, params)
        return loss, terms, grads, is_on.astype(jnp.float32), op_term

    def step_fn(state: TrainState, batch, tp):
        loss, terms, grads, on_flag, op_term = compute_grads(state.params, batch, tp, state.step, state.rng)
        gnorm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        new_state = state.replace(
            step=state.step + 1,
            params=_where_tree(ok, new_params, state.params),
            opt_state=_where_tree(ok, new_opt, state.opt_state),
            nan_skips=state.nan_skips + jnp.where(ok, 0, 1),
            nan_streak=jnp.where(ok, 0, state.nan_streak + 1))
        one = jnp.ones((), jnp.float32)
        metrics = {k: (s, n) for k, (s, n) in terms.items()}
        metrics.update(loss=(loss, one), grad_norm=(gnorm, one),
                       nan_skipped=(1.0 - ok.astype(jnp.float32), one))
        if op.active:
            metrics.update(on_policy=(on_flag, one), on_policy_jsd=op_term)
        return new_state, metrics

    out = TrainStep(step_fn, tx, mesh=mesh, rules=rules)
    out.compute_grads = compute_grads  # `(params, batch, teacher_params, step, rng)`, for tests and tools
    return out


def make_eval_step(student_graphdef, *, quant_rules=None):
    """Jitted dev-loss step: `(params, batch) -> (ce_sum, token_count)` (`objectives.dev_loss`:
    no smoothing, pad rows excluded)."""
    graph = _graph(student_graphdef)
    def f(params, batch):
        return objectives.dev_loss(forward_model(graph, params, quant_rules), batch)
    return jax.jit(f, compiler_options=sharding.compiler_options())


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------

MODEL_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels", "decoder_attention_mask",
              "loss_mask", "teacher_topk_logprobs", "teacher_topk_ids")


def target_tokens(batch: dict) -> int:
    """Non-pad target tokens of a batch: `loss_mask` > 0 (`decoder_attention_mask` on real
    rows, 0 on the pad rows `data.batches` adds), else `decoder_attention_mask`."""
    mask = batch["loss_mask"] if "loss_mask" in batch else batch["decoder_attention_mask"]
    return int((np.asarray(mask) > 0).sum())


def model_batch(batch: dict) -> dict:
    """The arrays the step uses (drops bookkeeping such as `example_id`, `valid`)."""
    return {k: v for k, v in batch.items() if k in MODEL_KEYS}


class _Preemption:
    """SIGTERM → request a checkpoint at the next step boundary, then a clean exit."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._handler)
        return self

    def _handler(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


class NonFiniteLoss(RuntimeError):
    """Raised after `max_nan_steps` consecutive skipped (non-finite) updates."""


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    losses: list[float]          # per-step loss of the steps run in this call
    start_step: int              # first step run in this call (> 0 after a resume)
    evals: list[dict]            # {"step", "loss", "bleu", "chrf"} per evaluation
    best: dict | None            # the best evaluation by keep_best_by
    preempted: bool = False
    seconds: float = 0.0         # wall time of this call's steps (compilation, evals, checkpoints included)
    target_tokens: int = 0       # non-pad target tokens of this call's batches

    def throughput(self) -> dict:
        """This call's steps, wall seconds and target tokens/s (what a stage records)."""
        n = len(self.losses)
        return {"steps_run": n, "train_seconds": round(self.seconds, 1),
                "target_tokens_per_s": round(self.target_tokens / self.seconds, 1) if self.seconds > 0 else None}


def _pure(state: TrainState) -> dict:
    """The checkpoint tree: plain dicts of arrays (no teacher, no graph)."""
    return {"step": state.step, "params": nnx.to_pure_dict(state.params), "opt_state": state.opt_state,
            "nan_skips": state.nan_skips, "nan_streak": state.nan_streak, "rng": state.rng}


def _abstract(tree):
    def f(x):
        sh = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sh)
    return jax.tree.map(f, tree)


def _restore(mgr, step, like: TrainState) -> TrainState:
    import orbax.checkpoint as ocp
    raw = mgr.restore(step, args=ocp.args.StandardRestore(_abstract(_pure(like))))
    params = like.params
    params = jax.tree.map(lambda x: x, params)  # a copy whose leaves we replace
    nnx.replace_by_pure_dict(params, raw["params"])
    return TrainState(step=raw["step"], params=params, opt_state=raw["opt_state"],
                      nan_skips=raw["nan_skips"], nan_streak=raw["nan_streak"], rng=raw["rng"])


def _better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


def train(step_fn: TrainStep, state: TrainState, cfg, *, workdir: str, batches: Callable[[int], Iterator[dict]],
          teacher_params=None, evaluate: Callable[[Any], dict] | None = None,
          log: Callable[[str], None] = print, progress: bool = True,
          fail_at_step: int | None = None) -> TrainResult:
    """Run `cfg.steps` steps of `step_fn` from `state` (or from the last checkpoint in `workdir`).

    Args:
      batches: `start_step -> iterator` of batches for steps start_step, start_step+1, ...;
        must be a pure function of (seed, step) so a resume sees the same data.
      evaluate: `params -> {"loss", "bleu", "chrf", ...}`, called every `cfg.eval_every` steps;
        the best params by `cfg.keep_best_by` are kept in `workdir/best`.
      fail_at_step: raise after that many steps (tests simulate a crash with it).
    Checkpoints (Orbax, async) go to `workdir/ckpt` every `cfg.checkpoint_every` steps, at the
    end, and on SIGTERM (then the loop returns with `preempted=True`). TensorBoard events go
    to `workdir/tb`.
    """
    import orbax.checkpoint as ocp
    from tqdm import tqdm

    total = int(_get(cfg, "steps"))
    ckpt_every = int(_get(cfg, "checkpoint_every", 0) or 0)
    eval_every = int(_get(cfg, "eval_every", 0) or 0)
    log_every = max(int(_get(cfg, "log_every", 50) or 50), 1)
    max_nan = int(_get(cfg, "max_nan_steps", 10) or 10)
    best_by = _get(cfg, "keep_best_by", "loss")
    from kd_flax import io_utils
    workdir = io_utils.abspath(workdir)  # Orbax wants absolute paths; a gs:// URL stays one
    writer_proc = jax.process_index() == 0

    mgr = ocp.CheckpointManager(os.path.join(workdir, "ckpt"), options=ocp.CheckpointManagerOptions(
        max_to_keep=2, enable_async_checkpointing=True, create=True))
    best_mgr = ocp.CheckpointManager(os.path.join(workdir, "best"), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, create=True, best_fn=lambda m: m[best_by],
        best_mode="min" if best_by == "loss" else "max"))
    latest = mgr.latest_step()
    if latest is not None:
        state = _restore(mgr, latest, state)
        log(f"resumed from {mgr.directory} step {latest}")
    start = int(jax.device_get(state.step))
    tb = io_utils.summary_writer(os.path.join(workdir, "tb")) if writer_proc else None
    evals: list[dict] = []
    best = None
    losses_run: list[float] = []
    window: dict[str, list[float]] = {}
    preempted = False
    bar = tqdm(total=total, initial=start, disable=not (progress and writer_proc), dynamic_ncols=True)
    from kd_flax.metrics import stderr_is_tty
    # No readable bar (off, or stderr is no terminal): a log line every log_every steps.
    log_lines = writer_proc and not (progress and stderr_is_tty())
    it = batches(start)
    t0, n_win, n_tok = time.perf_counter(), 0, 0  # steps and target tokens since the last log
    t_start, tok_total = t0, 0
    try:
        with _Preemption() as pre:
            for step in range(start, total):
                if fail_at_step is not None and step >= fail_at_step:
                    raise RuntimeError(f"simulated failure at step {step}")
                batch = model_batch(next(it))
                n_b = target_tokens(batch)
                n_win, n_tok, tok_total = n_win + 1, n_tok + n_b, tok_total + n_b
                state, m = step_fn(state, batch, teacher_params)
                m, streak = jax.device_get((m, state.nan_streak))  # one transfer per step
                streak = int(streak)
                losses_run.append(float(m["loss"][0]))
                for k, (s, n) in m.items():
                    w = window.setdefault(k, [0.0, 0.0])
                    w[0] += float(s)
                    w[1] += float(n)
                done = step + 1
                bar.update(1)
                if streak >= max_nan:
                    mgr.wait_until_finished()
                    raise NonFiniteLoss(
                        f"{streak} consecutive steps had a non-finite loss or gradient (max_nan_steps="
                        f"{max_nan}); stopped at step {done}. Lower the learning rate, use float32 "
                        f"(dtype), or check the data; the last good checkpoint is in {mgr.directory}")
                if done % log_every == 0 or done == total:
                    means = {k: losses.mean((np.float32(s), np.float32(n))) for k, (s, n) in window.items()}
                    el = max(time.perf_counter() - t0, 1e-9)
                    rate, tok_rate = n_win / el, n_tok / el
                    t0, n_win, n_tok = time.perf_counter(), 0, 0
                    bar.set_postfix(loss=f"{float(means['loss']):.4f}", steps_s=f"{rate:.2f}",
                                    tok_s=f"{tok_rate:.0f}")
                    if log_lines:
                        log(f"step {done}/{total}: loss={float(means['loss']):.4f}, {rate:.2f} steps/s, "
                            f"{tok_rate:.0f} target tokens/s")
                    if tb is not None:
                        for k, v in means.items():
                            tb.add_scalar(f"train/{k}", float(v), done)
                        tb.add_scalar("train/steps_per_s", rate, done)
                        tb.add_scalar("train/target_tokens_per_s", tok_rate, done)
                        tb.add_scalar("train/nan_skips_total", int(jax.device_get(state.nan_skips)), done)
                    window = {}
                if evaluate is not None and eval_every and (done % eval_every == 0 or done == total):
                    res = {k: float(v) for k, v in evaluate(state.params).items()}
                    res["step"] = done
                    evals.append(res)
                    log(f"step {done}: " + ", ".join(f"{k}={v:.4g}" for k, v in res.items() if k != "step"))
                    if tb is not None:
                        for k, v in res.items():
                            if k != "step":
                                tb.add_scalar(f"dev/{k}", v, done)
                    if best_by in res:
                        best_mgr.save(done, args=ocp.args.StandardSave(nnx.to_pure_dict(state.params)),
                                      metrics={best_by: res[best_by]})
                        if _better(best_by, res[best_by], None if best is None else best[best_by]):
                            best = res
                if (ckpt_every and done % ckpt_every == 0) or done == total:
                    mgr.save(done, args=ocp.args.StandardSave(_pure(state)))
                if pre.requested:
                    if mgr.latest_step() != done:
                        mgr.save(done, args=ocp.args.StandardSave(_pure(state)), force=True)
                    mgr.wait_until_finished()
                    log(f"SIGTERM: checkpoint saved at step {done} in {mgr.directory}; exiting")
                    preempted = True
                    break
    finally:
        bar.close()
        mgr.wait_until_finished()
        best_mgr.wait_until_finished()
        mgr.close()
        best_mgr.close()
        if tb is not None:
            tb.close()
    return TrainResult(state=state, losses=losses_run, start_step=start, evals=evals, best=best,
                       preempted=preempted, seconds=time.perf_counter() - t_start, target_tokens=tok_total)


def load_best_params(workdir: str, like_params):
    """The params saved in `workdir/best` (the best evaluation), or None."""
    import orbax.checkpoint as ocp
    from kd_flax import io_utils
    path = os.path.join(io_utils.abspath(workdir), "best")
    if not io_utils.is_dir(path):
        return None
    mgr = ocp.CheckpointManager(path)
    step = mgr.best_step() if mgr.best_step() is not None else mgr.latest_step()
    if step is None:
        mgr.close()
        return None
    raw = mgr.restore(step, args=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(like_params))))
    mgr.close()
    params = jax.tree.map(lambda x: x, like_params)
    nnx.replace_by_pure_dict(params, raw)
    return params
