"""Loss-curve parity: kd_flax's train step vs a transformers PyTorch T5 or mBART (issue 16).

Question answered: is there a training inefficiency in kd_flax itself? If kd_flax's model,
loss, gradient and optimizer step are all right, a kd_flax T5 and a transformers
`T5ForConditionalGeneration` that start from the *same weights*, see the *same batches* and
use the *same optimizer* must trace the same loss curve up to float32 noise. Any gap early
on points at one component, so the script also compares, on the first batch, the loss, the
gradient of every tensor and the parameters after one update.

`--arch mbart` runs the same comparison for kd_flax's BART-family model with
`model_type="mbart"` (pre-LN, final encoder/decoder layer_norm, layernorm_embedding, learned
positions with the offset of 2, `scale_embedding`, tied embeddings + `final_logits_bias`)
against transformers' `MBartForConditionalGeneration`. The config is the multi30k recipe's
(`configs/multi30k_enfr.py`, `model(...)`): relu, `scale_embedding=True`,
`max_position_embeddings=64` (so `--src_len/--tgt_len` <= 64), all dropouts 0, no forced EOS,
with the script's ids (pad 0, eos 1, decoder start 0, bos 0); `--d_model --d_ff --heads
--enc_layers --dec_layers --vocab --untied` size it (`--ff` is its `activation_function`;
`--d_kv` is ignored: head dim = d_model / heads). Weights go kd_flax -> HF exactly as for
T5 (`save_pretrained`, then `from_pretrained` with no missing/unexpected keys). Two
training-time differences between the libraries are removed on the torch side, so the
comparison is exact and measures kd_flax's *own* behaviour:
  * `final_logits_bias`: transformers registers it as a buffer (never trained); kd_flax
    makes it a Param that is trained (like every bias, without weight decay). The torch
    copy is turned into an `nn.Parameter` that the same name rule exempts from decay.
  * the pad row of the token embedding: transformers' `nn.Embedding(padding_idx=pad)` gives
    the looked-up pad row no gradient; kd_flax's lookup does (here it matters: pad is also
    the decoder start token, so every target's first input is that row). torch's
    `padding_idx` is cleared. (The row still gets the tied LM head's gradient on both sides.)
The attention key biases (`k_proj.bias`, mBART only: T5 has no biases) are left out of the
per-tensor comparisons: their exact gradient is 0 (a key bias adds the same q.b to every
score of a query, which the softmax cancels), so both sides hold float noise there (~1e-12,
printed on the first-batch line), which Adam scales into lr-sized random steps of a tensor
that does not change the model's outputs.

Both sides are deterministic: dropout is 0 (kd_flax also gets no dropout key effect at rate 0;
torch runs `model.train()` with p=0), label smoothing 0, a constant learning rate with no
warmup (kd_flax's `make_schedule` with `warmup_steps=0, schedule="constant"` is exactly
`lr`, which torch reproduces without any scheduler).

The optimizer is kd_flax's `make_optimizer` AdamW: global-norm clipping, then
`optax.adamw(b1, b2, eps=1e-8, weight_decay, mask=decay_mask)`. Torch gets
`clip_grad_norm_` + `torch.optim.AdamW` with the same betas / eps and two parameter
groups built with the same rule as `kd_flax.train.decay_mask` (no decay on biases or on any
norm's parameters); the script checks that both rules select the same number of elements.
Known, intended difference: torch's clip divides by `norm + 1e-6`, optax by `norm` (a
~1e-6/norm relative difference in the clipped update, below float32 step noise).

Data: by default a synthetic but *learnable* task (random Zipf-distributed source tokens;
the target is a fixed token permutation of the source, ending in EOS) so the loss actually
falls and the curves test learning dynamics, not a flat log(V) line. With `--data DIR`
(Multi30k-style `train.en[.gz]` / `train.fr[.gz]`) a small unigram tokenizer is trained on
the first lines and real sentence pairs are used. Each batch is built once in numpy and the
identical arrays (including `decoder_input_ids` — labels shifted right behind
`decoder_start_token_id`=0 — and both masks) go to both sides.

Loss on both sides: sum of token NLL over non-pad target tokens / their count (kd_flax's
`(sum, count)` CE term, `objectives.combine`); torch computes it from the logits by hand so
no HF loss convention (ignore_index, reduction) can differ silently.

Run (CPU, ~minutes with the defaults):

    .venv/bin/python benchmarks/loss_curve_parity.py [--steps 200 --batch 32 --csv curves.csv]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import re
import tempfile
import time

import numpy as np


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--arch", choices=("t5", "mbart"), default="t5",
      help="t5: T5 (v1.0/v1.1) vs T5ForConditionalGeneration; mbart: the multi30k recipe's mBART "
           "vs MBartForConditionalGeneration")
    a("--steps", type=int, default=200)
    a("--batch", type=int, default=32)
    a("--src_len", type=int, default=16)
    a("--tgt_len", type=int, default=16)
    a("--lr", type=float, default=1e-3)
    a("--weight_decay", type=float, default=0.01, help="non-zero so the decay masking is exercised")
    a("--b1", type=float, default=0.9)
    a("--b2", type=float, default=0.98)
    a("--clip", type=float, default=1.0, help="global-norm clip (0 = off)")
    a("--d_model", type=int, default=128)
    a("--d_ff", type=int, default=512)
    a("--d_kv", type=int, default=32, help="t5 only (mbart: d_model / heads)")
    a("--heads", type=int, default=4)
    a("--enc_layers", type=int, default=2)
    a("--dec_layers", type=int, default=2)
    a("--vocab", type=int, default=1000)
    a("--ff", default="relu", help="t5: feed_forward_proj, relu (T5 v1.0) or gated-gelu (v1.1); "
                                   "mbart: activation_function (relu, like the recipe)")
    a("--untied", action="store_true", help="separate lm_head (default: tied, like T5 v1.0)")
    a("--seed", type=int, default=0)
    a("--log_every", type=int, default=10)
    a("--data", default=None, help="dir with train.en[.gz]/train.fr[.gz] (optional)")
    a("--data_lines", type=int, default=20000, help="sentence pairs read from --data")
    a("--csv", default=None, help="write step,kd_flax_loss,torch_loss,... here")
    a("--threads", type=int, default=0, help="torch intra-op threads (0 = torch default)")
    a("--no_control", action="store_true",
      help="skip the noise-floor control (kd_flax again from params perturbed by 1e-7 relative)")
    return p.parse_args()


# ---------------------------------------------------------------------------
# Batches (numpy, shared by both sides)
# ---------------------------------------------------------------------------

PAD, EOS, START = 0, 1, 0  # T5 ids: pad 0, eos 1, decoder_start_token_id = pad


def make_batch(src_rows, tgt_rows, src_len, tgt_len):
    """Right-padded arrays in kd_flax's batch format from lists of id rows (EOS-terminated)."""
    b = len(src_rows)
    src = np.full((b, src_len), PAD, np.int32)
    lab = np.full((b, tgt_len), PAD, np.int32)
    for i, (s, t) in enumerate(zip(src_rows, tgt_rows)):
        src[i, :len(s)] = s
        lab[i, :len(t)] = t
    src_mask = (src != PAD).astype(np.int32)
    dec_mask = (lab != PAD).astype(np.int32)
    # T5 shift-right: decoder input = [start] + labels[:-1]; zeroed (= pad) past the target.
    dec_in = np.concatenate([np.full((b, 1), START, np.int32), lab[:, :-1]], 1) * dec_mask
    return {"input_ids": src, "attention_mask": src_mask, "labels": lab,
            "decoder_input_ids": dec_in, "decoder_attention_mask": dec_mask,
            "loss_mask": np.ones((b,), np.float32)[:, None] * dec_mask.astype(np.float32)}


