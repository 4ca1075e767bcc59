"""Images a user's data set really holds, through the loader and then the processor every stage
runs (evaluate, sft, the rollout pre-pass): every PIL mode, 1 x 1 and 3 x 3 pixels, long thin
strips up to the processor's aspect limit are answered; a strip past it is skipped by the loader
with its reason and refused by `glimpseprune.look` with a message (not the processor's
ValueError from deep in a stack)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from pipeline.config import ModelConfig, load_config
from pipeline.data import load_split

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "I;16", "F"]


def _write(tmp_path, name: str, image: Image.Image) -> str:
    suffix = ".jpg" if image.mode == "CMYK" else ".tiff" if image.mode in ("I", "F") else ".png"
    image.save(tmp_path / f"{name}{suffix}")
    return f"{name}{suffix}"


def test_every_mode_and_size_loads_and_runs_through_the_processor(tmp_path, tiny_model_dir):
    from glimpseprune.processor import load_processor
    from pipeline.prompts import prompt_text

    images = {f"mode-{m}": Image.new(m, (64, 40)) for m in MODES}
    images.update({"one-pixel": Image.new("RGB", (1, 1), (255, 0, 0)),
                   "three-pixels": Image.new("RGB", (3, 3)),
                   "tall-strip": Image.new("RGB", (28, 28 * 200)),  # at the limit: taken
                   "wide-sliver": Image.new("RGB", (4000, 2))})  # past it: skipped
    rows = [{"id": name, "image": _write(tmp_path, name, image), "question": "What color?",
             "answer": "red"} for name, image in images.items()]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path}", "data.source=jsonl", f"data.path={tmp_path / 'rows.jsonl'}",
        f"data.image_root={tmp_path}"])
    ds, report = load_split(cfg.data, "train", cfg.output_dir)
    assert dict(report.counts) == {"extreme aspect ratio": 1}
    assert report.example_ids["extreme aspect ratio"] == ["wide-sliver"]
    assert len(ds) == len(images) - 1

    processor = load_processor(tiny_model_dir, ModelConfig(max_pixels=50176))
    for row in ds:
        out = processor(text=[prompt_text(processor, row["question"])], images=[row["image"]],
                        return_tensors="pt")
        assert out["image_grid_thw"].prod() >= 4, row["id"]  # at least one merged token


def test_look_refuses_a_strip_past_the_aspect_limit_by_name(tmp_path, tiny_model_dir):
    Image.new("RGB", (4000, 2)).save(tmp_path / "sliver.png")
    done = subprocess.run(
        [sys.executable, "-m", "glimpseprune.look", "--model", str(tiny_model_dir),
         "--image", str(tmp_path / "sliver.png"), "--question", "What?",
         "--out", str(tmp_path / "look")], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "aspect ratio of 2000" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("size", [(4000, 2), (2, 4000)])
def test_the_rollout_actor_names_the_problem_before_its_prepass(size):
    """Serve and GRPO answer such a request with its own error (actors.rollout._check_image);
    checked on the rule itself, without an engine."""
    from actors.rollout import RolloutActor

    actor = RolloutActor.__new__(RolloutActor)
    actor.max_image_pixels = 10**8
    assert "aspect ratio of 2000" in actor._check_image(Image.new("RGB", size))
    assert actor._check_image(Image.new("RGB", (28, 28 * 200))) is None
