"""The vLLM plugin entry point and the request format for pruned Qwen2.5-VL images.

Owns the architecture name vLLM knows the pruned model by, its lazy registration (the
`vllm.general_plugins` entry point in pyproject.toml calls `register` in every vLLM process),
the engine arguments that select it, and the shape of one pruned image item of a request.
Must not import vLLM's model code at module level (plugins load before the platform is set
up): the model class lives in glimpseprune.vllm_model and is named here as a string.

A request then reads
    {"prompt": "...<|vision_start|><|image_pad|><|vision_end|>...",
     "multi_modal_data": {"image": pruned_image_item(kept_embeds, grid_thw, keep_mask)}}
with a single <|image_pad|> that vLLM expands to the kept count.
"""

from __future__ import annotations

import torch

ARCHITECTURE = "GlimpsePruneQwen2_5_VL"
MODEL_CLASS = "glimpseprune.vllm_model:GlimpsePruneQwen2_5_VLForConditionalGeneration"


def register() -> None:
    """Registers `ARCHITECTURE` with vLLM's model registry (lazily: nothing is imported)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


def engine_overrides() -> dict:
    """`vllm.LLM` keyword arguments that select the pruned model without editing the checkpoint."""
    return {"hf_overrides": {"architectures": [ARCHITECTURE]}, "enable_mm_embeds": True}


def pruned_image_item(kept_embeds_KD: torch.Tensor, grid_thw: list[int] | torch.Tensor,
                      keep_mask_V: torch.Tensor, merge_size: int = 2) -> dict:
    """One image of a request, as only its kept merged visual tokens.

    Args:
        kept_embeds_KD: [K, D] the merged image embeddings of the kept cells, row-major.
        grid_thw: the image's patch grid (1, H, W) as the HF processor reports it.
        keep_mask_V: bool [(H / m) * (W / m)] which merged cells are kept, row-major.
        merge_size: m, the vision tower's spatial merge size (2 for Qwen2.5-VL).

    Raises:
        ValueError: the mask does not fit the grid or the embeddings do not fit the mask.
    """
    grid_13 = torch.as_tensor(grid_thw, dtype=torch.long).reshape(1, 3)
    keep_mask_V = torch.as_tensor(keep_mask_V, dtype=torch.bool).flatten().cpu()
    t, h, w = grid_13[0].tolist()
    if t != 1:
        raise ValueError(f"an image has one temporal patch, got grid {grid_13[0].tolist()}")
    if keep_mask_V.numel() != (h // merge_size) * (w // merge_size):
        raise ValueError(f"keep mask has {keep_mask_V.numel()} entries for a "
                         f"{h // merge_size} x {w // merge_size} merged grid")
    if kept_embeds_KD.ndim != 2 or kept_embeds_KD.shape[0] != int(keep_mask_V.sum()):
        raise ValueError(f"{tuple(kept_embeds_KD.shape)} embeddings for "
                         f"{int(keep_mask_V.sum())} kept cells")
    return {"image_embeds": kept_embeds_KD.detach().cpu().contiguous(), "image_grid_thw": grid_13,
            "keep_mask": keep_mask_V}
