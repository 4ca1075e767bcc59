"""Dense per-cell supervision of the vision tower from the synthetic generator's geometry.

Owns the labels of every merged visual-token cell (what kind of object covers it, its colour,
and for boxes the digit), the linear heads that read them off the vision tower's merged output,
and their loss. Why: a random tiny vision tower never learns per-token features from answer
loss alone in CPU minutes (shared docs tiny-task.md: 0.23 held-out with answer loss only, 0.80
with dense pretraining first). Synthetic data only; must not be used for real models.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image, ImageDraw

from pipeline.synthetic import BOX_KIND, COLORS, SHAPES, SceneObject, draw_object

KINDS = ("background", *SHAPES, BOX_KIND)
COLOR_NAMES = tuple(COLORS)
IGNORE = -100
OBJECT_MIN_COVER = 0.15  # a cell belongs to the object covering at least this much of it
BACKGROUND_MAX_COVER = 0.04  # and is background when everything covers less; else ignored


def _coverage(obj: SceneObject, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """Fraction of each cell's pixels the object paints, [rows, cols]."""
    height, width = image_hw
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw_object(ImageDraw.Draw(canvas), obj)
    painted = np.asarray(canvas).any(axis=-1).astype(np.float32)
    rows, cols = grid_hw
    row_edges = np.linspace(0, height, rows + 1).round().astype(int)
    col_edges = np.linspace(0, width, cols + 1).round().astype(int)
    row_sums = np.add.reduceat(painted, row_edges[:-1], axis=0)
    cell_sums = np.add.reduceat(row_sums, col_edges[:-1], axis=1)
    areas = np.outer(np.diff(row_edges), np.diff(col_edges))
    return cell_sums / areas


def cell_labels(objects_json: str, image_hw: tuple[int, int],
                grid_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Row-major labels of every merged cell: kind, color, digit ([rows * cols] each; -100 where
    ambiguous, and colour / digit only on object / box cells)."""
    objects = [SceneObject(kind=o["kind"], color=o["color"], box=tuple(o["box"]),
                           digit=o["digit"]) for o in json.loads(objects_json)]
    rows, cols = grid_hw
    kind = np.full(rows * cols, IGNORE)
    color = np.full(rows * cols, IGNORE)
    digit = np.full(rows * cols, IGNORE)
    if not objects:
        kind[:] = 0
    else:
        cover = np.stack([_coverage(o, image_hw, grid_hw).ravel() for o in objects])
        best = cover.argmax(axis=0)
        best_cover = cover.max(axis=0)
        kind[cover.sum(axis=0) < BACKGROUND_MAX_COVER] = 0
        for cell in np.flatnonzero(best_cover >= OBJECT_MIN_COVER):
            obj = objects[best[cell]]
            kind[cell] = KINDS.index(obj.kind)
            color[cell] = COLOR_NAMES.index(obj.color)
            if obj.kind == BOX_KIND:
                digit[cell] = obj.digit
    return {name: torch.as_tensor(values, dtype=torch.long)
            for name, values in (("kind", kind), ("color", color), ("digit", digit))}


class DenseHeads(torch.nn.Module):
    """Linear read-outs of kind / colour / digit from each merged visual token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.kind = torch.nn.Linear(hidden_size, len(KINDS))
        self.color = torch.nn.Linear(hidden_size, len(COLOR_NAMES))
        self.digit = torch.nn.Linear(hidden_size, 10)

    def forward(self, feats_VD: torch.Tensor, labels: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of the three cross-entropies (each a mean over its labelled cells) and the
        per-head accuracies."""
        loss = feats_VD.new_zeros(())
        accuracy = {}
        for name in ("kind", "color", "digit"):
            target = labels[name].to(feats_VD.device)
            valid = target != IGNORE
            # Every head runs on every cell, labelled or not: under ZeRO-3 a head skipped on one
            # rank (an image without a digit box) leaves its parameter all-gather unmatched.
            logits = getattr(self, name)(feats_VD).float()
            if not valid.any():
                loss = loss + 0.0 * logits.sum()
                continue
            loss = loss + torch.nn.functional.cross_entropy(logits[valid], target[valid])
            accuracy[name] = float((logits[valid].argmax(-1) == target[valid]).float().mean())
        return loss, accuracy
