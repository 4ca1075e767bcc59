"""vLLM's Qwen2.5-VL taught to take only the kept visual tokens of an image.

Owns the vLLM 0.32 extension points of /work/shared/docs/vllm-pruned-images.md: an image item
made of `image_embeds` [n_kept, D], `image_grid_thw` [[1, H, W]] and `keep_mask` [(H/2)*(W/2)]
is sized by its KEPT count everywhere stock vLLM uses the full grid (the data parser's and the
multimodal processor's field configs, the placeholder expansion, the per-image split of the
embeddings), and each kept token gets its ORIGINAL M-RoPE (t, h, w) id, with the text after the
image continuing at the full grid's maximum + 1 (the same positions the replay forward uses).
An item without `keep_mask` (pixels, e.g. vLLM's memory profiling) takes the stock path.
Must not compute embeddings or keep masks (the glimpse pre-pass does) and must not patch vLLM:
it is imported lazily by vLLM's model registry (glimpseprune.vllm_plugin registers it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLMultiModalDataParser,
    _create_qwen2vl_field_factory,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import DictEmbeddingItems
from vllm.multimodal.processing import PromptReplacement


def _flat(value) -> torch.Tensor | None:
    """A batched flat field arrives as one tensor or, when vLLM could not stack, a list."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return torch.cat([torch.as_tensor(v).flatten() for v in value])
    return torch.as_tensor(value).flatten()


def kept_sizes(grid_thw_N3: torch.Tensor, keep_mask, merge: int) -> tuple[list[int], list[int]]:
    """Per image: (kept merged tokens, all merged tokens).

    Args:
        grid_thw_N3: [N, 3] patch grids of N images.
        keep_mask: the N images' masks concatenated (None: every token kept).
        merge: spatial merge size.
    """
    grid_thw_N3 = torch.as_tensor(grid_thw_N3).reshape(-1, 3)
    full = (grid_thw_N3.prod(-1) // (merge * merge)).tolist()
    mask = _flat(keep_mask)
    if mask is None:
        return full, full
    if mask.numel() != sum(full):
        raise ValueError(f"keep_mask has {mask.numel()} entries for images of {full} merged "
                         "tokens")
    return [int(m.sum()) for m in mask.bool().split(full)], full


def _field_factory(merge: int):
    """Stock Qwen2-VL field configs, with `image_embeds` sized by kept counts and a keep_mask."""
    stock = _create_qwen2vl_field_factory(merge)

    def fields(hf_inputs: Mapping[str, torch.Tensor]) -> Mapping[str, MultiModalFieldConfig]:
        config = dict(stock(hf_inputs))
        grid = hf_inputs.get("image_grid_thw", torch.empty((0, 3), dtype=torch.long))
        kept, full = kept_sizes(grid, hf_inputs.get("keep_mask"), merge)
        config["image_embeds"] = MultiModalFieldConfig.flat_from_sizes(
            "image", torch.tensor(kept, dtype=torch.long))
        config["keep_mask"] = MultiModalFieldConfig.flat_from_sizes(
            "image", torch.tensor(full, dtype=torch.long), keep_on_cpu=True)
        return config

    return fields


class PrunedImageDataParser(Qwen2VLMultiModalDataParser):
    """Parses `{"image_embeds", "image_grid_thw", "keep_mask"}` image items."""

    embedding_fields = {
        "image": {"image_embeds": "values", "image_grid_thw": "metadata",
                  "keep_mask": "metadata"},
        "video": Qwen2VLMultiModalDataParser.embedding_fields["video"],
    }

    def _parse_image_data(self, data):
        if not isinstance(data, dict):
            return super()._parse_image_data(data)
        required, optional = self.embedding_field_sets("image")
        # An item without a mask is an unpruned image: nothing to size it by but the grid.
        if "keep_mask" not in data:
            required, optional = required - {"keep_mask"}, optional | {"keep_mask"}
        return DictEmbeddingItems(data, modality="image", required_fields=required,
                                  optional_fields=optional,
                                  fields_factory=_field_factory(self._spatial_merge_size))


class PrunedProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_data_parser(self):
        return PrunedImageDataParser(
            self.get_hf_config().vision_config.spatial_merge_size, video_needs_metadata=True,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings)


class PrunedMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        # The embedding dict passes through here again after the parser: size it the same way,
        # or several images per batch get split at full-grid boundaries.
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        return dict(**_field_factory(merge)(hf_inputs),
                    second_per_grid_ts=MultiModalFieldConfig.batched("video", keep_on_cpu=True))

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs: Mapping[str, Any],
                            out_mm_kwargs) -> Sequence:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        image_token = self.info.get_tokenizer().get_vocab()[hf_processor.image_token]
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def image_tokens(item_idx: int) -> list[int]:
            item = out_mm_kwargs["image"][item_idx]
            mask = item["keep_mask"].data if "keep_mask" in item else None
            kept, _ = kept_sizes(item["image_grid_thw"].data, mask, merge)
            return [image_token] * kept[0]

        return [PromptReplacement(modality="image", target=[image_token],
                                  replacement=image_tokens) if u.modality == "image" else u
                for u in updates]


