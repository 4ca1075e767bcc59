"""Boxes land on the right cells of the processor's own visual-token grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from glimpseprune.grid import boxes_to_token_mask, resized_hw


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def _red_cells(processor, image):
    """Fraction of clearly red pixels in every merged cell, read back from pixel_values."""
    ip = processor.image_processor
    out = ip(images=[image], return_tensors="np")
    _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
    m, p = ip.merge_size, ip.patch_size
    patches = out["pixel_values"].reshape(gh // m, gw // m, m, m, 3, ip.temporal_patch_size, p, p)
    mean = np.asarray(ip.image_mean).reshape(3, 1, 1)
    std = np.asarray(ip.image_std).reshape(3, 1, 1)
    frac = np.zeros((gh // m, gw // m))
    for r in range(gh // m):
        for c in range(gw // m):
            cell = patches[r, c, :, :, :, 0] * std + mean  # [m, m, 3, p, p], values in 0..1
            red = (cell[:, :, 0] > 0.6) & (cell[:, :, 1] < 0.35) & (cell[:, :, 2] < 0.35)
            frac[r, c] = red.mean()
    return frac, (gh // m, gw // m)


@pytest.mark.parametrize("size,box", [
    ((448, 448), (100, 60, 170, 120)),  # the synthetic task's size: no resize
    ((300, 200), (37, 101, 121, 166)),  # resized to a multiple of 28, aspect kept
    ((641, 333), (400, 20, 470, 90)),
])
def test_boxes_hit_exactly_the_cells_that_hold_the_object(processor, size, box):
    image = Image.new("RGB", size, (235, 235, 235))
    ImageDraw.Draw(image).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(220, 20, 20))
    frac, grid = _red_cells(processor, image)
    mask = boxes_to_token_mask([list(box)], (size[1], size[0]), grid)
    assert mask.sum() > 0
    # Every cell the box touches holds red, every other cell none (resampling bleed aside).
    assert (frac[mask] > 0.0).all(), frac[mask]
    assert (frac[~mask] < 0.02).all(), frac[~mask].max()


def test_resized_hw_matches_the_processor(processor):
    ip = processor.image_processor
    for width, height in [(448, 448), (300, 200), (641, 333), (50, 1000), (2000, 1500)]:
        out = ip(images=[Image.new("RGB", (width, height))], return_tensors="np")
        _, gh, gw = (int(v) for v in out["image_grid_thw"][0])
        expected = resized_hw(height, width, ip.size["shortest_edge"], ip.size["longest_edge"])
        assert (gh * ip.patch_size, gw * ip.patch_size) == expected, (width, height)


def test_mask_is_union_and_clipped():
    mask = boxes_to_token_mask([[0, 0, 28, 28], [420, 420, 460, 460]], (448, 448), (16, 16))
    assert mask[0, 0] and mask[15, 15] and mask.sum() == 2
