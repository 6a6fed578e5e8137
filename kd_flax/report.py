"""Tables and reports: GitHub markdown tables (`format_table`), the evaluate stage's
`report.md` (`report_markdown`), and the pipeline's closing report: one table over the teacher
and every student variant, `WORKDIR/report.md` and a PNG plot of BLEU against model size
(`WORKDIR/report.png`).

Sizes: a float model counts 4 bytes a parameter; a quantized student counts the real byte
size of its integer export (`export/summary.json`), which is what would ship.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

from kd_flax import io_utils
from kd_flax.metrics import Stats, format_mean_std
from kd_flax.workdir import Workdir


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Stats):
        return format_mean_std(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                 *, align: Mapping[str, str] | None = None) -> str:
    """Rows of dicts → a GitHub markdown table (columns: given, else the keys in first-seen order).

    Floats print with 1 decimal (≥ 10) or 3 significant digits, `Stats` as "mean ± std", None
    as an empty cell, `|` is escaped. `align` maps a column to "left"/"right"/"center"
    (default: right for numbers, left otherwise).
    """
    if not rows:
        raise ValueError("rows: empty; need at least one row to format a table")
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    align = dict(align or {})
    for col, how in align.items():
        if how not in ("left", "right", "center"):
            raise ValueError(f"align[{col!r}]: {how!r} is not allowed; allowed: left, right, center")
    body = [[_cell(row.get(c)) for c in columns] for row in rows]
    header = [str(c) for c in columns]
    widths = [max(len(header[j]), *(len(r[j]) for r in body)) for j in range(len(columns))]

    def numeric(j):
        vals = [row.get(columns[j]) for row in rows if row.get(columns[j]) is not None]
        return bool(vals) and all(isinstance(v, (int, float, Stats)) and not isinstance(v, bool) for v in vals)

    seps = []
    for j, c in enumerate(columns):
        how = align.get(c, "right" if numeric(j) else "left")
        w = max(widths[j], 3)
        seps.append({"left": ":" + "-" * (w - 1), "right": "-" * (w - 1) + ":",
                     "center": ":" + "-" * (w - 2) + ":"}[how])
        widths[j] = w
    lines = ["| " + " | ".join(h.ljust(widths[j]) for j, h in enumerate(header)) + " |",
             "| " + " | ".join(seps) + " |"]
    for r in body:
        lines.append("| " + " | ".join(v.ljust(widths[j]) for j, v in enumerate(r)) + " |")
    return "\n".join(lines) + "\n"




def results_rows(results: Mapping[str, Any], name_prefix: str = "") -> list[dict[str, Any]]:
    """Table rows (model, parameters, size MB, BLEU mean ± std, chrF, sentences/s, hypotheses
    that hit max_new_tokens without EOS) from results."""
    rows = []
    for mname, r in results["models"].items():
        rows.append({
            "model": name_prefix + mname,
            "parameters": f"{r['parameters']:,}",
            "size (MB)": r["size_mb"],
            "BLEU": Stats(r["bleu"]["mean"], _nan(r["bleu"]["std"]), len(r["bleu"]["per_split"])),
            "chrF": Stats(r["chrf"]["mean"], _nan(r["chrf"]["std"]), len(r["chrf"]["per_split"])),
            "sentences/s": _nan(r["speed"]["sentences_per_s"]),
            "hit max_new_tokens": _hit_share(r),
        })
    return rows


def _hit_share(r: Mapping[str, Any]) -> str | None:
    """"count (share %)" of hypotheses that hit max_new_tokens without EOS (None: not recorded)."""
    hit = r.get("hit_max_new_tokens")
    if not hit:
        return None
    share = _nan(hit["share"])
    return f"{hit['count']} ({'–' if math.isnan(share) else f'{100 * share:.1f}%'})"


def _nan(v):
    return float("nan") if v is None else float(v)


def report_markdown(results: Mapping[str, Any]) -> str:
    """The stage's report.md: table, per-split scores, sacreBLEU signatures."""
    n = len(results["splits"])
    lines = [f"# Evaluation\n\nBLEU and chrF (sacreBLEU, corpus level) as mean ± sample std "
             f"(ddof=1) over {n} test split{'s' if n != 1 else ''}: {', '.join(results['splits'])}. "
             f"Decoding: num_beams={results['settings']['num_beams']}, "
             f"max_new_tokens={results['settings']['max_new_tokens']}. Sentences/s exclude the first "
             f"(compiling) batch of each shape. Hit max_new_tokens: hypotheses that reached "
             f"max_new_tokens without EOS (runaway loops or a too short limit), of all sentences.\n",
             format_table(results_rows(results)), "\n## Per split (BLEU / chrF)\n"]
    split_rows = []
    for mname, r in results["models"].items():
        row = {"model": mname}
        for s in results["splits"]:
            row[s] = f"{r['splits'][s]['bleu']:.1f} / {r['splits'][s]['chrf']:.1f}"
        split_rows.append(row)
    lines.append(format_table(split_rows))
    sigs = {sig for r in results["models"].values() for sig in r["signatures"].values()}
    lines.append("\nsacreBLEU signatures:\n\n" + "".join(f"- `{s}`\n" for s in sorted(sigs)))
    return "\n".join(lines)


