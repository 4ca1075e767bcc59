"""`python -m pipeline.ablate`: the RL ablation of issue F8, arms x seeds from one starting point.

Owns the arms - `full` (plain GRPO: every token kept in rollouts, training and evaluation, no
bonus), `no_bonus` (GlimpsePrune+ with reward.prune_bonus.weight=0), `bonus` (GlimpsePrune+
with the config's bonus), `sft_more` (the control: more SFT steps from the same base at about
the GRPO arms' mean wall-clock) - their runs as MLflow child runs of one `ablate` parent, the
held-out test evaluation of every final model (exact form: transformers, the model's own keep
rule, and every token for the unpruned figure; vLLM form: the keep rule in a vLLM engine, where
every layer sees only the kept tokens), and the summary: mean and std over seeds of
test accuracy, keep ratio and wall time, plus validation curves against steps and wall-clock as
PNG plots. Must not change what the stages do: each arm is only config overrides.

    python -m pipeline.ablate --config configs/tiny_hard.yaml --init DIR [--seeds 0,1,2]
        [--arms full,no_bonus,bonus,sft_more] [--sft-steps N] [--test-limit N] [key=value ...]

DIR holds a base and its stage-1 `glimpse_modules/` (an embedded-default folder or a stage-1 /
stage-2 export). Each finished (arm, seed) leaves `<arm>-s<seed>/ablate_result.json` and
rewrites summary.json / curves.png; the same command after an interruption reuses the finished
runs and runs only the rest (their child runs stay under the first parent run).
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

ARMS = {
    "full": ["rollout.mask_mode=full", "reward.prune_bonus.weight=0", "algo.train_vip=false"],
    "no_bonus": ["reward.prune_bonus.weight=0"],
    "bonus": [],
    "sft_more": [],
}
GRPO_ARMS = ("full", "no_bonus", "bonus")


def arm_overrides(arm: str, init: str, seed: int, out: Path, sft_steps: int) -> list[str]:
    """The dotted overrides one (arm, seed) run gets on top of the user's config."""
    common = [f"output_dir={out / f'{arm}-s{seed}'}", f"trainer.seed={seed}"]
    if arm == "sft_more":  # continue the base's answer training: no dense pretraining again
        return common + [f"model.path={init}", "sft.vision_pretrain_steps=0",
                         f"sft.total_steps={sft_steps}", f"sft.eval_every={max(sft_steps // 5, 1)}",
                         f"sft.checkpoint_every={sft_steps}"]
    return common + [f"trainer.init_from={init}", *ARMS[arm]]


def test_accuracy(cfg, model_dir: Path, modules: Path, limit: int) -> dict[str, float]:
    """Test accuracy with the keep rule and with every token in the exact form, the keep
    ratio, and the keep rule's accuracy and keep ratio in the vLLM form (`*_vllm`)."""
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.processor import load_processor
    from pipeline.data import load_split
    from pipeline.evaluate import evaluate_glimpse

    rows, _ = load_split(cfg.data, "test", cfg.output_dir)
    rows = [rows[i] for i in range(min(limit or len(rows), len(rows)))]
    model = GlimpsePruneModel.from_pretrained(model_dir, cfg.glimpse, modules_path=str(modules))
    result = evaluate_glimpse(model, load_processor(model_dir, cfg.model), rows,
                              cfg.rollout.max_new_tokens)
    del model  # the vLLM pass loads its own copy
    return {"test/accuracy_pruned": result["eval/accuracy"],
            "test/accuracy_unpruned": result["eval/accuracy_unpruned"],
            "test/keep_ratio": result["eval/keep_ratio"],
            **vllm_test_accuracy(cfg, model_dir, modules, rows)}


