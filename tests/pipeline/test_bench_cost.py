"""The benchmark's FLOP model: hand-derived values on small sizes, and the formulas against a
real (tiny, random) Qwen2.5-VL's weight shapes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline import bench_cost as cost

# hidden 4, MLP 8, 2 layers, 2 heads of dim 2, 1 KV head, vocabulary 10; a ViT of 2 blocks
# (block 1 full attention, block 0 windows of 4 patches), hidden 2, MLP 4, 24 values per patch,
# merge 2; K = 0; a VIP of 1 layer, hidden 2.
D = cost.ModelDims(hidden=4, intermediate=8, layers=2, heads=2, kv_heads=1, head_dim=2,
                   vocab=10, vision_depth=2, vision_hidden=2, vision_intermediate=4,
                   fullatt_blocks=(1,), window_patches=4, patch_values=24, merge=2,
                   prune_layer=0, vip_hidden=2, vip_layers=1)


def test_decoder_pieces():
    # q, o: 4 x (2 x 2) each = 32; k, v: 4 x (1 x 2) each = 16; MLP 3 x 4 x 8 = 96;
    # (32 + 16 + 96) x 2 FLOPs = 288 per token and layer.
    assert cost.linear_flops_per_token(D) == 288
    # 3 new tokens, nothing cached: 1 + 2 + 3 = 6 query-key pairs x 4 x 2 heads x 2 = 96.
    assert cost.attention_flops(D, 3, 0) == 96
    # 2 new after 5 cached: 5 x 2 + 3 = 13 pairs -> 13 x 16 = 208.
    assert cost.attention_flops(D, 2, 5) == 208
    # 2 layers x (3 x 288 + 96) = 1920; one token after 2 cached: 2 x (288 + 3 x 16) = 672.
    assert cost.decoder_flops(D, 3) == 1920
    assert cost.decoder_flops(D, 1, 2) == 672
    assert cost.decoder_flops(D, 3, layers=1) == 960
    assert cost.lm_head_flops(D, 4) == 2 * 4 * 10 * 4


def test_vision_tower_and_vip():
    # 8 patches: embedding 2 x 8 x 24 x 2 = 768; per block linear 2 x 8 x (4 x 2^2 + 3 x 2 x 4)
    # = 640; block 0 windowed attention 4 x 8 x 4 x 2 = 256, block 1 full 4 x 8^2 x 2 = 512;
    # merger: 2 merged tokens x 2 x (8 x 8 + 8 x 4) = 384. 768 + 640 + 256 + 640 + 512 + 384.
    assert cost.vit_flops(D, 8) == 3200
    # 2 visual tokens, 5 prompt tokens: glimpse logits 2 x 2 x 2 x 5 = 40; in_proj 2 x 2 x 2 x 2
    # = 16; the layer: 2 x 2 x (2 x 2 + 4 x 2^2 + 2 x 2^2 + 3 x 2 x 8) = 304 + attention
    # 4 x 2^2 x 2 = 32; out_proj 2 x 2 x 2 = 8. 40 + 16 + 336 + 8.
    assert cost.vip_flops(D, 2, 5) == 400


def test_generation_shared_and_distinct_prefixes():
    # Prompt 3, 2 samples, 1 distinct prompt, 2 tokens each: one prefill 1920 + one last-token
    # recompute 672; decode 1 step per sample at 3 cached: 2 x (288 + 4 x 16) = 704, x 2 rows;
    # LM head 2 x 4 x 10 x (2 x 2 tokens) = 320.
    assert cost.generation_flops(D, 3, 2, 1, 2) == {"prefill": 2592, "decode": 1408 + 320}
    # Two distinct prompts: two full prefills.
    assert cost.generation_flops(D, 3, 2, 2, 2) == {"prefill": 3840, "decode": 1728}


def test_both_sides_and_the_predicted_ratios():
    # 2 text + 2 visual tokens (8 patches), 1 kept, 1 prompt x 2 samples x 2 tokens.
    pruned = cost.pruned_flops(D, 2, 2, 1, 1, 2, 2, "shared")
    # ViT 3200; K = 0: no whole layer, layer 0's keys over 2 + 2 + 1 (glimpse) tokens:
    # 2 x 5 x 4 x (1 x 2) = 80; VIP 400; vLLM on 2 + 1 tokens: 2592 + 1728 (above).
    assert pruned == {"vit": 3200, "prepass_decoder": 80, "vip": 400, "prefill": 2592,
                      "decode": 1728, "total": 8000}
    # K = 1: layer 0 whole (5 x 288 + 15 x 16 = 1680) + layer 1's keys (80).
    assert cost.prepass_decoder_flops(replace(D, prune_layer=1), 5) == 1760
    sampled = cost.pruned_flops(D, 2, 2, 1, 1, 2, 2, "sampled")
    assert sampled["prefill"] == 3840 and sampled["total"] == 8000 - 2592 + 3840
    stock = cost.stock_flops(D, 2, 2, 1, 2, 2)
    # ViT 3200; prefill of 4: 2 x (4 x 288 + 10 x 16) = 2624, + recompute 2 x (288 + 4 x 16)
    # = 704; decode at 4 cached: 2 rows x 2 x (288 + 5 x 16) = 1472, + LM head 320.
    assert stock == {"vit": 3200, "prefill": 3328, "decode": 1792, "total": 8320}
    ratios = cost.predicted_ratios(D, 2, 2, 1, 1, 2, 2, "shared")
    # Prefill (1 sample, 1 token): pruned 3200 + 80 + 400 + 1920 + 80 = 5680; stock
    # 3200 + 2624 + 80 = 5904.
    assert ratios == pytest.approx({"tokens_per_s": 8320 / 8000, "prefill_s": 5680 / 5904,
                                    "kv_tokens": 3 / 4})
    with pytest.raises(ValueError, match="mask_mode"):
        cost.pruned_flops(D, 2, 2, 1, 1, 2, 2, "full")
    # M masks per prompt: M prefills; M = G is "sampled", M = 1 "shared"
    assert cost.pruned_flops(D, 2, 2, 1, 1, 2, 2, "sampled:2") == sampled
    assert cost.pruned_flops(D, 2, 2, 1, 1, 2, 2, "sampled:1") == \
        cost.pruned_flops(D, 2, 2, 1, 1, 2, 2, "shared")
    # Its prefill row (one sample per prompt) takes one mask per prompt: no G / M to divide.
    assert cost.predicted_ratios(D, 2, 2, 1, 1, 2, 2, "sampled:2")["prefill_s"] == \
        ratios["prefill_s"]


QWEN_7B = {  # the released Qwen2.5-VL-7B-Instruct config.json (text sizes at the top level)
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
                      "fullatt_block_indexes": [7, 15, 23, 31], "in_chans": 3, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112}}


def test_dims_from_a_released_config_and_what_they_predict():
    d = cost.dims_from_config(QWEN_7B, prune_layer=18, vip_hidden=256)
    assert (d.head_dim, d.kv_heads, d.window_patches, d.patch_values, d.vip_layers) == \
        (128, 4, 64, 3 * 2 * 14 * 14, 4)
    # 1,024 visual tokens, 16 prompts x 8 samples x 128 tokens, K = 18 of 28. On FLOPs,
    # keeping 10% on shared masks wins (~1.10x: the saving is in the prefill, which the
    # pre-pass's layers 0..18 over every token eat into; the decode's linear layers cost the
    # same on both sides); sampled masks lose (8 prefills per prompt, ~0.80x), and keeping
    # every token loses too (the pre-pass is pure extra work, ~0.78x).
    keep10 = cost.predicted_ratios(d, 30, 1024, 102, 16, 8, 128, "shared")["tokens_per_s"]
    keep10_sampled = cost.predicted_ratios(d, 30, 1024, 102, 16, 8, 128,
                                           "sampled")["tokens_per_s"]
    keep_all = cost.predicted_ratios(d, 30, 1024, 1024, 16, 8, 128, "shared")["tokens_per_s"]
    assert keep10 > 1.0 > keep10_sampled and keep_all < 1.0


def test_formulas_match_a_real_qwen2_5_vl():
    """Per token, the linear FLOPs are 2 x the weights a token passes through; the time model's
    weight and KV bytes are those weights' and the k / v projections' sizes."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from glimpseprune.tiny import build_model_config, build_tokenizer
    from pipeline import bench_time
    from pipeline.config import TinyModelConfig

    config = build_model_config(TinyModelConfig(), build_tokenizer())
    model = Qwen2_5_VLForConditionalGeneration(config)
    d = cost.dims_from_config(config.to_dict(), prune_layer=2, vip_hidden=256)

    def weights(module) -> int:
        return sum(p.numel() for n, p in module.named_parameters() if n.endswith("weight")
                   and p.dim() >= 2)

    assert cost.linear_flops_per_token(d) == 2 * weights(model.model.language_model.layers[0])
    assert cost.lm_head_flops(d, 1) == 2 * model.lm_head.weight.numel()
    visual, patches = model.model.visual, 64  # a 4-window image at window_patches = 64
    assert d.window_patches == 64 and d.merge == 2
    attention = 4 * patches * patches * d.vision_hidden * d.vision_depth  # all windows = image
    assert cost.vit_flops(d, patches) == attention + 2 * patches * (
        weights(visual.patch_embed) + weights(visual.blocks[0]) * d.vision_depth
        + weights(visual.merger) // 4)
    assert bench_time.decoder_weight_bytes(d, 4) == 4 * weights(model.model.language_model.layers)
    vision = weights(visual.patch_embed) + weights(visual.blocks) + weights(visual.merger)
    assert bench_time.vision_weight_bytes(d, 4) == 4 * vision
    attention = model.model.language_model.layers[0].self_attn
    per_layer = attention.k_proj.out_features + attention.v_proj.out_features
    assert bench_time.kv_bytes_per_token(d, 4) == 4 * per_layer * d.layers
