"""Where a prompt batch's visual tokens are: embeddings, M-RoPE positions, grid cells, ViT features.

Owns the translation of a processor batch (left-padded input_ids, attention_mask, pixel_values,
image_grid_thw) into the tensors the pruned forward needs: input embeddings with the image
features scattered in, the ORIGINAL M-RoPE (t, h, w) ids from transformers' `get_rope_index`,
each sample's visual token positions, their (row, col, image) on the merged grid, and the ViT
hidden states of chosen blocks pooled per 2x2 merge unit in the order the LLM receives them.
Must not run decoder layers (glimpseprune.decoder does) nor decide what to keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.vision_utils import get_vision_window_index


@dataclass
class PromptLayout:
    """A prompt batch laid out for the decoder. B rows, P padded prompt length."""

    embeds_BPD: torch.Tensor
    position_ids_3BP: torch.Tensor  # original M-RoPE ids; 0 on padding
    attention_mask_BP: torch.Tensor  # bool, False on (left) padding
    visual_index: list[torch.Tensor]  # per row, [V_b] positions of its visual tokens
    rows: list[torch.Tensor]  # per row, [V_b] row of each visual token in its image's grid
    cols: list[torch.Tensor]
    image_ids: list[torch.Tensor]  # per row, [V_b] index of the token's image within the row
    grids_hw: list[list[tuple[int, int]]]  # per row, the merged (rows, cols) of each image
    vit_features: list[list[torch.Tensor]] | None  # per row, per VIP layer, [V_b, F]

    @property
    def num_visual(self) -> list[int]:
        return [int(v.numel()) for v in self.visual_index]

    def select(self, rows: list[int]) -> PromptLayout:
        """The layout of the listed rows, in that order (a row may repeat: G samples of one
        prompt share its layout, so the vision tower runs once per prompt)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.embeds_BPD.device)
        pick = lambda values: [values[i] for i in rows]  # noqa: E731
        return PromptLayout(
            self.embeds_BPD[index], self.position_ids_3BP[:, index],
            self.attention_mask_BP[index], pick(self.visual_index), pick(self.rows),
            pick(self.cols), pick(self.image_ids), pick(self.grids_hw),
            None if self.vit_features is None else pick(self.vit_features))


def pooled_vit_features(visual, hidden_states: tuple, grid_thw: torch.Tensor,
                        blocks: list[int]) -> list[torch.Tensor]:
    """ViT block outputs averaged over each 2x2 merge unit, in the LLM's merged-token order.

    Qwen2.5-VL's vision tower permutes merge units into attention windows before its blocks and
    un-permutes only after the merger, so block outputs are in window order: we undo that here.

    Args:
        visual: the vision tower (for its merge and window sizes).
        hidden_states: the tower's `output_hidden_states` (entry i + 1 is block i's output).
        grid_thw: [num_images, 3] the processor's patch grids.
        blocks: which blocks to read.

    Returns:
        per block, [V_total, F] with V_total the merged tokens of all images.
    """
    unit = visual.spatial_merge_size ** 2
    window_index, _ = get_vision_window_index(
        grid_thw, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size,
        patch_size=visual.patch_size)
    to_llm_order = torch.argsort(window_index.to(grid_thw.device))
    pooled = []
    for block in blocks:
        states = hidden_states[block + 1]
        pooled.append(states.reshape(-1, unit, states.shape[-1]).mean(1)[to_llm_order])
    return pooled


def _grid_cells(grid_thw: torch.Tensor, merge: int, device) -> tuple[list, list, list]:
    """Per image: (rows, cols) of every merged token, row-major, and the merged grid size."""
    rows, cols, grids = [], [], []
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        r, c = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device),
                              indexing="ij")
        rows.append(r.flatten().repeat(t))
        cols.append(c.flatten().repeat(t))
        grids.append((gh, gw))
    return rows, cols, grids


def build_layout(model, inputs: dict, vit_blocks: list[int] | None) -> PromptLayout:
    """Embeds a processor batch and locates its visual tokens.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration`.
        inputs: the processor's output (left-padded), with pixel_values and image_grid_thw.
        vit_blocks: ViT blocks whose pooled outputs the VIP reads; None skips them.
    """
    core = model.model
    input_ids = inputs["input_ids"]
    attention_mask_BP = inputs.get("attention_mask")
    if attention_mask_BP is None:
        attention_mask_BP = torch.ones_like(input_ids)
    image_token = model.config.image_token_id
    if (input_ids == model.config.video_token_id).any():
        raise ValueError("video inputs are not supported by the pruned forward")
    grid_thw = inputs["image_grid_thw"]
    vision = core.get_image_features(inputs["pixel_values"], grid_thw,
                                     output_hidden_states=vit_blocks is not None,
                                     return_dict=True)
    image_embeds = torch.cat(vision.pooler_output, 0)
    embeds_BPD = core.get_input_embeddings()(input_ids)
    visual_BP = input_ids == image_token
    embeds_BPD = embeds_BPD.masked_scatter(visual_BP[..., None],
                                           image_embeds.to(embeds_BPD.dtype))
    # The modality ids transformers' get_rope_index groups on: 1 for image tokens, 0 for text.
    position_ids_3BP, _ = core.get_rope_index(
        input_ids, mm_token_type_ids=visual_BP.long(), image_grid_thw=grid_thw,
        attention_mask=attention_mask_BP)
    pooled = None
    if vit_blocks is not None:
        pooled = pooled_vit_features(core.visual, vision.hidden_states, grid_thw, vit_blocks)
    layout = PromptLayout(embeds_BPD, position_ids_3BP, attention_mask_BP.bool(), [], [], [],
                          [], [], None if pooled is None else [])
    _locate_visual_tokens(layout, visual_BP, grid_thw, core.visual.spatial_merge_size, pooled)
    return layout


def _locate_visual_tokens(layout: PromptLayout, visual_BP: torch.Tensor, grid_thw: torch.Tensor,
                          merge: int, pooled: list[torch.Tensor] | None) -> None:
    """Fills the per-row fields: images are consumed in order, as many as a row has tokens for."""
    rows, cols, grids = _grid_cells(grid_thw, merge, visual_BP.device)
    start, image = 0, 0
    for b in range(visual_BP.shape[0]):
        index_V = visual_BP[b].nonzero().squeeze(-1)
        row_images, count = [], 0
        while count < index_V.numel():
            row_images.append(image)
            count += rows[image].numel()
            image += 1
        if count != index_V.numel():
            raise ValueError(f"row {b}: {index_V.numel()} image tokens do not match its images")
        empty = index_V.new_zeros(0)
        layout.visual_index.append(index_V)
        layout.rows.append(torch.cat([rows[i] for i in row_images] or [empty]))
        layout.cols.append(torch.cat([cols[i] for i in row_images] or [empty]))
        layout.image_ids.append(torch.cat(
            [torch.full_like(rows[i], k) for k, i in enumerate(row_images)] or [empty]))
        layout.grids_hw.append([grids[i] for i in row_images])
        if pooled is not None:
            layout.vit_features.append([p[start:start + count] for p in pooled])
        start += count
