"""The pipeline's closing report: one table over the teacher and every student variant,
`WORKDIR/report.md` and a PNG plot of BLEU against model size (`WORKDIR/report.png`).

Sizes: a float model counts 4 bytes a parameter; a quantized student counts the real byte
size of its integer export (`export/summary.json`), which is what would ship.
"""

from __future__ import annotations

import math
import os

from kd_flax import evaluate, io_utils


def _rows(workdir: str) -> list[dict]:
    sources = []  # (label, evaluate dir, export summary or None)
    top = os.path.join(workdir, "evaluate", "results.json")
    if io_utils.exists(top):
        sources.append(("", top, _summary(workdir)))
    vroot = os.path.join(workdir, "variants")
    if os.path.isdir(vroot):
        for name in sorted(os.listdir(vroot)):
            path = os.path.join(vroot, name, "evaluate", "results.json")
            if io_utils.exists(path):
                sources.append((name, path, _summary(os.path.join(vroot, name))))
    rows = []
    for label, path, summary in sources:
        results = io_utils.read_json(path)
        for mname, m in results["models"].items():
            size_mb = m.get("size_mb") or 0.0
            bits = m.get("weight_bits")
            if mname == "student" and summary and summary.get("int_bytes"):
                size_mb = summary["int_bytes"] / 2**20
            speed = m.get("speed") or {}
            rows.append({
                "model": label if label and mname == "student" else mname,
                "parameters": m.get("parameters", 0),
                "size (MB)": round(size_mb, 3),
                "weights": f"int{bits}" if bits else "fp32",
                "BLEU": _mean_std(m["bleu"]),
                "chrF": _mean_std(m["chrf"]),
                "sentences/s": round(speed.get("sentences_per_s", float("nan")), 1),
                "_bleu": m["bleu"]["mean"], "_size": size_mb,
            })
    return rows  # the teacher is evaluated once, at the top level (main.run)


def _summary(d: str) -> dict | None:
    path = os.path.join(d, "export", "summary.json")
    return io_utils.read_json(path) if io_utils.exists(path) else None


def _mean_std(m: dict) -> str:
    std = m.get("std")
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{m['mean']:.1f}"
    return f"{m['mean']:.1f} ± {std:.1f}"


def write_report(config, workdir: str) -> str:
    rows = _rows(workdir)
    if not rows:
        return ""
    columns = ["model", "parameters", "size (MB)", "weights", "BLEU", "chrF", "sentences/s"]
    table = evaluate.format_table([{k: r[k] for k in columns} for r in rows], columns)
    n_splits = len(config.data.test)
    text = (f"# {config.name}: results\n\n"
            f"BLEU and chrF: sacreBLEU, mean ± sample std over {n_splits} test split(s)"
            f"{' (multi-reference)' if _multi_ref(workdir) else ''}; sentences/s: decoding on "
            f"this machine (num_beams={config.evaluate.num_beams}).\n\n{table}\n")
    png = os.path.join(workdir, "report.png")
    if _plot(rows, png, config.name):
        text += "\n![BLEU against model size](report.png)\n"
    io_utils.atomic_write_text(os.path.join(workdir, "report.md"), text)
    print(table)
    return text


def _multi_ref(workdir: str) -> bool:
    path = os.path.join(workdir, "evaluate", "results.json")
    if not io_utils.exists(path):
        return False
    for m in io_utils.read_json(path)["models"].values():
        return any(s.get("num_refs", 1) > 1 for s in m.get("splits", {}).values())
    return False


def _plot(rows: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for r in rows:
        ax.scatter(r["_size"], r["_bleu"], s=40)
        ax.annotate(r["model"], (r["_size"], r["_bleu"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("model size (MB, log scale)")
    ax.set_ylabel("BLEU (mean over test splits)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True
