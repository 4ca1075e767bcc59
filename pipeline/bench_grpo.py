"""`python -m pipeline.bench_grpo`: GRPO step time, GlimpsePrune+ against plain GRPO.

Owns issue F11's GRPO-step measurement: two short `pipeline.grpo` runs from one starting point
on the same prompts (same seed, so the same data order), one after the other in one process:
- pruned: GlimpsePrune+ as configured (the glimpse pre-pass, vLLM on text + kept tokens, the
  policy and reference replaying text + kept tokens), every sampled mask fitted to exactly
  --keep-ratio of the visual tokens (the keep budget's floor and cap);
- plain: plain GRPO (rollout.mask_mode=full): stock vLLM on pixels with no pre-pass, every
  visual token in rollout, training and reference, no bonus, no VIP training.
- pruned_collective (only with --sides): the pruned side with rollout.weight_sync=collective
  (the gloo group instead of Ray's object store), for the two weight-sync routes side by side;
- pruned_pixels (only with --sides): the pruned side with rollout.reuse_vision=false, so the
  policy and reference run the frozen vision tower on pixels again instead of reusing the
  pre-pass's outputs (the before / after of that change, measured in the same run).
Both generate fixed-length responses (rollout.ignore_eos) so they produce the same number of
tokens. Per side, the median over the measured steps (not the first, which warms caches, and not
those that ran an evaluation) of every `timing_s/*` part - pre-pass, generate, reward, reference,
train, weight sync, step - and the pruned / plain ratio of each; printed, as JSON, as a PNG, and
in MLflow (one parent run, the two GRPO runs as children).

    python -m pipeline.bench_grpo --config configs/tiny.yaml --init glimpseprune/embedded/tiny \\
        [--image-size 896] [--steps 5] [--prompts 4] [--group 8] [--new-tokens 32] \\
        [--keep-ratio 0.1] [--sides pruned,pruned_pixels,pruned_collective,plain] [key=value ...]
    # a model of real proportions, random weights and freshly initialised glimpse modules:
    python -m pipeline.bench_grpo --config configs/bench_realistic.yaml --init random ...
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

PARTS = ("prepass", "generate", "rollout", "reward", "reference", "train", "weight_sync",
         "step")
SIDES = {"pruned": [], "pruned_pixels": ["rollout.reuse_vision=false"],
         "pruned_collective": ["rollout.weight_sync=collective"],
         "plain": ["rollout.mask_mode=full", "algo.train_vip=false",
                   "reward.prune_bonus.weight=0"]}
SHAPE_KEYS = ("rollout/visual_tokens", "rollout/kept_tokens", "rollout/keep_ratio",
              "rollout/response_length")
SYNC_KEYS = ("weight_sync/mb", "weight_sync/mb_per_s")  # what one push moved, and how fast


def side_overrides(args, side: str, out: Path) -> list[str]:
    """The dotted overrides of one side's GRPO run (both: same image size, prompts, lengths)."""
    px = args.image_size
    common = [
        f"output_dir={out / side}", f"trainer.init_from={Path(args.init).resolve()}",
        f"trainer.total_steps={args.steps}", f"trainer.prompts_per_step={args.prompts}",
        # one evaluation at step 0 and the one the last step always runs; few rows each
        f"trainer.eval_every={args.steps}", "trainer.eval_samples=4",
        f"checkpoint.every_steps={args.steps}",
        f"rollout.n={args.group}", f"rollout.max_new_tokens={args.new_tokens}",
        "rollout.ignore_eos=true",
        f"rollout.max_model_len={(px // 28) ** 2 + args.new_tokens + 256}",
        f"model.max_pixels={px * px}", f"data.synthetic.image_size={px}",
        f"data.synthetic.num_train={args.prompts * args.steps}",
        "data.synthetic.num_validation=4", "data.synthetic.num_test=4",
        "data.synthetic.questions_per_image=1"]
    if side != "plain":  # exactly this share kept: the budget's floor and cap are equal
        kept = max(1, round(args.keep_ratio * (px // 28) ** 2))
        common += [f"glimpse.max_keep_ratio={args.keep_ratio}", f"glimpse.min_keep={kept}"]
    return common + SIDES[side]


def random_init(cfg, folder: Path) -> Path:
    """A stage-1 folder on the config's base with freshly initialised (seeded) glimpse modules:
    with the keep budget fixed, speed does not depend on trained weights."""
    import torch
    from transformers import AutoConfig

    from glimpseprune.io import save_modules
    from glimpseprune.model import spec_for
    from glimpseprune.modules import GlimpseModules
    from glimpseprune.tiny import resolve_base_model

    base = resolve_base_model(cfg.model, cfg.output_dir).resolve()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.trainer.seed)
        modules = GlimpseModules(spec_for(AutoConfig.from_pretrained(base), cfg.glimpse))
    save_modules(modules, folder / "glimpse_modules")
    (folder / "base_model.txt").write_text(f"{base}\n")
    return folder


def measured_steps(records: dict[int, dict[str, float]]) -> list[int]:
    """Steps to time: not the first (warm-up) and not one that ran an evaluation."""
    return [step for step in sorted(records) if step > 1 and "eval/accuracy" not in records[step]]


def side_figures(records: dict[int, dict[str, float]]) -> dict:
    """Medians of the timing parts and the token shape over the measured steps."""
    steps = measured_steps(records)
    if not steps:
        raise ValueError(f"no step to time among {sorted(records)}: run at least 3 steps (the "
                         "first warms up, the last evaluates)")
    figures = {"steps": steps}
    for key in [f"timing_s/{part}" for part in PARTS] + list(SHAPE_KEYS) + list(SYNC_KEYS):
        values = [records[s][key] for s in steps if key in records[s]]
        if values:
            figures[key] = statistics.median(values)
    return figures


def ratios(pruned: dict, plain: dict) -> dict[str, float]:
    """pruned / plain of every timing part both sides have, but the pre-pass: plain GRPO runs
    none (its `prepass` is building the prompt strings), so that part has no ratio."""
    return {part: pruned[f"timing_s/{part}"] / plain[f"timing_s/{part}"] for part in PARTS
            if part != "prepass" and plain.get(f"timing_s/{part}")
            and f"timing_s/{part}" in pruned}


def table(summary: dict) -> str:
    """Seconds per part for every side run, then each pruned side's ratio to plain."""
    sides = [side for side in SIDES if side in summary]
    pruned = summary["pruned"]
    by_side = summary.get("ratios_by_side", {"pruned": summary["ratios"]})
    lines = [f"GRPO step timing at {summary['image_size']} px, {summary['prompts']} prompts x "
             f"G {summary['group']} x {summary['new_tokens']} tokens; medians of steps "
             f"{pruned['steps']} (seconds; ratio = side / plain)",
             f"{'part':12s} " + " ".join(f"{side:>13s}" for side in sides) + " "
             + " ".join(f"{'ratio ' + side:>20s}" for side in by_side)]

    def cell(side: dict, key: str) -> str:
        return f"{side[key]:13.2f}" if key in side else f"{'-':>13s}"

    for part in PARTS:
        key = f"timing_s/{part}"
        lines.append(f"{part:12s} " + " ".join(cell(summary[side], key) for side in sides)
                     + " " + " ".join(f"{r[part]:20.3f}" if part in r else f"{'-':>20s}"
                                      for r in by_side.values()))
    for key in SHAPE_KEYS + SYNC_KEYS:
        lines.append(f"{key.split('/')[1]:12s} " + " ".join(
            f"{summary[side].get(key, float('nan')):13.3f}" for side in sides))
    share = pruned.get("timing_s/weight_sync", 0) / pruned["timing_s/step"]
    lines.append(f"weight sync share of the pruned step: {share:.3f}")
    return "\n".join(lines)


def plot(summary: dict, out: Path) -> Path:
    """Bars of every timing part, pruned beside plain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    sides = [side for side in SIDES if side in summary]
    width = 0.8 / len(sides)
    for k, side in enumerate(sides):
        values = [summary[side].get(f"timing_s/{part}", 0.0) for part in PARTS]
        ax.bar([i + (k - (len(sides) - 1) / 2) * width for i in range(len(PARTS))], values,
               width, label=side)
    ax.set_xticks(range(len(PARTS)), PARTS)
    ax.set_ylabel("seconds per step (median)")
    ax.set_title(f"GRPO step at {summary['image_size']} px: GlimpsePrune+ vs plain GRPO")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _records(client, run_id: str) -> dict[int, dict[str, float]]:
    """Every metric of a run, by step."""
    by_step: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        for metric in client.get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {})[key] = metric.value
    return {step: values for step, values in by_step.items() if step > 0}


def _options(parser) -> None:
    parser.add_argument("--init", required=True, help="a stage-1 or stage-2 folder (base + "
                        "glimpse_modules/), e.g. glimpseprune/embedded/tiny, or 'random': the "
                        "config's base with freshly initialised glimpse modules")
    parser.add_argument("--sides", default="pruned,plain", help="comma-separated, from "
                        f"{', '.join(SIDES)} (pruned and plain always run)")
    parser.add_argument("--image-size", type=int, default=896, help="pixels per side "
                        "(896: 1,024 visual tokens)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="G, samples per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--keep-ratio", type=float, default=0.1,
                        help="the pruned side's kept / visual tokens (glimpse.min_keep and "
                        "glimpse.max_keep_ratio both set to it, so every sampled mask keeps it)")


def main(argv: list[str] | None = None) -> None:
    from pipeline import grpo
    from pipeline.config import load_config, parse_args
    from pipeline.tracking import Tracker

    cfg, args = parse_args(argv, "GRPO step time: GlimpsePrune+ (pruned rollouts and replay) "
                                 "against plain GRPO (stock vLLM, every token).", _options)
    if args.steps < 3:
        raise SystemExit("bench_grpo: --steps must be at least 3 (the first warms up, the "
                         "last evaluates)")
    wanted = {s.strip() for s in args.sides.split(",") if s.strip()} | {"pruned", "plain"}
    if wanted - set(SIDES):
        raise SystemExit(f"bench_grpo: unknown side(s) {sorted(wanted - set(SIDES))}; known: "
                         f"{', '.join(SIDES)}")
    out = Path(cfg.output_dir) / "bench_grpo"
    if args.init == "random":
        args.init = str(random_init(cfg, out / "random_init"))
    parent = Tracker(cfg, "bench_grpo")
    summary = {"image_size": args.image_size, "prompts": args.prompts, "group": args.group,
               "new_tokens": args.new_tokens, "keep_ratio": args.keep_ratio,
               "init": str(args.init)}
    for side in [side for side in SIDES if side in wanted]:
        run_cfg = load_config(args.config, [*args.overrides, f"tracking.uri={parent.uri}",
                                            *side_overrides(args, side, out)])
        run = grpo.run(run_cfg, parent.run_id)
        summary[side] = side_figures(_records(parent.client, run["mlflow_run_id"]))
        summary[side]["run_id"] = run["mlflow_run_id"]
    summary["ratios_by_side"] = {side: ratios(summary[side], summary["plain"])
                                 for side in SIDES if side in summary and side != "plain"}
    summary["ratios"] = summary["ratios_by_side"]["pruned"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "timing.png")
    for name in ("summary.json", "timing.png"):
        parent.client.log_artifact(parent.run_id, str(out / name), "bench_grpo")
    parent.log({f"ratio/{part}": value for part, value in summary["ratios"].items()}
               | {f"ratio_{side}/{part}": value for side, r in summary["ratios_by_side"].items()
                  if side != "pruned" for part, value in r.items()}, 0)
    parent.finish()
    print(table(summary))
    print(f"written: {out / 'summary.json'}, {out / 'timing.png'} (MLflow run {parent.run_id})")


if __name__ == "__main__":
    main()
