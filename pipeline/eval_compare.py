"""Runs every method of `pipeline.evaluate --methods` through both inference forms.

Owns the order of the comparison and its per-sample records: the learned keep rules first
(their mean keep ratio sets the fixed-ratio pruners' matched ratio), then every fixed-ratio
pruner at each ratio on masks made once per prompt, then the same masks (and the learned
models' own pre-pass keep rules) through vLLM. Forms (shared docs method.md):
- exact: transformers, GlimpsePruneModel's pruned prefill - layers 0..K over every visual
  token, layers K+1.. and the decode over the kept ones;
- vllm: the RolloutActor's engine - every layer over the kept tokens only (rollouts, serving).
Each record holds the prediction, exact match, ANLS, visual / kept / KV-cache tokens and the
analytic prefill ratio; each setting's wall times and peak memory are measured around it.
Must not aggregate or plot (pipeline/eval_report.py does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from pipeline.eval_methods import (
    FIXED_RATIO_METHODS,
    fixed_ratio_masks,
    prefill_flops_ratio,
    row_signals,
)
from pipeline.measure import peak_memory
from pipeline.prompts import normalise_answer
from rewards.functions import anls

FIXED_RATIOS = (1 / 9, 2 / 9, 3 / 9)  # the paper's <= 11.1 / 22.2 / 33.3 % settings


@dataclass
class Setting:
    """One column of the comparison: a method, at a keep ratio for the fixed-ratio ones."""

    method: str
    keep_ratio: float | None = None
    label: str = ""
    masks: list = field(default_factory=list)  # per row, filled by the exact pass
    measured: dict = field(default_factory=dict)  # per form: latency_s, select_s, peak_mem_mb

    def __post_init__(self):
        if not self.label:
            self.label = self.method if self.keep_ratio is None else \
                f"{self.method}@{self.keep_ratio:.3f}"


def _record(form: str, setting: Setting, row: dict, prediction: str, mask_V: torch.Tensor,
            text_tokens: int, kv_tokens: int, geometry: tuple[int, int], box_V=None) -> dict:
    visual, kept = int(mask_V.numel()), int(mask_V.sum())
    num_layers, prune_layer = geometry
    record = {
        "form": form, "setting": setting.label, "method": setting.method,
        "target_keep_ratio": setting.keep_ratio, "id": row["id"],
        "question_type": row.get("question_type") or "all", "question": row["question"],
        "answer": row["answer"], "prediction": prediction,
        "exact": float(normalise_answer(prediction) == normalise_answer(row["answer"])),
        "anls": anls(normalise_answer(prediction), normalise_answer(row["answer"])),
        "visual_tokens": visual, "kept_tokens": kept, "text_tokens": text_tokens,
        "kv_tokens": kv_tokens,
        "prefill_flops_ratio": prefill_flops_ratio(
            form, text_tokens, visual, kept, num_layers, prune_layer,
            setting.method in ("glimpseprune", "glimpseprune_plus", "fastv")),
    }
    if box_V is not None and int(box_V.sum()):  # share of the target boxes' tokens kept
        record["box_recall"] = int((box_V & mask_V).sum()) / int(box_V.sum())
    return record


def _decode(tokenizer, tokens) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def run_exact(models: dict, processor, rows: list[dict], settings: list[Setting],
              batch_size: int, max_new_tokens: int, seed: int, box_masks) -> list[dict]:
    """The exact form for every setting; fills each setting's masks (reused by the vLLM pass).

    Args:
        models: GlimpsePruneModel per learned method ("glimpseprune", "glimpseprune_plus");
            "glimpseprune" also serves the baseline and the fixed-ratio pruners' signals.
        box_masks: per row, the target boxes' token mask, or None (no recall column).
    """
    from pipeline.evaluate import _prompt_batch

    scorer = models["glimpseprune"]
    geometry = (scorer.glimpse_modules.spec.text_layers, scorer.glimpse_modules.spec.prune_layer)
    tokenizer = processor.tokenizer
    generator = torch.Generator().manual_seed(seed)
    records = []
    for setting in settings:
        setting.measured["exact"] = {"latency_s": 0.0, "select_s": 0.0}
    if rows:  # untimed warm-up: the first call pays one-off allocations
        warm, count = _prompt_batch(processor, rows[:batch_size]), len(rows[:batch_size])
        for model in {id(m): m for m in models.values()}.values():
            model.generate(warm, max_new_tokens=max_new_tokens, keep_masks=[None] * count)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        inputs = _prompt_batch(processor, chunk)
        text_B = [int(inputs["attention_mask"][b].sum()) for b in range(len(chunk))]
        boxes = box_masks[start:start + batch_size] if box_masks else [None] * len(chunk)
        signals, signal_s = None, 0.0
        for setting in settings:
            timing = setting.measured["exact"]
            tick = time.perf_counter()
            model, masks = models.get(setting.method, scorer), None
            if setting.method == "baseline":
                masks = [None] * len(chunk)
            elif setting.method in FIXED_RATIO_METHODS:
                if signals is None and setting.method != "random":
                    signals = row_signals(scorer, inputs, [r["question"] for r in chunk],
                                          tokenizer)
                    signal_s = time.perf_counter() - tick
                    tick = time.perf_counter()
                masks = fixed_ratio_masks(setting.method, _num_visual(scorer, inputs), signals,
                                          setting.keep_ratio, generator)
                timing["select_s"] += time.perf_counter() - tick + \
                    (signal_s if setting.method != "random" else 0.0)
            tick = time.perf_counter()
            with peak_memory(mem := {}):
                out = model.generate(inputs, max_new_tokens=max_new_tokens, keep_masks=masks)
            timing["latency_s"] += time.perf_counter() - tick
            timing["peak_mem_mb"] = max(timing.get("peak_mem_mb", 0.0), mem["peak_mem_mb"])
            for b, row in enumerate(chunk):
                mask_V = out.keep_masks[b].cpu()
                setting.masks.append(mask_V)
                visual, kept = int(mask_V.numel()), int(mask_V.sum())
                records.append(_record(
                    "exact", setting, row, _decode(tokenizer, out.tokens[b]), mask_V,
                    text_B[b] - visual, text_B[b] - visual + kept, geometry, boxes[b]))
    return records


def _num_visual(model, inputs: dict) -> list[int]:
    """Merged visual tokens per row (one image each)."""
    merge = model.base.model.visual.spatial_merge_size ** 2
    return [int(g.prod()) // merge for g in inputs["image_grid_thw"]]


def run_vllm(actors: dict, rows: list[dict], settings: list[Setting], tokenizer,
             geometry: tuple[int, int], box_masks: list | None = None) -> list[dict]:
    """The vLLM form: the exact pass's masks for baseline and fixed-ratio settings, each learned
    model's own pre-pass keep rule for its setting (greedy, one answer per prompt)."""
    from pipeline.batch import PromptBatch

    prompts = PromptBatch.from_rows(rows)
    boxes = box_masks or [None] * len(rows)
    records = []
    for actor in {id(a): a for a in actors.values()}.values():  # untimed warm-up
        actor.generate(prompts.take(range(min(4, len(prompts)))), n=1, greedy=True)
    for setting in settings:
        actor = actors.get(setting.method, actors["glimpseprune"])
        learned = setting.method in actors
        with peak_memory(mem := {}):
            batch = actor.generate(prompts, n=1, greedy=True,
                                   keep_masks=None if learned else setting.masks)
        extras = batch.extras
        setting.measured["vllm"] = {
            "latency_s": sum(extras["generate_s"][:1]), "prepass_s": sum(extras["prepass_s"][:1]),
            "peak_mem_mb": mem["peak_mem_mb"]}
        for b, row in enumerate(rows):
            if extras["error"][b]:
                raise RuntimeError(f"vLLM failed row {row['id']} ({setting.label}): "
                                   f"{extras['error'][b]}")
            kv = extras["prompt_tokens"][b]  # what vLLM holds in its KV cache for the prompt
            mask_V = torch.as_tensor(batch.keep_mask_BV[b], dtype=torch.bool)
            records.append(_record("vllm", setting, row, _decode(tokenizer,
                                                                 batch.response_ids[b]),
                                   mask_V, kv - int(mask_V.sum()), kv, geometry, boxes[b]))
    return records
