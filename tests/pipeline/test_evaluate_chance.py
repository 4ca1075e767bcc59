"""Chance levels of the held-out evaluation (pipeline/evaluate.py), by hand."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.evaluate import chance_levels


def test_chance_levels_uniform_and_prior_by_hand():
    test_rows = [{"question_type": "color", "answer": "red"},
                 {"question_type": "color", "answer": "Blue."},
                 {"question_type": "number", "answer": "7"}]
    train = {"color": Counter({"blue": 5, "red": 2}), "number": Counter({"3": 4, "7": 1})}
    out = chance_levels(test_rows, train)
    # uniform: colour 1/7, number 1/10; overall the mean over rows: (1/7 + 1/7 + 1/10) / 3
    assert out["chance_uniform/color"] == pytest.approx(1 / 7)
    assert out["chance_uniform"] == pytest.approx((2 / 7 + 1 / 10) / 3)
    # prior: always "blue" for colour (1 of 2 test rows, 'Blue.' normalises to 'blue'), always
    # "3" for number (0 of 1): overall 1 of 3
    assert out["chance_prior/color"] == pytest.approx(0.5)
    assert out["chance_prior/number"] == 0.0
    assert out["chance_prior"] == pytest.approx(1 / 3)
