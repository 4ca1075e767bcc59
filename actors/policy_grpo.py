"""The GRPO update of one policy rank (stage 2): replayed keep masks, clipped objective, KL.

Owns the per-micro-batch arithmetic of `PolicyActor.train_step(batch, "grpo")`: the replay
forward of every row on exactly the pruned prompt vLLM sampled from (its `keep_mask_BV`), the
clipped policy loss of pipeline/algo.py with the rows' advantages, the k3 KL to the reference
log-probs (extras["ref_logprobs"]), the optional truncated importance weights, and with
`algo.train_vip` the keep mask's log-likelihood under the VIP times the advantage. Must not
decide advantages or rewards (the driver does) nor talk to Ray or MLflow.

One update per rollout (on-policy): the "old" log-probs are the current weights' own,
detached, so the ratio is 1 in value and the clip only shapes the gradient; this is also where
`logprob_abs_diff` (trainer vs vLLM on the same weights) is measured, with no extra forward.
"""

from __future__ import annotations

import torch

from actors.batching import all_reduce_, keep_masks_of
from pipeline import algo


def _pad(rows: list, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads per-row 1-D tensors / lists into [B, T] plus the bool mask of real tokens."""
    width = max(len(r) for r in rows)
    values_BT = like.new_zeros(len(rows), width)
    mask_BT = torch.zeros(len(rows), width, dtype=torch.bool, device=like.device)
    for b, row in enumerate(rows):
        values_BT[b, :len(row)] = torch.as_tensor(row, dtype=like.dtype, device=like.device)
        mask_BT[b, :len(row)] = True
    return values_BT, mask_BT


def mask_log_likelihood(vip_logits_V: torch.Tensor, keep_mask_V: torch.Tensor,
                        temperature: float) -> torch.Tensor:
    """Mean over visual tokens of log Bernoulli(keep_mask | sigmoid(vip_logit / temperature)).

    The rollout's draws were then clipped to the keep budget (min_keep / max_keep_ratio); the
    budget's few forced tokens are scored as if drawn (an approximation, noted in algo.py).
    """
    logits_V = vip_logits_V.float() / temperature
    keep_V = keep_mask_V.to(logits_V.dtype)
    log_p_V = keep_V * torch.nn.functional.logsigmoid(logits_V) + \
        (1 - keep_V) * torch.nn.functional.logsigmoid(-logits_V)
    return log_p_V.mean()


def _global_counts(batch, world: int) -> tuple[float, float]:
    counts = torch.tensor([float(sum(len(r) for r in batch.response_ids)), float(len(batch))])
    if world > 1:
        all_reduce_(counts)
    return float(counts[0]), float(counts[1])


def distinct_prompt_inputs(actor, batch, rows: list[int]) -> dict:
    """The micro-batch's distinct prompts as one processor batch, and `prompt_rows` (per row,
    its prompt's place in it): the vision tower, the glimpse pass and the VIP then run once per
    prompt, not once per sample.

    The VIP is called once per prompt row, and under ZeRO-3 every call all-gathers its weights:
    so every rank pads its distinct prompts (repeating the last) to the largest count of any
    rank for this micro-batch, or a rank with fewer would leave the others waiting."""
    firsts: dict[int, int] = {}
    for i in rows:
        firsts.setdefault(batch.prompt_index_B[i], i)
    place = {prompt: k for k, prompt in enumerate(firsts)}
    representatives = list(firsts.values())
    if actor.dist.world_size > 1:
        most = int(all_reduce_(torch.tensor([len(representatives)]),
                               torch.distributed.ReduceOp.MAX))
        representatives += representatives[-1:] * (most - len(representatives))
    return {"prompt_rows": [place[batch.prompt_index_B[i]] for i in rows],
            **actor._prompt_inputs(batch, representatives)}


def grpo_step(actor, batch) -> dict[str, float]:
    """One optimiser step of GRPO over this rank's rows (see the module docstring).

    Args:
        actor: the PolicyActor (engine, config, processor, device).
        batch: this rank's rows, with advantages_B, rollout_logprobs, keep_mask_BV and, when
            algo.kl_coef > 0, extras["ref_logprobs"].

    Returns:
        loss, kl, clip_frac, logprob_abs_diff (mean |trainer - vLLM| per token), vip_loss,
        entropy (mean per-token entropy of the policy), lr, grad_norm, tokens: global means
        over every rank's rows.
    """
    cfg = actor.grpo["algo"]
    engine = actor.engine
    engine.train()
    # The rollout drew the keep masks from the VIP in eval mode (no dropout on the glimpse
    # token); the mask log-likelihood must score that same distribution.
    engine.module.glimpse_modules.eval()
    global_tokens, global_rows = _global_counts(batch, actor.dist.world_size)
    # The global normaliser: token-level aggregation divides by every token of the step,
    # sequence-level by every row; each micro-batch scales its own mean by its share.
    sums = torch.zeros(7)  # loss, kl, clip tokens, |diff| sum, vip loss, tokens, entropy sum
    micro = actor._micro_batches(batch)
    ref = batch.extras.get("ref_logprobs")
    for k, (rows, real) in enumerate(micro):
        engine.set_gradient_accumulation_boundary(k == len(micro) - 1)
        entropies: list[torch.Tensor] = []
        logprobs, vip_logits = engine(
            response_ids=[list(batch.response_ids[i]) for i in rows],
            keep_masks=keep_masks_of(batch, rows, actor.device), with_vip=cfg.train_vip,
            entropies=entropies, **distinct_prompt_inputs(actor, batch, rows))
        logp_BT, mask_BT = _pad(logprobs, logprobs[0])
        mask_BT[real:] = False  # padding rows (see equal_micro_batches) count nothing
        old_BT = logp_BT.detach()
        rollout_BT, _ = _pad([batch.rollout_logprobs[i] for i in rows], old_BT)
        ref_BT = _pad([ref[i] for i in rows], old_BT)[0] if ref is not None else None
        adv_B = torch.tensor([batch.advantages_B[i] for i in rows], dtype=old_BT.dtype,
                             device=old_BT.device)
        loss, stats = algo.policy_loss(
            logp_BT, old_BT, adv_B, mask_BT, cfg.clip_low, cfg.clip_high, ref_BT, cfg.kl_coef,
            cfg.loss_agg, algo.tis_weights(old_BT, rollout_BT, cfg.tis_cap))
        tokens = float(mask_BT.sum())
        share = tokens / global_tokens if cfg.loss_agg == "token" else real / global_rows
        objective = loss * share
        vip_sum = torch.zeros(())
        if cfg.train_vip:
            masks = keep_masks_of(batch, rows, actor.device)
            nll = torch.stack([-mask_log_likelihood(v, m, actor.grpo["mask_temperature"])
                               for v, m in zip(vip_logits, masks, strict=True)])
            vip_sum = (nll * adv_B)[:real].sum()
            objective = objective + vip_sum / global_rows
        # DeepSpeed averages gradients over ranks: scale back up to the global mean.
        if not real:
            objective = objective * 0.0  # all padding (its token mean is 0 / 0 = 0 anyway)
        engine.backward(objective * actor.dist.world_size, scale_wrt_gas=False)
        diff = float(((old_BT - rollout_BT).abs() * mask_BT).sum())
        entropy = float(sum(e.sum() for e in entropies[:real]))
        sums += float(real > 0) * torch.tensor([
            float(loss.detach()) * share, stats["kl"] * tokens, stats["clip_frac"] * tokens, diff,
            float(vip_sum.detach()), tokens, entropy])
    lr = actor.scheduler.get_last_lr()[0]
    engine.step()
    if actor.dist.world_size > 1:
        all_reduce_(sums)
    grad_norm = engine.get_global_grad_norm()
    return {"loss": float(sums[0]), "kl": float(sums[1] / sums[5]),
            "clip_frac": float(sums[2] / sums[5]), "logprob_abs_diff": float(sums[3] / sums[5]),
            "vip_loss": float(sums[4] / global_rows), "entropy": float(sums[6] / sums[5]),
            "lr": float(lr), "tokens": global_tokens,
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}


def replay_logprobs(actor, batch) -> list[list[float]]:
    """Log-probs of every row's response on its keep mask, no gradient (a PolicyActor or a
    ReferenceActor: anything with engine, processor, device and _micro_batches)."""
    actor.engine.eval()
    out = []
    with torch.no_grad():
        for rows, real in actor._micro_batches(batch):
            logprobs, _ = actor.engine(
                response_ids=[list(batch.response_ids[i]) for i in rows],
                keep_masks=keep_masks_of(batch, rows, actor.device),
                **distinct_prompt_inputs(actor, batch, rows))
            out += [lp.float().cpu().tolist() for lp in logprobs[:real]]
    return out