def pruned_mrope_positions(num_tokens: int, images: list[tuple]) -> tuple[torch.Tensor, int]:
    """M-RoPE ids of a prompt whose images hold only their kept tokens.

    Args:
        num_tokens: L, the prompt length (text + kept visual tokens).
        images: per image, (offset of its first placeholder, t, merged rows, merged cols,
            bool keep mask over t * rows * cols or None for all).

    Returns:
        ([3, L] int64 positions, delta) with delta = next position - L, as vLLM expects.
    """
    pieces, start, next_id = [], 0, 0
    for offset, t, rows, cols, keep_V in sorted(images, key=lambda image: image[0]):
        grid_3V = np.indices((t, rows, cols)).reshape(3, -1)
        if keep_V is not None:
            grid_3V = grid_3V[:, np.asarray(keep_V, dtype=bool)]
        text_len = offset - start
        pieces.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_id)
        pieces.append(grid_3V + next_id + text_len)
        # Text after the image continues after the FULL grid, kept cells or not.
        next_id += text_len + max(t, rows, cols)
        start = offset + grid_3V.shape[1]
    tail = num_tokens - start
    pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_id)
    positions_3L = np.concatenate(pieces, axis=1).astype(np.int64)
    return torch.from_numpy(positions_3L), int(next_id + tail - num_tokens)


@MULTIMODAL_REGISTRY.register_processor(PrunedMultiModalProcessor, info=PrunedProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class GlimpsePruneQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image items may carry only their kept visual tokens."""

    def embed_multimodal(self, **kwargs: object):
        keep_mask = kwargs.pop("keep_mask", None)
        if keep_mask is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None or image_input["type"] != "image_embeds":
            raise ValueError("a keep_mask needs image_embeds of the kept tokens, not pixels")
        kept, _ = kept_sizes(image_input["image_grid_thw"].cpu(), keep_mask,
                             self.visual.spatial_merge_size)
        embeds = image_input["image_embeds"].type(self.visual.dtype)
        if embeds.shape[0] != sum(kept):
            raise ValueError(f"{embeds.shape[0]} image embeddings for {sum(kept)} kept tokens")
        return tuple(embeds.split(kept))

    def get_mrope_input_positions(self, input_tokens: list[int],
                                  mm_features: list) -> tuple[torch.Tensor, int]:
        merge = self.config.vision_config.spatial_merge_size
        images = []
        for feature in mm_features:
            if feature.modality != "image":
                raise ValueError(f"{type(self).__name__} serves images only, got "
                                 f"{feature.modality}")
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            mask = feature.data["keep_mask"].data if "keep_mask" in feature.data else None
            images.append((feature.mm_position.offset, t, h // merge, w // merge,
                           None if mask is None else mask.cpu().numpy()))
        return pruned_mrope_positions(len(input_tokens), images)
