"""Serving speed of a student: kd_flax fp32 vs CTranslate2 int8 (and fp32) vs transformers, same CPU.

Issue 13's benchmark. Two models, each run by every engine in one run:

* `--model DIR` (an HF seq2seq dir, e.g. the demo's `variants/seqkd_w8a8/export/hf`) with
  `--sources FILE` (JSONL, field "src", e.g. the demo's `data/test0-300.jsonl`): real sentences,
  decoding stops at EOS (at most `--max-new-tokens`).
* A T5-small-shaped student with random weights (`generate_speed.make_models`): random sources
  of `--src-len` ids + EOS, exactly `--new-tokens` generated (EOS suppressed until then).

Settings: latency at batch 1 (greedy and beam 4: the mean seconds per sentence over the
latency sentences, requests one after the other) and throughput at batch 32 (sentences/s and
tokens/s over the throughput sentences, in batches of 32 taken in file order). Engines:

* kd_flax fp32: `kd_flax.translate.Translator` on `load_pretrained(DIR)` (padded to its length
  buckets 16/32/64/128, so each shape compiles once in the warm-up).
* CTranslate2 int8 (the headline) and float32: `kd_flax.export.to_ctranslate2(DIR, ..., q)`,
  `ctranslate2.Translator(compute_type=q, intra_threads=--threads, inter_threads=1)`.
* transformers PyTorch fp32: `AutoModelForSeq2SeqLM.generate`, `torch.set_num_threads(--threads)`.

All engines get the same token ids (tokenization is outside the timed calls), beam search with
length_penalty 1.0 and early stopping, and the same count of generated tokens: the best
hypothesis' tokens, without decoder start, EOS or the padding after EOS. Per setting each engine
runs one untimed pass (warm-up: XLA compilation, caches), then `--repeats` timed passes taken in
turn round the engines; the median is reported, with the share of sentences whose output equals
kd_flax fp32's. Ratios are speed vs kd_flax fp32 (> 1: faster than kd_flax), by wall time and by
process CPU time (all threads; steadier on a shared machine). Each engine runs in its own
process (spawned), one at a time, with OMP_WAIT_POLICY=PASSIVE (`--omp-wait-policy`). JAX's CPU
client uses every core; the other engines get `--threads` (default: all cores), so on a 2-core
machine all run on 2.

    python benchmarks/serve_speed.py --model runs/demo/variants/seqkd_w8a8/export/hf \\
        --sources runs/demo/data/test0-300.jsonl            # a few minutes on 2 cores
    python benchmarks/serve_speed.py --small                   # quick check: tiny T5 (+ --model ...)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from generate_speed import make_models, save_id_tokenizer  # noqa: E402

ENGINES = ("kd_flax", "ct2_int8", "ct2_fp32", "transformers")
LABELS = {"kd_flax": "kd_flax fp32", "ct2_int8": "CTranslate2 int8", "ct2_fp32": "CTranslate2 fp32",
          "transformers": "transformers fp32"}


@dataclasses.dataclass
class Workload:
    """One model and its sources: `sources` are id rows ending in EOS; `min_new_tokens` =
    `max_new_tokens` forces the length (random weights never choose EOS by themselves)."""
    name: str
    hf_dir: str
    latency_sources: list
    throughput_sources: list
    max_new_tokens: int
    min_new_tokens: int = 0


def content(row, eos_id: int) -> list[int]:
    """Generated ids up to (not including) the first EOS, i.e. without the padding after it: what
    is counted (CTranslate2's hypotheses are exactly this). A row without EOS is kept whole (a
    random model may well generate <pad> ids: they count)."""
    row = [int(x) for x in row]
    return row[:row.index(eos_id)] if eos_id in row else row


class KdFlax:
    def __init__(self, wl: Workload, batch_size: int):
        from kd_flax.models import load_pretrained
        from kd_flax.translate import Translator

        self.model = load_pretrained(wl.hf_dir)
        cfg = self.model.config
        self.eos, self.pad = int(cfg.eos_token_id), int(cfg.pad_token_id)
        self.translators = {}
        self.make = lambda beams, bs: Translator(
            self.model, None, dict(num_beams=beams, max_new_tokens=wl.max_new_tokens,
                                   min_new_tokens=wl.min_new_tokens, length_penalty=1.0, early_stopping=True),
            batch_size=bs)

    def __call__(self, rows, beams):
        import numpy as np

        from kd_flax import data as data_lib

        key = (beams, len(rows))
        if key not in self.translators:
            self.translators[key] = self.make(beams, len(rows))
        tr = self.translators[key]
        ids = data_lib.pad_rows(rows, data_lib.bucket_length(max(map(len, rows)), tr.boundaries), self.pad)
        mask = (np.arange(ids.shape[1])[None] < np.array([len(r) for r in rows])[:, None]).astype(np.int32)
        seqs = tr(ids, mask)[0]
        return [content(s, self.eos) for s in seqs[:, 0]]


class CT2:
    def __init__(self, wl: Workload, quantization: str, threads: int, out_root: str):
        import ctranslate2
        import transformers as tf

        from kd_flax import export

        out = export.to_ctranslate2(wl.hf_dir, os.path.join(out_root, f"{wl.name}-{quantization}"), quantization)
        self.tok = tf.AutoTokenizer.from_pretrained(wl.hf_dir)
        self.translator = ctranslate2.Translator(out, device="cpu", compute_type=quantization,
                                                 intra_threads=threads, inter_threads=1)
        self.wl = wl

    def __call__(self, rows, beams):
        toks = [self.tok.convert_ids_to_tokens([int(x) for x in r]) for r in rows]
        res = self.translator.translate_batch(toks, beam_size=beams, max_batch_size=0, length_penalty=1.0,
                                              max_decoding_length=self.wl.max_new_tokens,
                                              min_decoding_length=self.wl.min_new_tokens)
        return [self.tok.convert_tokens_to_ids(r.hypotheses[0]) for r in res]


class Transformers:
    def __init__(self, wl: Workload):
        import transformers as tf

        self.model = tf.AutoModelForSeq2SeqLM.from_pretrained(wl.hf_dir).eval()
        self.eos, self.pad = int(self.model.config.eos_token_id), int(self.model.config.pad_token_id)
        self.wl = wl

    def __call__(self, rows, beams):
        import numpy as np
        import torch

        from kd_flax import data as data_lib

        ids = torch.as_tensor(data_lib.pad_rows(rows, max(map(len, rows)), self.pad), dtype=torch.long)
        mask = torch.as_tensor(np.arange(ids.shape[1])[None] < np.array([len(r) for r in rows])[:, None],
                               dtype=torch.long)
        extra = dict(early_stopping=True, length_penalty=1.0) if beams > 1 else {}
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False,
                                      max_new_tokens=self.wl.max_new_tokens, min_new_tokens=self.wl.min_new_tokens,
                                      **extra)
        return [content(s, self.eos) for s in out[:, 1:].tolist()]


def make_engine(name: str, wl: Workload, args, out_root: str):
    if name == "kd_flax":
        return KdFlax(wl, args.batch)
    if name.startswith("ct2_"):
        return CT2(wl, {"ct2_int8": "int8", "ct2_fp32": "float32"}[name], args.threads, out_root)
    return Transformers(wl)


def worker(name: str, wl: Workload, args, out_root: str, conn) -> None:
    """One engine in its own process: receives ``(rows batches, beams)``, runs them, sends back
    ``(wall s, process CPU s, outputs)``; None ends it."""
    import torch

    torch.set_num_threads(args.threads)
    engine = make_engine(name, wl, args, out_root)
    conn.send("ready")
    while (job := conn.recv()) is not None:
        batches, beams = job
        t0, c0 = time.perf_counter(), time.process_time()
        out = [o for b in batches for o in engine(b, beams)]
        conn.send((time.perf_counter() - t0, time.process_time() - c0, out))


def bench_workload(wl: Workload, names, args, out_root: str) -> dict:
    """{(kind, beams, engine): result}, kind "latency" (batch 1) or "throughput" (batch --batch).

    Each engine lives in its own process (two OpenMP runtimes in one process, CTranslate2's and
    torch's, slowed transformers 5x here), one engine runs at a time. Per setting every engine
    runs one untimed pass (warm-up), then the timed passes go round the engines in turn
    (`--repeats` rounds), so that a burst of load from other jobs on a shared machine hits all
    engines alike rather than the one that happened to run then."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns = {}, {}
    for name in names:
        conns[name], child = ctx.Pipe()
        procs[name] = ctx.Process(target=worker, args=(name, wl, args, out_root, child), daemon=True)
        procs[name].start()
    for name in names:
        assert conns[name].recv() == "ready"
    settings = [("latency", b) for b in args.latency_beams] + [("throughput", b) for b in args.throughput_beams]
    results = {}
    try:
        for kind, beams in settings:
            src, batch = (wl.latency_sources, 1) if kind == "latency" else (wl.throughput_sources, args.batch)
            batches = [src[i:i + batch] for i in range(0, len(src), batch)]
            walls, cpus, outs, first = {n: [] for n in names}, {n: [] for n in names}, {}, {}
            for rnd in range(args.repeats + 1):  # round 0: warm-up
                for name in names:
                    conns[name].send((batches, beams))
                    wall, cpu, out = conns[name].recv()
                    if rnd == 0:
                        first[name], outs[name] = wall, out
                    else:
                        walls[name].append(wall)
                        cpus[name].append(cpu)
            for name in names:
                r = results[(kind, beams, name)] = dict(
                    wall=statistics.median(walls[name]), cpu=statistics.median(cpus[name]), first=first[name],
                    outputs=outs[name], sentences=len(src), tokens=sum(len(o) for o in outs[name]))
                print(f"  {wl.name:8s} {kind:10s} beam {beams} {LABELS[name]:18s} {r['wall']:7.3f} s/pass "
                      f"(CPU {r['cpu']:.3f} s, warm-up {r['first']:.2f} s), {r['sentences']} sent, "
                      f"{r['tokens']} tok; load {os.getloadavg()[0]:.2f}", flush=True)
    finally:
        for name in names:
            conns[name].send(None)
            procs[name].join(timeout=30)
    return results


def table(wl: Workload, results: dict, batch: int) -> list[str]:
    """Markdown rows, grouped by setting; speed = kd_flax's wall time / the engine's (same sources)."""
    lines = []
    for kind, beams, name in sorted(results, key=lambda k: (k[0] != "latency", k[1], ENGINES.index(k[2]))):
        r, base = results[(kind, beams, name)], results.get((kind, beams, "kd_flax"))
        n = r["sentences"]
        speed = f"{base['wall'] / r['wall']:.2f}×" if base else "–"
        cpu_speed = f"{base['cpu'] / r['cpu']:.2f}×" if base else "–"
        same = f"{100 * sum(a == b for a, b in zip(r['outputs'], base['outputs'])) / n:.0f} %" if base else "–"
        if kind == "latency":
            setting, figure = f"latency, batch 1, beam {beams}", f"{1000 * r['wall'] / n:.1f} ms/sent"
        else:
            setting, figure = f"throughput, batch {batch}, beam {beams}", f"{n / r['wall']:.1f} sent/s"
        lines.append(f"| {wl.name} | {setting} | {LABELS[name]} | {figure} | {r['tokens'] / r['wall']:.0f} "
                     f"| {speed} | {cpu_speed} | {same} |")
    return lines


def demo_workload(args, tokenizer_dir) -> Workload:
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(tokenizer_dir)
    with open(args.sources) as f:
        texts = [json.loads(line)["src"] for line in f if line.strip()]
    need = max(args.latency_sentences, args.throughput_sentences)
    texts = (texts * (-(-need // len(texts))))[:need]
    ids = [list(x) for x in tok(texts)["input_ids"]]
    return Workload("student", args.model, ids[:args.latency_sentences], ids[:args.throughput_sentences],
                    max_new_tokens=args.max_new_tokens)


def t5_workload(args, small: bool) -> Workload:
    import numpy as np

    config, _, hf_dir, _ = make_models(small)  # random T5 (seed 0) saved as safetensors in hf_dir
    save_id_tokenizer(hf_dir, config.vocab_size)
    rng = np.random.default_rng(0)
    n = max(args.latency_sentences, args.throughput_sentences)
    rows = [list(r) + [int(config.eos_token_id)] for r in rng.integers(3, config.vocab_size, (n, args.src_len)).tolist()]
    return Workload("t5-small" + ("-tiny" if small else ""), hf_dir, rows[:args.t5_latency_sentences],
                    rows[:args.t5_throughput_sentences], max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF seq2seq dir of the student (e.g. runs/demo/variants/seqkd_w8a8/export/hf)")
    p.add_argument("--sources", help="JSONL with a 'src' field (e.g. runs/demo/data/test0-300.jsonl); needed with --model")
    p.add_argument("--small", action="store_true", help="quick check: tiny T5, few sentences, 2 repeats")
    p.add_argument("--skip-t5", action="store_true", help="only the --model student")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--batch", type=int, default=32, help="throughput batch size")
    p.add_argument("--latency-beams", type=int, nargs="+", default=[1, 4])
    p.add_argument("--throughput-beams", type=int, nargs="+", default=[1])
    p.add_argument("--latency-sentences", type=int, default=64, help="--model student, batch 1")
    p.add_argument("--throughput-sentences", type=int, default=256, help="--model student, batch --batch")
    p.add_argument("--max-new-tokens", type=int, default=32, help="--model student")
    p.add_argument("--t5-latency-sentences", type=int, default=8)
    p.add_argument("--t5-throughput-sentences", type=int, default=64)
    p.add_argument("--src-len", type=int, default=32, help="T5: source ids (+ EOS)")
    p.add_argument("--new-tokens", type=int, default=32, help="T5: generated tokens (forced)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per setting (median reported)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch / CTranslate2 threads")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "unset"],
                   help="OMP_WAIT_POLICY of the engine processes (torch and CTranslate2 use OpenMP). PASSIVE: "
                        "with other jobs on the cores, spinning OpenMP barriers made transformers up to 5x and "
                        "CTranslate2 fp32 up to 50x slower here; 'unset' leaves OpenMP's default (spin, then sleep)")
    args = p.parse_args()
    if args.small:
        args.latency_sentences = args.t5_latency_sentences = 4
        args.throughput_sentences = args.t5_throughput_sentences = args.batch
        args.repeats = min(args.repeats, 2)
    if args.model and not args.sources:
        p.error("--model needs --sources (a JSONL file with a 'src' field)")
    if not args.model and args.skip_t5:
        p.error("nothing to run: --skip-t5 without --model")

    if args.omp_wait_policy != "unset":
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch / ctranslate2 load OpenMP
    import ctranslate2
    import jax
    import torch
    import transformers as tf

    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    print(f"jax {jax.__version__} ({jax.device_count()} CPU device(s)), ctranslate2 {ctranslate2.__version__} "
          f"(intra_threads={args.threads}), torch {torch.__version__} (threads={torch.get_num_threads()}), "
          f"transformers {tf.__version__}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {os.cpu_count()} cores, load average {load0[0]:.2f} at start")
    with tempfile.TemporaryDirectory(prefix="kd_serve_bench_") as tmp:
        workloads = []
        if args.model:
            workloads.append(demo_workload(args, args.model))
        if not args.skip_t5:
            workloads.append(t5_workload(args, args.small))
        rows = []
        for wl in workloads:
            print(f"{wl.name}: {wl.hf_dir}; latency {len(wl.latency_sources)} sentences, throughput "
                  f"{len(wl.throughput_sources)}; max_new_tokens {wl.max_new_tokens}"
                  + (" (forced)" if wl.min_new_tokens else ""), flush=True)
            rows += table(wl, bench_workload(wl, args.engines, args, tmp), args.batch)
    load1 = os.getloadavg()
    print(f"\nload average {load0[0]:.2f} at start, {load1[0]:.2f} at end ({os.cpu_count()} cores); "
          f"median of {args.repeats} timed passes after one warm-up pass\n")
    print("| model | setting | engine | latency or throughput | tok/s | × kd_flax fp32 (wall) | × kd_flax fp32 (CPU time) "
          "| same output as kd_flax |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
