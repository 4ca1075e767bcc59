"""Training-free fixed-ratio visual-token pruners that GlimpsePrune is compared with.

Owns the pure maths of the baselines a user would pick instead of GlimpsePrune: the token
count for a keep_ratio, random keep, FastV (attention of the last prompt token), DivPrune
(max-min diversity) and CDPruner (instruction-conditioned DPP). Each pruner returns a bool
keep_mask_V with exactly k True entries, computes in float32 whatever the input dtype, runs on
the input's device and is deterministic (ties go to the lower token index).

Must not load models, run the decoder or pull embeddings (pipeline/evaluate.py does that and
hands the tensors in), and must not import Ray or vLLM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Relevance floor of CDPruner's min-max normalisation (the reference adds 1e-6 too), so the
# least relevant token still has a non-zero kernel diagonal.
_RELEVANCE_EPS = 1e-6
# A DPP marginal gain at or below this means the kernel has no volume left to add (the
# candidate is a linear combination of the kept tokens); its Cholesky row is not computed.
_GAIN_EPS = 1e-10


def keep_count(num_visual: int, keep_ratio: float, min_keep: int = 1) -> int:
    """How many of `num_visual` visual tokens a fixed-ratio pruner keeps.

    round(V * keep_ratio) with halves rounding up (0.5 of 5 keeps 3, not Python's banker's 2),
    then clamped to [min_keep, V]; V = 0 keeps 0.

    Args:
        num_visual: V, the sample's visual token count (all its images).
        keep_ratio: fraction to keep, in (0, 1].
        min_keep: floor on the count (clipped to V).

    Returns:
        k, the number of tokens to keep.

    Raises:
        ValueError: keep_ratio outside (0, 1] (or NaN), negative num_visual or min_keep.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if num_visual < 0:
        raise ValueError(f"num_visual must be >= 0, got {num_visual}")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    # The epsilon stops 0.35 * 10 = 3.4999... from rounding down to 3.
    count = math.floor(num_visual * keep_ratio + 0.5 + 1e-9)
    return min(max(count, min_keep), num_visual)


def _check_k(k: int, num_visual: int) -> None:
    if not 1 <= k <= num_visual:
        raise ValueError(f"k must be in [1, {num_visual}] (the visual token count), got {k}")


def _mask_from_index(index: torch.Tensor, num_visual: int) -> torch.Tensor:
    keep_mask_V = torch.zeros(num_visual, dtype=torch.bool, device=index.device)
    keep_mask_V[index] = True
    return keep_mask_V


