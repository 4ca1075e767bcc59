"""The rollout benchmark's analytic cost model: FLOPs of a pruned and a stock rollout.

Owns pure functions that count the multiply-adds (2 FLOPs each) of one benchmark cell on both
sides, from a model's config (any Qwen2.5-VL-shaped model: text hidden / intermediate / layers /
heads / KV heads / vocabulary, vision depth / hidden / intermediate / patch / merge / window),
and the pruned / stock ratios they predict. Must not time, load weights or import torch / vLLM.

The pruned formula is for OUR vLLM form (shared docs method.md, design.md "Measuring against
what users would pick"):
- the glimpse pre-pass, once per prompt, in transformers: the vision tower over every patch,
  decoder layers 0..K-1 over every token (text + all visual + the glimpse token) and of layer
  K only the keys (all the glimpse query's logits read: `GlimpsePruneModel._vip_pass`), the VIP
  over
  the visual tokens (approximate: its linear layers and attention, norms left out);
- then vLLM over text + KEPT visual tokens only, every layer: one prefill per DISTINCT mask
  (mask_mode shared: one per prompt, the other G - 1 samples share its prefill; sampled: one
  per sample, nothing shared; sampled:M: M per prompt, each shared by G / M samples), then the
  decode.
The stock side is stock vLLM on the full image: its own vision tower once per prompt (the
encoder cache shares it across the group), one prefill of text + all visual tokens per prompt
(prefix-shared across the group as above), then the decode at the longer context.

Counted per token and layer: q / k / v / o projections (grouped-query k / v), the SwiGLU MLP,
and attention's two matrix products (4 * heads * head_dim FLOPs per query-key pair, causal);
the LM head once per generated token. Left out: norms, rotary, biases, embeddings, the
sampler, partial-block recompute under the prefix cache, and everything that is not a FLOP
(memory traffic, launch and scheduling overheads, which dominate a tiny model on a CPU).
Both sides generate the same tokens (ignore_eos), so the predicted throughput ratio is
stock FLOPs / pruned FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelDims:
    """The sizes the cost model needs (names as in a Qwen2.5-VL config.json)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    fullatt_blocks: tuple[int, ...]
    window_patches: int  # patches in one windowed-attention window, (window_size / patch)^2
    patch_values: int  # pixels x channels x frames that one patch embeds
    merge: int  # spatial_merge_size: patches per visual token = merge^2
    prune_layer: int  # K: the pre-pass runs decoder layers 0..K-1 and layer K's keys
    vip_hidden: int
    vip_layers: int


