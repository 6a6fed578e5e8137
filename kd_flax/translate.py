"""Model-level decoding: `generate` for one call, `Translator` for many.

* `generate(model, input_ids, attention_mask, ...)` decodes one batch with a `kd_flax.models`
  encoder-decoder (contract: ``encode`` / ``init_cache`` / ``decode`` with an explicit cache
  whose leaves carry the batch on axis 0; ``unembedding()`` gives the LM head). Settings are
  read the way transformers reads them (`kd_flax.decoding.resolve_settings`). It is one
  `jax.jit` whose static arguments are the model's graph structure, the settings and the mesh:
  JAX's compile cache keys on those, never on weights, so nothing here keeps a model alive.
* `Translator(model, tokenizer, settings, mesh=None, rules=None)` owns what repeated decoding
  with one model reuses, as attributes (the Flax gemma sampler's pattern): its jitted function
  and, on CPU, the LM head laid out once per set of weights. It decodes padded id batches
  (``translator(input_ids, attention_mask, seed)``: the teacher job) and texts
  (``translator.translate(texts)``: evaluate and dev BLEU), with the model's weights or
  any other weights of the same structure (``state=``) without compiling again. Drop it and
  the model, its compiled function and its head go with it.
"""

from __future__ import annotations

import functools
import time
import weakref
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kd_flax import corpus as corpus_lib
from kd_flax import data as data_lib
from kd_flax import decoding
from kd_flax.decoding import GenerateOutput, GenerationSettings, expand_rows, resolve_settings


class _StaticGraph:
    """Hashable handle of an `nnx.GraphDef` for jit's static arguments.

    A GraphDef hashes by structure and static values; kd_flax models keep every static attribute
    hashable (`generation_config` is stored as JSON text). Only for a module that holds an
    unhashable one (e.g. a dict) is its repr the key: still correct, but slower (~30 ms per call
    for a T5-small-sized graph).
    """

    def __init__(self, graphdef):
        self.graphdef = graphdef
        try:
            hash(graphdef)
            self._key = graphdef
        except TypeError:
            self._key = repr(graphdef)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _StaticGraph) and self._key == other._key


def _constrain_batch(tree, mesh, batch_spec, rest=P.UNCONSTRAINED):
    """Shard axis 0 of every non-scalar leaf like the activations' batch; the other axes get
    `rest` (left to XLA by default, e.g. heads over the model axis under tensor parallelism)."""
    if mesh is None:
        return tree

    def one(x):
        if jnp.ndim(x) == 0:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(batch_spec, *[rest] * (x.ndim - 1))))

    return jax.tree.map(one, tree)


