"""The rollout benchmark's time model: the bytes each part moves, the machine's measured rates,
and the seconds a roofline predicts from them.

Owns the memory half of the cost model that `pipeline/bench_cost.py` counts the FLOPs of:
per part of a cell (ViT, pre-pass decoder layers, VIP, vLLM's prefill, the decode) the bytes it
must read, and, from a `Machine` (FLOP/s and bytes/s measured on this machine by `calibrate`),
its predicted seconds: the larger of compute time and memory time (a roofline per part), summed
over the parts. Why a FLOP count alone mispredicts a rollout: a decode step reads every weight
once for the whole batch and every sample's whole KV cache, so its time grows with the context
length (which pruning shortens) far more than its FLOPs do. Calibration imports torch; the byte
counts do not.

Bytes counted (dtype_bytes per value): the decode reads, per step, the decoder's and the LM
head's weights once (every running sample is in one batch) and each sample's KV cache at its
current context (vLLM's paged attention reads a shared prefix once per sample, not once per
group); a prefill reads the decoder's weights once per distinct prompt (an upper bound: vLLM
may batch several prefills into one step); the pre-pass reads the vision tower's, layers
0..K-1's and layer K's key projection's weights once per prompt; the VIP's weights are left
out (small). Activations are left out: they stay in cache at these sizes or are dominated by
the FLOPs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.bench_cost import (
    ModelDims,
    linear_flops_per_token,
    masks_per_prompt,
    pruned_flops,
    stock_flops,
)


@dataclass(frozen=True)
class Machine:
    """What this machine sustains: dense matrix-multiply FLOP/s at the model's MLP shape and
    memory read bandwidth in bytes/s."""

    flops_per_s: float
    bytes_per_s: float


def decoder_weight_bytes(d: ModelDims, dtype_bytes: int, layers: int | None = None) -> int:
    """The projection and MLP weights of `layers` decoder layers (default all)."""
    layers = d.layers if layers is None else layers
    return layers * linear_flops_per_token(d) // 2 * dtype_bytes


def vision_weight_bytes(d: ModelDims, dtype_bytes: int) -> int:
    """The vision tower's weights: patch embedding, every block's qkv / proj / MLP, merger."""
    dv, merged_in = d.vision_hidden, d.merge * d.merge * d.vision_hidden
    blocks = d.vision_depth * (4 * dv * dv + 3 * dv * d.vision_intermediate)
    merger = merged_in * merged_in + merged_in * d.hidden
    return (d.patch_values * dv + blocks + merger) * dtype_bytes


def kv_bytes_per_token(d: ModelDims, dtype_bytes: int) -> int:
    """KV-cache bytes of one token over every layer (keys and values, grouped-query heads)."""
    return d.layers * 2 * d.kv_heads * d.head_dim * dtype_bytes


def generation_bytes(d: ModelDims, prompt_len: int, rows: int, distinct: int, new_tokens: int,
                     dtype_bytes: int) -> dict[str, int]:
    """vLLM's reads for `rows` samples of `new_tokens` on prompts of `prompt_len` tokens,
    `distinct` of which differ: a weight read per distinct prefill, then T - 1 decode steps of
    one weight read (decoder + LM head) and every sample's KV cache at context
    prompt_len + t for step t (the keys `bench_cost.generation_flops` counts)."""
    weights = decoder_weight_bytes(d, dtype_bytes)
    head = d.hidden * d.vocab * dtype_bytes
    steps = new_tokens - 1
    context_sum = steps * prompt_len + steps * (steps + 1) // 2  # sum over t of prompt_len + t
    decode = steps * (weights + head) + rows * context_sum * kv_bytes_per_token(d, dtype_bytes)
    return {"prefill": distinct * weights, "decode": decode}


def pruned_bytes(d: ModelDims, text: int, visual: int, kept: int, prompts: int, group: int,
                 new_tokens: int, mask_mode: str, dtype_bytes: int) -> dict[str, int]:
    """Bytes of the pruned side of one cell (the parts of `bench_cost.pruned_flops`)."""
    distinct = prompts * masks_per_prompt(mask_mode, group)
    return {"vit": prompts * vision_weight_bytes(d, dtype_bytes),
            "prepass_decoder": prompts * (decoder_weight_bytes(d, dtype_bytes, d.prune_layer)
                                          + d.hidden * d.kv_heads * d.head_dim * dtype_bytes),
            "vip": 0,
            **generation_bytes(d, text + kept, prompts * group, distinct, new_tokens,
                               dtype_bytes)}


def stock_bytes(d: ModelDims, text: int, visual: int, prompts: int, group: int,
                new_tokens: int, dtype_bytes: int) -> dict[str, int]:
    """Bytes of stock vLLM on the full image (the parts of `bench_cost.stock_flops`)."""
    return {"vit": prompts * vision_weight_bytes(d, dtype_bytes),
            **generation_bytes(d, text + visual, prompts * group, prompts, new_tokens,
                               dtype_bytes)}


def roofline_seconds(flops: dict[str, int], reads: dict[str, int],
                     machine: Machine) -> dict[str, float]:
    """Per part, max(FLOPs / FLOP/s, bytes / bytes/s), and their sum as "total"."""
    parts = {part: max(flops[part] / machine.flops_per_s, reads.get(part, 0) / machine.bytes_per_s)
             for part in flops if part != "total"}
    parts["total"] = sum(parts.values())
    return parts


def predicted_time_ratios(d: ModelDims, machine: Machine, dtype_bytes: int, text: int,
                          visual: int, kept: int, prompts: int, group: int, new_tokens: int,
                          mask_mode: str) -> dict[str, float]:
    """The roofline's predictions for the measured pruned / stock ratios of one cell:
    tokens_per_s (stock seconds / pruned seconds: equal tokens) and prefill_s (one token per
    prompt, pre-pass included), plus both sides' predicted seconds."""
    def side_seconds(g: int, t: int, mode: str) -> tuple[float, float]:
        pruned = roofline_seconds(
            pruned_flops(d, text, visual, kept, prompts, g, t, mode),
            pruned_bytes(d, text, visual, kept, prompts, g, t, mode, dtype_bytes), machine)
        stock = roofline_seconds(
            stock_flops(d, text, visual, prompts, g, t),
            stock_bytes(d, text, visual, prompts, g, t, dtype_bytes), machine)
        return pruned["total"], stock["total"]

    pruned_s, stock_s = side_seconds(group, new_tokens, mask_mode)
    first_pruned_s, first_stock_s = side_seconds(1, 1, "shared")
    return {"tokens_per_s": stock_s / pruned_s, "prefill_s": first_pruned_s / first_stock_s,
            "pruned_s": pruned_s, "stock_s": stock_s}


def calibrate(d: ModelDims, dtype: str = "float32", repeats: int = 3) -> Machine:
    """Measures this machine, best of `repeats`: FLOP/s of a [512, hidden] x [hidden,
    intermediate] matrix multiply (the model's own MLP shape, in its dtype, torch's threads) and
    read bandwidth summing a 256 MiB tensor (larger than any cache)."""
    import torch

    kind = getattr(torch, dtype)
    a = torch.randn(512, d.hidden, dtype=kind)
    b = torch.randn(d.hidden, d.intermediate, dtype=kind)
    big = torch.ones(2**28 // kind.itemsize, dtype=kind)
    a @ b, big.sum()  # warm-up: thread pools, page faults
    best_mm = best_read = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best_mm = min(best_mm, (time.perf_counter() - start) / 4)
        start = time.perf_counter()
        big.sum()
        best_read = min(best_read, time.perf_counter() - start)
    return Machine(flops_per_s=2 * 512 * d.hidden * d.intermediate / best_mm,
                   bytes_per_s=big.numel() * big.element_size() / best_read)
