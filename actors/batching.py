"""Rows of a RolloutBatch -> model inputs, and micro-batches that match across ZeRO-3 ranks.

Owns what the policy and reference ranks share: the left-padded processor batch of some rows'
prompts (what GlimpsePruneModel and its replay forward take), each row's keep mask as a tensor,
and the rule that every rank runs the same NUMBER of micro-batches. Must not run a model or
compute a loss.
"""

from __future__ import annotations

import torch

from pipeline.batch import RolloutBatch
from pipeline.prompts import prompt_text


def prompt_inputs(processor, batch: RolloutBatch, rows: range, device: torch.device) -> dict:
    """A left-padded processor batch of the prompts of `rows` (one image each); with the
    rollout's vision-tower outputs (`batch.prompts.vision`) as `vision` instead of pixels, so
    the model does not run its frozen vision tower again."""
    prompts = [batch.prompt_index_B[i] for i in rows]
    processor.tokenizer.padding_side = "left"
    enc = processor(
        text=[prompt_text(processor, batch.prompts.questions[p]) for p in prompts],
        images=[batch.prompts.images[p] for p in prompts], padding=True, return_tensors="pt")
    skip = {"mm_token_type_ids"} | ({"pixel_values"} if batch.prompts.vision else set())
    out = {k: v.to(device) for k, v in enc.items() if k not in skip}
    if batch.prompts.vision:
        out["vision"] = [batch.prompts.vision[p] for p in prompts]
    return out


def keep_masks_of(batch: RolloutBatch, rows: range, device: torch.device) -> list:
    """Each row's keep mask as a bool tensor (None: keep every visual token)."""
    masks = batch.keep_mask_BV or [None] * len(batch)
    return [None if masks[i] is None else torch.as_tensor(masks[i], dtype=torch.bool,
                                                           device=device) for i in rows]


def all_reduce_(tensor: torch.Tensor, op=None) -> torch.Tensor:
    """In-place all-reduce of a small CPU tensor (counts, sums) on any backend: NCCL reduces
    CUDA tensors only, so the values travel through the GPU there."""
    op = torch.distributed.ReduceOp.SUM if op is None else op
    if torch.distributed.get_backend() == "nccl":
        on_device = tensor.cuda()
        torch.distributed.all_reduce(on_device, op=op)
        tensor.copy_(on_device.cpu())
    else:
        torch.distributed.all_reduce(tensor, op=op)
    return tensor


def equal_micro_batches(num_rows: int, size: int) -> list[tuple[list[int], int]]:
    """(rows, real) per micro-batch: the same number of micro-batches of the same sizes on
    every rank (a collective); the first `real` rows are this rank's, the rest repeat its last
    row and must weigh 0.

    Every ZeRO-3 forward all-gathers parameters, once per module CALL: a rank that ran one
    micro-batch more than the others, or one more per-row call (the VIP runs once per row),
    would wait forever. So every rank runs micro-batches shaped by the largest shard.
    """
    if num_rows == 0:
        raise ValueError("a rank received no rows: give each step at least as many rows as "
                         "the group has ranks")
    most = int(all_reduce_(torch.tensor([num_rows]), torch.distributed.ReduceOp.MAX))
    out = []
    for start in range(0, most, size):
        stop = min(start + size, most)
        out.append(([min(i, num_rows - 1) for i in range(start, stop)],
                    max(0, min(stop, num_rows) - start)))
    return out
