"""Fixed-ratio baseline pruners: hand-worked cases (arithmetic in comments) and properties."""

from __future__ import annotations

import math

import pytest
import torch

from glimpseprune.pruners import (
    cdpruner_keep,
    divprune_keep,
    fastv_keep,
    keep_count,
    random_keep,
)


def _unit(degrees: float, scale: float = 1.0) -> list[float]:
    return [scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))]


def test_keep_count_rounding_and_clamps():
    assert keep_count(576, 0.111) == 64  # 63.94 -> 64
    assert keep_count(5, 0.5) == 3  # 2.5 rounds up, not Python's banker's 2
    assert keep_count(10, 0.35) == 4  # 3.4999... in floats still rounds to 4
    assert keep_count(10, 0.01) == 1  # 0.1 -> 0, min_keep 1 wins
    assert keep_count(10, 0.01, min_keep=0) == 0
    assert keep_count(3, 0.5, min_keep=8) == 3  # min_keep clipped to V
    assert keep_count(7, 1.0) == 7
    assert keep_count(0, 0.5) == 0


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5, math.nan])
def test_keep_count_rejects_ratio_outside_unit_interval(ratio):
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        keep_count(10, ratio)


def test_keep_count_rejects_negative_counts():
    with pytest.raises(ValueError, match="num_visual"):
        keep_count(-1, 0.5)
    with pytest.raises(ValueError, match="min_keep"):
        keep_count(10, 0.5, min_keep=-1)


def test_random_keep_is_seeded_and_exact():
    first = random_keep(100, 17, torch.Generator().manual_seed(3))
    again = random_keep(100, 17, torch.Generator().manual_seed(3))
    other = random_keep(100, 17, torch.Generator().manual_seed(4))
    assert first.dtype == torch.bool and first.shape == (100,)
    assert int(first.sum()) == 17 and torch.equal(first, again)
    assert not torch.equal(first, other)
    assert random_keep(5, 5, torch.Generator().manual_seed(0)).all()


