"""The reward service combines the components per config and survives bad rows."""

from __future__ import annotations

import pytest

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import PruneBonusConfig, RewardConfig
from rewards.service import RewardService


def _batch(extras):
    prompts = PromptBatch(ids=["p0", "p1"], images=[None, None], questions=["q0", "q1"],
                          answers=["red", "7"])
    # group of 2 per prompt: rows 0,1 -> p0, rows 2,3 -> p1
    return RolloutBatch(prompts=prompts, prompt_index_B=[0, 0, 1, 1],
                        response_ids=[[1], [1], [1], [1]], extras=extras)


def test_components_and_total():
    service = RewardService(RewardConfig(format_weight=0.1,
                                         prune_bonus=PruneBonusConfig(weight=0.5)))
    batch = _batch({"visual_tokens": [256] * 4, "kept_tokens": [64, 256, 32, 128],
                    "finish_reason": ["stop", "stop", "length", "stop"],
                    "error": [None] * 4})
    scores = service.score(batch, ["Red", "blue", "7", "8"])
    # row 0: correct, keep 64/256 = 0.25 -> bonus 0.5 * 0.75 = 0.375; format 1 -> total
    #        1 + 0.1 + 0.375 = 1.475.  row 1: wrong -> bonus 0, format 1 -> 0.1.
    # row 2: correct, keep 0.125 -> bonus 0.4375; cut at max tokens -> format 0 -> 1.4375.
    # row 3: wrong -> 0.1.
    assert scores["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    assert scores["prune_bonus"] == pytest.approx([0.375, 0.0, 0.4375, 0.0])
    assert scores["total"] == pytest.approx([1.475, 0.1, 1.4375, 0.1])
    assert scores["errors"] == 0


def test_failed_rows_and_raising_functions_score_zero_and_are_counted(monkeypatch):
    service = RewardService(RewardConfig())
    batch = _batch({"visual_tokens": [256] * 4, "kept_tokens": [64] * 4,
                    "finish_reason": ["stop", "error", "stop", "stop"],
                    "error": [None, "image over pixel limit", None, None]})

    def flaky(prediction, reference):
        if prediction == "boom":
            raise ValueError("cannot score")
        return float(prediction == reference)

    monkeypatch.setattr(service, "correct", flaky)
    scores = service.score(batch, ["red", "", "boom", "7"])
    assert scores["errors"] == 2
    assert scores["accuracy"] == [1.0, 0.0, 0.0, 1.0]
    assert scores["total"][1] == 0.0 and scores["total"][2] == 0.0


def test_all_failed_has_the_shape_of_a_score():
    """What the driver records for a hung worker's rows (pipeline/grpo.py's Roles.score)."""
    batch = _batch({"visual_tokens": [256] * 4, "kept_tokens": [64] * 4})
    scored = RewardService(RewardConfig()).score(batch, ["red", "", "blue", "7"])
    failed = RewardService.all_failed(4)
    assert failed.keys() == scored.keys()
    assert all(len(failed[k]) == 4 for k, v in scored.items() if isinstance(v, list))
    assert failed["errors"] == 4 and failed["total"] == [0.0] * 4


def test_unknown_correctness_is_a_clear_error():
    with pytest.raises(ValueError, match="'bogus' is unknown"):
        RewardService(RewardConfig(correctness="bogus"))