def vllm_test_accuracy(cfg, model_dir: Path, modules: Path, rows: list[dict]) -> dict:
    """The keep rule's greedy test accuracy in the vLLM form (every layer sees only the kept
    tokens: what rollouts, GRPO's validation and serving run), in this process's own engine."""
    from dataclasses import replace

    from actors.rollout import RolloutActor
    from pipeline.batch import PromptBatch
    from pipeline.grpo import greedy_scores

    actor = RolloutActor(str(model_dir), cfg.model, replace(cfg.glimpse,
                                                            modules_path=str(modules)),
                         replace(cfg.rollout, mask_mode="shared"), seed=cfg.trainer.seed,
                         max_image_pixels=cfg.data.max_image_pixels)
    try:
        out = actor.generate(PromptBatch.from_rows(rows), n=1, greedy=True)
    finally:
        actor.shutdown()
    failed = [rows[b]["id"] for b, error in enumerate(out.extras["error"]) if error]
    if failed:
        raise RuntimeError(f"ablate: the vLLM form failed test rows {failed[:5]}")
    scores = greedy_scores(out, rows, actor.processor.tokenizer)  # as GRPO's validation
    return {"test/accuracy_pruned_vllm": scores["eval/accuracy"],
            "test/keep_ratio_vllm": scores["eval/keep_ratio"]}


