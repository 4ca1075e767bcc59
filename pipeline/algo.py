"""GRPO maths as small pure functions of tensors. No ray, deepspeed or vllm imports.

Owns group advantages, the clipped policy objective, the k3 KL estimate, loss aggregation and
the truncated importance-sampling weight. Tensors use shape letters: B rows, T response tokens
(right-padded, with `mask_BT` marking real tokens).

Departures from textbook GRPO (each is a config choice):
- Clip-higher (DAPO): the ratio is clipped to [1 - clip_low, 1 + clip_high] with separate
  bounds, so low-probability tokens that earned a positive advantage can grow faster.
- Token-level aggregation (DAPO) by default: the loss is the mean over every response token of
  the batch, so long answers are not down-weighted; `loss_agg="sequence"` gives GRPO's mean of
  per-sequence means.
- Dr.GRPO advantages optional (`advantage="drgrpo"`): r - mean(group) without dividing by the
  group's std, which otherwise up-weights groups whose rewards barely differ. It matters for
  the pruning bonus: std-normalised, a group with one correct sample ([1 + b, 0, 0, 0]) gets
  the same advantages for any bonus b, so only groups with several correct samples feel it.
- KL in the loss with the k3 estimator (exp(ref - logp) - (ref - logp) - 1, always >= 0), not in
  the reward; coefficient 0 skips the reference model altogether.
- Truncated importance sampling (optional, `tis_cap` > 0): vLLM samples with its own kernels, so
  its log-probs differ slightly from the trainer's; tokens are re-weighted by
  min(exp(logp_old_trainer - logp_vllm), cap).
- The keep mask is part of the action: rows of one group use different keep masks, so a correct
  answer from fewer visual tokens earns a larger advantage through the pruning bonus (a shared
  mask would make the bonus constant within the group, and normalisation would erase it).
  Each row's mask is drawn per token from sigmoid(vip_logit / rollout.mask_temperature)
  (rollout.mask_mode=sampled), then fitted to the keep budget (min_keep, max_keep_ratio).
  The policy and reference replay the row's own mask, so every log-prob is of the sequence vLLM
  sampled from. With `algo.train_vip` the VIP (and glimpse token) also learn, REINFORCE-style:
  -advantage x the mask's mean per-token Bernoulli log-likelihood, averaged over rows
  (actors/policy_grpo.py); the budget's forced tokens are scored as if drawn (approximation).
  Without it the VIP stays frozen, as in the reference method (only the language model learns).
- One update per rollout (on-policy): the old log-probs are the current weights' own, so the
  ratio is 1 in value; there is no PPO-epoch loop.
"""

from __future__ import annotations

import torch


def group_advantages(rewards_B: torch.Tensor, group_id_B: torch.Tensor, mode: str = "grpo",
                     eps: float = 1e-4) -> torch.Tensor:
    """Per-row advantage from the rewards of its group.

    Args:
        rewards_B: one scalar reward per row.
        group_id_B: integer id of each row's group (rows of one prompt share it).
        mode: "grpo": (r - mean) / (std + eps); "drgrpo": r - mean.
        eps: keeps a group of equal rewards at advantage 0 instead of 0 / 0.

    Returns:
        [B] advantages; a singleton group gets 0 (nothing to compare with).
    """
    if mode not in ("grpo", "drgrpo"):
        raise ValueError(f"unknown advantage mode {mode!r}; known: grpo, drgrpo")
    rewards_B = rewards_B.float()
    _, inverse_B = torch.unique(group_id_B, return_inverse=True)
    groups = int(inverse_B.max()) + 1
    count_G = torch.zeros(groups).index_add_(0, inverse_B, torch.ones_like(rewards_B))
    mean_G = torch.zeros(groups).index_add_(0, inverse_B, rewards_B) / count_G
    centred_B = rewards_B - mean_G[inverse_B]
    if mode == "drgrpo":
        return centred_B
    # Population std (divide by the group size), as the reference implementations do.
    var_G = torch.zeros(groups).index_add_(0, inverse_B, centred_B**2) / count_G
    return centred_B / (var_G.sqrt()[inverse_B] + eps)


