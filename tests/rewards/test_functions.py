"""Reward functions on hand-worked cases (the arithmetic is in the comments)."""

from __future__ import annotations

import pytest

from rewards.functions import (
    anls,
    choice_match,
    exact_match,
    format_reward,
    numeric_match,
    prune_bonus,
)


@pytest.mark.parametrize("prediction,reference,expected", [
    ("red", "red", 1.0), ("The Red.", "red", 1.0), ("  RED ", "red", 1.0),
    ("dark red", "red", 0.0), ("", "red", 0.0), ("7", "7", 1.0),
])
def test_exact_match(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize("prediction,reference,expected", [
    ("about 1,000 people", "1000", 1.0),  # commas dropped: 1000 == 1000
    ("99.5", "100", 1.0),  # |99.5 - 100| = 0.5 <= 0.01 * 100 = 1
    ("98.9", "100", 0.0),  # 1.1 > 1
    ("0", "0", 1.0), ("0.001", "0", 0.0),  # at zero only exact counts
    ("no idea", "3", 0.0), ("-2.5 degrees", "-2.5", 1.0),
])
def test_numeric_match(prediction, reference, expected):
    assert numeric_match(prediction, reference) == expected


@pytest.mark.parametrize("prediction,reference,expected", [
    ("B", "B", 1.0), ("(b)", "B", 1.0), ("B. a cat", "(B)", 1.0), ("C", "B", 0.0),
    ("Because", "B", 0.0),  # a word starting with B chooses nothing
])
def test_choice_match(prediction, reference, expected):
    assert choice_match(prediction, reference) == expected


def test_anls():
    assert anls("invoice", "invoice") == 1.0
    # "invoce" vs "invoice": one deletion, longest 7 -> 1 - 1/7 = 0.857...
    assert anls("invoce", "invoice") == pytest.approx(6 / 7)
    # "cat" vs "invoice": distance >= 7 - 3 = 4, similarity <= 1 - 4/7 = 0.43 < 0.5 -> 0
    assert anls("cat", "invoice") == 0.0
    assert anls("Total  Due", ["amount", "total due"]) == 1.0  # best reference, spaces folded


def test_format_reward():
    assert format_reward("red", finished=True) == 1.0
    assert format_reward("red", finished=False) == 0.0  # cut at max_new_tokens
    assert format_reward("", finished=True) == 0.0
    assert format_reward("one two three four five six seven eight nine", True) == 0.0


def test_prune_bonus_is_paid_only_for_correct_answers():
    # weight 0.5, 20% of the tokens kept: 0.5 * (1 - 0.2) = 0.4
    assert prune_bonus(1.0, 0.2, 0.5) == pytest.approx(0.4)
    assert prune_bonus(0.0, 0.01, 0.5) == 0.0  # wrong answer: nothing, however few tokens
    assert prune_bonus(1.0, 1.0, 0.5) == 0.0  # kept everything: nothing
    assert prune_bonus(1.0, 0.2, 0.0) == 0.0  # bonus off
    with pytest.raises(ValueError, match="outside"):
        prune_bonus(1.0, 1.5, 0.5)
