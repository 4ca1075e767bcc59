"""The replay forward: log-probs of given responses on pruned prompts, for RL and for checks.

Owns the approximate form of method.md ("Approximate form used in RL"): the whole decoder runs
from layer 0 on the already-pruned sequence (text tokens + kept visual tokens at their ORIGINAL
M-RoPE ids, then the response at last + 1, last + 2, ...). The keep masks come from anywhere
(a rollout, the VIP, a test). Must not run the glimpse token or the VIP, and must not cut the
graph: policy training backpropagates through it.
"""

from __future__ import annotations

import torch

from glimpseprune.decoder import causal_mask, lm_logits, rotary, run_layers, text_model
from glimpseprune.layout import PromptLayout, build_layout


def pruned_sequences(base, inputs: dict, keep_masks: list, response_ids: list[list[int]],
                     prompt_rows: list[int] | None = None, layout: PromptLayout | None = None):
    """Builds the left-padded pruned prompt + response batch.

    Args:
        prompt_rows: per response row, its prompt's row in `inputs` (None: row b is prompt b).
            The G samples of one prompt then share one vision-tower pass.
        layout: `inputs` already laid out (the caller ran the vision tower), or None.

    Returns:
        embeds_BSD, position_ids_3BS, valid_BS (bool), and the response lengths T_b.
    """
    if layout is None:
        layout = build_layout(base, inputs, None)
    if prompt_rows is not None:
        layout = layout.select(prompt_rows)
    device = layout.embeds_BPD.device
    responses = [torch.as_tensor(r, dtype=torch.long, device=device) for r in response_ids]
    # One embedding call for the whole batch: under ZeRO-3 every module call all-gathers its
    # weights, so a per-row call would make ranks with fewer rows gather fewer times.
    response_embeds = base.model.get_input_embeddings()(torch.cat(responses)).split(
        [r.numel() for r in responses])
    rows = []
    for b, mask in enumerate(keep_masks):
        keep_P = layout.attention_mask_BP[b].clone()
        if mask is not None:
            mask_V = torch.as_tensor(mask, dtype=torch.bool, device=device)
            if mask_V.numel() != layout.num_visual[b]:
                raise ValueError(f"row {b}: keep mask has {mask_V.numel()} entries for "
                                 f"{layout.num_visual[b]} visual tokens")
            keep_P[layout.visual_index[b][~mask_V]] = False
        index = keep_P.nonzero().squeeze(-1)
        positions_3n = layout.position_ids_3BP[:, b, index]
        # The response continues after the ORIGINAL last position, as decoding did.
        after = positions_3n.max() + 1 + torch.arange(responses[b].numel(), device=device)
        rows.append((torch.cat([layout.embeds_BPD[b, index], response_embeds[b]]),
                     torch.cat([positions_3n, after[None].expand(3, -1)], 1)))
    width = max(e.shape[0] for e, _ in rows)
    embeds_BSD = layout.embeds_BPD.new_zeros(len(rows), width, layout.embeds_BPD.shape[-1])
    positions_3BS = torch.zeros(3, len(rows), width, dtype=torch.long, device=device)
    valid_BS = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for b, (embeds, positions) in enumerate(rows):
        n = embeds.shape[0]
        embeds_BSD[b, width - n:] = embeds
        positions_3BS[:, b, width - n:] = positions
        valid_BS[b, width - n:] = True
    return embeds_BSD, positions_3BS, valid_BS, [len(r) for r in response_ids]


def replay_logprobs(base, inputs: dict, keep_masks: list, response_ids: list[list[int]],
                    entropies: list | None = None, prompt_rows: list[int] | None = None,
                    layout: PromptLayout | None = None) -> list[torch.Tensor]:
    """Per-token log-probs of each row's response on its pruned prompt.

    Args:
        base: a `Qwen2_5_VLForConditionalGeneration` (sdpa or eager attention).
        inputs: the left-padded processor batch of the prompts (with images).
        keep_masks: per row, bool [V_b] over all its visual tokens (row-major per image), or
            None to keep every visual token.
        response_ids: per row, the response token ids.
        entropies: if a list is given, each row's per-token entropy of the next-token
            distribution [T_b] is appended to it (detached).
        prompt_rows: per row, its prompt's row in `inputs` (None: one prompt per row).
        layout: `inputs` already laid out by the caller (None: lay them out here).

    Returns:
        per row, float32 [T_b]: log p(response[t] | pruned prompt, response[:t]).
    """
    text = text_model(base)
    embeds_BSD, positions_3BS, valid_BS, lengths = pruned_sequences(
        base, inputs, keep_masks, response_ids, prompt_rows, layout)
    hidden_BSD = run_layers(text, embeds_BSD, range(len(text.layers)),
                            causal_mask(text, embeds_BSD, valid_BS),
                            rotary(text, embeds_BSD, positions_3BS), None)
    longest = max(lengths)
    # Slot s predicts slot s + 1: responses fill each row's last T_b slots.
    logits_BTV = lm_logits(base, hidden_BSD[:, -longest - 1:-1]).float()
    logprobs_BTV = torch.log_softmax(logits_BTV, -1)
    out = []
    for b, length in enumerate(lengths):
        target_T = torch.as_tensor(response_ids[b], dtype=torch.long, device=logits_BTV.device)
        rows_TV = logprobs_BTV[b, longest - length:]
        out.append(rows_TV.gather(-1, target_T[:, None]).squeeze(-1))
        if entropies is not None:
            entropies.append(-(rows_TV.exp() * rows_TV).sum(-1).detach())
    return out