def dims_from_config(config: dict, prune_layer: int, vip_hidden: int,
                     vip_layers: int | None = None) -> ModelDims:
    """ModelDims from a checkpoint's config.json (as a dict) and the glimpse settings.

    Args:
        config: the parsed config.json; the text sizes may sit in "text_config" (transformers
            5) or at the top level (the released Qwen2.5-VL checkpoints).
        prune_layer: K (GlimpseConfig.prune_layer, resolved).
        vip_hidden: GlimpseConfig.vip_hidden_size.
        vip_layers: VIP layers (one per ViT block it reads); None: the full-attention blocks.
    """
    text, vision = config.get("text_config") or config, config["vision_config"]
    heads = text["num_attention_heads"]
    patch = vision.get("patch_size", 14)
    fullatt = tuple(vision.get("fullatt_block_indexes", ()))
    return ModelDims(
        hidden=text["hidden_size"], intermediate=text["intermediate_size"],
        layers=text["num_hidden_layers"], heads=heads,
        kv_heads=text.get("num_key_value_heads") or heads,
        head_dim=text.get("head_dim") or text["hidden_size"] // heads,
        vocab=text.get("vocab_size") or config["vocab_size"],
        vision_depth=vision["depth"], vision_hidden=vision["hidden_size"],
        vision_intermediate=vision["intermediate_size"], fullatt_blocks=fullatt,
        window_patches=(vision.get("window_size", 112) // patch) ** 2,
        patch_values=vision.get("in_channels", vision.get("in_chans", 3))
        * vision.get("temporal_patch_size", 2) * patch * patch,
        merge=vision.get("spatial_merge_size", 2), prune_layer=prune_layer,
        vip_hidden=vip_hidden, vip_layers=len(fullatt) if vip_layers is None else vip_layers)


def linear_flops_per_token(d: ModelDims) -> int:
    """One decoder layer's projections for one token: q, k, v, o and the SwiGLU MLP."""
    q_o = 2 * d.hidden * d.heads * d.head_dim
    k_v = 2 * d.hidden * d.kv_heads * d.head_dim
    return 2 * (q_o + k_v + 3 * d.hidden * d.intermediate)


def attention_flops(d: ModelDims, new: int, past: int) -> int:
    """One layer's causal attention for `new` tokens after `past` cached ones: token i (1-based)
    attends to past + i keys, so past * new + new (new + 1) / 2 query-key pairs."""
    pairs = past * new + new * (new + 1) // 2
    return 4 * d.heads * d.head_dim * pairs


def decoder_flops(d: ModelDims, new: int, past: int = 0, layers: int | None = None) -> int:
    """`layers` decoder layers (default all) over `new` tokens after `past` cached ones."""
    layers = d.layers if layers is None else layers
    return layers * (new * linear_flops_per_token(d) + attention_flops(d, new, past))


def prepass_decoder_flops(d: ModelDims, tokens: int) -> int:
    """The pre-pass's decoder share over `tokens` (prompt + glimpse token): layers 0..K-1
    whole, and layer K's key projection (the glimpse query's own q and logits are in
    `vip_flops`)."""
    return decoder_flops(d, tokens, layers=d.prune_layer) \
        + 2 * tokens * d.hidden * d.kv_heads * d.head_dim


def lm_head_flops(d: ModelDims, tokens: int) -> int:
    """The LM head for `tokens` positions (vLLM computes logits only where it samples)."""
    return 2 * d.hidden * d.vocab * tokens


def vit_flops(d: ModelDims, patches: int) -> int:
    """The vision tower over one image of `patches` patches: patch embedding, every block
    (qkv + proj, SwiGLU MLP, attention over the whole image in the full-attention blocks and
    within windows of `window_patches` in the others), and the patch merger's MLP."""
    embed = 2 * patches * d.patch_values * d.vision_hidden
    dv, iv = d.vision_hidden, d.vision_intermediate
    linear = 2 * patches * (4 * dv * dv + 3 * dv * iv)
    full = 4 * patches * patches * dv
    windowed = 4 * patches * min(d.window_patches, patches) * dv
    blocks = sum(linear + (full if b in d.fullatt_blocks else windowed)
                 for b in range(d.vision_depth))
    merged_in = d.merge * d.merge * dv
    merger = 2 * (patches // (d.merge * d.merge)) * (merged_in * merged_in + merged_in * d.hidden)
    return embed + blocks + merger


def vip_flops(d: ModelDims, visual: int, prompt_tokens: int) -> int:
    """The glimpse query's attention logits at layer K over the prompt, and the VIP over
    `visual` tokens (approximate: per VIP layer the ViT-feature projection, q / k from the
    conditioned input, v / o, a 4x SwiGLU MLP and attention within the image)."""
    h = d.vip_hidden
    glimpse_logits = 2 * d.heads * d.head_dim * prompt_tokens
    per_layer = 2 * visual * (d.vision_hidden * h + 2 * 2 * h * h + 2 * h * h + 3 * h * 4 * h) \
        + 4 * visual * visual * h
    return glimpse_logits + 2 * visual * d.heads * h + d.vip_layers * per_layer + 2 * visual * h


def generation_flops(d: ModelDims, prompt_len: int, rows: int, distinct: int,
                     new_tokens: int) -> dict[str, int]:
    """vLLM's share of a batch: `rows` samples of `new_tokens` each on prompts of `prompt_len`
    tokens, `distinct` of which differ (the others hit the prefix cache and recompute only the
    last prompt token). The first token comes from the prefill; T - 1 decode steps follow, at
    context prompt_len + t - 1 for step t."""
    prefill = distinct * decoder_flops(d, prompt_len) \
        + (rows - distinct) * decoder_flops(d, 1, prompt_len - 1)
    steps = new_tokens - 1
    decode_pairs = steps * prompt_len + steps * (steps + 1) // 2
    decode = rows * d.layers * (steps * linear_flops_per_token(d)
                                + 4 * d.heads * d.head_dim * decode_pairs)
    return {"prefill": prefill, "decode": decode + lm_head_flops(d, rows * new_tokens)}


def masks_per_prompt(mask_mode: str, group: int) -> int:
    """Distinct keep masks per prompt of a bench mask mode: "shared" 1, "sampled" G (one per
    sample), "sampled:M" M (rollout.masks_per_prompt, each shared by G / M samples)."""
    if mask_mode == "shared":
        return 1
    if mask_mode == "sampled":
        return group
    name, _, count = mask_mode.partition(":")
    if name != "sampled" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"unknown mask_mode {mask_mode!r}; known: shared, sampled, sampled:M")
    if group % int(count):
        raise ValueError(f"mask_mode {mask_mode!r}: {count} masks per prompt do not divide "
                         f"G = {group}")
    return int(count)


def pruned_flops(d: ModelDims, text: int, visual: int, kept: int, prompts: int, group: int,
                 new_tokens: int, mask_mode: str) -> dict[str, int]:
    """FLOPs of the pruned side of one cell: the pre-pass of every prompt (ViT, decoder layers
    0..K-1 and layer K's keys over text + visual + the glimpse token, VIP), then vLLM on
    text + kept tokens.

    Args:
        d: the model's sizes.
        text, visual, kept: per prompt, text tokens, visual tokens, kept visual tokens (mean).
        prompts, group: N prompts, G samples each.
        new_tokens: T generated per sample.
        mask_mode: "shared" (one mask per prompt), "sampled" (one per sample) or
            "sampled:M" (M per prompt; see `masks_per_prompt`).
    """
    distinct = prompts * masks_per_prompt(mask_mode, group)
    parts = {
        "vit": prompts * vit_flops(d, visual * d.merge * d.merge),
        "prepass_decoder": prompts * prepass_decoder_flops(d, text + visual + 1),
        "vip": prompts * vip_flops(d, visual, text + visual + 1),
        **generation_flops(d, text + kept, prompts * group, distinct, new_tokens),
    }
    parts["total"] = sum(parts.values())
    return parts


def stock_flops(d: ModelDims, text: int, visual: int, prompts: int, group: int,
                new_tokens: int) -> dict[str, int]:
    """FLOPs of stock vLLM on the full image: its vision tower and one prefill of text + all
    visual tokens per prompt (shared by the group), then the decode at that context."""
    parts = {"vit": prompts * vit_flops(d, visual * d.merge * d.merge),
             **generation_flops(d, text + visual, prompts * group, prompts, new_tokens)}
    parts["total"] = sum(parts.values())
    return parts


def predicted_ratios(d: ModelDims, text: int, visual: int, kept: int, prompts: int,
                     group: int, new_tokens: int, mask_mode: str) -> dict[str, float]:
    """What the cost model predicts for the measured pruned / stock ratios of one cell:
    tokens_per_s (stock FLOPs / pruned FLOPs: equal tokens), prefill_s (one token per prompt,
    pre-pass included, over stock's ViT + prefill) and kv_tokens (exact: prompt tokens held)."""
    pruned = pruned_flops(d, text, visual, kept, prompts, group, new_tokens, mask_mode)
    stock = stock_flops(d, text, visual, prompts, group, new_tokens)
    # the prefill row: one sample and one mask per prompt, whatever the cell's mask mode
    first_pruned = pruned_flops(d, text, visual, kept, prompts, 1, 1, "shared")
    first_stock = stock_flops(d, text, visual, prompts, 1, 1)
    return {"tokens_per_s": stock["total"] / pruned["total"],
            "prefill_s": first_pruned["total"] / first_stock["total"],
            "kv_tokens": (text + kept) / (text + visual)}
