"""Stage-1 distillation for data without boxes: the answer under soft pruning should match the
answer without pruning, while keeping few tokens.

Owns the soft-pruned forward and its loss. Soft pruning is the differentiable stand-in for the
replay form (glimpseprune/replay.py, every layer on the pruned sequence): each visual token's key
gets the additive attention bias log p, p = sigmoid(vip_logit), for every query, so p = 1 keeps
the token as is and p -> 0 removes it exactly as dropping it would. The teacher is the same
sequence without bias and without gradient. Loss per row = mean over answer tokens of
KL(teacher || student) + sparsity x mean(p). Must not change the base model (stage 1 trains
only the glimpse token and the VIP; gradients reach them through p).
"""

from __future__ import annotations

import torch

from glimpseprune.decoder import lm_logits, rotary, run_layers, text_model
from glimpseprune.layout import build_layout
from glimpseprune.replay import pruned_sequences

MIN_BIAS = -1e4  # log p floor: exp(-1e4) is 0 in fp32, without -inf arithmetic


def _biased_mask(valid_BS: torch.Tensor, key_bias_BS: torch.Tensor) -> torch.Tensor:
    """Additive float mask [B, 1, S, S]: causal + padding, plus `key_bias` on every query's
    keys. Padded queries see only themselves (no all -inf row, so no NaN)."""
    size = valid_BS.shape[1]
    causal_SS = torch.ones(size, size, dtype=torch.bool, device=valid_BS.device).tril()
    allowed_BSS = causal_SS[None] & valid_BS[:, None, :]
    allowed_BSS |= torch.eye(size, dtype=torch.bool, device=valid_BS.device)[None]
    mask = torch.where(allowed_BSS, key_bias_BS[:, None, :], torch.finfo(key_bias_BS.dtype).min)
    return mask[:, None]


def _answer_logits(model, embeds_BSD, positions_3BS, mask, longest: int) -> torch.Tensor:
    text = text_model(model.base)
    hidden_BSD = run_layers(text, embeds_BSD, range(len(text.layers)), mask,
                            rotary(text, embeds_BSD, positions_3BS), None)
    # Slot s predicts slot s + 1: the answers fill each row's last slots.
    return lm_logits(model.base, hidden_BSD[:, -longest - 1:-1]).float()


def distill_losses(model, inputs: dict, answer_ids: list[list[int]], sparsity: float,
                   vip_logits: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Per-row distillation losses [B] and diagnostics.

    Args:
        model: a GlimpsePruneModel (base frozen).
        inputs: the left-padded processor batch of the prompts (with images).
        answer_ids: per row, the answer tokens to distil on (e.g. the reference answer + end).
        sparsity: weight of mean(p) in the loss.
        vip_logits: per row, [V_b]; None runs the glimpse pre-pass (what training does).

    Returns:
        (losses [B], {"kl": mean KL per answer token, "mean_keep_prob": mean p}).
    """
    if vip_logits is None:
        vip_logits = model.vip_logits(inputs)
    layout = build_layout(model.base, inputs, None)
    embeds_BSD, positions_3BS, valid_BS, lengths = pruned_sequences(
        model.base, inputs, [None] * len(answer_ids), answer_ids)
    batch, width = valid_BS.shape
    pad_B = layout.attention_mask_BP.shape[1] - layout.attention_mask_BP.sum(1)
    key_bias_BS = embeds_BSD.new_zeros(batch, width, dtype=torch.float32)
    probs = []
    for b in range(batch):
        # keep-all replay: row b's prompt starts at slot width - n_b, n_b = valid slots
        start = width - int(valid_BS[b].sum())
        slots_V = start + layout.visual_index[b] - pad_B[b]
        log_p_V = torch.nn.functional.logsigmoid(vip_logits[b].float()).clamp(min=MIN_BIAS)
        key_bias_BS[b, slots_V] = log_p_V
        probs.append(log_p_V.exp())
    longest = max(lengths)
    with torch.no_grad():
        teacher_BTV = _answer_logits(model, embeds_BSD, positions_3BS,
                                     _biased_mask(valid_BS, torch.zeros_like(key_bias_BS)),
                                     longest)
    student_BTV = _answer_logits(model, embeds_BSD, positions_3BS,
                                 _biased_mask(valid_BS, key_bias_BS.to(embeds_BSD.dtype)),
                                 longest)
    teacher_logp = torch.log_softmax(teacher_BTV, -1)
    kl_BT = (teacher_logp.exp() * (teacher_logp - torch.log_softmax(student_BTV, -1))).sum(-1)
    losses, kls = [], []
    for b, length in enumerate(lengths):
        kl = kl_BT[b, longest - length:].mean()
        kls.append(kl.detach())
        losses.append(kl + sparsity * probs[b].mean())
    return torch.stack(losses), {"kl": float(torch.stack(kls).mean()),
                                 "mean_keep_prob": float(torch.cat(probs).mean())}
