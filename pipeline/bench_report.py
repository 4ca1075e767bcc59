"""The rollout benchmark's report: the cells as JSON, a printed table and a ratio plot.

Owns how pipeline.bench's cells are shown: one table row per cell with, for every measured
figure, the pruned value, the stock value, their ratio and (where the cost model has them) the
predicted ratios beside it, FLOPs alone and the roofline; a PNG of measured and predicted
pruned / stock throughput and prefill ratios per cell. Must not measure or compute costs.
"""

from __future__ import annotations

import json
from pathlib import Path

# (cell key, table heading, format); prefill_s is the time to the first token of every prompt.
FIGURES = (("tokens_per_s", "tokens/s", ".1f"), ("prefill_s", "prefill s", ".3f"),
           ("kv_tokens", "KV tokens", ".0f"), ("peak_mem_mb", "peak MB", ".0f"))


def cell_label(cell: dict) -> str:
    """A short name for one cell: image size, keep ratio, G, T, mask mode."""
    return (f"{cell['image_px']}px k{cell['keep_ratio']:g} G{cell['group_size']} "
            f"T{cell['new_tokens']} {cell['mask_mode']}")


def table(cells: list[dict]) -> str:
    """The cells as text: per figure, pruned | stock | ratio | predicted ratio."""
    head = f"{'cell':30}{'V':>6}{'kept':>6}"
    for _, name, _ in FIGURES:
        head += f" | {name + ' pruned':>16}{'stock':>9}{'ratio':>7}{'pred':>7}{'roof':>7}"
    lines = [head, "-" * len(head)]
    for cell in cells:
        line = f"{cell_label(cell):30}{cell['visual_tokens']:>6}{cell['kept_tokens']:>6}"
        for key, _, fmt in FIGURES:
            pruned, stock = cell["pruned"].get(key), cell["stock"].get(key)
            ratio, predicted = cell["ratio"].get(key), cell["predicted"].get(key)
            roofline = cell.get("roofline", {}).get(key)
            line += (" | " + (f"{pruned:>16{fmt}}" if pruned is not None else f"{'-':>16}")
                     + (f"{stock:>9{fmt}}" if stock is not None else f"{'-':>9}")
                     + "".join(f"{v:>7.3f}" if v is not None else f"{'-':>7}"
                               for v in (ratio, predicted, roofline)))
        lines.append(line)
    lines.append("ratio = pruned / stock (tokens/s > 1: pruned faster; prefill s, KV tokens, "
                 "peak MB < 1: pruned smaller); pred = the FLOP model of pipeline/bench_cost.py; "
                 "roof = the roofline of FLOPs and bytes read at this machine's measured rates "
                 "(pipeline/bench_time.py)")
    return "\n".join(lines)


def plot(cells: list[dict], path: Path) -> None:
    """Bars of measured and predicted pruned / stock ratios per cell: throughput and prefill."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [cell_label(c) for c in cells]
    positions = range(len(cells))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(cells) + 2), 7), sharex=True)
    for ax, key, title in ((axes[0], "tokens_per_s", "throughput, pruned / stock (> 1: faster)"),
                           (axes[1], "prefill_s", "prefill time, pruned / stock (< 1: faster)")):
        ax.bar([p - 0.27 for p in positions], [c["ratio"][key] for c in cells], 0.27,
               label="measured")
        ax.bar(list(positions), [c["predicted"][key] for c in cells], 0.27,
               label="predicted (FLOPs)")
        ax.bar([p + 0.27 for p in positions],
               [c.get("roofline", {}).get(key, float("nan")) for c in cells], 0.27,
               label="predicted (roofline)")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(title)
        ax.legend()
    axes[1].set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle(f"pruned rollouts (pre-pass included) vs stock vLLM; {cells[0]['device']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(cells: list[dict], folder: Path) -> dict[str, Path]:
    """bench.json (the list of cells), table.txt and ratios.png under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "bench.json", "table": folder / "table.txt",
             "plot": folder / "ratios.png"}
    paths["json"].write_text(json.dumps(cells, indent=2) + "\n")
    paths["table"].write_text(table(cells) + "\n")
    plot(cells, paths["plot"])
    return paths