def _generate_impl(graphdef, state, input_ids, attention_mask, seed, head=None, *,
                   settings: GenerationSettings, mesh=None, batch_spec=None) -> GenerateOutput:
    """Traced body of every model-level decode: encode, build the cache once, run the loop.
    `head`: ``model.unembedding()`` computed by the caller, or None to compute it here."""
    from flax import nnx

    decoding.TRACE_COUNTS["generate"] += 1
    if isinstance(graphdef, _StaticGraph):
        graphdef = graphdef.graphdef
    model = nnx.merge(graphdef, state)
    model.eval()  # dropout off, whatever mode the caller left the model in
    st = settings
    batch = input_ids.shape[0]
    enc = model.encode(input_ids, attention_mask)
    # Rows per input: K beams, or n independent samples.
    rows = st.num_beams if st.num_beams > 1 else (st.num_return_sequences if st.do_sample else 1)
    common = dict(max_new_tokens=st.max_new_tokens, eos_token_id=st.eos_token_id,
                  pad_token_id=st.pad_token_id, min_new_tokens=st.min_new_tokens,
                  forced_bos_token_id=st.forced_bos_token_id, forced_eos_token_id=st.forced_eos_token_id,
                  suppress_tokens=st.suppress_tokens, length_penalty=st.length_penalty,
                  length_penalty_style=st.length_penalty_style)
    start = jnp.full((batch,), st.decoder_start_token_id, jnp.int32)
    enc_rows, mask_rows = expand_rows(enc, rows), expand_rows(attention_mask, rows)
    if st.num_beams > 1:
        # The cache is built for B rows (cross-attention K/V computed once per input) and
        # beam_search repeats it; the closure sees the B*K rows.
        cache = _constrain_batch(model.init_cache(batch, st.max_new_tokens, enc, attention_mask), mesh, batch_spec)
    else:
        cache = _constrain_batch(
            model.init_cache(batch * rows, st.max_new_tokens, enc_rows, mask_rows), mesh, batch_spec)
        start = jnp.repeat(start, rows)

    # The LM head weight as [D, V], laid out once, outside the loop: a tied head is the embedding
    # [V, D] transposed, and XLA CPU re-lays it out (or runs a slower dot) on every step otherwise.
    if head is None:
        head = model.unembedding()

    def tokens_to_logits(tokens, cache):
        logits, new_cache = model.decode(tokens, enc_rows, mask_rows, cache=cache, unembedding=head)
        # Constrain only the leaves the step rewrote: untouched ones (cross-attention K/V) keep
        # their identity, which tells beam_search that it need not reorder them.
        old_leaves = jax.tree.leaves(cache)
        new_leaves, treedef = jax.tree.flatten(new_cache)
        new_leaves = [n if n is o else _constrain_batch(n, mesh, batch_spec)
                      for n, o in zip(new_leaves, old_leaves)]
        return logits[:, -1], jax.tree.unflatten(treedef, new_leaves)

    if st.num_beams > 1:
        out = decoding.beam_search(tokens_to_logits, start, cache, num_beams=st.num_beams,
                                   num_return_sequences=st.num_return_sequences,
                                   early_stopping=st.early_stopping, gather=st.gather, **common)
    elif st.do_sample:
        out = decoding.sample(tokens_to_logits, start, cache, jax.random.key(seed), temperature=st.temperature,
                              top_k=st.top_k, top_p=st.top_p, **common)
    else:
        out = decoding.greedy_search(tokens_to_logits, start, cache, **common)
    if out.sequences.shape[0] != batch:  # samples: [B*n, 1, L] -> [B, n, L]
        out = jax.tree.map(lambda x: x.reshape((batch, rows) + x.shape[2:]), out)
    return _constrain_batch(out, mesh, batch_spec, rest=None)  # outputs: rows over the data axes


@functools.cache
def _generate_jit(nested: bool = False):
    # Built on first use: compiler_options() asks for the backend, which must not start at import
    # (jax.distributed.initialize has to come first on multi-host runs). Compiler options are for
    # top-level jits only; inside a caller's jit (the generation job's step) they are the caller's.
    # One jit for every model: its cache keys on the static graph, settings and mesh, not weights.
    from kd_flax import sharding
    return jax.jit(_generate_impl, static_argnames=("graphdef", "settings", "mesh", "batch_spec"),
                   compiler_options=None if nested else sharding.compiler_options())


def _default_mask(input_ids, settings: GenerationSettings):
    """HF's inferred attention mask: non-pad positions when pad is a distinct token, else all ones."""
    if settings.pad_token_id not in settings.eos_token_id:
        return (input_ids != settings.pad_token_id).astype(jnp.int32)
    return jnp.ones_like(input_ids, dtype=jnp.int32)


def _check_inputs(input_ids, attention_mask):
    shape = np.shape(input_ids)
    if len(shape) != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {shape}")
    if attention_mask is not None and np.shape(attention_mask) != shape:
        raise ValueError(f"attention_mask shape {np.shape(attention_mask)} != input_ids shape {shape}")