# Keys: 0 text, 1 visual A, 2 visual B, 3 text (last prompt token).
# Head 0 logits [10, 5, 0, 0]: softmax sum = e^10 + e^5 + 1 + 1 = 22026.5 + 148.4 + 2 = 22176.9
#   -> A = 148.4 / 22176.9 = 0.0067, B = 1 / 22176.9 = 0.00005 (the text sink takes the rest)
# Head 1 logits [0, 0, 1, 0]: sum = 3 + e = 5.718 -> A = 1 / 5.718 = 0.175, B = e / 5.718 = 0.475
# Mean over heads: A = 0.091, B = 0.238 -> keep B.
# Without softmax (mean raw logits): A = 2.5, B = 0.5 -> A.
# Softmax over visual keys only: head 0 A = 0.993, head 1 A = 1 / (1 + e) = 0.269 -> A = 0.631.
FASTV_LOGITS_HK = torch.tensor([[10.0, 5.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
FASTV_VISUAL_V = torch.tensor([1, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fastv_softmax_over_all_keys_per_head(dtype):
    mask = fastv_keep(FASTV_LOGITS_HK.to(dtype), FASTV_VISUAL_V, k=1)
    assert mask.tolist() == [False, True]
    assert fastv_keep(FASTV_LOGITS_HK.to(dtype), FASTV_VISUAL_V, k=2).all()


def test_fastv_invalid_keys_leave_the_softmax():
    # Key 0 masked: head 0 over [5, 0, 0]: A = 148.4 / 150.4 = 0.987, B = 0.0066;
    # head 1 over [0, 1, 0]: sum = 2 + e = 4.718, A = 0.212, B = 0.576; mean A = 0.599 > B = 0.291
    valid_K = torch.tensor([False, True, True, True])
    assert fastv_keep(FASTV_LOGITS_HK, FASTV_VISUAL_V, 1, valid_K).tolist() == [True, False]
    with pytest.raises(ValueError, match="invalid"):
        fastv_keep(FASTV_LOGITS_HK, FASTV_VISUAL_V, 1, torch.tensor([True, False, True, True]))


def test_fastv_ties_go_to_the_lower_index_and_k_is_checked():
    # Equal logits: every visual key weighs 1/6; the two lowest visual positions are kept.
    mask = fastv_keep(torch.zeros(3, 6), torch.tensor([1, 2, 3, 4]), k=2)
    assert mask.tolist() == [True, True, False, False]
    for k in (0, 5):
        with pytest.raises(ValueError, match="k must be in"):
            fastv_keep(torch.zeros(3, 6), torch.tensor([1, 2, 3, 4]), k=k)


# Directions 0, 30, 90, 180 degrees with different norms (cosine distance ignores norms).
# Angles to the nearest other token: t0 30, t1 30, t2 60, t3 90 -> first t3 (1 - cos 90 = 1).
# Distance to t3: t0 1 - cos 180 = 2, t1 1 + cos 30 = 1.87, t2 1 -> t0.
# Nearest of {t3, t0}: t1 min(1.87, 1 - cos 30 = 0.13) = 0.13, t2 min(1, 1) = 1 -> t2, then t1.
# (Euclidean distance would start at t0 or t1: their nearest neighbour is 1.62 away, t3's 1.12.)
DIVPRUNE_VD = torch.tensor([_unit(0, 2.0), _unit(30, 3.0), _unit(90, 0.5), _unit(180, 1.0)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_divprune_farthest_point_order(dtype):
    expected = {1: [3], 2: [0, 3], 3: [0, 2, 3], 4: [0, 1, 2, 3]}
    for k, kept in expected.items():
        mask = divprune_keep(DIVPRUNE_VD.to(dtype), k)
        assert mask.nonzero().flatten().tolist() == kept


def test_divprune_duplicates_and_single_token():
    duplicates_VD = torch.ones(5, 3)
    mask = divprune_keep(duplicates_VD, 3)
    assert int(mask.sum()) == 3 and torch.equal(mask, divprune_keep(duplicates_VD, 3))
    assert divprune_keep(torch.randn(1, 4), 1).tolist() == [True]


# Relevance beats diversity. Instruction (1, 0); tokens at 0, 20, 90 degrees.
# cos to instruction 1, 0.940, 0 -> min-max r = 1, 0.940, ~1e-6.
# Step 1 gains r^2: 1, 0.883, 1e-12 -> t0.
# Step 2 gain r_i^2 (1 - cos^2 angle to t0): t1 0.883 * sin^2 20 = 0.883 * 0.117 = 0.103,
#   t2 1e-12 * 1 -> t1, though t2 is the diverse one (DivPrune keeps t2 then t0).
RELEVANT_VD = torch.tensor([_unit(0), _unit(20), _unit(90)])
# Diversity skips a near-duplicate. Tokens at 0, 5, 60, 90 degrees: r = 1, 0.996, 0.5, ~0.
# Step 1 -> t0. Step 2: t1 0.992 * sin^2 5 = 0.992 * 0.0076 = 0.0075, t2 0.25 * sin^2 60 = 0.19
#   -> t2, though t1 is more relevant (top relevance would keep t0 and t1).
DUPLICATE_VD = torch.tensor([_unit(0), _unit(5), _unit(60), _unit(90)])
INSTRUCTION_D = torch.tensor([1.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cdpruner_relevance_and_diversity(dtype):
    relevant = cdpruner_keep(RELEVANT_VD.to(dtype), INSTRUCTION_D.to(dtype), 2)
    assert relevant.tolist() == [True, True, False]
    assert divprune_keep(RELEVANT_VD, 2).tolist() == [True, False, True]
    duplicate = cdpruner_keep(DUPLICATE_VD.to(dtype), INSTRUCTION_D.to(dtype), 2)
    assert duplicate.tolist() == [True, False, True, False]


def test_cdpruner_averages_instruction_tokens_and_fills_exactly_k():
    # Two instruction tokens (1, 0) and (1, 0): the mean cosine equals one token's.
    two_MD = torch.stack([INSTRUCTION_D, INSTRUCTION_D])
    assert cdpruner_keep(DUPLICATE_VD, two_MD, 2).tolist() == [True, False, True, False]
    # Past rank 2 in the plane every gain is ~0; the mask still has exactly k entries.
    for k in (3, 4):
        mask = cdpruner_keep(DUPLICATE_VD, INSTRUCTION_D, k)
        assert int(mask.sum()) == k and torch.equal(mask, cdpruner_keep(DUPLICATE_VD,
                                                                        INSTRUCTION_D, k))


def test_cdpruner_constant_relevance_is_pure_diversity():
    # Instruction orthogonal to every token: all cosines 0, so r = eps / eps = 1 and L = S.
    # Step 1: all gains 1 -> t0 (lowest index). Step 2: sin^2 10 = 0.03 vs sin^2 90 = 1 -> t2.
    features_VD = torch.tensor([[1.0, 0.0, 0.0], [*_unit(10), 0.0], [0.0, 1.0, 0.0]])
    mask = cdpruner_keep(features_VD, torch.tensor([0.0, 0.0, 1.0]), 2)
    assert mask.tolist() == [True, False, True]


def test_cdpruner_greedy_matches_brute_force_determinants():
    # Each greedy step must add the token that maximises det(L[S + i]) (Chen et al. 2018).
    gen = torch.Generator().manual_seed(0)
    features_VD, instruction_MD = torch.randn(8, 5, generator=gen), torch.randn(3, 5, generator=gen)
    unit_VD = torch.nn.functional.normalize(features_VD.double(), dim=-1)
    r_V = (unit_VD @ torch.nn.functional.normalize(instruction_MD.double(), dim=-1).T).mean(-1)
    r_V = (r_V - r_V.min() + 1e-6) / (r_V.max() - r_V.min() + 1e-6)
    kernel_VV = r_V[:, None] * (unit_VD @ unit_VD.T) * r_V[None, :]
    kept: list[int] = []
    for k in range(1, 6):
        dets = {i: float(torch.linalg.det(kernel_VV[kept + [i]][:, kept + [i]]))
                for i in range(8) if i not in kept}
        kept.append(max(dets, key=dets.get))
        assert cdpruner_keep(features_VD, instruction_MD, k).nonzero().flatten().tolist() == \
            sorted(kept)


def test_pruners_exact_k_for_every_k_and_deterministic():
    gen = torch.Generator().manual_seed(1)
    features_VD = torch.randn(12, 6, generator=gen).to(torch.bfloat16)
    instruction_D = torch.randn(6, generator=gen)
    logits_HK = torch.randn(4, 20, generator=gen)
    visual_V = torch.arange(3, 15)
    for k in range(1, 13):
        for prune in (lambda k=k: divprune_keep(features_VD, k),
                      lambda k=k: cdpruner_keep(features_VD, instruction_D, k),
                      lambda k=k: fastv_keep(logits_HK, visual_V, k)):
            mask = prune()
            assert mask.dtype == torch.bool and int(mask.sum()) == k
            assert torch.equal(mask, prune())


@pytest.mark.gpu
def test_pruners_on_cuda_match_cpu():
    cuda = torch.device("cuda")
    assert torch.equal(fastv_keep(FASTV_LOGITS_HK.to(cuda), FASTV_VISUAL_V.to(cuda), 1).cpu(),
                       fastv_keep(FASTV_LOGITS_HK, FASTV_VISUAL_V, 1))
    assert divprune_keep(DIVPRUNE_VD.to(cuda), 3).cpu().tolist() == [True, False, True, True]
    mask = cdpruner_keep(DUPLICATE_VD.to(cuda), INSTRUCTION_D.to(cuda), 2)
    assert mask.device.type == "cuda" and mask.cpu().tolist() == [True, False, True, False]
    random_mask = random_keep(50, 9, torch.Generator(cuda).manual_seed(0))
    assert random_mask.device.type == "cuda" and int(random_mask.sum()) == 9
