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
import re
from typing import Any, Mapping, Sequence

from kd_flax import io_utils
from kd_flax.metrics import Stats, format_mean_std, split_stats
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
                "_bleu": m["bleu"]["mean"], "_chrf": m["chrf"]["mean"], "_size": size_mb,
            })
    return rows


_SEED_ROW = re.compile(r"^(?P<base>.+?)_seed(?P<seed>\d+)(?P<suffix>_.*)?$")


def seed_rows(rows: list[dict]) -> list[dict]:
    """Rows of a variant repeated over seeds (variants `<name>_seed<k>` beside `<name>`, e.g.
    configs/multi30k_enfr.py's `seeds=3`), reduced to mean ± sample std across the seeds of
    each seed's BLEU / chrF (its mean over the test splits). Empty when nothing is repeated."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        m = _SEED_ROW.match(r["model"])
        key = m["base"] + (m["suffix"] or "") if m else r["model"]
        groups.setdefault(key, []).append(r)
    if not any(len(g) > 1 for g in groups.values()):
        return []
    out = []
    for key, g in groups.items():
        if len(g) > 1:
            out.append({"model": key, "seeds": len(g),
                        "BLEU": format_mean_std(split_stats([r["_bleu"] for r in g])),
                        "chrF": format_mean_std(split_stats([r["_chrf"] for r in g]))})
    return out


def stage_rows(wd: Workdir) -> list[dict]:
    """Where the pipeline's time went: one row per finished stage (and distill sub-stage) with
    its wall seconds and its throughput — training target tokens/s (compilation and dev
    evaluations included), generation sentences/s."""
    rows = []

    def add(name, rec, **extra):
        if rec is not None and rec.get("status") == "done":
            rows.append({"stage": name, "seconds": rec.get("seconds"), "_sub": False, **extra})

    fin = wd.record("finetune")
    add("finetune (teacher)", fin, **{"train tokens/s": ((fin or {}).get("result") or {}).get("target_tokens_per_s")})
    gen = wd.record("generate")
    manifest = _read_json(io_utils.join(wd.pseudo_label_dir, "manifest.json"))
    if gen is not None and manifest:
        secs, n = manifest.get("generate_seconds") or 0.0, manifest.get("counts", {}).get("generated", 0)
        add("generate (pseudo-labels)", gen, **{"sentences/s": round(n / secs, 1) if secs else None})
    add("evaluate (teacher)", wd.record("evaluate"))
    for name in wd.variants():
        view = wd.for_variant(name)
        dist = view.record("distill")
        add(f"{name}: distill", dist)
        for st in ((dist or {}).get("result") or {}).get("stages", []):
            reused = f", reused from {st['reused_from']}" if st.get("reused_from") else ""
            rows.append({"stage": f"{name}: distill {st['targets']} ({st['steps']} steps{reused})",
                         "seconds": st.get("train_seconds"), "train tokens/s": st.get("target_tokens_per_s"),
                         "_sub": True})  # inside its distill row's seconds
        add(f"{name}: evaluate", view.record("evaluate"))
        add(f"{name}: export", view.record("export"))
    return rows


def _read_json(path):
    return io_utils.read_json(path) if io_utils.exists(path) else None


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
            f"this machine (num_beams={config.evaluate.num_beams}"
            f"{_also(config)}).\n\n{table}\n")
    across = seed_rows(rows)
    if across:
        text += ("\n## Across seeds\n\nEach variant trained with every seed (teacher and pseudo-labels "
                 "shared): mean ± sample std across seeds of each run's score.\n\n"
                 + format_table(across, ["model", "seeds", "BLEU", "chrF"]) + "\n")
    stages = stage_rows(wd)
    if stages:
        total = sum(r["seconds"] or 0 for r in stages if not r["_sub"])
        text += (f"\n## Stages\n\nWall seconds per stage on this machine ({total / 60:.1f} min in all); "
                 f"train tokens/s: target tokens per second of training, compilation and dev "
                 f"evaluations included.\n\n"
                 + format_table(stages, ["stage", "seconds", "train tokens/s", "sentences/s"]) + "\n")
    png = wd.path("report.png")
    if _plot(rows, png, config.name):
        text += "\n![BLEU against model size](report.png)\n"
    io_utils.atomic_write_text(wd.path("report.md"), text)
    print(table)
    return text


def _also(config) -> str:
    also = list(config.evaluate.get("also_num_beams", []))
    return f"; rows `_greedy` / `_beam<n>`: num_beams={also}" if also else ""


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
