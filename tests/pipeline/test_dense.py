"""Dense per-cell labels follow the drawn pixels; the heads' loss ignores unlabelled cells."""

from __future__ import annotations

import json

import torch

from pipeline.dense import COLOR_NAMES, IGNORE, KINDS, DenseHeads, cell_labels


def _objects(*objs):
    return json.dumps([{"kind": k, "color": c, "box": b, "digit": d} for k, c, b, d in objs])


def test_square_covering_whole_cells_labels_exactly_them():
    # A square on 28-px cell edges: cells (1..2, 3..4) of a 16 x 16 grid are fully covered.
    labels = cell_labels(_objects(("square", "red", [84, 28, 140, 84], -1)), (448, 448), (16, 16))
    kind = labels["kind"].view(16, 16)
    assert (kind[1:3, 3:5] == KINDS.index("square")).all()
    assert (labels["color"].view(16, 16)[1:3, 3:5] == COLOR_NAMES.index("red")).all()
    kind[1:3, 3:5] = 0
    assert (kind == 0).all()  # every other cell is background
    assert (labels["digit"] == IGNORE).all()  # no box, no digit labels


def test_partial_cover_is_ignored_and_box_cells_carry_the_digit():
    # The box covers 18 of cell 0's 28 px per side (41% of its area) -> labelled box; the
    # circle spans px 200..256: cells 7 and 8 mostly, cell 9 only a 4 px sliver.
    objs = _objects(("box", "blue", [10, 10, 66, 66], 7),
                    ("circle", "green", [200, 200, 256, 256], -1))
    labels = cell_labels(objs, (448, 448), (16, 16))
    kind, digit = labels["kind"].view(16, 16), labels["digit"].view(16, 16)
    assert (kind[0:2, 0:2] == KINDS.index("box")).all() and (digit[0:2, 0:2] == 7).all()
    assert kind[7, 7] == KINDS.index("circle")  # the circle's centre cell
    assert (kind[7:9, 7:9] == KINDS.index("circle")).all()
    # Row 9 holds only a 4 px sliver of the round edge: 2.8% of cell (9, 7) -> background,
    # 6.9% of cell (9, 8) -> between 4% and 15%: ignored rather than guessed.
    assert kind[9, 7] == 0 and kind[9, 8] == IGNORE and kind[9, 9] == 0
    assert (digit[kind != KINDS.index("box")] == IGNORE).all()


def test_heads_loss_ignores_unlabelled_cells():
    torch.manual_seed(0)
    heads = DenseHeads(8)
    feats = torch.randn(4, 8)
    labels = {"kind": torch.tensor([0, 1, IGNORE, IGNORE]),
              "color": torch.tensor([IGNORE, 2, IGNORE, IGNORE]),
              "digit": torch.full((4,), IGNORE)}
    loss, acc = heads(feats, labels)
    changed = feats.clone()
    changed[2:] = 100.0  # unlabelled cells cannot change the loss
    assert torch.allclose(heads(changed, labels)[0], loss)
    expected = (torch.nn.functional.cross_entropy(heads.kind(feats[:2]), labels["kind"][:2])
                + torch.nn.functional.cross_entropy(heads.color(feats[1:2]), labels["color"][1:2]))
    assert torch.allclose(loss, expected) and set(acc) == {"kind", "color"}
