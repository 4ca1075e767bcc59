"""Sampled keep masks: per rollout sample, a Bernoulli draw from the VIP's keep probabilities.

Owns the "sampled" mask mode of the rollout (rollout.mask_mode): every visual token is kept
with probability sigmoid(vip_logit / mask_temperature), independently per sample, so that the
samples of one group see different prunings and the pruning bonus can tell them apart. The
keep budget of glimpseprune.keep (min_keep, max_keep_ratio) still holds for every draw.
Must not decide the deterministic keep rule (glimpseprune.keep does) nor learn anything.
"""

from __future__ import annotations

import torch

from glimpseprune.keep import keep_budget


def sample_keep_masks(vip_logits_V: torch.Tensor, num_samples: int, temperature: float = 1.0,
                      min_keep: int = 1, max_keep_ratio: float | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Draws `num_samples` keep masks for one prompt.

    Args:
        vip_logits_V: [V] the prompt's VIP logits.
        num_samples: G, how many masks.
        temperature: divides the logits before the sigmoid (> 0; higher: closer to fair coins).
        min_keep, max_keep_ratio: the budget of `keep.keep_budget`. A draw below the floor
            gains its highest-logit dropped tokens; a draw above the cap keeps only its
            highest-logit kept tokens.
        generator: the random source (CPU).

    Returns:
        bool [G, V] keep_mask_GV.
    """
    if temperature <= 0:
        raise ValueError(f"mask temperature must be > 0, got {temperature}")
    logits_V = vip_logits_V.detach().float().cpu()
    num_visual = logits_V.numel()
    probs_GV = torch.sigmoid(logits_V / temperature).expand(num_samples, num_visual)
    keep_mask_GV = torch.rand(probs_GV.shape, generator=generator) < probs_GV
    low, high = keep_budget(num_visual, min_keep, max_keep_ratio)
    # Ranking by logit (stable: ties go to the earlier token) makes the budget fix deterministic.
    order_V = torch.sort(logits_V, descending=True, stable=True).indices
    for g in range(num_samples):
        kept = int(keep_mask_GV[g].sum())
        if kept < low:
            dropped_in_order = order_V[~keep_mask_GV[g, order_V]]
            keep_mask_GV[g, dropped_in_order[:low - kept]] = True
        elif kept > high:
            kept_in_order = order_V[keep_mask_GV[g, order_V]]
            keep_mask_GV[g, kept_in_order[high:]] = False
    return keep_mask_GV
