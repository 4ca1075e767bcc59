"""The benchmark's time model: bytes per part on small hand-checked sizes, the roofline's per-part
maximum, and the machine calibration (the byte counts against a real Qwen2.5-VL's weights are
in test_bench_cost.py, beside the FLOP counts)."""

from __future__ import annotations

import math

import pytest

from pipeline import bench_cost as cost
from pipeline import bench_time as btime

# The sizes of tests/pipeline/test_bench_cost.py: hidden 4, MLP 8, 2 layers, 2 heads of dim 2,
# 1 KV head, vocabulary 10; ViT of 2 blocks, hidden 2, MLP 4, 24 values per patch, merge 2; K = 0.
D = cost.ModelDims(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2,
                   vocab=10, vision_depth=2, vision_hidden=2, vision_intermediate=4,
                   fullatt_blocks=(1,), window_patches=4, patch_values=24, merge=2,
                   prune_layer=0, vip_hidden=2, vip_layers=1)


def test_weight_and_kv_bytes():
    # per layer 144 weights (q, o 16 each, k, v 8 each, MLP 96), fp32: 2 layers x 576 B.
    assert btime.decoder_weight_bytes(D, 4) == 1152
    assert btime.decoder_weight_bytes(D, 2, layers=1) == 288
    # ViT: embedding 24 x 2, blocks 2 x (4 x 4 + 3 x 2 x 4) = 80, merger 8 x 8 + 8 x 4 = 96.
    assert btime.vision_weight_bytes(D, 4) == (48 + 80 + 96) * 4
    # 2 layers x (K and V) x 1 head x dim 2 x 4 B.
    assert btime.kv_bytes_per_token(D, 4) == 32


def test_generation_bytes_grow_with_context():
    # prompt 3, 2 rows, 1 distinct, 3 tokens: 1 weight read for the prefill; 2 decode steps
    # each reading decoder + head (1152 + 160) and every row's KV at context 4 then 5.
    reads = btime.generation_bytes(D, 3, 2, 1, 3, 4)
    assert reads == {"prefill": 1152, "decode": 2 * (1152 + 160) + 2 * (4 + 5) * 32}
    # Pruning shortens the context: fewer KV bytes per step, the same weight reads.
    short = btime.generation_bytes(D, 1, 2, 1, 3, 4)
    assert reads["decode"] - short["decode"] == 2 * 2 * 2 * 32


def test_roofline_takes_the_slower_of_compute_and_memory_per_part():
    machine = btime.Machine(flops_per_s=100.0, bytes_per_s=10.0)
    seconds = btime.roofline_seconds({"vit": 1000, "decode": 100, "total": 1100},
                                     {"vit": 10, "decode": 100}, machine)
    assert seconds == {"vit": 10.0, "decode": 10.0, "total": 20.0}


def test_predicted_time_ratios_on_a_memory_bound_machine():
    d = cost.dims_from_config({"hidden_size": 3584, "intermediate_size": 18944,
                               "num_hidden_layers": 28, "num_attention_heads": 28,
                               "num_key_value_heads": 4, "vocab_size": 152064,
                               "vision_config": {"depth": 32, "hidden_size": 1280,
                                                 "intermediate_size": 3420,
                                                 "fullatt_block_indexes": [7, 15, 23, 31]}},
                              prune_layer=18, vip_hidden=256)
    args = (30, 1024, 102, 16, 8, 128, "shared")
    compute_bound = btime.Machine(flops_per_s=1e12, bytes_per_s=1e15)
    memory_bound = btime.Machine(flops_per_s=1e15, bytes_per_s=1e12)
    # With memory free the roofline is the FLOP model.
    assert btime.predicted_time_ratios(d, compute_bound, 2, *args)["tokens_per_s"] == \
        pytest.approx(cost.predicted_ratios(d, *args)["tokens_per_s"], rel=1e-3)
    # Bandwidth-bound decode: 128 rows' KV over ~1,054 vs ~132 tokens of context, the same
    # weight reads; pruning wins more than its FLOPs say.
    bound = btime.predicted_time_ratios(d, memory_bound, 2, *args)
    assert bound["tokens_per_s"] > cost.predicted_ratios(d, *args)["tokens_per_s"]
    assert bound["stock_s"] / bound["pruned_s"] == pytest.approx(bound["tokens_per_s"])


def test_calibrate_measures_positive_rates():
    d = cost.ModelDims(hidden=256, intermediate=1024, layers=2, heads=4, kv_heads=1,
                       head_dim=64, vocab=640, vision_depth=1, vision_hidden=64,
                       vision_intermediate=128, fullatt_blocks=(), window_patches=64,
                       patch_values=1176, merge=2, prune_layer=0, vip_hidden=64, vip_layers=1)
    machine = btime.calibrate(d, "float32", repeats=1)
    # Any machine this runs on does between 100 MFLOP/s and 100 PFLOP/s and reads between
    # 100 MB/s and 100 TB/s; a wrong unit (seconds for rates, bits for bytes) falls outside.
    assert 1e8 < machine.flops_per_s < 1e17 and math.isfinite(machine.flops_per_s)
    assert 1e8 < machine.bytes_per_s < 1e14
