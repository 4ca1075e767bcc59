"""Box-attention supervision of the SFT warm start: the answer position should look at the box.

Owns the capture of chosen decoder layers' attention weights (forward hooks on their
self-attention; the language model must run eager attention, the only kind that returns them)
and two losses on the position predicting each answer: its attention, averaged over heads,
should fall on the visual tokens of that question's target box (-log of the mass there), and,
one hop earlier, on the question's words that name the target ("red" in "What shape is
red?"), which is what it must look the box up by.
Why: a tiny model trained on answers alone learns the answer prior and a "bag of colours"
shortcut and then plateaus (shared docs tiny-task.md; issue F4's runs: 0.31 held-out, the same
with or without the target box's tokens). The lookup the task needs - from the question's words
to the few cells that hold the answer - is exactly an attention pattern, and the generator knows
where it should point. With the box term alone, shape questions stayed at 0.33 (a bag of the
shapes present): the answer position's first layer never read the colour word it must look
the object up by (issue F4). A training aid only: inference never uses it, and the grounding
checks of pipeline.evaluate measure the model without it. Must not compute the answer loss.
"""

from __future__ import annotations

import torch

from glimpseprune.grid import boxes_to_token_mask


class AttentionCapture:
    """Keeps the attention weights [B, H, L, L] of the latest forward of `layer_ids`."""

    def __init__(self, decoder_layers, layer_ids: list[int]):
        self.weights: dict[int, torch.Tensor] = {}
        for layer in layer_ids:
            if not 0 <= layer < len(decoder_layers):
                raise ValueError(f"sft.box_attention_layers names layer {layer}; the model has "
                                 f"decoder layers 0..{len(decoder_layers) - 1}")
            decoder_layers[layer].self_attn.register_forward_hook(self._hook(layer))

    def _hook(self, layer: int):
        def keep(_module, _inputs, output) -> None:
            if output[1] is None:
                raise RuntimeError("box-attention supervision needs the language model's "
                                   "attention weights: load it with attn_implementation='eager'")
            self.weights[layer] = output[1]
        return keep


def _mass_loss(weights: dict[int, torch.Tensor], layers: list[int], row: int, position: int,
               keys: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Mean over `layers` of -log(head-mean attention mass from `position` on `keys`), and
    the mean mass."""
    loss, mass_sum = 0.0, 0.0
    for layer in layers:
        mass = weights[layer][row, :, position, keys].float().sum(-1).mean()
        loss = loss - torch.log(mass + 1e-6)
        mass_sum += float(mass.detach())
    return loss / len(layers), mass_sum / len(layers)


def box_attention_loss(weights: dict[int, torch.Tensor], layers: list[int],
                       input_ids_BL: torch.Tensor, image_token_id: int, queries: list[list],
                       grids_B3: torch.Tensor, image_hws: list[tuple[int, int]]
                       ) -> tuple[torch.Tensor, int, float]:
    """Sum over answers of the mean over `layers` of -log(head-mean attention mass on the
    target box's visual tokens).

    Args:
        weights: layer -> attention probabilities [B, H, L, L] of the forward just run.
        layers: the decoder layers whose attention is asked to fall on the box.
        input_ids_BL: that forward's token ids (one image per row).
        image_token_id: the visual-token id (its positions, in order, are the merged cells).
        queries: per row, (position that predicts an answer's first token, that question's
            target boxes in original-image pixels, naming-word ids); rows or answers without
            boxes are skipped.
        grids_B3: image_grid_thw per row.
        image_hws: original (height, width) per row.

    Returns:
        (summed loss, number of supervised answers, summed box mass averaged over layers).
    """
    loss = input_ids_BL.new_zeros((), dtype=torch.float32)
    count, mass_sum = 0, 0.0
    for j, row_queries in enumerate(queries):
        visual_V = (input_ids_BL[j] == image_token_id).nonzero()[:, 0]
        grid = (int(grids_B3[j][1]) // 2, int(grids_B3[j][2]) // 2)
        for position, boxes, _ in row_queries:
            if not boxes:
                continue
            box_V = torch.as_tensor(boxes_to_token_mask(boxes, image_hws[j], grid).ravel())
            term, mass = _mass_loss(weights, layers, j, position,
                                    visual_V[box_V.to(visual_V.device)])
            loss, mass_sum, count = loss + term, mass_sum + mass, count + 1
    return loss, count, mass_sum


def word_attention_loss(weights: dict[int, torch.Tensor], layers: list[int],
                        input_ids_BL: torch.Tensor, queries: list[list]
                        ) -> tuple[torch.Tensor, int, float]:
    """Sum over answers of the mean over `layers` of -log(head-mean attention mass on the
    answer's own question words that name its target).

    The words are found as the last occurrence of each naming-word id before the answer: the
    question of a turn is the latest text before its answer, and answers are written without
    the leading space that the in-question form of a word has (a different token).

    Returns:
        (summed loss, number of supervised answers, summed mass averaged over layers).
    """
    loss = input_ids_BL.new_zeros((), dtype=torch.float32)
    count, mass_sum = 0, 0.0
    for j, row_queries in enumerate(queries):
        for position, _, word_ids in row_queries:
            before = input_ids_BL[j, :position + 1]
            keys = [int((before == w).nonzero()[-1, 0]) for w in word_ids if (before == w).any()]
            if not keys:
                continue
            term, mass = _mass_loss(weights, layers, j, position,
                                    torch.tensor(keys, device=input_ids_BL.device))
            loss, mass_sum, count = loss + term, mass_sum + mass, count + 1
    return loss, count, mass_sum
