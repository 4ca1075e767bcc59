"""GRPO maths on hand-derived numbers (arithmetic in the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.algo import (
    aggregate,
    dynamic_sampling_keep,
    group_advantages,
    k3_kl,
    mean_group_std,
    policy_loss,
    tis_weights,
)


def test_group_advantages_std_normalised():
    # group 0: rewards 1, 0 -> mean 0.5, population std 0.5 -> (+0.5, -0.5) / (0.5 + 1e-4)
    # group 1: rewards 2, 2, 2 -> all equal -> 0 / (0 + 1e-4) = 0 (no NaN)
    adv = group_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0, 2.0]),
                           torch.tensor([0, 0, 1, 1, 1]))
    expected = 0.5 / (0.5 + 1e-4)
    assert adv.tolist() == pytest.approx([expected, -expected, 0.0, 0.0, 0.0])
    assert not torch.isnan(adv).any()


def test_group_advantages_singleton_and_drgrpo():
    # a group of one: r - mean = 0 in both modes
    assert group_advantages(torch.tensor([3.0]), torch.tensor([7])).tolist() == [0.0]
    # drgrpo: rewards 1, 0, 0, 1 in one group -> mean 0.5 -> +-0.5, no std division
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([4, 4, 4, 4]),
                           mode="drgrpo")
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5]


def test_k3_kl_values():
    # d = ref - logp; d = 0 -> 0; d = ln 2 -> 2 - ln 2 - 1 = 0.30685...
    logp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-1.0, -1.0 + math.log(2)]])
    assert k3_kl(logp, ref).tolist()[0] == pytest.approx([0.0, 1 - math.log(2)])


def test_clip_boundaries_with_clip_higher():
    # A = +1: ratio 1.5 clips at 1 + 0.28 = 1.28 -> loss -1.28; ratio 0.5 is not clipped for
    # A > 0 (min picks 0.5) -> loss -0.5.  A = -1: ratio 0.5 clips at 1 - 0.2 = 0.8 -> the min
    # of (-0.5, -0.8) is -0.8 -> loss +0.8; ratio 1.5 -> min(-1.5, -1.28) = -1.5 -> loss 1.5.
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.5]]))
    old = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    for row, adv, expected in ((0, 1.0, [-1.28, -0.5]), (1, -1.0, [0.8, 1.5])):
        loss, info = policy_loss(logp[row:row + 1], old[row:row + 1], torch.tensor([adv]),
                                 mask[row:row + 1], clip_low=0.2, clip_high=0.28)
        assert loss.item() == pytest.approx(sum(expected) / 2)
        assert info["clip_frac"] == pytest.approx(0.5)  # one of the two tokens clipped


def test_masks_and_aggregation():
    values = torch.tensor([[1.0, 2.0, 3.0], [10.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token: (1 + 2 + 3 + 10) / 4 = 4; sequence: mean(2, 10) = 6
    assert aggregate(values, mask, "token").item() == pytest.approx(4.0)
    assert aggregate(values, mask, "sequence").item() == pytest.approx(6.0)
    # a row with no tokens is ignored, not a division by zero
    empty = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert aggregate(values, empty, "sequence").item() == pytest.approx(2.0)


def test_loss_gradient_and_kl_term():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = logp.detach().clone()
    ref = old - math.log(2)  # d = -ln 2 -> k3 = 0.5 + ln 2 - 1 = 0.19315
    loss, info = policy_loss(logp, old, torch.tensor([2.0]), torch.ones(1, 2),
                             ref_logp_BT=ref, kl_coef=0.1)
    # ratio 1 -> policy term -2 per token; KL term 0.1 * 0.19315
    assert loss.item() == pytest.approx(-2.0 + 0.1 * (0.5 + math.log(2) - 1))
    assert info["kl"] == pytest.approx(0.5 + math.log(2) - 1)
    loss.backward()
    # d/dlogp of -ratio*A at ratio 1 = -A / 2 tokens = -1; KL: d/dlogp (e^d - d - 1) with
    # d = ref - logp is -e^d + 1 = -0.5 + 1 = 0.5, times 0.1 / 2 tokens = 0.025
    assert logp.grad.tolist()[0] == pytest.approx([-1.0 + 0.025, -1.0 + 0.025])


def test_tis_weights_and_dynamic_sampling():
    old = torch.tensor([[0.0, 0.0]])
    rollout = torch.tensor([[math.log(0.5), math.log(4.0)]])
    # exp(0 - ln 0.5) = 2 -> capped at 1.5; exp(0 - ln 4) = 0.25
    assert tis_weights(old, rollout, cap=1.5).tolist()[0] == pytest.approx([1.5, 0.25])
    assert tis_weights(old, rollout, cap=0.0).tolist()[0] == [1.0, 1.0]
    keep = dynamic_sampling_keep(torch.tensor([1.0, 1.0, 0.0, 1.0, 5.0]),
                                 torch.tensor([0, 0, 1, 1, 2]))
    assert keep.tolist() == [False, False, True, True, False]  # equal or singleton: dropped


def test_mean_group_std_by_hand():
    # group 7: 0.1, 0.3 -> mean 0.2, population std 0.1; group 2: 0.5, 0.5 -> 0;
    # group 4: 0, 0, 0.3 -> mean 0.1, variance (0.01 + 0.01 + 0.04) / 3 = 0.02, std 0.14142
    values_B = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.0, 0.0, 0.3])
    group_B = torch.tensor([7, 2, 7, 2, 4, 4, 4])
    assert mean_group_std(values_B, group_B) == pytest.approx((0.1 + 0 + 0.02 ** 0.5) / 3)
    # one shared mask per group: the bonus is constant in every group
    assert mean_group_std(torch.tensor([0.2, 0.2, 0.6, 0.6]),
                          torch.tensor([0, 0, 1, 1])) == 0.0
