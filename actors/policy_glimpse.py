"""Stage 1's update of one policy rank: train the glimpse token + VIP, base frozen.

Owns the per-micro-batch arithmetic of `PolicyActor.train_step(batch, "glimpse_*")`: the box
loss (Dice + 0.1 BCE against the target boxes' token masks), the distillation loss
(glimpseprune.distill) or their sum, and the keep ratio / box recall of the keep rule. Must not
build the engine (actors/policy.py does) nor talk to Ray or MLflow.
"""

from __future__ import annotations

import torch

from actors.batching import all_reduce_
from pipeline.batch import RolloutBatch


def box_targets(actor, batch: RolloutBatch, rows: range, grids: torch.Tensor) -> list:
    """Per row, the bool token mask of its target boxes on the merged grid (None: no boxes)."""
    from glimpseprune.grid import boxes_to_token_mask

    targets = []
    for i, grid in zip(rows, grids, strict=True):
        p = batch.prompt_index_B[i]
        image = batch.prompts.images[p]
        if not batch.prompts.boxes[p]:
            targets.append(None)
            continue
        mask = boxes_to_token_mask(batch.prompts.boxes[p], (image.height, image.width),
                                   (int(grid[1]) // 2, int(grid[2]) // 2))
        targets.append(torch.as_tensor(mask.ravel(), device=actor.device))
    return targets


def glimpse_step(actor, batch: RolloutBatch, loss: str) -> dict[str, float]:
    """Stage 1: "glimpse_box" (Dice + 0.1 BCE against the target-box token masks),
    "glimpse_distill" (glimpseprune.distill: soft-pruned vs unpruned answers + sparsity,
    on the rows' response tokens) or their sum "glimpse_box+distill". Keep ratio and box
    recall use the keep rule."""
    from glimpseprune.distill import distill_losses
    from glimpseprune.keep import keep_masks_for_batch
    from glimpseprune.losses import box_loss

    actor.engine.train()
    rows_total = torch.tensor([float(len(batch))])
    all_reduce_(rows_total)
    sums = torch.zeros(5)  # loss, kept tokens, visual tokens, target tokens (kept, all)
    micro = actor._micro_batches(batch)
    module = actor.engine.module
    for k, (rows, real) in enumerate(micro):
        actor.engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
        inputs = actor._prompt_inputs(batch, rows)
        vip_logits = actor.engine(**inputs)  # through the engine: ZeRO-3 counts micro-steps
        targets = box_targets(actor, batch, rows, inputs["image_grid_thw"])
        losses = torch.zeros(len(rows))
        if "box" in loss:
            if any(t is None for t in targets):
                raise ValueError(f"{loss} got a row without boxes")
            losses = losses + torch.stack([box_loss(v, t) for v, t in
                                           zip(vip_logits, targets, strict=True)])
        if "distill" in loss:
            losses = losses + distill_losses(module, inputs,
                                             [batch.response_ids[i] for i in rows],
                                             actor.glimpse_cfg.train_sparsity, vip_logits)[0]
        # Rows after `real` are padding (see equal_micro_batches): they count nothing.
        actor.engine.backward(losses[:real].sum() / rows_total.item() * actor.dist.world_size,
                              scale_wrt_gas=False)
        keep = keep_masks_for_batch([v.detach() for v in vip_logits[:real]], module.threshold,
                                    module.min_keep, module.max_keep_ratio)
        for m, t, l_ in zip(keep, targets[:real], losses[:real], strict=True):
            hit, total = (0.0, 0.0) if t is None else (float((m & t.bool()).sum()),
                                                        float(t.sum()))
            sums += torch.tensor([float(l_), float(m.sum()), float(m.numel()), hit, total])
    lr = actor.scheduler.get_last_lr()[0]
    actor.engine.step()
    all_reduce_(sums)
    grad_norm = actor.engine.get_global_grad_norm()
    return {"loss": float(sums[0] / rows_total), "lr": float(lr),
            "keep_ratio": float(sums[1] / sums[2]),
            "box_recall": float(sums[3] / sums[4]) if sums[4] else float("nan"),
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
