"""pipeline.evaluate on rows without boxes: the box checks are "not applicable", not scores of
empty masks (issue F9: box_only was reported with zero visual tokens and box recall 0.0)."""

from __future__ import annotations

import math

import torch


def test_box_checks_count_only_rows_with_boxes():
    from transformers import AutoProcessor

    from glimpseprune.model import GlimpsePruneModel
    from pipeline.config import load_config
    from pipeline.embedded import EMBEDDED_DIR, MODULES_DIR
    from pipeline.evaluate import evaluate_glimpse, evaluate_grounding
    from pipeline.synthetic import generate_split

    cfg = load_config("configs/tiny.yaml", ["data.synthetic.num_test=2"])
    rows = list(generate_split(cfg.data.synthetic, "test"))[:6]
    model = GlimpsePruneModel.from_pretrained(EMBEDDED_DIR, cfg.glimpse,
                                              modules_path=MODULES_DIR)
    processor = AutoProcessor.from_pretrained(EMBEDDED_DIR)
    bare = [{**r, "boxes": []} for r in rows]
    none = evaluate_grounding(model, processor, bare, batch_size=4, with_pruning=True)
    assert none["rows_with_boxes"] == 0 and "full/accuracy" in none
    assert not any(k.startswith(("box_only", "no_box")) for k in none)
    assert "pruned/box_recall" not in none and "pruned/keep_ratio" in none
    assert math.isnan(evaluate_glimpse(model, processor, bare)["eval/box_recall"])
    # some with, some without: the box checks see exactly the rows that have boxes
    mixed = [r if i % 2 else bare[i] for i, r in enumerate(rows)]
    part = evaluate_grounding(model, processor, mixed, batch_size=4, with_pruning=True)
    only = evaluate_grounding(model, processor, mixed[1::2], batch_size=4, with_pruning=True)
    assert part["rows_with_boxes"] == 3
    for key in ("box_only/accuracy", "no_box/accuracy", "pruned/box_recall"):
        assert part[key] == only[key], key
    assert torch.isfinite(torch.tensor(part["pruned/box_recall"]))