def _rows(wd: Workdir) -> list[dict]:
    # (label, evaluate results, export summary or None); the teacher is evaluated once, at the
    # top level (main.run), each variant's student in its own view of the workdir.
    views = [("", wd)] + [(name, wd.for_variant(name)) for name in wd.variants()]
    rows = []
    for label, view in views:
        results = view.eval_results()
        if results is None:
            continue
        summary = view.export_summary()
        for mname, m in results["models"].items():
            size_mb = m.get("size_mb") or 0.0
            bits = m.get("weight_bits")
            if mname == "student" and summary and summary.get("int_bytes"):
                size_mb = summary["int_bytes"] / 2**20
            speed = m.get("speed") or {}
            rows.append({
                "model": _row_name(label, mname),
                "parameters": m.get("parameters", 0),
                "size (MB)": round(size_mb, 3),
                "weights": f"int{bits}" if bits else "fp32",
                "BLEU": _mean_std(m["bleu"]),
                "chrF": _mean_std(m["chrf"]),
                "sentences/s": round(speed.get("sentences_per_s", float("nan")), 1),
                "_bleu": m["bleu"]["mean"], "_size": size_mb,
            })
    return rows


def _row_name(variant: str, model: str) -> str:
    """A variant's student rows carry the variant's name: `seqkd_w8a8`, `seqkd_w8a8_ct2_int8`
    (the CTranslate2 conversion of that student); top-level rows keep the model's name."""
    if variant and model.startswith("student"):
        return variant + model[len("student"):]
    return model


def _mean_std(m: dict) -> str:
    return format_mean_std(Stats(m["mean"], _nan(m.get("std")), 0))


def write_report(config, workdir) -> str:
    wd = Workdir.of(workdir)
    rows = _rows(wd)
    if not rows:
        return ""
    columns = ["model", "parameters", "size (MB)", "weights", "BLEU", "chrF", "sentences/s"]
    table = format_table([{k: r[k] for k in columns} for r in rows], columns)
    n_splits = len(config.data.test)
    text = (f"# {config.name}: results\n\n"
            f"BLEU and chrF: sacreBLEU, mean ± sample std over {n_splits} test split(s)"
            f"{' (multi-reference)' if _multi_ref(wd) else ''}; sentences/s: decoding on "
            f"this machine (num_beams={config.evaluate.num_beams}).\n\n{table}\n")
    png = wd.path("report.png")
    if _plot(rows, png, config.name):
        text += "\n![BLEU against model size](report.png)\n"
    io_utils.atomic_write_text(wd.path("report.md"), text)
    print(table)
    return text


def _multi_ref(wd: Workdir) -> bool:
    results = wd.eval_results()
    for m in (results or {}).get("models", {}).values():
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
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    io_utils.atomic_write_bytes(path, buf.getvalue())
    return True
