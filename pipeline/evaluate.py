"""Held-out evaluation of a GlimpsePrune model: answers with and without pruning, keep ratio,
recall of the target-box tokens, and the grounding checks of the embedded default.

Owns the evaluation rows' batching, greedy generation through GlimpsePruneModel (exact pruned
prefill) with the keep rule, with every token kept, with only the target-box tokens and with
every token but those; per-question-type accuracy against chance levels; and the
`python -m pipeline.evaluate` command. Without --methods it writes the grounding checks as JSON;
with --methods it compares pruning methods through both inference forms (the training-free
fixed-ratio pruners at 11.1 / 22.2 / 33.3 % and at glimpseprune's own mean keep ratio;
pipeline/eval_compare.py) and writes per-sample JSONL, an aggregate JSON, a table and a PNG
plot, all logged to an MLflow `evaluate` run. Any data source works: per-type columns and
chance levels appear only where rows have a `question_type`. Must not train.

    python -m pipeline.evaluate --config configs/tiny.yaml [--model DIR] [--modules DIR]
        [--split test] [--limit N] [--methods baseline,random,fastv,divprune,cdpruner,
        glimpseprune,glimpseprune_plus --plus DIR --forms exact,vllm] [dotted.key=value ...]
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import torch

from pipeline.prompts import normalise_answer, prompt_text

log = logging.getLogger(__name__)


def _prompt_batch(processor, rows: list[dict]) -> dict:
    """A left-padded processor batch of the rows' prompts (GlimpsePruneModel builds its own
    M-RoPE ids, so mm_token_type_ids is dropped)."""
    processor.tokenizer.padding_side = "left"
    inputs = dict(processor(text=[prompt_text(processor, r["question"]) for r in rows],
                            images=[r["image"] for r in rows], padding=True, return_tensors="pt"))
    inputs.pop("mm_token_type_ids", None)
    return inputs


def drop_unprocessable(processor, rows: list[dict], report) -> list[dict]:
    """The rows the processor takes, one at a time; each it refuses is counted in `report`
    (reason "processor refused it") and left out, so one such row cannot stop an evaluation.
    The loader checks rows first; this catches what only the model's own processor sees."""
    kept, refused = [], []
    for row in rows:
        try:
            _prompt_batch(processor, [row])
        except Exception as error:  # noqa: BLE001 - whatever the processor raises is the row's
            report.add("processor refused it", row["id"])
            refused.append(f"{row['id']} ({type(error).__name__}: {error})")
        else:
            kept.append(row)
    if refused:
        log.warning(
            "evaluate: the processor refused %d of %d rows, left out: %s", len(refused),
            len(rows), "; ".join(refused[:5]))
    if not kept:
        from pipeline.data import DataError

        raise DataError(f"evaluate: the processor refused every row, e.g. {refused[0]}")
    return kept


