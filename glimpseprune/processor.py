"""Loading a checkpoint's processor with the config's image sizes.

Owns the one place a processor is made from a checkpoint folder: `AutoProcessor` loads it, then
`model.min_pixels` / `model.max_pixels` replace the sizes the checkpoint saved (without this, the
saved processor_config.json wins: the embedded default, saved at 224 px, would turn every image
into at most 64 visual tokens whatever the config says). vLLM's engine gets the same sizes
through `mm_processor_kwargs` (glimpseprune/vllm_engine.py), so both engines see one image size.
Must not build or change a tokenizer, a chat template or padding: callers set those.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ModelConfig

# Qwen2-VL's resize refuses an image whose long side is more than this many times its short one
# (ValueError deep inside the processor): callers check first and say so.
MAX_ASPECT_RATIO = 200


def image_shape_problem(width: int, height: int) -> str | None:
    """Why the processor cannot take an image of this size, or None."""
    ratio = max(width, height) / max(1, min(width, height))
    if ratio > MAX_ASPECT_RATIO:
        return (f"image of {width} x {height} pixels has an aspect ratio of {ratio:.0f}; the "
                f"Qwen2-VL processor takes at most {MAX_ASPECT_RATIO}")
    return None


def load_processor(model_path: str | Path, model_cfg: ModelConfig):
    """The checkpoint's processor, resizing images to `model_cfg`'s pixel range.

    In transformers 5.x the Qwen2-VL image (and video) processor resizes by its `size` dict
    ({"shortest_edge": min pixels, "longest_edge": max pixels}); `min_pixels` / `max_pixels`
    attributes are read on each call and override `size` (with a FutureWarning); 5.19 drops them
    at load, but a processor that keeps them (remote code, older transformers) gets them set too.

    Args:
        model_path: HF checkpoint folder (nothing is downloaded).
        model_cfg: the `model` section: min_pixels, max_pixels and trust_remote_code.
    """
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(
        str(model_path), trust_remote_code=model_cfg.trust_remote_code)
    for name in ("image_processor", "video_processor"):
        part = getattr(processor, name, None)
        if part is None:
            continue
        part.size["shortest_edge"] = model_cfg.min_pixels  # in place: a SizeDict stays one
        part.size["longest_edge"] = model_cfg.max_pixels
        for attr, value in (("min_pixels", model_cfg.min_pixels),
                            ("max_pixels", model_cfg.max_pixels)):
            if getattr(part, attr, None) is not None:
                setattr(part, attr, value)
    return processor