def synthetic_batches(args):
    """Learnable random task: Zipf source tokens, target = perm[source] + EOS; lengths vary."""
    rng = np.random.default_rng(args.seed)
    ids = np.arange(2, args.vocab)  # never pad/eos inside a sentence
    perm = rng.permutation(ids)
    table = np.zeros(args.vocab, np.int64)
    table[ids] = perm
    zipf = 1.0 / np.arange(1, len(ids) + 1)
    zipf /= zipf.sum()
    max_len = min(args.src_len, args.tgt_len) - 1
    for step in range(args.steps):
        r = np.random.default_rng((args.seed, step))
        lens = r.integers(max(1, max_len // 3), max_len + 1, args.batch)
        srcs = [np.append(r.choice(ids, n, p=zipf), EOS) for n in lens]
        tgts = [np.append(table[s[:-1]], EOS) for s in srcs]
        yield make_batch(srcs, tgts, args.src_len, args.tgt_len)


def _read_lines(path, n):
    for cand in (path, path + ".gz"):
        if os.path.exists(cand):
            opener = gzip.open if cand.endswith(".gz") else open
            with opener(cand, "rt", encoding="utf-8") as f:
                return [line.rstrip("\n") for _, line in zip(range(n), f)]
    raise FileNotFoundError(path + "[.gz]")


def data_setup(args):
    """Tokenizer trained on the first `--data_lines` en+fr lines; returns (vocab, batch iterator)."""
    from kd_flax import data as data_lib
    from kd_flax import models

    en = _read_lines(os.path.join(args.data, "train.en"), args.data_lines)
    fr = _read_lines(os.path.join(args.data, "train.fr"), args.data_lines)
    tok = models.train_tokenizer(en + fr, args.vocab)
    src, _ = data_lib.encode_texts(en, tok, args.src_len)
    tgt, _ = data_lib.encode_texts(fr, tok, args.tgt_len)
    assert tok.pad_token_id == PAD and tok.eos_token_id == EOS, (tok.pad_token_id, tok.eos_token_id)
    order = np.random.default_rng(args.seed).permutation(len(src))

    def gen():
        for step in range(args.steps):
            idx = order[(np.arange(args.batch) + step * args.batch) % len(order)]
            yield make_batch([src[i] for i in idx], [tgt[i] for i in idx], args.src_len, args.tgt_len)
    return len(tok), gen()


# ---------------------------------------------------------------------------
# Both trainers
# ---------------------------------------------------------------------------

def train_block(args):
    """kd_flax's train block (format of tests/test_train.py): plain CE + AdamW, constant LR."""
    import ml_collections
    return ml_collections.ConfigDict({
        "steps": args.steps, "batch_size": args.batch, "grad_accum": 1, "dtype": "float32",
        "optimizer": {"name": "adamw", "learning_rate": args.lr, "warmup_steps": 0, "schedule": "constant",
                      "weight_decay": args.weight_decay, "grad_clip_norm": args.clip,
                      "b1": args.b1, "b2": args.b2},
        "loss": {"ce_weight": 1.0, "label_smoothing": 0.0, "smoothing": "fairseq", "kd_weight": 0.0,
                 "kd_type": "kl", "temperature": 1.0, "lam": 0.5, "beta": 0.5, "fused": False,
                 "hidden_weight": 0.0, "attention_weight": 0.0},
    })


def hf_no_decay(name: str) -> bool:
    """kd_flax.train.decay_mask's rule on an HF tensor name: biases (`*bias`) and any *norm* are exempt."""
    parts = name.split(".")
    return parts[-1].endswith("bias") or any("norm" in p for p in parts)


def torch_optimizer(tmodel, args):
    import torch
    decay, no_decay = [], []
    for name, prm in tmodel.named_parameters():  # tied tensors appear once
        (no_decay if hf_no_decay(name) else decay).append(prm)
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.b1, args.b2), eps=1e-8)
    return opt, sum(p.numel() for p in decay)


