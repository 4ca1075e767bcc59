"""Held-out evaluation of a GlimpsePrune model: answers with and without pruning, keep ratio,
and recall of the target-box tokens.

Owns the evaluation rows' batching, greedy generation through GlimpsePruneModel (exact pruned
prefill) with the keep rule and with every token kept, and the figures stage 1 reports. Must not
train. (The full `python -m pipeline.evaluate` with fixed-ratio baselines and latency is F6/F7.)
"""

from __future__ import annotations

import torch

from pipeline.prompts import normalise_answer, prompt_text


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
        inputs = dict(processor(text=[prompt_text(processor, r["question"]) for r in chunk],
                                images=[r["image"] for r in chunk], padding=True,
                                return_tensors="pt"))
        inputs.pop("mm_token_type_ids", None)
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
            "eval/box_recall": target_kept / max(target, 1)}
