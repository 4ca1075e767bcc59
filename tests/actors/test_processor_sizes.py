"""The actors' processors resize images to `model.*_pixels`, not to the checkpoint's saved sizes,
with no engine, Ray or DeepSpeed started.

The embedded default saved 224 x 224 max pixels; with model.max_pixels = 448 x 448 a 448 px image
keeps its size: 448 / 14 = 32 patches a side, grid (1, 32, 32), 2 x 2 merge -> 256 visual tokens
(64 at the saved size). test_policy_zero3's M-RoPE test checks a live policy rank the same way.
"""

from __future__ import annotations

import torch
from PIL import Image

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import load_config
from pipeline.embedded import EMBEDDED_DIR

QUESTION = "What color is the square?"


def _cfg(tmp_path):
    return load_config("configs/tiny.yaml", [f"output_dir={tmp_path}",
                                             "model.max_pixels=200704"])


def _prompts() -> PromptBatch:
    return PromptBatch(ids=["a"], images=[Image.new("RGB", (448, 448), (40, 40, 200))],
                       questions=[QUESTION], answers=["blue"])


def test_rollout_prepass_runs_at_the_config_size(tmp_path):
    from actors.rollout import RolloutActor
    from pipeline.prompts import prompt_text

    cfg = _cfg(tmp_path)
    actor = RolloutActor.__new__(RolloutActor)  # the pre-pass half only: no vLLM engine
    actor._load_prepass(str(EMBEDDED_DIR), cfg.model, cfg.glimpse, seed=0)
    prompts = _prompts()
    (done,) = actor._prepass_chunk([prompt_text(actor.processor, QUESTION)], prompts.images)
    assert done.grid_thw == [1, 32, 32]
    assert done.vip_logits_V.numel() == 256 and done.vision.embeds_VD.shape[0] == 256


def test_policy_and_reference_batches_at_the_config_size(tmp_path):
    """PolicyActor and ReferenceActor build `load_processor(model_path, model_cfg)` and batch
    through `prompt_inputs`; their constructors start DeepSpeed, so this runs that pair alone."""
    from actors.batching import prompt_inputs
    from glimpseprune.processor import load_processor

    batch = RolloutBatch(prompts=_prompts(), prompt_index_B=[0], response_ids=[[1]])
    processor = load_processor(EMBEDDED_DIR, _cfg(tmp_path).model)
    inputs = prompt_inputs(processor, batch, range(1), torch.device("cpu"))
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
