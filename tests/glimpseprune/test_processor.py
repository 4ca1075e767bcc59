"""The config's image sizes win over the checkpoint's saved ones: load_processor and look.

The committed embedded default saved its processor at 224 x 224 = 50,176 max pixels; the config
here asks for 448 x 448 = 200,704. A 448 px image is then left at 448 px: 448 / 14 = 32 patches a
side, grid (1, 32, 32), merged 2 x 2 -> 16 x 16 = 256 visual tokens. At the saved size it would
be cut to 224 px: grid (1, 16, 16) -> 64 tokens.
"""

from __future__ import annotations

import json
import warnings

from PIL import Image

from pipeline.config import ModelConfig
from pipeline.embedded import EMBEDDED_DIR

BIG = 448 * 448


def _image(side: int) -> Image.Image:
    return Image.new("RGB", (side, side), (90, 160, 40))


def test_config_max_pixels_wins_over_the_saved_size():
    from transformers import AutoProcessor

    from glimpseprune.processor import load_processor

    saved = AutoProcessor.from_pretrained(EMBEDDED_DIR)
    assert saved.image_processor(images=[_image(448)])["image_grid_thw"].tolist() == [[1, 16, 16]]
    processor = load_processor(EMBEDDED_DIR, ModelConfig(max_pixels=BIG))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the `size` dict, not the deprecated *_pixels path
        out = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"],
                        images=[_image(448)], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 32, 32]]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == pad).sum()) == 256
    assert processor.video_processor.size["longest_edge"] == BIG


def test_config_min_pixels_wins():
    from glimpseprune.processor import load_processor

    # A 28 px image has 784 pixels, under either minimum: at 56 x 56 = 3,136 (the default and
    # the saved value) it grows to 56 px, 4 x 4 patches; at 112 x 112 to 112 px, 8 x 8 patches.
    small = load_processor(EMBEDDED_DIR, ModelConfig())
    assert small.image_processor(images=[_image(28)])["image_grid_thw"].tolist() == [[1, 4, 4]]
    larger = load_processor(EMBEDDED_DIR, ModelConfig(min_pixels=112 * 112, max_pixels=BIG))
    assert larger.image_processor(images=[_image(28)])["image_grid_thw"].tolist() == [[1, 8, 8]]


def test_look_uses_its_pixel_flags_not_the_saved_size(tmp_path, capsys):
    from glimpseprune.look import main

    _image(448).save(tmp_path / "img.png")
    base = ["--model", str(EMBEDDED_DIR), "--image", str(tmp_path / "img.png"), "--question",
            "What color is the circle?", "--out", str(tmp_path), "--max-new-tokens", "1"]
    main(base)  # default --max-pixels: model.max_pixels's default, 448 x 448
    assert json.loads(capsys.readouterr().out)["visual_tokens"] == 256
    main(base + ["--max-pixels", str(112 * 112)])  # 112 px: 8 x 8 patches -> 4 x 4 tokens
    assert json.loads(capsys.readouterr().out)["visual_tokens"] == 16


def test_remote_code_only_with_trust_remote_code(tmp_path):
    import shutil

    from glimpseprune.processor import load_processor

    folder = tmp_path / "custom"
    shutil.copytree(EMBEDDED_DIR, folder, ignore=shutil.ignore_patterns("*.safetensors",
                                                                        "glimpse_modules"))
    (folder / "custom_processing.py").write_text(
        "from transformers import Qwen2_5_VLProcessor\n\n\n"
        "class CustomProcessor(Qwen2_5_VLProcessor):\n    pass\n")
    saved = json.loads((folder / "processor_config.json").read_text())
    saved["auto_map"] = {"AutoProcessor": "custom_processing.CustomProcessor"}
    (folder / "processor_config.json").write_text(json.dumps(saved))
    stock = load_processor(folder, ModelConfig(max_pixels=BIG))  # trust_remote_code off
    assert type(stock).__name__ == "Qwen2_5_VLProcessor"
    custom = load_processor(folder, ModelConfig(max_pixels=BIG, trust_remote_code=True))
    assert type(custom).__name__ == "CustomProcessor"
    assert custom.image_processor.size["longest_edge"] == BIG
