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
    """A left-padded processor batch of the prompts of `rows` (one image each)."""
    prompts = [batch.prompt_index_B[i] for i in rows]
    processor.tokenizer.padding_side = "left"
    enc = processor(
        text=[prompt_text(processor, batch.prompts.questions[p]) for p in prompts],
        images=[batch.prompts.images[p] for p in prompts], padding=True, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items() if k != "mm_token_type_ids"}


def keep_masks_of(batch: RolloutBatch, rows: range, device: torch.device) -> list:
    """Each row's keep mask as a bool tensor (None: keep every visual token)."""
    masks = batch.keep_mask_BV or [None] * len(batch)
    return [None if masks[i] is None else torch.as_tensor(masks[i], dtype=torch.bool,
                                                           device=device) for i in rows]


def equal_micro_batches(num_rows: int, size: int) -> list[tuple[range, float]]:
    """(rows, weight) per micro-batch, the same COUNT on every rank (a collective).

    Every ZeRO-3 forward all-gathers parameters, so a rank that ran one micro-batch more than
    the others would wait forever. Ranks with fewer rows repeat their last micro-batch with
    weight 0: it joins the collectives and adds nothing to loss or gradient.
    """
    if num_rows == 0:
        raise ValueError("a rank received no rows: give each step at least as many rows as "
                         "the group has ranks")
    micro = [(range(s, min(s + size, num_rows)), 1.0) for s in range(0, num_rows, size)]
    most = torch.tensor([len(micro)])
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return micro + [(micro[-1][0], 0.0)] * (int(most) - len(micro))
