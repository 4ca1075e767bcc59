"""The keep rule: VIP logits -> which visual tokens a sample keeps.

Owns the fixed-threshold rule of method.md (keep = sigmoid(logit) > threshold), its top-k cap
`max_keep_ratio` and its floor `min_keep`, applied per sample over all of that sample's visual
tokens (several images are concatenated, row-major per image). Must not smooth, grow regions or
learn anything: the VIP alone decides relevance, this file only turns scores into a mask.
"""

from __future__ import annotations

import math

import torch


def keep_budget(num_visual: int, min_keep: int, max_keep_ratio: float | None) -> tuple[int, int]:
    """The (lowest, highest) number of tokens a sample with `num_visual` visual tokens may keep.

    The cap is floor(max_keep_ratio * V), so the kept ratio never exceeds the setting (the
    paper's <=11.1% budgets); `min_keep` wins over the cap and both are clipped to V.
    """
    low = min(max(min_keep, 0), num_visual)
    if max_keep_ratio is None:
        return low, num_visual
    # The epsilon stops 0.29 * 100 = 28.999... from flooring to 28.
    cap = math.floor(max_keep_ratio * num_visual + 1e-9)
    return low, max(low, min(cap, num_visual))


def keep_mask_from_logits(vip_logits_V: torch.Tensor, threshold: float = 0.5, min_keep: int = 1,
                          max_keep_ratio: float | None = None) -> torch.Tensor:
    """Turns one sample's VIP logits into its keep mask.

    Args:
        vip_logits_V: [V] one logit per visual token of the sample (all its images).
        threshold: keep where sigmoid(logit) > threshold.
        min_keep: keep at least this many (the highest logits) even if fewer pass.
        max_keep_ratio: if more than floor(ratio * V) pass, keep only that many, highest first.

    Returns:
        bool [V] keep_mask_V.
    """
    logits_V = vip_logits_V.detach().float()
    num_visual = logits_V.numel()
    keep_mask_V = torch.sigmoid(logits_V) > threshold
    low, high = keep_budget(num_visual, min_keep, max_keep_ratio)
    passed = int(keep_mask_V.sum())
    if low <= passed <= high:
        return keep_mask_V
    count = high if passed > high else low
    # A stable sort makes ties go to the earlier token, so the mask is deterministic.
    order_V = torch.sort(logits_V, descending=True, stable=True).indices
    keep_mask_V = torch.zeros(num_visual, dtype=torch.bool, device=logits_V.device)
    keep_mask_V[order_V[:count]] = True
    return keep_mask_V


def keep_masks_for_batch(vip_logits: list[torch.Tensor], threshold: float = 0.5,
                         min_keep: int = 1,
                         max_keep_ratio: float | None = None) -> list[torch.Tensor]:
    """`keep_mask_from_logits` for each sample of a batch (samples differ in V)."""
    return [keep_mask_from_logits(v, threshold, min_keep, max_keep_ratio) for v in vip_logits]
