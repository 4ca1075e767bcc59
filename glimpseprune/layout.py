"""Where a prompt batch's visual tokens are: embeddings, M-RoPE positions, grid cells, ViT features.

Owns the translation of a processor batch (left-padded input_ids, attention_mask, pixel_values,
image_grid_thw) into the tensors the pruned forward needs: input embeddings with the image
features scattered in, the ORIGINAL M-RoPE (t, h, w) ids from transformers' `get_rope_index`,
each sample's visual token positions, their (row, col, image) on the merged grid, and the ViT
hidden states of chosen blocks pooled per 2x2 merge unit in the order the LLM receives them -
or, given a `PromptVision` per row from an earlier pass of the same frozen tower, those instead
of running the tower. Must not run decoder layers (glimpseprune.decoder does) nor decide what
to keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.vision_utils import get_vision_window_index


@dataclass
class PromptVision:
    """One prompt's vision-tower outputs (CPU tensors when they travel): what `build_layout`
    needs instead of running a frozen vision tower again (the rollout pre-pass makes them, the
    policy and reference reuse them: rollout.reuse_vision)."""

    embeds_VD: torch.Tensor  # merged image embeddings, what the LLM receives, row-major
    vit_features: list[torch.Tensor]  # per VIP ViT block, [V, F] pooled per merge unit


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


def build_layout(model, inputs: dict, vit_blocks: list[int] | None,
                 vision: list | None = None) -> PromptLayout:
    """Embeds a processor batch and locates its visual tokens.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration`.
        inputs: the processor's output (left-padded), with image_grid_thw and pixel_values
            (pixel_values may be absent when `vision` is given).
        vit_blocks: ViT blocks whose pooled outputs the VIP reads; None skips them.
        vision: per row, a `pipeline.batch.PromptVision` that an earlier pass of this same
            (frozen) vision tower made: the tower is not run at all then.
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
    embeds_BPD = core.get_input_embeddings()(input_ids)
    visual_BP = input_ids == image_token
    pooled = None
    if vision is None:
        tower = core.get_image_features(inputs["pixel_values"], grid_thw,
                                        output_hidden_states=vit_blocks is not None,
                                        return_dict=True)
        image_embeds = torch.cat(tower.pooler_output, 0)
        if vit_blocks is not None:
            pooled = pooled_vit_features(core.visual, tower.hidden_states, grid_thw, vit_blocks)
    else:
        image_embeds, pooled = _given_vision(vision, vit_blocks, embeds_BPD)
    if image_embeds.shape[0] != int(visual_BP.sum()):
        raise ValueError(f"{image_embeds.shape[0]} image embeddings for "
                         f"{int(visual_BP.sum())} image tokens in the batch")
    embeds_BPD = embeds_BPD.masked_scatter(visual_BP[..., None],
                                           image_embeds.to(embeds_BPD.dtype))
    # The modality ids transformers' get_rope_index groups on: 1 for image tokens, 0 for text.
    position_ids_3BP, _ = core.get_rope_index(
        input_ids, mm_token_type_ids=visual_BP.long(), image_grid_thw=grid_thw,
        attention_mask=attention_mask_BP)
    layout = PromptLayout(embeds_BPD, position_ids_3BP, attention_mask_BP.bool(), [], [], [],
                          [], [], None if pooled is None else [])
    _locate_visual_tokens(layout, visual_BP, grid_thw, core.visual.spatial_merge_size, pooled)
    return layout


def _given_vision(vision: list, vit_blocks: list[int] | None, like: torch.Tensor):
    """Image embeddings [V_total, D] and, per ViT block, [V_total, F] from per-row features,
    on the device and in the dtype of `like`."""
    embeds = torch.cat([v.embeds_VD for v in vision], 0).to(like)
    if vit_blocks is None:
        return embeds, None
    for b, v in enumerate(vision):
        if len(v.vit_features) != len(vit_blocks):
            raise ValueError(f"row {b}: {len(v.vit_features)} ViT feature layers given, the VIP "
                             f"reads {len(vit_blocks)} ({vit_blocks})")
    return embeds, [torch.cat([v.vit_features[k] for v in vision], 0).to(like)
                    for k in range(len(vit_blocks))]


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
