"""Stage 1's evaluation and the demo's transformers answers resize images to `model.*_pixels`,
not to the sizes the checkpoint's processor saved.

The embedded default saved 224 x 224 max pixels; with model.max_pixels = 448 x 448 a 448 px image
keeps its size: 448 / 14 = 32 patches a side, grid (1, 32, 32), 2 x 2 merge -> 256 visual tokens
(64 at the saved size).
"""

from __future__ import annotations

from PIL import Image

from pipeline.config import load_config
from pipeline.embedded import EMBEDDED_DIR

BIG = ["model.max_pixels=200704"]  # 448 x 448


def _image() -> Image.Image:
    return Image.new("RGB", (448, 448), (200, 40, 40))


def test_glimpse_stage_evaluates_at_the_config_size(tmp_path):
    from pipeline.glimpse import GlimpseStage
    from pipeline.prompts import prompt_text

    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", *BIG])
    processor = GlimpseStage(cfg, EMBEDDED_DIR).processor
    out = processor(text=[prompt_text(processor, "What color is the square?")],
                    images=[_image()], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 32, 32]]


def test_demo_transformers_answers_at_the_config_size(tmp_path):
    from pipeline.demo import _greedy_ids_transformers

    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", *BIG])
    rows = [{"question": "What color is the square?", "image": _image()}]
    ids, visual_tokens = _greedy_ids_transformers(EMBEDDED_DIR, cfg.model, rows, 1)
    assert len(ids) == 1 and visual_tokens == 256
