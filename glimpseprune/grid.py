"""Geometry of Qwen2.5-VL's visual tokens: pixel boxes <-> cells of the merged token grid.

Owns the mapping from an image's original pixels to the processor's resized grid (smart resize
to multiples of patch_size * merge_size) and the rasterisation of target boxes into a keep-style
token mask (union of boxes, floor/ceil to cells, as the reference method does for its
localisation loss). Must not import the model: data checks and the VIP's targets both use it.
"""

from __future__ import annotations

import math

import numpy as np


def resized_hw(height: int, width: int, min_pixels: int, max_pixels: int,
               factor: int = 28) -> tuple[int, int]:
    """The (height, width) Qwen2-VL's image processor resizes an image to.

    Both sides become multiples of `factor` (patch 14 x merge 2) with the aspect ratio kept as
    well as rounding allows and the pixel count brought inside [min_pixels, max_pixels].
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is "
                         "over 200, which Qwen2.5-VL's processor rejects")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def boxes_to_token_mask(boxes_xyxy: list[list[float]], image_hw: tuple[int, int],
                        merged_grid_hw: tuple[int, int]) -> np.ndarray:
    """Rasterises pixel boxes onto the merged visual-token grid.

    Args:
        boxes_xyxy: boxes in the ORIGINAL image's pixels, (x0, y0, x1, y1), x1/y1 exclusive.
        image_hw: the original image's (height, width).
        merged_grid_hw: the grid of visual tokens the LLM sees: image_grid_thw[1:] // merge.

    Returns:
        bool array [rows, cols], row-major like the visual tokens; True where a box touches the
        cell (floor of the start, ceil of the end, so a partly covered cell counts).
    """
    rows, cols = merged_grid_hw
    height, width = image_hw
    mask = np.zeros((rows, cols), dtype=bool)
    for x0, y0, x1, y1 in boxes_xyxy:
        r0 = math.floor(y0 / height * rows)
        r1 = math.ceil(y1 / height * rows)
        c0 = math.floor(x0 / width * cols)
        c1 = math.ceil(x1 / width * cols)
        mask[max(r0, 0):min(r1, rows), max(c0, 0):min(c1, cols)] = True
    return mask
