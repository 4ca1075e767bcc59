"""The keep masks of every method `pipeline.evaluate --methods` compares, for one prompt batch.

Owns what each method needs from the model and how it turns that into keep masks:
`baseline` (every token), `random`, `fastv`, `divprune`, `cdpruner` (the training-free
fixed-ratio pruners of glimpseprune.pruners, at a keep ratio given per call), `glimpseprune`
and `glimpseprune_plus` (a model's own keep rule, dynamic per image and question). The signals
come from one decoder pass over the prompt (layers 0..K, every token): the merged visual
embeddings the LLM receives (DivPrune, CDPruner), the question tokens' input embeddings
(CDPruner's instruction) and the last prompt token's raw attention logits at layer K (FastV).
Must not generate or score answers (pipeline/evaluate.py does).

Why FastV reads layer K, the layer GlimpsePrune prunes at, and not its paper's layer 2: in the
exact form every method then runs layers 0..K over every token and the rest over the kept ones,
so the methods differ only in which tokens they keep, at equal compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

from glimpseprune import decoder, pruners
from glimpseprune.layout import build_layout

FIXED_RATIO_METHODS = ("random", "fastv", "divprune", "cdpruner")
LEARNED_METHODS = ("glimpseprune", "glimpseprune_plus")
METHODS = ("baseline", *FIXED_RATIO_METHODS, *LEARNED_METHODS)


@dataclass
class RowSignals:
    """What the fixed-ratio pruners read for one row."""

    visual_VD: torch.Tensor  # merged visual embeddings, as the LLM receives them
    instruction_MD: torch.Tensor  # input embeddings of the question's tokens
    attention_HK: torch.Tensor  # last prompt token's raw attention logits at layer K
    visual_index_V: torch.Tensor  # where the visual tokens sit among the K keys
    valid_K: torch.Tensor  # False on left padding


def _question_positions(input_ids_P: torch.Tensor, question_ids: list[int],
                        candidates_P: torch.Tensor) -> torch.Tensor:
    """Positions of the question's tokens in a prompt: the question's token ids as one run if
    they occur so; else every text token (a tokenizer may merge across the question's edge)."""
    ids, n = input_ids_P.tolist(), len(question_ids)
    for start in range(len(ids) - n + 1):
        if n and ids[start:start + n] == question_ids:
            return torch.arange(start, start + n, device=input_ids_P.device)
    return candidates_P.nonzero().squeeze(-1)


@torch.no_grad()
def row_signals(model, inputs: dict, questions: list[str], tokenizer) -> list[RowSignals]:
    """One pass over layers 0..K of `model` (a GlimpsePruneModel) for the pruners' signals."""
    base, layer = model.base, model.glimpse_modules.spec.prune_layer
    text = decoder.text_model(base)
    layout = build_layout(base, inputs, None)
    hidden_BPD = layout.embeds_BPD
    rope = decoder.rotary(text, hidden_BPD, layout.position_ids_3BP)
    mask = decoder.causal_mask(text, hidden_BPD, layout.attention_mask_BP)
    cache = DynamicCache(config=text.config)
    hidden_BPD = decoder.run_layers(text, hidden_BPD, range(layer), mask, rope, cache)
    query_in_B1D = hidden_BPD[:, -1:]  # left padding: the last slot is every row's last token
    decoder.run_layers(text, hidden_BPD, range(layer, layer + 1), mask, rope, cache)
    logits_BHK = decoder.glimpse_attention_logits(
        text.layers[layer], query_in_B1D, (rope[0][:, -1:], rope[1][:, -1:]),
        cache.layers[layer].keys)
    special = set(tokenizer.all_special_ids)
    out = []
    for b, question in enumerate(questions):
        ids_P = inputs["input_ids"][b]
        text_P = layout.attention_mask_BP[b].clone()
        text_P[layout.visual_index[b]] = False
        text_P &= torch.tensor([int(t) not in special for t in ids_P.tolist()],
                               device=text_P.device)
        positions = _question_positions(ids_P, tokenizer.encode(question,
                                                                add_special_tokens=False), text_P)
        out.append(RowSignals(
            visual_VD=layout.embeds_BPD[b, layout.visual_index[b]],
            instruction_MD=layout.embeds_BPD[b, positions],
            attention_HK=logits_BHK[b], visual_index_V=layout.visual_index[b],
            valid_K=layout.attention_mask_BP[b]))
    return out


def fixed_ratio_masks(method: str, num_visual_B: list[int], signals: list[RowSignals] | None,
                      keep_ratio: float, generator: torch.Generator) -> list[torch.Tensor]:
    """Per row, a bool [V] keep mask of round(V * keep_ratio) tokens chosen by `method`
    (`signals` may be None for `random`, which reads nothing)."""
    masks = []
    for b, num_visual in enumerate(num_visual_B):
        k = pruners.keep_count(num_visual, keep_ratio)
        sig = signals[b] if signals is not None else None
        if method == "random":
            mask = pruners.random_keep(num_visual, k, generator)
        elif method == "fastv":
            mask = pruners.fastv_keep(sig.attention_HK, sig.visual_index_V, k, sig.valid_K)
        elif method == "divprune":
            mask = pruners.divprune_keep(sig.visual_VD, k)
        elif method == "cdpruner":
            mask = pruners.cdpruner_keep(sig.visual_VD, sig.instruction_MD, k)
        else:
            raise ValueError(f"unknown fixed-ratio method {method!r}; known: "
                             f"{FIXED_RATIO_METHODS}")
        masks.append(mask.cpu())
    return masks


def prefill_flops_ratio(form: str, text_tokens: int, visual: int, kept: int, num_layers: int,
                        prune_layer: int, needs_prepass: bool) -> float:
    """Analytic prefill cost against the unpruned prompt, counting decoder token-layers (the
    linear layers' FLOPs are proportional to them; attention's quadratic term is left out).

    exact: layers 0..K over all text + visual tokens, layers K+1.. over text + kept.
    vllm: every layer over text + kept, plus, for a method that scores tokens with the decoder
    (glimpseprune's glimpse pre-pass, fastv), layers 0..K over all tokens once before it.
    """
    full, pruned = text_tokens + visual, text_tokens + kept
    early, late = prune_layer + 1, num_layers - prune_layer - 1
    if form == "exact":
        cost = early * full + late * pruned
    elif form == "vllm":
        cost = num_layers * pruned + (early * full if needs_prepass else 0)
    else:
        raise ValueError(f"unknown inference form {form!r}; known: exact, vllm")
    return cost / (num_layers * full)
