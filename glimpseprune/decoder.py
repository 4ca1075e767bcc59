"""Running transformers' Qwen2.5-VL decoder layers piecewise, with gaps in the positions.

Owns the small steps the pruned forward is made of, built on transformers' own classes (decoder
layers, rotary embedding, mask builder, DynamicCache) without patching them: the mask of a
left-padded batch, the rotary tables for explicit (t, h, w) ids, a run over a range of layers,
one layer's keys alone, the glimpse query's raw attention logits, and the gather that compacts a
batch (hidden states, cache entries, positions) onto the tokens it keeps. Must not decide what to
keep, and must not keep any state between calls: everything lives in the tensors and the cache
passed in.
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv

SUPPORTED_ATTENTION = ("sdpa", "eager")


def text_model(model):
    """The decoder stack (`Qwen2_5_VLTextModel`) of a `Qwen2_5_VLForConditionalGeneration`."""
    text = model.model.language_model
    if text.config._attn_implementation not in SUPPORTED_ATTENTION:
        # Flash-attention kernels take no per-row positions with gaps plus padding masks here.
        raise ValueError(f"the pruned forward needs attn_implementation in {SUPPORTED_ATTENTION}, "
                         f"not {text.config._attn_implementation!r}")
    return text


def causal_mask(text, hidden_BLD: torch.Tensor, attention_mask_BK: torch.Tensor, cache=None):
    """transformers' causal + padding mask for queries `hidden_BLD` over keys `attention_mask_BK`.

    Pass `cache` only when its every layer already holds the keys before these queries.
    """
    return create_causal_mask(config=text.config, inputs_embeds=hidden_BLD,
                              attention_mask=attention_mask_BK.long(), past_key_values=cache)


def rotary(text, hidden_BLD: torch.Tensor, position_ids_3BL: torch.Tensor):
    """(cos, sin) of M-RoPE at explicit (t, h, w) ids, as the decoder layers take them."""
    return text.rotary_emb(hidden_BLD, position_ids_3BL)


def run_layers(text, hidden_BLD: torch.Tensor, layers: range, mask, rope, cache) -> torch.Tensor:
    """Runs decoder layers `layers` in order; each appends its keys/values to `cache`."""
    for i in layers:
        hidden_BLD = text.layers[i](hidden_BLD, attention_mask=mask, position_embeddings=rope,
                                    past_key_values=cache, use_cache=cache is not None)
    return hidden_BLD


def lm_logits(model, hidden_BLD: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head."""
    return model.lm_head(model.model.language_model.norm(hidden_BLD))


def glimpse_attention_logits(layer, glimpse_in_B1D: torch.Tensor, rope_last, keys_BhKE):
    """The glimpse query's raw (pre-softmax, scaled, RoPE'd) attention logits at one layer.

    Args:
        layer: the decoder layer (its input norm and q projection are reused).
        glimpse_in_B1D: the residual stream entering the layer at the glimpse position.
        rope_last: (cos, sin) at the glimpse position, each [B, 1, E].
        keys_BhKE: the layer's cached keys (RoPE applied), [B, kv_heads, K, E].

    Returns:
        [B, H, K] logits of every attention head over every key.
    """
    attn = layer.self_attn
    query = attn.q_proj(layer.input_layernorm(glimpse_in_B1D))
    query_BH1E = query.view(query.shape[0], 1, -1, attn.head_dim).transpose(1, 2)
    query_BH1E, _ = apply_rotary_pos_emb(query_BH1E, query_BH1E, *rope_last)
    keys_BHKE = repeat_kv(keys_BhKE, attn.num_key_value_groups)
    return (query_BH1E @ keys_BHKE.transpose(-1, -2)).squeeze(2) * attn.scaling


def layer_keys(layer, hidden_BLD: torch.Tensor, rope) -> torch.Tensor:
    """The keys one decoder layer makes of `hidden_BLD` (its input norm, k projection, RoPE),
    [B, kv_heads, L, E]: what its forward would cache, without the rest of the layer."""
    attn = layer.self_attn
    keys = attn.k_proj(layer.input_layernorm(hidden_BLD))
    keys_BhLE = keys.view(*hidden_BLD.shape[:2], -1, attn.head_dim).transpose(1, 2)
    _, keys_BhLE = apply_rotary_pos_emb(keys_BhLE, keys_BhLE, *rope)
    return keys_BhLE


def compact_index(keep_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather indices that move each row's kept tokens to the right end (left padding).

    Args:
        keep_BL: bool, which of a row's L tokens stay (padding must be False).

    Returns:
        index_BN: [B, N] source positions, N = the most any row keeps; padding slots point at 0.
        valid_BN: [B, N] bool, False on the new left padding.
    """
    counts_B = keep_BL.sum(1)
    width = int(counts_B.max())
    valid_BN = torch.arange(width, device=keep_BL.device)[None] >= (width - counts_B)[:, None]
    index_BN = torch.zeros(keep_BL.shape[0], width, dtype=torch.long, device=keep_BL.device)
    # Kept positions in increasing order fill each row's valid slots: order is preserved.
    index_BN[valid_BN] = keep_BL.nonzero()[:, 1]
    return index_BN, valid_BN


def gather_tokens(values_BL_: torch.Tensor, index_BN: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """values[b, ..., index[b, n], ...] along `dim` (the batch is dim 0)."""
    shape = [1] * values_BL_.dim()
    shape[0], shape[dim] = index_BN.shape
    index = index_BN.view(shape).expand(*[s if d != dim and d != 0 else -1
                                          for d, s in enumerate(values_BL_.shape)])
    return values_BL_.gather(dim, index)


def compact_cache(cache, layers: range, index_BN: torch.Tensor) -> None:
    """Keeps only the gathered entries of `layers` in a DynamicCache (entries are reused as-is)."""
    for i in layers:
        entry = cache.layers[i]
        entry.keys = gather_tokens(entry.keys, index_BN, dim=2)
        entry.values = gather_tokens(entry.values, index_BN, dim=2)
