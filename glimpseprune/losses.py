"""Stage-1 losses of the glimpse token + VIP (method.md, "Stage 1").

Owns the localisation loss: Dice + 0.1 x BCE between a sample's VIP logits and the token mask
rasterised from its target boxes (glimpseprune.grid). Pure functions of tensors; must not run
the model.
"""

from __future__ import annotations

import torch

BCE_WEIGHT = 0.1  # the reference method's weight of BCE beside Dice


def dice_loss(vip_logits_V: torch.Tensor, target_V: torch.Tensor, smooth: float = 1.0
              ) -> torch.Tensor:
    """1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s), p = sigmoid(logits); soft, per sample."""
    probs_V = torch.sigmoid(vip_logits_V.float())
    target_V = target_V.float()
    overlap = (probs_V * target_V).sum()
    return 1.0 - (2.0 * overlap + smooth) / (probs_V.sum() + target_V.sum() + smooth)


def box_loss(vip_logits_V: torch.Tensor, target_V: torch.Tensor) -> torch.Tensor:
    """Dice + 0.1 x BCE of one sample's VIP logits against its box token mask."""
    bce = torch.nn.functional.binary_cross_entropy_with_logits(vip_logits_V.float(),
                                                               target_V.float())
    return dice_loss(vip_logits_V, target_V) + BCE_WEIGHT * bce