def _mesh_layout(mesh, rules):
    """(mesh with Auto axes, rules, input sharding [B, T], batch PartitionSpec entry, data shards)."""
    from kd_flax import sharding as shd

    mesh = shd.auto_axes(mesh)
    rules = shd.DEFAULT_RULES if rules is None else rules
    data_sh = shd.batch_sharding(mesh, rules, ndim=2)
    batch_spec = data_sh.spec[0] if len(data_sh.spec) else None
    names = batch_spec if isinstance(batch_spec, tuple) else (batch_spec,)
    n_shards = int(np.prod([mesh.shape[a] for a in names if a is not None]))
    return mesh, rules, data_sh, batch_spec, n_shards


def _check_divisible(batch: int, n_shards: int, batch_spec) -> None:
    if batch % n_shards:
        raise ValueError(f"input_ids batch {batch} must be divisible by the {n_shards} data shards "
                         f"of the mesh (axes {batch_spec})")


def _place(x, sharding):
    """A host or device array on `sharding`; host arrays via a callback, which is multi-process
    safe (every process passes the same global value and keeps its own shards)."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _to_host(x) -> np.ndarray:
    """A (possibly multi-host sharded) array -> the full numpy array on every process."""
    if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int, num_beams: int | None = None,
             num_return_sequences: int | None = None, length_penalty: float | None = None,
             early_stopping: bool | str | None = None, min_new_tokens: int | None = None,
             do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, mesh=None, rules=None, unembedding=None,
             **extra) -> GenerateOutput:
    """Generate with a `kd_flax.models` encoder-decoder; jitted, one compilation per input shape,
    settings and mesh (the model enters as graphdef + state, so no weights are kept).

    Settings left as None come from ``model.generation_config``, then ``model.config``, then the
    defaults num_beams=1, num_return_sequences=1, length_penalty=1.0, early_stopping=True,
    min_new_tokens=0, do_sample=False, temperature=1.0, top_k=0 (off), top_p=1.0 (off).
    `extra` may set: length_penalty_style ("hf"|"gnmt"), eos_token_id, pad_token_id,
    decoder_start_token_id, forced_bos_token_id, forced_eos_token_id, suppress_tokens,
    min_length, bad_words_ids (single tokens), gather ("take"|"one_hot").
    With `mesh` (and optional logical `rules`, default `kd_flax.sharding.DEFAULT_RULES`): weights
    placed by the rules (tensor parallel over the model axis when they say so), rows and outputs
    over the data axes, the KV cache constrained alike; the batch must divide by the data shards.
    `unembedding`: the LM head as ``model.unembedding()`` returns it, for a caller that wraps
    `generate` in its own jit (`Translator.head_for`); else it is laid out inside, on every call
    (25-55 ms for a T5-small tied head on CPU: decode repeatedly with a `Translator`).

    Returns `GenerateOutput`: sequences [B, n, max_new_tokens] (no decoder-start token, pad after
    EOS), scores / sum_logprobs / lengths [B, n]; n = num_return_sequences.
    """
    from flax import nnx

    settings = resolve_settings(model, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                num_return_sequences=num_return_sequences, length_penalty=length_penalty,
                                early_stopping=early_stopping, min_new_tokens=min_new_tokens,
                                do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                **extra)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    _check_inputs(input_ids, attention_mask)
    mask = (_default_mask(input_ids, settings) if attention_mask is None
            else jnp.asarray(attention_mask, jnp.int32))
    graphdef, state = nnx.split(model)
    graph = _StaticGraph(graphdef)
    if mesh is None:
        nested = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((input_ids, mask, state)))
        return _generate_jit(nested)(graph, state, input_ids, mask, jnp.int32(seed),
                                     unembedding, settings=settings)
    if unembedding is not None:
        raise ValueError("generate(unembedding=) is for unsharded calls; with mesh= the LM head is "
                         "laid out inside the sharded function")
    from kd_flax import sharding as shd

    mesh, rules, data_sh, batch_spec, n_shards = _mesh_layout(mesh, rules)
    _check_divisible(input_ids.shape[0], n_shards, batch_spec)
    # A no-op placement when the weights already live on the mesh (`kd_flax.sharding.shard_model`).
    state = jax.device_put(state, shd.param_shardings(state, mesh, rules))
    ids, mask = _place(input_ids, data_sh), _place(mask, data_sh)
    # The mesh and rules are visible to the model's own activation constraints while tracing.
    with jax.set_mesh(mesh), shd.use_rules(rules):
        return _generate_jit()(graph, state, ids, mask, jnp.int32(seed), None, settings=settings,
                               mesh=mesh, batch_spec=batch_spec)


def _generated_tokens(seqs: np.ndarray, eos_id: int | None, pad_id: int | None) -> int:
    """Tokens produced per row up to and including EOS (pad after EOS is not counted)."""
    total = 0
    for row in seqs:
        if eos_id is not None and (row == eos_id).any():
            total += int(np.argmax(row == eos_id)) + 1
        elif pad_id is not None:
            total += int((row != pad_id).sum())
        else:
            total += row.size
    return total


def hit_max_new_tokens(seqs: np.ndarray, eos_id) -> np.ndarray:
    """Per hypothesis of `seqs` (``[..., max_new_tokens]``, as `generate` returns them): True
    where it has no EOS, i.e. decoding stopped at `max_new_tokens` (a runaway loop, or a limit
    too short for the sentence). `eos_id`: one id or several; None: nothing can end a row."""
    seqs = np.asarray(seqs)
    if eos_id is None:
        return np.ones(seqs.shape[:-1], bool)
    return ~np.isin(seqs, np.atleast_1d(np.asarray(eos_id))).any(-1)


def _weak(x):
    try:
        return weakref.ref(x)
    except TypeError:  # a plain Python leaf: compared as is
        return lambda: x


class Translator:
    """One model, one set of decoding settings: padded id batches or texts in, outputs back.

    Owns, as attributes, what repeated decoding reuses (the Flax gemma sampler's pattern):
    its jitted function (one compilation per ``[batch, bucket_length]`` input shape;
    `compilations()` counts them) and, on CPU, the LM head laid out once per set of weights
    (`head_for`). Nothing is cached at module level: dropping the Translator and the model
    frees both, compiled function and head included.

    Args:
      model: a `kd_flax.models` encoder-decoder; with `generate_fn`, also a plain pytree of
        arrays (a stand-in model).
      tokenizer: a Hugging Face tokenizer, used by `translate` (None to decode ids only).
      settings: `kd_flax.decoding.GenerationSettings`, or `generate`'s keywords
        (``max_new_tokens`` required) resolved against the model by `resolve_settings`.
      mesh, rules: decode sharded: `jax.jit` with `NamedSharding`s, weights by the logical
        `rules` (default `kd_flax.sharding.DEFAULT_RULES`), rows over the mesh's data axes.
      batch_size, source_prefix, max_source_length, bucket_boundaries: how `translate`
        tokenizes and batches (`kd_flax.data.tokenize_examples` and `generation_batches`;
        with a mesh, batch_size is rounded up to a multiple of the data shards).
      generate_fn: a stand-in decoder ``(model, input_ids, attention_mask, *, seed, **settings)
        -> .sequences/.scores/.sum_logprobs`` (tests), jitted here like the real one; `settings`
        (a mapping) then goes to it as is.
    """

    def __init__(self, model, tokenizer, settings: GenerationSettings | Mapping[str, Any],
                 mesh=None, rules=None, *, batch_size: int = 32, source_prefix: str = "",
                 max_source_length: int = 512, bucket_boundaries: Sequence[int] = (16, 32, 64, 128),
                 generate_fn: Callable | None = None):
        from flax import nnx

        from kd_flax import sharding as shd

        if generate_fn is None and not isinstance(model, nnx.Module):
            raise ValueError(f"Translator: model must be a kd_flax (nnx) model, got {type(model).__name__}; "
                             "a stand-in pytree needs a stand-in generate_fn")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        if generate_fn is None:
            self.settings = (settings if isinstance(settings, GenerationSettings)
                             else resolve_settings(model, **dict(settings)))
        else:
            self.settings = dict(settings.to_dict() if isinstance(settings, GenerationSettings) else settings)
        self.batch_size, self.source_prefix = int(batch_size), source_prefix or ""
        self.max_source_length = int(max_source_length)
        self.boundaries = data_lib.normalize_boundaries(bucket_boundaries, self.max_source_length)
        self._graphdef = nnx.graphdef(model) if isinstance(model, nnx.Module) else None
        self._head = None  # (weak refs to the weights' leaves, their laid-out LM head)
        self._shapes: set[tuple[int, ...]] = set()  # input shapes run (compiled) so far
        self._traces = [0]
        self.mesh = self.rules = None
        self.data_shards, batch_spec = 1, None
        if mesh is not None:
            self.mesh, self.rules, self._data_sh, batch_spec, self.data_shards = _mesh_layout(mesh, rules)
            state = self._state()
            self._state_sh = (shd.param_shardings(state, self.mesh, self.rules) if self._graphdef is not None
                              else jax.tree.map(lambda x: x.sharding, state))
        self._batch_spec = batch_spec
        self._custom = generate_fn is not None
        self._jitted = self._build(generate_fn)

    def _build(self, generate_fn):
        """The jitted ``(state, head, input_ids, attention_mask, seed) -> (sequences, scores,
        sum_logprobs)``. It closes over static things only (graph, settings, mesh)."""
        from flax import nnx

        from kd_flax import sharding as shd

        graphdef, settings, traces = self._graphdef, self.settings, self._traces
        mesh, batch_spec = self.mesh, self._batch_spec

        def step(state, head, input_ids, attention_mask, seed):
            traces[0] += 1  # runs while tracing only: counts compilations
            if generate_fn is None:
                out = _generate_impl(graphdef, state, input_ids, attention_mask, seed, head,
                                     settings=settings, mesh=mesh, batch_spec=batch_spec)
            else:
                model = state if graphdef is None else nnx.merge(graphdef, state)
                out = generate_fn(model, input_ids, attention_mask, seed=seed, **settings)
            return out.sequences, out.scores, out.sum_logprobs

        if mesh is None:
            return jax.jit(step, compiler_options=shd.compiler_options())
        rows3, rows2 = NamedSharding(mesh, P(batch_spec, None, None)), NamedSharding(mesh, P(batch_spec, None))
        return jax.jit(step, in_shardings=(self._state_sh, None, self._data_sh, self._data_sh,
                                           NamedSharding(mesh, P())),
                       out_shardings=(rows3, rows2, rows2), compiler_options=shd.compiler_options())

    def compilations(self) -> int:
        """How many times this Translator's function was compiled (traced)."""
        return self._traces[0]

    def _state(self, state=None):
        """The weights to decode with: `state`, else the model's current ones."""
        from flax import nnx

        if state is not None:
            return state
        return nnx.state(self.model) if self._graphdef is not None else self.model

    def head_for(self, state=None):
        """``model.unembedding()`` for these weights (default: the model's), laid out once per set
        of weights, or None where the jitted function lays it out itself (or a stand-in
        `generate_fn` decodes).

        A tied head is the embedding [V, D] transposed to [D, V]. XLA CPU takes 25-55 ms for
        T5-small's 32k x 512 (4 % of a greedy batch of 32) and would redo it on every batch. The
        copy is kept while every leaf of the weights is the same array (new weights, new copy).
        Only unsharded on CPU: elsewhere the transpose is cheap and a second copy of a big
        embedding would cost device memory.
        """
        from flax import nnx

        if self._custom or self._graphdef is None or self.mesh is not None or jax.default_backend() != "cpu":
            return None
        state = self._state(state)
        leaves = jax.tree.leaves(state)
        if self._head is not None:
            refs, head = self._head
            if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
                return head
        head = nnx.merge(self._graphdef, state).unembedding()
        if any(head[0] is x for x in leaves):  # an untied head is a weight already: nothing to keep
            return head
        self._head = ([_weak(x) for x in leaves], head)
        return head

    def __call__(self, input_ids, attention_mask, seed: int = 0, *, state=None):
        """Decode one padded batch: ``[B, T]`` ids and mask (B divisible by `data_shards`) ->
        ``(sequences [B, n, L] int32, scores [B, n], sum_logprobs [B, n])`` as numpy arrays on
        every process. `seed` seeds sampling; `state` (an `nnx.State` of the same model
        structure, e.g. ``nnx.state(model)`` after training steps) replaces the model's weights
        for this call, with no new compilation."""
        state = self._state(state)
        return self._run(state, self.head_for(state), input_ids, attention_mask, seed)

    def _run(self, state, head, input_ids, attention_mask, seed):
        _check_inputs(input_ids, attention_mask)
        seed = np.int32(seed)
        if self.mesh is None:
            out = self._jitted(state, head, jnp.asarray(input_ids, jnp.int32),
                               jnp.asarray(attention_mask, jnp.int32), seed)
        else:
            from kd_flax import sharding as shd

            _check_divisible(np.shape(input_ids)[0], self.data_shards, self._batch_spec)
            state = jax.device_put(state, self._state_sh)  # a no-op when the weights already live there
            ids = _place(np.asarray(input_ids, np.int32), self._data_sh)
            mask = _place(np.asarray(attention_mask, np.int32), self._data_sh)
            with jax.set_mesh(self.mesh), shd.use_rules(self.rules):
                out = self._jitted(state, None, ids, mask, seed)
        self._shapes.add(tuple(np.shape(input_ids)))
        return tuple(_to_host(x) for x in out)

    def translate(self, texts: Sequence[str], *, state=None, meter=None) -> list[str]:
        """Translate `texts` -> one string per text (the best sequence, special tokens skipped).

        Texts get `source_prefix`, are truncated to `max_source_length` tokens (EOS kept),
        sorted into length buckets and padded to ``[batch_size, bucket_length]``
        (`kd_flax.data.generation_batches`), so each bucket compiles once. `state`: other
        weights, as in `__call__`. `meter` (a `kd_flax.metrics.SpeedMeter`) receives each
        batch's sentences, generated tokens, wall time and how many of its hypotheses hit
        `max_new_tokens` without EOS (`hit_max_new_tokens`); a shape's first batch is then run
        once untimed before, so that no timed batch includes its compilation.
        """
        if isinstance(texts, str):
            raise ValueError("texts: expected a list of strings, got one string")
        if not texts:
            return []
        if self.tokenizer is None:
            raise ValueError("Translator.translate needs a tokenizer (Translator(model, tokenizer, ...))")
        tok = self.tokenizer
        config = getattr(self.model, "config", None)
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else getattr(config, "pad_token_id", 0) or 0
        eos_id = getattr(config, "eos_token_id", tok.eos_token_id)
        examples = data_lib.tokenize_examples([corpus_lib.Example(i, t) for i, t in enumerate(texts)], tok,
                                              max_source_length=self.max_source_length,
                                              source_prefix=self.source_prefix)
        batch_size = -(-self.batch_size // self.data_shards) * self.data_shards
        state = self._state(state)
        head = self.head_for(state)
        out: list[str | None] = [None] * len(texts)
        for batch in data_lib.generation_batches(examples, batch_size, self.boundaries, pad_id):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if meter is not None and ids.shape not in self._shapes:
                self._run(state, head, ids, mask, 0)  # compile outside the timed call
            t0 = time.perf_counter()
            seqs = self._run(state, head, ids, mask, 0)[0]
            seconds = time.perf_counter() - t0
            rows = np.flatnonzero(batch["valid"])
            best = seqs[rows, 0]
            for r, text in zip(rows, tok.batch_decode(best.tolist(), skip_special_tokens=True)):
                out[batch["rows"][r]] = text.strip()
            if meter is not None:
                meter.add(len(rows), _generated_tokens(best, eos_id, pad_id), seconds,
                          hit_max=int(hit_max_new_tokens(best, eos_id).sum()))
        return out  # type: ignore[return-value]
