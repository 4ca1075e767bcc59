"""The committed hard-task base (glimpseprune/embedded/tiny_hard, configs/tiny_hard.yaml): its
files are the ones its card describes, it answers clearly above chance and below saturation,
its answers come from the target region, and its stage-1 pruner prunes.

Thresholds sit between chance (about 0.13 on this task) and the figures measured when the model
was committed (in the comments), loose enough for a 40-question slice."""

from __future__ import annotations

import json

from pipeline.embedded import CARD_NAME, HARD_DIR, verify


def test_the_hard_files_match_their_card():
    card = verify(HARD_DIR)
    assert card["base"]["command"].startswith("python -m pipeline.sft --config "
                                              "configs/tiny_hard.yaml")
    test = card["evaluate"]["test"]
    # issue F8: held-out accuracy in 0.45-0.80, grounded (all-but-box near chance)
    assert test["rows"] == 1000 and 0.45 <= test["full/accuracy"] <= 0.80
    assert test["no_box/accuracy"] <= test["chance_prior"] + 0.1


def test_the_hard_model_answers_grounded_and_prunes():
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.processor import load_processor
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_glimpse, evaluate_grounding
    from pipeline.synthetic import generate_split

    cfg = load_config("configs/tiny_hard.yaml", ["data.synthetic.num_test=8"])
    rows = list(generate_split(cfg.data.synthetic, "test"))[:40]
    model = GlimpsePruneModel.from_pretrained(HARD_DIR, cfg.glimpse,
                                              modules_path=str(HARD_DIR / "glimpse_modules"))
    processor = load_processor(HARD_DIR, cfg.model)
    result = evaluate_glimpse(model, processor, rows)
    # measured when committed: 0.625 unpruned, 0.625 pruned at 0.055 kept
    assert 0.4 <= result["eval/accuracy_unpruned"] <= 0.95
    assert result["eval/accuracy"] >= 0.35
    assert result["eval/keep_ratio"] <= 0.2
    grounding = evaluate_grounding(model, processor, rows[:24])
    # measured when committed: 0.79 with only the target's tokens, 0.125 without
    assert grounding["box_only/accuracy"] >= grounding["no_box/accuracy"] + 0.3
    assert grounding["no_box/accuracy"] <= 0.35
    card = json.loads((HARD_DIR / CARD_NAME).read_text())
    assert card["evaluate"]["test-methods"]["results"]  # the methods table it was judged by