def random_keep(num_visual: int, k: int, generator: torch.Generator,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Keeps k visual tokens drawn uniformly without replacement.

    Args:
        num_visual: V.
        k: tokens to keep, in [1, V].
        generator: seeded torch.Generator; the same seed gives the same mask.
        device: where the mask lives (default: the generator's device).

    Returns:
        bool [V] keep_mask_V with exactly k True entries.
    """
    _check_k(k, num_visual)
    order_V = torch.randperm(num_visual, generator=generator, device=generator.device)
    return _mask_from_index(order_V[:k], num_visual).to(device or generator.device)


def _top_k_mask(scores_V: torch.Tensor, k: int) -> torch.Tensor:
    # A stable descending sort puts the lower index first among equal scores.
    order_V = torch.sort(scores_V, descending=True, stable=True).indices
    return _mask_from_index(order_V[:k], scores_V.numel())


def fastv_keep(attention_logits_HK: torch.Tensor, visual_index_V: torch.Tensor, k: int,
               valid_K: torch.Tensor | None = None) -> torch.Tensor:
    """FastV: keeps the k visual tokens the last prompt token attends to most.

    FastV ranks visual tokens by the attention weight the last prompt token gives them at an
    early decoder layer (FastV prunes after layer 2): softmax over every key the query sees
    (text keys included, so a head busy with text weighs its visual keys less), then the mean
    over heads, then the visual keys' weights.

    Args:
        attention_logits_HK: [H, K] raw pre-softmax logits of the last prompt token's query
            over all K key positions, per head.
        visual_index_V: [V] long positions of the visual tokens among the K keys.
        k: tokens to keep, in [1, V].
        valid_K: optional bool [K]; False keys (padding, masked) take no part in the softmax.

    Returns:
        bool [V] keep_mask_V with exactly k True entries.

    Raises:
        ValueError: k outside [1, V], or a visual position that valid_K marks invalid.
    """
    num_visual = visual_index_V.numel()
    _check_k(k, num_visual)
    logits_HK = attention_logits_HK.float()
    if valid_K is not None:
        if not bool(valid_K[visual_index_V].all()):
            raise ValueError("valid_K marks some visual_index_V positions as invalid keys")
        logits_HK = logits_HK.masked_fill(~valid_K, -math.inf)
    weights_K = torch.softmax(logits_HK, dim=-1).mean(dim=0)
    return _top_k_mask(weights_K[visual_index_V], k)


def _unit_rows(features_VD: torch.Tensor) -> torch.Tensor:
    # float32 whatever came in; a zero row stays zero (similarity 0 to everything).
    return F.normalize(features_VD.float(), dim=-1)


def divprune_keep(features_VD: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune: keeps k visual tokens that solve max-min diversity greedily.

    Distance is cosine distance, 1 - cos(x_i, x_j), of the visual embeddings. As in the
    DivPrune reference code, the first token is the one whose distance to its nearest other
    token is largest (the most isolated one); each next token is the one whose distance to its
    nearest kept token is largest (farthest-point order). Kept tokens are excluded explicitly,
    so exact duplicates still give k distinct tokens. Memory is one [V, V] float32 matrix.

    Args:
        features_VD: [V, D] visual token embeddings (any float dtype, any device).
        k: tokens to keep, in [1, V].

    Returns:
        bool [V] keep_mask_V with exactly k True entries.
    """
    num_visual = features_VD.shape[0]
    _check_k(k, num_visual)
    unit_VD = _unit_rows(features_VD)
    distance_VV = 1.0 - unit_VD @ unit_VD.T
    if num_visual == 1:
        return torch.ones(1, dtype=torch.bool, device=features_VD.device)
    self_VV = torch.eye(num_visual, dtype=torch.bool, device=features_VD.device)
    first = int(torch.argmax(distance_VV.masked_fill(self_VV, math.inf).min(dim=1).values))
    keep_mask_V = torch.zeros(num_visual, dtype=torch.bool, device=features_VD.device)
    keep_mask_V[first] = True
    # nearest_V[i]: distance from token i to its nearest kept token, updated per addition.
    nearest_V = distance_VV[first].clone()
    for _ in range(k - 1):
        best = int(torch.argmax(nearest_V.masked_fill(keep_mask_V, -math.inf)))
        keep_mask_V[best] = True
        nearest_V = torch.minimum(nearest_V, distance_VV[best])
    return keep_mask_V


def cdpruner_keep(features_VD: torch.Tensor, instruction_MD: torch.Tensor,
                  k: int) -> torch.Tensor:
    """CDPruner: keeps the MAP subset of a DPP conditioned on the instruction.

    Normalisations (as the CDPruner paper and reference code do, unless noted):
      - similarity S_ij = cos(x_i, x_j) of the visual embeddings, with S_ii set to exactly 1;
      - relevance r_i = mean over the M instruction embeddings t_m of cos(x_i, t_m), then
        min-max normalised over the V tokens: r = (r - min + eps) / (max - min + eps), eps=1e-6,
        so r lies in (0, 1] and the least relevant token keeps a tiny non-zero weight. The
        reference divides by (max - min) alone; the extra eps only rescales r by a constant,
        which scales every DPP gain by the same factor and so keeps the same tokens, while a
        constant relevance (e.g. an instruction orthogonal to every token) gives r = 1 (pure
        diversity) instead of a division by zero. No sign flip: the reference negates r only
        for CLIP (LLaVA), where its authors saw the sign inverted; no theta re-weighting
        (commented out in the reference);
      - kernel L = diag(r) S diag(r), so L_ij = r_i r_j cos(x_i, x_j).
    The MAP subset is found by the greedy Cholesky-update algorithm of Chen et al. (2018):
    gain d_i^2 starts at L_ii = r_i^2; each step keeps argmax d^2, then for every candidate
    e_i = (L_ji - <c_j, c_i>) / d_j, c_i gets e_i appended and d_i^2 -= e_i^2. Once the best
    gain is <= 1e-10 (no volume left) the other tokens are kept in gain order without updates,
    so the mask always has exactly k entries.

    Args:
        features_VD: [V, D] visual token embeddings.
        instruction_MD: [M, D] embeddings of the instruction's tokens in the same space, or
            [D] for one pooled instruction embedding.
        k: tokens to keep, in [1, V].

    Returns:
        bool [V] keep_mask_V with exactly k True entries.
    """
    num_visual = features_VD.shape[0]
    _check_k(k, num_visual)
    unit_VD = _unit_rows(features_VD)
    instruction_MD = instruction_MD.reshape(-1, instruction_MD.shape[-1])
    relevance_V = (unit_VD @ _unit_rows(instruction_MD).T).mean(dim=-1)
    low, high = relevance_V.min(), relevance_V.max()
    relevance_V = (relevance_V - low + _RELEVANCE_EPS) / (high - low + _RELEVANCE_EPS)
    similarity_VV = unit_VD @ unit_VD.T
    # cos(x, x) = 1 exactly: float noise in |u|^2 must not break ties between equal gains.
    similarity_VV.fill_diagonal_(1.0)
    kernel_VV = relevance_V[:, None] * similarity_VV * relevance_V[None, :]

    gain_V = torch.diagonal(kernel_VV).clone()  # d_i^2
    cholesky_kV = torch.zeros(k, num_visual, device=unit_VD.device)  # c_i stacked by step
    keep_mask_V = torch.zeros(num_visual, dtype=torch.bool, device=unit_VD.device)
    for step in range(k):
        best = int(torch.argmax(gain_V.masked_fill(keep_mask_V, -math.inf)))
        best_gain = float(gain_V[best])
        keep_mask_V[best] = True
        if best_gain <= _GAIN_EPS:
            continue
        # e_i = (L_best,i - <c_best, c_i>) / d_best   [V]
        inner_V = cholesky_kV[:step, best] @ cholesky_kV[:step]
        update_V = (kernel_VV[best] - inner_V) / math.sqrt(best_gain)
        cholesky_kV[step] = update_V
        gain_V = gain_V - update_V.square()
    return keep_mask_V
