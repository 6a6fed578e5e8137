"""Shared test helpers: tiny random transformers (PyTorch) models saved to disk, padded
batches, and reference outputs. Imported by the model, HF-io and sharding tests (and by
other engineers' tests): ``from tests.model_fixtures import make_hf_model, make_batch``.
"""

from __future__ import annotations

import numpy as np

# Tiny shapes: compile fast, still exercise every code path (several heads, 2 layers,
# relative-position buckets past max_exact).
TINY = dict(vocab_size=96, d_model=32, layers=2, heads=4, ffn=64)


def hf_config(model_type: str, **config_kw):
    """Tiny transformers config for ``model_type`` in t5, mt5, bart, mbart, marian."""
    import transformers as tf

    v, d, n, h, f = (TINY[k] for k in ("vocab_size", "d_model", "layers", "heads", "ffn"))
    if model_type in ("t5", "mt5"):
        cls = tf.T5Config if model_type == "t5" else tf.MT5Config
        kw = dict(vocab_size=v, d_model=d, d_kv=d // h, d_ff=f, num_layers=n, num_decoder_layers=n,
                  num_heads=h, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        if model_type == "mt5":
            kw.update(feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    elif model_type in ("bart", "mbart", "marian"):
        cls = {"bart": tf.BartConfig, "mbart": tf.MBartConfig, "marian": tf.MarianConfig}[model_type]
        kw = dict(vocab_size=v, d_model=d, encoder_layers=n, decoder_layers=n, encoder_attention_heads=h,
                  decoder_attention_heads=h, encoder_ffn_dim=f, decoder_ffn_dim=f,
                  max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                  init_std=0.1)
        if model_type == "marian":
            kw.update(pad_token_id=v - 1, decoder_start_token_id=v - 1, eos_token_id=0,
                      bos_token_id=None, forced_eos_token_id=0)
        else:
            kw.update(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2)
    else:
        raise ValueError(f"model_type {model_type!r}; allowed: t5, mt5, bart, mbart, marian")
    kw.update(config_kw)
    return cls(**kw)


def make_hf_model(tmp_path, model_type: str, *, seed: int = 0, perturb: float = 0.05,
                  untie_head: bool | None = None, **config_kw):
    """Build a tiny random transformers seq2seq model, save it (safetensors) under
    ``tmp_path/<model_type>``, return ``(dir, torch_model)`` (model in eval mode).

    ``perturb`` adds N(0, perturb²) noise to every trainable parameter so norms/biases are
    not at their trivial init. ``untie_head`` (T5 family; default: True for mt5 and for
    ``feed_forward_proj="gated-gelu"``) gives the model its own ``lm_head`` like real
    Flan-T5 / mT5 checkpoints.
    """
    import torch
    import transformers as tf

    config = hf_config(model_type, **config_kw)
    torch.manual_seed(seed)
    cls = {"t5": tf.T5ForConditionalGeneration, "mt5": tf.MT5ForConditionalGeneration,
           "bart": tf.BartForConditionalGeneration, "mbart": tf.MBartForConditionalGeneration,
           "marian": tf.MarianMTModel}[model_type]
    model = cls(config)
    if model_type in ("t5", "mt5"):
        if untie_head is None:
            untie_head = model_type == "mt5" or config.feed_forward_proj.startswith("gated")
        if untie_head:
            # transformers 5 always ties T5 heads at init; real v1.1/mT5 checkpoints do not
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * config.d_model ** -0.5)
            model.config.tie_word_embeddings = False
            model.config.scale_decoder_outputs = False  # v1.1 / mT5: no d_model**-0.5 rescale
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and perturb:
                p.add_(torch.randn_like(p) * perturb)
    model.eval()
    # eager attention: the only implementation that returns attention maps
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:
        model.config._attn_implementation = "eager"
    name = model_type + ("_" + "_".join(f"{k}-{v}" for k, v in sorted(config_kw.items())) if config_kw else "")
    out = tmp_path / name.replace("/", "-")
    model.save_pretrained(out, safe_serialization=True)
    return out, model


def make_batch(seed: int = 0, *, batch: int = 3, src_len: int = 7, tgt_len: int = 6, vocab: int = 96,
               pad_id: int = 0, start_id: int = 0, low: int = 3):
    """Right-padded random batch (numpy int32): rows have different lengths, the first
    row is full. Returns dict with input_ids, attention_mask, decoder_input_ids
    (``start_id`` first), decoder_attention_mask."""
    rng = np.random.default_rng(seed)
    high = vocab - 1 if pad_id == vocab - 1 else vocab

    def padded(length, first=None):
        ids = rng.integers(low, high, size=(batch, length)).astype(np.int32)
        lens = np.concatenate([[length], rng.integers(2, length + 1, size=batch - 1)])
        mask = (np.arange(length)[None, :] < lens[:, None]).astype(np.int32)
        if first is not None:
            ids[:, 0] = first
        return np.where(mask == 1, ids, pad_id).astype(np.int32), mask

    input_ids, attention_mask = padded(src_len)
    dec_ids, dec_mask = padded(tgt_len, first=start_id)
    return dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=dec_ids,
                decoder_attention_mask=dec_mask)


def torch_forward(model, batch: dict, **kw):
    """transformers forward on a numpy batch; returns the output object (no grad)."""
    import torch

    with torch.no_grad():
        return model(**{k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in batch.items()}, **kw)


def to_np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def rel_err(a, b, mask=None) -> float:
    """max |a - b| / max |b| over the positions where ``mask`` (broadcast on the leading
    axes of ``a``) is 1."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        a, b = a[m], b[m]
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))