def torch_loss(tmodel, tb):
    """Mean token NLL over non-pad targets (sum / count), from the logits."""
    import torch
    logits = tmodel(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"],
                    decoder_input_ids=tb["decoder_input_ids"],
                    decoder_attention_mask=tb["decoder_attention_mask"]).logits
    nll = -torch.log_softmax(logits.float(), -1).gather(-1, tb["labels"].unsqueeze(-1)).squeeze(-1)
    w = tb["loss_mask"]
    return (nll * w).sum() / w.sum()


def kd_config(args):
    """kd_flax config of `--arch` at the command line's size."""
    from kd_flax import models
    if args.arch == "t5":
        overrides = {}
        if args.untied:
            overrides.update(tie_word_embeddings=False, scale_decoder_outputs=False)
        return models.tiny_config("t5", vocab_size=args.vocab, d_model=args.d_model, d_ff=args.d_ff,
                                  d_kv=args.d_kv, num_heads=args.heads, encoder_layers=args.enc_layers,
                                  decoder_layers=args.dec_layers, relative_attention_num_buckets=32,
                                  relative_attention_max_distance=128, feed_forward_proj=args.ff,
                                  dropout_rate=0.0, **overrides)
    # The multi30k recipe's own model dict (configs/multi30k_enfr.py `model_dict`), at this size,
    # through the recipe's own path (config_from_dict).
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "multi30k_enfr", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "configs", "multi30k_enfr.py"))
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    d = dict(recipe.model_dict("mbart", args.d_model, args.enc_layers, args.dec_layers, args.heads, args.d_ff, 0.0),
             vocab_size=args.vocab, activation_function=args.ff,
             attention_dropout=0.0, activation_dropout=0.0,  # BartConfig's defaults; explicit here
             pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START, bos_token_id=0)
    if args.untied:
        d["tie_word_embeddings"] = False
    return models.config_from_dict(d, tokenizer=None)


