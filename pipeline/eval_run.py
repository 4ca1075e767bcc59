"""`pipeline.evaluate --methods`: loads what the methods need, runs them, writes and logs it all.

Owns the method list's checks, the models (the base + its stage-1 glimpse modules, and a
stage-2 export for glimpseprune_plus), the settings (learned keep rules first; then every
fixed-ratio pruner at 11.1 / 22.2 / 33.3 % and at glimpseprune's own mean keep ratio, the
matched comparison), one vLLM engine at a time for the vLLM form, and the outputs under
<output_dir>/evaluate/<split>-methods/: samples.jsonl, summary.json, table.txt,
accuracy_vs_keep.png - the same files and every aggregate as metrics in one MLflow run.
Must not hold method maths (pipeline/eval_methods.py) or per-sample loops
(pipeline/eval_compare.py).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from pipeline.eval_compare import FIXED_RATIOS, Setting, run_exact, run_vllm
from pipeline.eval_methods import FIXED_RATIO_METHODS, LEARNED_METHODS, METHODS


def parse_methods(text: str, modules: str, plus: str) -> list[str]:
    """The --methods list, checked: known names, and the folders the learned ones need."""
    methods = list(METHODS) if text.strip() == "all" else \
        [m.strip() for m in text.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"evaluate: unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    if text.strip() == "all" and not plus:
        methods.remove("glimpseprune_plus")
    if "glimpseprune" in methods and not modules:
        raise SystemExit("evaluate: method glimpseprune needs --modules (stage 1's glimpse "
                         "modules folder)")
    if "glimpseprune_plus" in methods and not plus:
        raise SystemExit("evaluate: method glimpseprune_plus needs --plus (a stage-2 export)")
    return methods


def _settings(methods: list[str], matched: float | None) -> list[Setting]:
    ratios = sorted(set(FIXED_RATIOS) | ({round(matched, 4)} if matched else set()))
    return [Setting(m, r) for m in methods if m in FIXED_RATIO_METHODS for r in ratios]


def _load_models(cfg, model_dir: Path, modules: str, plus: str) -> dict:
    from glimpseprune.model import GlimpsePruneModel

    models = {"glimpseprune": GlimpsePruneModel.from_pretrained(
        model_dir, cfg.glimpse, modules_path=modules or None)}
    if plus:
        models["glimpseprune_plus"] = GlimpsePruneModel.from_pretrained(
            plus, cfg.glimpse, modules_path=str(Path(plus) / "glimpse_modules"))
    return models


def _vllm_pass(cfg, model_dir: Path, args, rows, settings, tokenizer, geometry,
               boxes) -> list[dict]:
    """One engine for the base (baseline, fixed-ratio, glimpseprune), then one for the plus
    export; each stopped before the next starts (two engines do not fit a small box)."""
    from actors.rollout import RolloutActor

    rollout_cfg = replace(cfg.rollout, mask_mode="shared")
    records = []
    groups = [(model_dir, args.modules, [s for s in settings
                                         if s.method != "glimpseprune_plus"])]
    if args.plus:
        groups.append((Path(args.plus), str(Path(args.plus) / "glimpse_modules"),
                       [s for s in settings if s.method == "glimpseprune_plus"]))
    for path, modules, group in groups:
        if not group:
            continue
        actor = RolloutActor(str(path), cfg.model, replace(cfg.glimpse, modules_path=modules),
                             rollout_cfg, seed=args.seed,
                             max_image_pixels=cfg.data.max_image_pixels)
        try:  # the learned settings use this engine's own pre-pass keep rule
            records += run_vllm({m: actor for m in LEARNED_METHODS}, rows, group, tokenizer,
                                geometry, boxes)
        finally:
            actor.shutdown()
    return records


def _row_box_masks(processor, rows: list[dict]) -> list | None:
    """Per row, the target boxes' token mask on the grid the processor gives its image; None
    when a row has no boxes (user data without them: no recall column)."""
    from pipeline.evaluate import _box_masks

    if not all(r.get("boxes") for r in rows):
        return None
    grids = [processor.image_processor(images=[r["image"]], return_tensors="pt")
             ["image_grid_thw"][0] for r in rows]
    return _box_masks(rows, grids)


def run_methods(cfg, args, model_dir: Path, rows: list[dict], chance: dict,
                skipped: int = 0) -> dict:
    """Runs the comparison and writes / logs its outputs; returns the summary. `skipped`:
    rows the loader or the processor left out (recorded in the summary)."""
    from glimpseprune.processor import load_processor
    from pipeline.eval_report import aggregate, plot, table
    from pipeline.tracking import Tracker

    methods = parse_methods(args.methods, args.modules, args.plus)
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    if set(forms) - {"exact", "vllm"} or "exact" not in forms:
        raise SystemExit("evaluate: --forms takes exact or exact,vllm (vllm reuses the exact "
                         "pass's keep masks)")
    models = _load_models(cfg, model_dir, args.modules, args.plus)
    processor = load_processor(model_dir, cfg.model)
    max_new = cfg.rollout.max_new_tokens
    learned = [Setting(m) for m in methods if m in LEARNED_METHODS]
    settings = [Setting("baseline")] if "baseline" in methods else []
    boxes = _row_box_masks(processor, rows)
    records = run_exact(models, processor, rows, learned + settings, args.batch_size, max_new,
                        args.seed, boxes)
    matched = next((sum(int(m.sum()) for m in s.masks) / sum(m.numel() for m in s.masks)
                    for s in learned if s.method == "glimpseprune"), None)
    fixed = _settings(methods, matched)
    records += run_exact(models, processor, rows, fixed, args.batch_size, max_new, args.seed,
                         boxes)
    settings = learned + settings + fixed
    spec = models["glimpseprune"].glimpse_modules.spec
    if "vllm" in forms:
        records += _vllm_pass(cfg, model_dir, args, rows, settings, processor.tokenizer,
                              (spec.text_layers, spec.prune_layer), boxes)
    measured = {(form, s.label): s.measured[form] for s in settings for form in s.measured}
    summary_rows = aggregate(records, measured)
    out_dir = Path(cfg.output_dir) / "evaluate" / f"{args.split}-methods"
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / "samples.jsonl").open("w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
    summary = {"model": str(model_dir), "modules": args.modules, "plus": args.plus,
               "split": args.split, "rows": len(rows), "skipped": skipped, "forms": forms,
               "matched_keep_ratio": matched, "seed": args.seed, **chance,
               "results": summary_rows}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = table(summary_rows)
    (out_dir / "table.txt").write_text(text + "\n")
    plot(summary_rows, out_dir / "accuracy_vs_keep.png", f"{args.split} ({len(rows)} rows)")
    tracker = Tracker(cfg, "evaluate")
    tracker.log({f"{r['form']}/{r['setting']}/{k}": v for r in summary_rows
                 for k, v in r.items() if isinstance(v, float)}, step=0)
    tracker.client.log_artifacts(tracker.run_id, str(out_dir), "evaluate")
    tracker.finish()
    print(text)
    for key, value in chance.items():
        print(f"{key:32s} {value:.3f}")
    print(f"written: {out_dir} (MLflow run {tracker.run_id})")
    return summary