def evaluate_glimpse(model, processor, rows: list[dict], max_new_tokens: int = 8,
                     batch_size: int = 8) -> dict[str, float]:
    """Greedy exact match pruned vs unpruned, mean keep ratio and target-box token recall.

    Args:
        model: a GlimpsePruneModel (its keep rule settings apply).
        processor: the base checkpoint's processor.
        rows: rows in the common schema (boxes optional; recall counts rows that have them).
    """
    from glimpseprune.grid import boxes_to_token_mask

    processor.tokenizer.padding_side = "left"
    hits = {"pruned": [], "full": []}
    kept = visual = target = target_kept = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs = _prompt_batch(processor, chunk)
        with torch.no_grad():
            pruned = model.generate(inputs, max_new_tokens=max_new_tokens)
            full = model.generate(inputs, max_new_tokens=max_new_tokens,
                                  keep_masks=[None] * len(chunk))
        for name, out in (("pruned", pruned), ("full", full)):
            for row, tokens in zip(chunk, out.tokens, strict=True):
                answer = processor.tokenizer.decode(tokens, skip_special_tokens=True)
                hits[name].append(normalise_answer(answer) == normalise_answer(row["answer"]))
        for row, mask, grid in zip(chunk, pruned.keep_masks, inputs["image_grid_thw"],
                                   strict=True):
            kept += int(mask.sum())
            visual += mask.numel()
            if row.get("boxes"):
                box_mask = boxes_to_token_mask(row["boxes"], (row["image"].height,
                                                              row["image"].width),
                                               (int(grid[1]) // 2, int(grid[2]) // 2))
                box_V = torch.as_tensor(box_mask.ravel())
                target += int(box_V.sum())
                target_kept += int((box_V & mask.cpu()).sum())
    return {"eval/accuracy": sum(hits["pruned"]) / len(rows),
            "eval/accuracy_unpruned": sum(hits["full"]) / len(rows),
            "eval/keep_ratio": kept / max(visual, 1),
            # not applicable (NaN) when no row has boxes, rather than a recall of 0
            "eval/box_recall": target_kept / target if target else float("nan")}


# Answers each synthetic question type can have: uniform chance is one over their count
# (object_left_of: 7 colours x 4 shapes).
ANSWER_COUNTS = {"color": 7, "shape": 4, "number": 10, "number_right_of": 10,
                 "object_left_of": 28}


def chance_levels(test_rows: list[dict], train_answers: dict[str, Counter]) -> dict[str, float]:
    """Per type and overall: uniform chance (1 / possible answers) and the prior baseline
    (always the type's most common TRAIN answer, scored on the test rows)."""
    out, uniform, prior = {}, [], []
    by_type = defaultdict(list)
    for row in test_rows:
        by_type[row["question_type"]].append(row)
    for qtype, rows in sorted(by_type.items()):
        common = train_answers[qtype].most_common(1)[0][0] if train_answers[qtype] else ""
        hits = [normalise_answer(r["answer"]) == normalise_answer(common) for r in rows]
        out[f"chance_uniform/{qtype}"] = 1.0 / ANSWER_COUNTS.get(qtype, 1)
        out[f"chance_prior/{qtype}"] = sum(hits) / len(rows)
        uniform += [1.0 / ANSWER_COUNTS.get(qtype, 1)] * len(rows)
        prior += hits
    out["chance_uniform"] = sum(uniform) / max(len(uniform), 1)
    out["chance_prior"] = sum(prior) / max(len(prior), 1)
    return out


def _box_masks(rows: list[dict], grids: torch.Tensor) -> list[torch.Tensor]:
    from glimpseprune.grid import boxes_to_token_mask

    return [torch.as_tensor(boxes_to_token_mask(
        row["boxes"], (row["image"].height, row["image"].width),
        (int(grid[1]) // 2, int(grid[2]) // 2)).ravel()) for row, grid in zip(rows, grids,
                                                                            strict=True)]


def evaluate_grounding(model, processor, rows: list[dict], max_new_tokens: int = 8,
                       batch_size: int = 8, with_pruning: bool = False) -> dict[str, float]:
    """Greedy exact match per question type with every visual token ("full"), only the target
    box's tokens ("box_only"), every token but those ("no_box") and, with `with_pruning`, the
    keep rule of the model's VIP ("pruned", plus its keep ratio and the share of target-box
    tokens it keeps). The box checks and the box recall count only rows that have boxes; with
    none they are left out (not applicable), never scored on empty masks."""
    processor.tokenizer.padding_side = "left"
    hits: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    kept = visual = target = target_kept = 0
    boxed = [bool(r.get("boxes")) for r in rows]

    def score(mode: str, chunk: list[dict], inputs: dict, masks) -> list:
        with torch.no_grad():
            out = model.generate(inputs, max_new_tokens=max_new_tokens, keep_masks=masks)
        for row, tokens in zip(chunk, out.tokens, strict=True):
            answer = processor.tokenizer.decode(tokens, skip_special_tokens=True)
            hits[mode].append((row["question_type"],
                               normalise_answer(answer) == normalise_answer(row["answer"])))
        return out.keep_masks

    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs = _prompt_batch(processor, chunk)
        score("full", chunk, inputs, [None] * len(chunk))
        if with_pruning:
            masks = score("pruned", chunk, inputs, None)  # the keep rule decides
            kept += sum(int(m.sum()) for m in masks)
            visual += sum(m.numel() for m in masks)
        with_boxes = [k for k in range(len(chunk)) if boxed[start + k]]
        if not with_boxes:
            continue
        if len(with_boxes) < len(chunk):
            chunk = [chunk[k] for k in with_boxes]
            inputs = _prompt_batch(processor, chunk)
        box = _box_masks(chunk, inputs["image_grid_thw"])
        score("box_only", chunk, inputs, box)
        score("no_box", chunk, inputs, [~m for m in box])
        if with_pruning:
            own = [masks[k] for k in with_boxes]
            target += sum(int(b.sum()) for b in box)
            target_kept += sum(int((b & m.cpu()).sum()) for b, m in zip(box, own, strict=True))
    result = {"rows_with_boxes": sum(boxed)}
    for mode, pairs in hits.items():
        result[f"{mode}/accuracy"] = sum(h for _, h in pairs) / len(pairs)
        for qtype in sorted({t for t, _ in pairs}):
            of_type = [h for t, h in pairs if t == qtype]
            result[f"{mode}/accuracy/{qtype}"] = sum(of_type) / len(of_type)
    if with_pruning:
        result["pruned/keep_ratio"] = kept / max(visual, 1)
        if target:  # target-box tokens kept; not applicable without boxes
            result["pruned/box_recall"] = target_kept / target
    return result


def _train_answers(cfg) -> dict[str, Counter]:
    """Per question type, the TRAIN split's answer counts (empty where the source has no
    train split or no question types: chance levels are then left out)."""
    from pipeline.data import DataError, load_split

    counts: dict[str, Counter] = defaultdict(Counter)
    try:
        train, _ = load_split(cfg.data, "train", cfg.output_dir)
    except DataError:
        return counts
    if "question_type" not in train.column_names:
        return counts
    for qtype, answer in zip(train["question_type"], train["answer"], strict=True):
        counts[qtype][normalise_answer(answer)] += 1
    return counts


def _options(parser) -> None:
    parser.add_argument("--model", default="", help="HF folder (default: model.path or the tiny "
                                                     "base)")
    parser.add_argument("--modules", default="", help="glimpse modules folder: also evaluate "
                                                       "pruning with its keep rule")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="first N rows (0: all)")
    parser.add_argument("--methods", default="", help="comma-separated methods to compare: "
                        "baseline, random, fastv, divprune, cdpruner, glimpseprune, "
                        "glimpseprune_plus (or 'all')")
    parser.add_argument("--plus", default="", help="a stage-2 (GRPO) export folder: the "
                                                    "glimpseprune_plus method")
    parser.add_argument("--forms", default="exact,vllm", help="inference forms: exact "
                        "(transformers) and/or vllm; vllm reuses the exact pass's masks")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="the random pruner's seed")


def main(argv: list[str] | None = None) -> None:
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.processor import load_processor
    from glimpseprune.tiny import resolve_base_model
    from pipeline.config import parse_args
    from pipeline.data import load_split

    cfg, args = parse_args(argv, "Held-out accuracy, grounding checks, chance levels and the "
                                 "comparison of pruning methods.", _options)
    model_dir = Path(args.model) if args.model else resolve_base_model(cfg.model, cfg.output_dir)
    rows, report = load_split(cfg.data, args.split, cfg.output_dir)
    rows = [rows[i] for i in range(min(args.limit or len(rows), len(rows)))]
    rows = drop_unprocessable(load_processor(model_dir, cfg.model), rows, report)
    train_answers = _train_answers(cfg)
    typed = all(r.get("question_type") for r in rows) and bool(train_answers)
    chance = chance_levels(rows, train_answers) if typed else {}
    if args.methods:
        from pipeline.eval_run import run_methods

        run_methods(cfg, args, model_dir, rows, chance, report.skipped)
        return
    model = GlimpsePruneModel.from_pretrained(model_dir, cfg.glimpse,
                                              modules_path=args.modules or None)
    processor = load_processor(model_dir, cfg.model)
    if not typed:
        rows = [{**r, "question_type": r.get("question_type") or "all"} for r in rows]
    result = {"model": str(model_dir), "modules": args.modules, "split": args.split,
              "rows": len(rows), "skipped": report.skipped,
              "skipped_by_reason": dict(report.counts), **chance,
              **evaluate_grounding(model, processor, rows, cfg.rollout.max_new_tokens,
                                   with_pruning=bool(args.modules))}
    out = Path(cfg.output_dir) / "evaluate" / f"{args.split}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for key, value in result.items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
