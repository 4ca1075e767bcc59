"""The comparison's outputs: aggregates per (form, setting), the printed table, the PNG plot.

Owns how per-sample records (pipeline/eval_compare.py) become one row per inference form and
setting - accuracy (exact match and ANLS, overall and per question type), mean keep ratio,
visual / kept / KV-cache tokens, analytic prefill ratio, target-box recall, wall times and peak
memory - and how those rows are shown: a fixed-width table and accuracy against keep ratio,
one series per method and one panel per form. Must not run models or talk to MLflow (the
evaluate command logs what this returns).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(records: list[dict], measured: dict[tuple[str, str], dict]) -> list[dict]:
    """One row per (form, setting) in first-seen order.

    Args:
        records: per-sample records.
        measured: (form, setting label) -> that setting's summed wall times and peak memory.
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["form"], record["setting"])].append(record)
    rows = []
    for (form, label), group in groups.items():
        n = len(group)
        row = {"form": form, "setting": label, "method": group[0]["method"],
               "target_keep_ratio": group[0]["target_keep_ratio"], "rows": n,
               "accuracy": _mean([r["exact"] for r in group]),
               "anls": _mean([r["anls"] for r in group]),
               "keep_ratio": _mean([r["kept_tokens"] / max(r["visual_tokens"], 1)
                                    for r in group]),
               "visual_tokens": _mean([r["visual_tokens"] for r in group]),
               "kept_tokens": _mean([r["kept_tokens"] for r in group]),
               "kv_tokens": _mean([r["kv_tokens"] for r in group]),
               "prefill_flops_ratio": _mean([r["prefill_flops_ratio"] for r in group]),
               "box_recall": _mean([r["box_recall"] for r in group if "box_recall" in r])}
        by_type = defaultdict(list)
        for r in group:
            by_type[r["question_type"]].append(r)
        for qtype, of_type in sorted(by_type.items()):
            row[f"accuracy/{qtype}"] = _mean([r["exact"] for r in of_type])
            row[f"anls/{qtype}"] = _mean([r["anls"] for r in of_type])
        times = measured.get((form, label), {})
        for key in ("latency_s", "select_s", "prepass_s"):
            if key in times:
                row[f"{key}_per_sample"] = times[key] / n
        row["peak_mem_mb"] = times.get("peak_mem_mb")
        rows.append(row)
    return rows


COLUMNS = (("form", "{:6s}"), ("setting", "{:24s}"), ("accuracy", "{:6.3f}"),
           ("anls", "{:6.3f}"), ("keep_ratio", "{:6.3f}"), ("kept_tokens", "{:6.1f}"),
           ("kv_tokens", "{:6.1f}"), ("prefill_flops_ratio", "{:6.3f}"),
           ("box_recall", "{:6.3f}"), ("latency_s_per_sample", "{:7.4f}"),
           ("peak_mem_mb", "{:7.0f}"))
HEADERS = ("form", "setting", "acc", "anls", "keep", "kept", "kv", "prefill", "recall",
           "s/sample", "peak MB")


def table(rows: list[dict]) -> str:
    """The aggregates as fixed-width text, with per-type accuracy after the main columns."""
    types = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("accuracy/")})
    widths = [int(re.search(r":(\d+)", fmt).group(1)) for _, fmt in COLUMNS]
    head = "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths, strict=True))
    lines = [head + "  " + "  ".join(f"{t[:10]:>10s}" for t in types)]
    for row in rows:
        cells = []
        for (key, fmt), width in zip(COLUMNS, widths, strict=True):
            value = row.get(key)
            cells.append("-".rjust(width) if value is None else fmt.format(value))
        per_type = [row.get(f"accuracy/{t}") for t in types]
        lines.append("  ".join(cells) + "  " + "  ".join(
            f"{'-':>10s}" if v is None else f"{v:10.3f}" for v in per_type))
    return "\n".join(lines)


def plot(rows: list[dict], out: Path, title: str) -> Path:
    """Accuracy against mean keep ratio, one series per method, one panel per form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    forms = sorted({r["form"] for r in rows}, key=["exact", "vllm"].index)
    fig, axes = plt.subplots(1, len(forms), figsize=(6 * len(forms), 4.5), squeeze=False)
    for ax, form in zip(axes[0], forms, strict=True):
        series: dict[str, list] = defaultdict(list)
        for r in rows:
            if r["form"] == form:
                series[r["method"]].append((r["keep_ratio"], r["accuracy"]))
        for method, points in series.items():
            points.sort()
            style = "o-" if len(points) > 1 else ("*" if "glimpse" in method else "s")
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=method,
                    markersize=12 if style == "*" else 6)
        ax.set_xlabel("mean keep ratio (kept / visual tokens)")
        ax.set_ylabel("accuracy (exact match)")
        ax.set_title(f"{title} - {form} form")
        ax.set_xlim(0, 1.05)
        ax.set_ylim(0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
