"""The committed embedded default (glimpseprune/embedded/tiny): its files are the ones its card
describes, and the model they hold answers held-out questions and prunes.

The thresholds are far above chance (about 0.2 on this task) and below the card's measured
figures on the whole test split, so that they hold on a 40-question slice."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.embedded import CARD_NAME, EMBEDDED_DIR, MODULES_DIR, verify


def test_the_files_match_their_card():
    card = verify()
    assert "model.safetensors" in card["files"]
    assert "glimpse_modules/glimpse_modules.safetensors" in card["files"]
    assert card["base"]["steps"] > 0 and card["base"]["wall_s"] > 0
    assert card["base"]["command"].startswith("python -m pipeline.sft")


def test_a_changed_or_extra_file_is_named(tmp_path):
    copy = tmp_path / "tiny"
    shutil.copytree(EMBEDDED_DIR, copy)
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    with pytest.raises(ValueError, match="config.json does not match"):
        verify(copy)
    shutil.copy(EMBEDDED_DIR / "config.json", copy / "config.json")
    (copy / "stray.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="stray.bin"):
        verify(copy)


def test_the_embedded_model_answers_and_prunes():
    from transformers import AutoProcessor

    from glimpseprune.model import GlimpsePruneModel
    from pipeline.config import load_config
    from pipeline.evaluate import evaluate_glimpse, evaluate_grounding
    from pipeline.synthetic import generate_split

    cfg = load_config("configs/tiny.yaml", ["data.synthetic.num_test=8"])
    rows = list(generate_split(cfg.data.synthetic, "test"))[:40]
    model = GlimpsePruneModel.from_pretrained(EMBEDDED_DIR, cfg.glimpse,
                                              modules_path=MODULES_DIR)
    processor = AutoProcessor.from_pretrained(EMBEDDED_DIR)
    result = evaluate_glimpse(model, processor, rows)
    # measured when committed: 1.0 / 1.0 at keep ratio 0.124, recall 0.81 on these 40 rows
    assert result["eval/accuracy_unpruned"] >= 0.9
    assert result["eval/accuracy"] >= 0.9
    assert result["eval/keep_ratio"] <= 0.2
    assert result["eval/box_recall"] >= 0.7
    # grounded: the answer lives in the target box's tokens (measured 1.0 vs 0.25 here)
    grounding = evaluate_grounding(model, processor, rows[:24])
    assert grounding["box_only/accuracy"] >= 0.9
    assert grounding["no_box/accuracy"] <= 0.45
    # the card's figures are the ones the README quotes (test split, 1,000 questions)
    test = json.loads((EMBEDDED_DIR / CARD_NAME).read_text())["evaluate"]["test"]
    assert test["rows"] == 1000 and test["full/accuracy"] >= 0.75