def _history(client, run_id: str, key: str) -> list[tuple[int, float, float]]:
    """(step, seconds since the run's first value of `key`, value) of one metric: the clock
    starts at the step-0 evaluation, so start-up (Ray actors, engines, op builds) is left out
    alike for every arm."""
    history = sorted((m.step, m.timestamp, m.value) for m in client.get_metric_history(run_id, key))
    start = min((t for _, t, _ in history), default=0)
    return [(step, (t - start) / 1000, value) for step, t, value in history]


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def plot_curves(curves: dict, out: Path) -> Path:
    """Validation accuracy and keep ratio per arm (mean over seeds, band of one std) against
    steps and against wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for (row, key), (col, axis) in [((r, k), (c, a)) for r, k in
                                    enumerate(("eval/accuracy", "eval/keep_ratio"))
                                    for c, a in enumerate(("step", "wall-clock (s)"))]:
        ax = axes[row][col]
        for arm, runs in curves.items():
            series = [h for h in (run.get(key) for run in runs) if h]
            if not series:
                continue
            length = min(len(s) for s in series)
            x = np.mean([[p[col] for p in s[:length]] for s in series], 0)
            y = np.array([[p[2] for p in s[:length]] for s in series])
            ax.plot(x, y.mean(0), "o-", label=f"{arm} ({len(series)} seeds)", markersize=3)
            ax.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
        ax.set_xlabel(axis)
        ax.set_ylabel(f"validation {key.split('/')[1]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _options(parser) -> None:
    parser.add_argument("--init", required=True, help="base + glimpse_modules/ folder")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--sft-steps", type=int, default=0, help="sft_more's steps (0: the "
                        "GRPO arms' mean wall time / the base card's seconds per SFT step)")
    parser.add_argument("--test-limit", type=int, default=0, help="first N test rows (0: all)")


def _sft_steps(args, init: Path, grpo_wall: list[float]) -> int:
    if args.sft_steps:
        return args.sft_steps
    card = json.loads((init / "card.json").read_text()) if (init / "card.json").is_file() \
        else {}
    base = card.get("base", {})
    if not (grpo_wall and base.get("wall_s") and base.get("steps")):
        raise SystemExit("ablate: pass --sft-steps (no GRPO arm ran first, or --init has no "
                         "card.json with the base's SFT wall time and steps)")
    return max(1, round(statistics.fmean(grpo_wall) / (base["wall_s"] / base["steps"])))


def _finished_runs(out: Path, arms: list[str], seeds: list[int],
                   overrides: list[str]) -> dict[tuple[str, int], dict]:
    """The (arm, seed) results an earlier ablate left in `out`; refuses ones made with other
    overrides (another budget must not be mixed into this one's means)."""
    finished = {}
    for arm in arms:
        for seed in seeds:
            saved = out / f"{arm}-s{seed}" / "ablate_result.json"
            if not saved.is_file():
                continue
            earlier = json.loads(saved.read_text())
            if earlier.get("overrides") != overrides:
                raise SystemExit(f"ablate: {saved} was made with the overrides "
                                 f"{earlier.get('overrides')}, not {overrides}: use another "
                                 "output_dir or delete it")
            finished[arm, seed] = earlier
    return finished


def main(argv: list[str] | None = None) -> None:
    from pipeline import grpo, sft
    from pipeline.config import load_config, parse_args
    from pipeline.tracking import Tracker

    cfg, args = parse_args(argv, "The RL ablation: plain GRPO, GlimpsePrune+ without and with "
                                 "the pruning bonus, and more SFT, over seeds.", _options)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if set(arms) - set(ARMS):
        raise SystemExit(f"ablate: unknown arm(s) {sorted(set(arms) - set(ARMS))}; known: "
                         f"{', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    init, out = Path(args.init).resolve(), Path(cfg.output_dir) / "ablate"
    finished = _finished_runs(out, arms, seeds, args.overrides)  # before any work
    parent = Tracker(cfg, "ablate")
    # Every child run logs into the parent's store (its own output_dir would give it another).
    user = [*args.overrides, f"tracking.uri={parent.uri}"]
    results: dict[str, list[dict]] = defaultdict(list)
    base_test = test_accuracy(cfg, init, init / "glimpse_modules", args.test_limit)
    parent.log({f"base/{k}": v for k, v in base_test.items()}, 0)
    order = [a for a in arms if a in GRPO_ARMS] + [a for a in arms if a not in GRPO_ARMS]
    for arm in order:
        for seed in seeds:
            saved = out / f"{arm}-s{seed}" / "ablate_result.json"
            if (arm, seed) in finished:  # by an earlier, interrupted ablate: not run again
                results[arm].append(finished[arm, seed])
                print(f"ablate: {arm} seed {seed}: reused {saved}", flush=True)
                continue
            steps = _sft_steps(args, init, [r["wall_s"] for a in GRPO_ARMS
                                            for r in results.get(a, [])]) \
                if arm == "sft_more" else 0
            run_cfg = load_config(args.config, user + arm_overrides(arm, str(init), seed, out,
                                                                    steps))
            tick = time.perf_counter()
            summary = (sft.run if arm == "sft_more" else grpo.run)(run_cfg, parent.run_id)
            wall = time.perf_counter() - tick
            export = Path(summary["export"])
            modules = export / "glimpse_modules"
            test = test_accuracy(run_cfg, export, modules if modules.is_dir()
                                 else init / "glimpse_modules", args.test_limit)
            results[arm].append({"seed": seed, "wall_s": wall, "run_id": summary["mlflow_run_id"],
                                 "sft_steps": steps or None, "overrides": args.overrides,
                                 **test})
            saved.write_text(json.dumps(results[arm][-1], indent=2) + "\n")
            print(f"ablate: {arm} seed {seed}: {json.dumps(results[arm][-1])}", flush=True)
            write_summary(parent.client, out, init, seeds, base_test, results)  # so far
    table = write_summary(parent.client, out, init, seeds, base_test, results)
    for name in ("summary.json", "curves.png"):
        parent.client.log_artifact(parent.run_id, str(out / name), "ablate")
    parent.log({f"{arm}/{key}_{stat}": value for arm, keys in table.items()
                for key, stats in keys.items() for stat, value in stats.items()}, 0)
    parent.finish()
    for arm, keys in table.items():
        print(f"{arm:10s} " + "  ".join(f"{k} {v['mean']:.3f}+-{v['std']:.3f}"
                                         for k, v in keys.items()))
    print(f"written: {out / 'summary.json'} (MLflow run {parent.run_id})")


def write_summary(client, out: Path, init: Path, seeds: list[int], base_test: dict,
                  results: dict[str, list[dict]]) -> dict:
    """summary.json (mean / std over the finished seeds of every arm, `n` says how many) and
    curves.png from the runs finished so far; returns the per-arm table."""
    curves = {arm: [{key: _history(client, r["run_id"], key)
                     for key in ("eval/accuracy", "eval/keep_ratio")} for r in runs]
              for arm, runs in results.items()}
    table = {arm: {key: _stats([r[key] for r in runs]) for key in
                   ("test/accuracy_pruned", "test/accuracy_unpruned", "test/keep_ratio",
                    "test/accuracy_pruned_vllm", "test/keep_ratio_vllm", "wall_s")
                   if all(key in r for r in runs)} for arm, runs in results.items()}
    summary = {"init": str(init), "seeds": seeds, "base": base_test, "arms": table,
               "runs": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(curves, out / "curves.png")
    return table


if __name__ == "__main__":
    main()