# transformers class of each arch, and its config fields that must be 0 for a deterministic run.
HF_CLASS = {"t5": "T5ForConditionalGeneration", "mbart": "MBartForConditionalGeneration"}
HF_ZERO = {"t5": ("dropout_rate",),
           "mbart": ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop",
                     "decoder_layerdrop")}


# Tensors whose exact gradient is 0 (softmax shift invariance: see the module docstring); the
# per-tensor comparisons skip them (they only hold float noise on both sides).
ZERO_GRAD = re.compile(r"\.k_proj\.bias$")


def build_models(args):
    """(kd_flax model, transformers torch model) of `--arch` with the same weights."""
    import torch
    import transformers
    from flax import nnx

    from kd_flax import models

    model = models.create_model(kd_config(args), nnx.Rngs(args.seed))
    # Same weights: kd_flax's own HF export, loaded by transformers (no missing/unexpected keys).
    with tempfile.TemporaryDirectory() as d:
        models.save_pretrained(model, d)
        tmodel, info = getattr(transformers, HF_CLASS[args.arch]).from_pretrained(
            d, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"HF load not clean: {bad}"
    for k in HF_ZERO[args.arch]:
        assert getattr(tmodel.config, k) == 0.0, (k, getattr(tmodel.config, k))
    if args.arch == "mbart":  # make torch train what kd_flax trains (see the module docstring)
        tmodel.final_logits_bias = torch.nn.Parameter(tmodel.final_logits_bias.detach().clone())
        if not tmodel.config.tie_word_embeddings:
            # Untied, transformers keeps an unused `model.shared` (kd_flax exports the encoder table
            # under that name too): alias it to the encoder's table so it is one tensor, as in kd_flax.
            assert torch.equal(tmodel.model.shared.weight, tmodel.model.encoder.embed_tokens.weight)
            tmodel.model.shared = tmodel.model.encoder.embed_tokens
        for m in tmodel.modules():
            if isinstance(m, torch.nn.Embedding):
                m.padding_idx = None
    tmodel.train()  # dropout p=0: deterministic, but the training code path
    return model, tmodel


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    args = parse_args()
    import jax
    import torch
    from flax import nnx

    from kd_flax import train as T
    from kd_flax.models import hf

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    if args.data:
        args.vocab, batches = data_setup(args)
    else:
        batches = synthetic_batches(args)

    model, tmodel = build_models(args)

    tcfg = train_block(args)
    step = T.make_train_step(model, tcfg)
    state = T.init_train_state(nnx.state(model, nnx.Param), tcfg, seed=args.seed)
    # Noise-floor control: the same kd_flax step from params perturbed by ~1 float32 ulp. Training
    # is chaotic (Adam turns tiny gradient differences into full-size updates), so float noise
    # alone grows along the curve; kd_flax-vs-torch is only meaningful relative to this.
    ctrl = None
    if not args.no_control:
        keys = iter(jax.random.split(jax.random.key(args.seed + 1), len(jax.tree.leaves(state.params))))
        ctrl = T.init_train_state(jax.tree.map(lambda x: x * (1 + 1e-7 * jax.random.normal(next(keys), x.shape)),
                                               state.params), tcfg, seed=args.seed)
    opt, torch_decay_n = torch_optimizer(tmodel, args)
    mask = T.decay_mask(state.params)
    kd_decay_n = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(mask)) if m)
    assert kd_decay_n == torch_decay_n, f"decay groups differ: kd_flax {kd_decay_n} vs torch {torch_decay_n} elements"

    tparams = dict(tmodel.named_parameters(remove_duplicate=False))  # every HF alias of a tied tensor

    def kd_tensors(tree):
        """A Param-shaped tree (params or grads) as {HF name: numpy} via kd_flax's name table."""
        nnx.update(model, jax.tree.map(lambda x: jax.numpy.array(x, copy=True), tree))
        return hf.export_tensors(model)

    def compare(kd_tree, torch_of):
        """Max over tensors of relative L2 error, and the worst tensor's name."""
        errs = {n: rel(a, torch_of(tparams[n]).detach().numpy()) for n, a in kd_tensors(kd_tree).items()
                if n in tparams and not ZERO_GRAD.search(n)}
        worst = max(errs, key=errs.get)
        return errs[worst], worst

    header = f"{'step':>5} {'kd_flax':>10} {'torch':>10} {'abs diff':>10} {'rel diff':>10} {'gnorm kd':>9} {'gnorm pt':>9} {'ctrl rel':>9}"
    if args.arch == "t5":
        arch = (f"T5 d_model={args.d_model} d_ff={args.d_ff} layers={args.enc_layers}+{args.dec_layers} "
                f"heads={args.heads} d_kv={args.d_kv} vocab={args.vocab} ff={args.ff} tied={not args.untied}")
    else:
        arch = (f"mBART d_model={args.d_model} ffn={args.d_ff} layers={args.enc_layers}+{args.dec_layers} "
                f"heads={args.heads} vocab={args.vocab} act={args.ff} tied={not args.untied} "
                f"scale_embedding max_pos=64")
    print(f"{arch} | "
          f"batch={args.batch} src/tgt_len={args.src_len}/{args.tgt_len} lr={args.lr} wd={args.weight_decay} "
          f"b=({args.b1},{args.b2}) clip={args.clip} | data={'multi30k:' + args.data if args.data else 'synthetic'} "
          f"| {sum(p.numel() for p in tmodel.parameters())} params")
    print(header)

    rows, kd_times, pt_times = [], [], []
    for i, b in enumerate(batches):
        tb = {k: torch.as_tensor(v, dtype=torch.float32 if k == "loss_mask" else torch.long) for k, v in b.items()}

        if i == 0:  # component check on the first batch: gradients before any update
            _, _, g, _, _ = jax.jit(step.compute_grads)(state.params, {k: jax.numpy.asarray(v) for k, v in b.items()},
                                               None, state.step, state.rng)
            opt.zero_grad(set_to_none=True)
            torch_loss(tmodel, tb).backward()
            grad_err, grad_worst = compare(g, lambda p: p.grad)
            zero_g = [(float(np.linalg.norm(a)), float(tparams[n].grad.norm())) for n, a in kd_tensors(g).items()
                      if ZERO_GRAD.search(n)]
            del g

        t0 = time.perf_counter()
        state, m = step(state, b)
        kd_loss, kd_gn = float(m["loss"][0]), float(m["grad_norm"][0])  # float() blocks until ready
        kd_times.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(tmodel, tb)
        loss.backward()
        pt_gn = float(torch.nn.utils.clip_grad_norm_(tmodel.parameters(), args.clip)) if args.clip > 0 else float("nan")
        opt.step()
        pt_loss = loss.item()
        pt_times.append(time.perf_counter() - t0)

        c_rel = float("nan")
        if ctrl is not None:
            ctrl, cm = step(ctrl, b)
            c_rel = abs(float(cm["loss"][0]) - kd_loss) / abs(kd_loss)
        if i == 0:
            upd_err, upd_worst = compare(state.params, lambda p: p)
        diff = abs(kd_loss - pt_loss)
        rows.append((i + 1, kd_loss, pt_loss, diff, diff / abs(pt_loss), kd_gn, pt_gn, c_rel))
        if i == 0 or (i + 1) % args.log_every == 0 or i + 1 == args.steps:
            print(f"{i + 1:>5} {kd_loss:>10.5f} {pt_loss:>10.5f} {diff:>10.2e} {diff / abs(pt_loss):>10.2e} "
                  f"{kd_gn:>9.4f} {pt_gn:>9.4f} {c_rel:>9.2e}")

    final_err, final_worst = compare(state.params, lambda p: p)
    if ctrl is not None:  # the control's own parameter drift from kd_flax, same metric
        ctrl_t = kd_tensors(ctrl.params)
        ctrl_t = {n: rel(ctrl_t[n], a) for n, a in kd_tensors(state.params).items() if not ZERO_GRAD.search(n)}
        ctrl_worst = max(ctrl_t, key=ctrl_t.get)
    r = np.array(rows)
    last = r[-min(20, len(r)):]
    early = r[:min(20, len(r))]
    # The first kd_flax step includes jit compilation; time steady-state steps only.
    kd_t = float(np.median(kd_times[1:] or kd_times))
    pt_t = float(np.median(pt_times[1:] or pt_times))
    print()
    print(f"first batch: loss rel diff {r[0, 4]:.2e}; grads max rel L2 err {grad_err:.2e} ({grad_worst}); "
          f"params after 1 update max rel L2 err {upd_err:.2e} ({upd_worst})")
    if zero_g:
        print(f"  (skipped: {len(zero_g)} k_proj.bias tensors, exact gradient 0; their max |grad| "
              f"kd_flax {max(k for k, _ in zero_g):.1e}, torch {max(t for _, t in zero_g):.1e})")
    print(f"params after {len(r)} steps: max rel L2 err {final_err:.2e} ({final_worst})")
    print(f"loss rel diff: max over curve {r[:, 4].max():.2e} (step {int(r[r[:, 4].argmax(), 0])}), "
          f"max over first {len(early)} steps {early[:, 4].max():.2e}")
    if ctrl is not None:
        print(f"noise-floor control (kd_flax vs kd_flax from 1e-7-perturbed params): loss rel diff max over curve "
              f"{np.nanmax(r[:, 7]):.2e}, first {len(early)} steps {np.nanmax(early[:, 7]):.2e}; "
              f"params after {len(r)} steps max rel L2 err {ctrl_t[ctrl_worst]:.2e} ({ctrl_worst})")
    print(f"mean loss over last {len(last)} steps: kd_flax {last[:, 1].mean():.5f}  torch {last[:, 2].mean():.5f}  "
          f"(rel diff {abs(last[:, 1].mean() - last[:, 2].mean()) / last[:, 2].mean():.2e})")
    print(f"step time (median, excl. first): kd_flax {kd_t * 1e3:.1f} ms  torch {pt_t * 1e3:.1f} ms  "
          f"(torch/kd_flax = {pt_t / kd_t:.2f}x); kd_flax first step (compile) {kd_times[0]:.1f} s")

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "kd_flax_loss", "torch_loss", "abs_diff", "rel_diff", "kd_flax_grad_norm",
                        "torch_grad_norm", "control_rel_diff", "kd_flax_step_s", "torch_step_s"])
            for row, kt, pt in zip(rows, kd_times, pt_times):
                w.writerow([*row, kt, pt])
        print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