def k3_kl(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): exp(d) - d - 1, d = ref - logp."""
    delta_BT = ref_logp_BT - logp_BT
    return torch.exp(delta_BT) - delta_BT - 1.0


def aggregate(values_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str = "token"
              ) -> torch.Tensor:
    """Scalar mean of per-token values: over all tokens ("token") or of per-row means
    ("sequence"). Rows without tokens count as nothing."""
    mask_BT = mask_BT.to(values_BT.dtype)
    if mode == "token":
        return (values_BT * mask_BT).sum() / mask_BT.sum().clamp(min=1.0)
    if mode == "sequence":
        per_row_B = (values_BT * mask_BT).sum(1) / mask_BT.sum(1).clamp(min=1.0)
        has_tokens_B = (mask_BT.sum(1) > 0).to(values_BT.dtype)
        return (per_row_B * has_tokens_B).sum() / has_tokens_B.sum().clamp(min=1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; known: token, sequence")


def tis_weights(old_logp_BT: torch.Tensor, rollout_logp_BT: torch.Tensor, cap: float
                ) -> torch.Tensor:
    """Truncated importance weights min(exp(old - rollout), cap); all ones when cap <= 0."""
    if cap <= 0:
        return torch.ones_like(old_logp_BT)
    return torch.exp(old_logp_BT - rollout_logp_BT).clamp(max=cap).detach()


def policy_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, advantages_B: torch.Tensor,
                mask_BT: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28,
                ref_logp_BT: torch.Tensor | None = None, kl_coef: float = 0.0,
                loss_agg: str = "token", weights_BT: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO objective (to minimise) and its diagnostics.

    per token: -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) [* tis weight]
               + kl_coef * k3(logp, ref_logp)

    Returns:
        (loss, {"clip_frac", "kl", "ratio_mean"}).
    """
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    adv_BT = advantages_B[:, None].to(logp_BT.dtype)
    unclipped_BT = ratio_BT * adv_BT
    clipped_BT = ratio_BT.clamp(1.0 - clip_low, 1.0 + clip_high) * adv_BT
    per_token_BT = -torch.minimum(unclipped_BT, clipped_BT)
    if weights_BT is not None:
        per_token_BT = per_token_BT * weights_BT
    kl_BT = torch.zeros_like(per_token_BT)
    if kl_coef and ref_logp_BT is not None:
        kl_BT = k3_kl(logp_BT, ref_logp_BT)
        per_token_BT = per_token_BT + kl_coef * kl_BT
    clipped_tokens_BT = (clipped_BT < unclipped_BT).to(logp_BT.dtype)  # the clip was active
    loss = aggregate(per_token_BT, mask_BT, loss_agg)
    return loss, {"clip_frac": float(aggregate(clipped_tokens_BT, mask_BT)),
                  "kl": float(aggregate(kl_BT.detach(), mask_BT)),
                  "ratio_mean": float(aggregate(ratio_BT.detach(), mask_BT))}


def dynamic_sampling_keep(rewards_B: torch.Tensor, group_id_B: torch.Tensor) -> torch.Tensor:
    """Bool [B]: rows of groups whose rewards are not all equal (DAPO's dynamic sampling drops
    the others: they carry zero advantage and only dilute the batch)."""
    _, inverse_B = torch.unique(group_id_B, return_inverse=True)
    groups = int(inverse_B.max()) + 1
    high_G = torch.full((groups,), -float("inf")).scatter_reduce(0, inverse_B, rewards_B.float(),
                                                                 "amax")
    low_G = torch.full((groups,), float("inf")).scatter_reduce(0, inverse_B, rewards_B.float(),
                                                               "amin")
    return (high_G > low_G)[inverse_B]


def mean_group_std(values_B: torch.Tensor, group_id_B: torch.Tensor) -> float:
    """Mean over groups of the population std of `values_B` within each group. Of the rows'
    keep ratios it says whether a group's samples saw different prunings at all: near 0, the
    pruning bonus is (almost) constant within every group and its advantage vanishes."""
    _, inverse_B = torch.unique(group_id_B, return_inverse=True)
    groups = int(inverse_B.max()) + 1
    values_B = values_B.double()
    count_G = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse_B,
                                                                  torch.ones_like(values_B))
    mean_G = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse_B, values_B) / count_G
    square_G = torch.zeros(groups, dtype=torch.float64).index_add_(
        0, inverse_B, (values_B - mean_G[inverse_B]) ** 2)
    return float((square_G / count_G).sqrt().mean())
