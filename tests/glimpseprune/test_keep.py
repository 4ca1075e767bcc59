"""The keep rule: threshold, top-k cap, floor; hand-worked cases and properties on random logits."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glimpseprune.keep import keep_budget, keep_mask_from_logits, keep_masks_for_batch


def test_threshold_alone():
    # sigmoid(2)=0.88, sigmoid(-1)=0.27, sigmoid(0.5)=0.62, sigmoid(3)=0.95 -> > 0.5: T F T T
    mask = keep_mask_from_logits(torch.tensor([2.0, -1.0, 0.5, 3.0]), threshold=0.5)
    assert mask.tolist() == [True, False, True, True]
    # > 0.9 passes only sigmoid(3)=0.95
    assert keep_mask_from_logits(torch.tensor([2.0, -1.0, 0.5, 3.0]), 0.9).tolist() == [
        False, False, False, True]


def test_cap_keeps_the_highest_logits():
    # 3 of 4 pass; cap floor(0.5 * 4) = 2 keeps logits 3.0 and 2.0
    mask = keep_mask_from_logits(torch.tensor([2.0, -1.0, 0.5, 3.0]), 0.5, max_keep_ratio=0.5)
    assert mask.tolist() == [True, False, False, True]


def test_floor_keeps_the_highest_logits():
    # nothing passes 0.99; min_keep 3 keeps 3.0, 2.0, 0.5
    mask = keep_mask_from_logits(torch.tensor([2.0, -1.0, 0.5, 3.0]), 0.99, min_keep=3)
    assert mask.tolist() == [True, False, True, True]


def test_infinite_logits_keep_everything():
    assert keep_mask_from_logits(torch.full((7,), math.inf), threshold=1e-6).all()


def test_budget_arithmetic():
    assert keep_budget(256, 1, 0.111) == (1, 28)  # 0.111 * 256 = 28.4 -> 28
    assert keep_budget(100, 1, 0.29) == (1, 29)  # 28.999... in floats must not floor to 28
    assert keep_budget(10, 5, 0.1) == (5, 5)  # min_keep wins over a cap of 1
    assert keep_budget(3, 8, None) == (3, 3)  # both clipped to V


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=300),
       threshold=st.floats(0.01, 0.99), min_keep=st.integers(0, 40),
       ratio=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_limits_hold_on_random_logits(logits, threshold, min_keep, ratio):
    logits_V = torch.tensor(logits)
    mask = keep_mask_from_logits(logits_V, threshold, min_keep, ratio)
    kept, total = int(mask.sum()), len(logits)
    assert kept >= min(min_keep, total)
    if ratio is not None:
        assert kept <= max(min(min_keep, total), math.floor(ratio * total + 1e-9))
    passed = torch.sigmoid(logits_V) > threshold
    if min(min_keep, total) <= int(passed.sum()) <= (
            total if ratio is None else max(min(min_keep, total),
                                            math.floor(ratio * total + 1e-9))):
        assert torch.equal(mask, passed)  # within the limits the threshold alone decides
    if 0 < kept < total:  # whatever is kept ranks at least as high as whatever is dropped
        assert logits_V[mask].min() >= logits_V[~mask].max()


def test_per_sample_over_all_its_visual_tokens():
    # Two samples of different sizes (e.g. one with two images concatenated): each has its own cap.
    masks = keep_masks_for_batch([torch.arange(8.0), torch.arange(4.0)], 0.5, 1, 0.25)
    assert [m.tolist() for m in masks] == [[False] * 6 + [True] * 2, [False] * 3 + [True]]
