"""What pruning buys in vLLM: the same prompts with and without pruning, side by side.

Owns the rollout benchmark (first version): one RolloutActor, one set of synthetic test
prompts, and per mode ("pruned": the config's keep rule / mask mode, or random masks of
`--keep-ratio`; "unpruned": every visual token kept) the median over rounds of
- rollout tokens/s: generated tokens / vLLM wall time, `rollout.n` samples per prompt;
- prefill time: vLLM wall time for one token per prompt (n = 1, prefix cache cleared);
- KV-cache tokens: the prompt length vLLM holds (text + kept visual tokens), mean per row;
then the pruned / unpruned ratios. The glimpse pre-pass is not in these times (it is printed
apart). Prints numbers; no pass/fail. Must not train.

    python -m pipeline.bench --config configs/tiny.yaml [--keep-ratio 0.1] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace

import torch

from pipeline.batch import PromptBatch
from pipeline.config import parse_args


def _random_masks(num_rows: int, num_visual: int, keep_ratio: float, seed: int) -> list:
    """Per row, a mask keeping round(keep_ratio * V) (at least one) random tokens."""
    generator = torch.Generator().manual_seed(seed)
    count = max(1, round(keep_ratio * num_visual))
    masks = []
    for _ in range(num_rows):
        mask_V = torch.zeros(num_visual, dtype=torch.bool)
        mask_V[torch.randperm(num_visual, generator=generator)[:count]] = True
        masks.append(mask_V)
    return masks


def _measure(actor, prompts: PromptBatch, n: int, masks) -> dict[str, float]:
    """One round of one mode: decode throughput, prefill time, KV tokens, pre-pass time."""
    actor.llm.reset_prefix_cache()
    out = actor.generate(prompts, n=n, keep_masks=masks)
    if any(out.extras["error"]):
        raise RuntimeError(f"bench rows failed: {set(filter(None, out.extras['error']))}")
    tokens = sum(len(r) for r in out.response_ids)
    actor.llm.reset_prefix_cache()
    full_cfg, actor.cfg = actor.cfg, replace(actor.cfg, max_new_tokens=1)
    try:  # one token per prompt: the time is the prefill's
        first = actor.generate(prompts, n=1, keep_masks=None if masks is None else masks[::n])
    finally:
        actor.cfg = full_cfg
    return {"tokens_per_s": tokens / out.extras["generate_s"][0],
            "prefill_s": first.extras["generate_s"][0],
            "kv_tokens": statistics.mean(out.extras["prompt_tokens"]),
            "keep_ratio": sum(out.extras["kept_tokens"]) / sum(out.extras["visual_tokens"]),
            "prepass_s": out.extras["prepass_s"][0]}


def run(actor, prompts: PromptBatch, n: int, keep_ratio: float | None, rounds: int,
        seed: int = 0) -> dict[str, dict[str, float]]:
    """Median over `rounds` (modes alternate within a round) of each mode's figures."""
    prepass, _ = actor.prepass(prompts.take([0]))
    num_visual = int(prepass[0].vip_logits_V.numel())
    rows = len(prompts) * n
    modes = {"pruned": None if keep_ratio is None else
             _random_masks(rows, num_visual, keep_ratio, seed),
             "unpruned": [torch.ones(num_visual, dtype=torch.bool)] * rows}
    runs = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, masks in modes.items():
            runs[mode].append(_measure(actor, prompts, n, masks))
    return {mode: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for mode, results in runs.items()}


def print_table(result: dict[str, dict[str, float]], out=sys.stdout) -> None:
    pruned, full = result["pruned"], result["unpruned"]
    print(f"{'':16}{'pruned':>12}{'unpruned':>12}{'ratio':>10}", file=out)
    for key, fmt in (("tokens_per_s", ".1f"), ("prefill_s", ".3f"), ("kv_tokens", ".1f"),
                     ("keep_ratio", ".3f"), ("prepass_s", ".3f")):
        ratio = pruned[key] / full[key] if full[key] else float("nan")
        print(f"{key:16}{pruned[key]:>12{fmt}}{full[key]:>12{fmt}}{ratio:>10.3f}", file=out)


def main(argv: list[str] | None = None) -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--keep-ratio", type=float, default=None,
                            help="random masks of this ratio instead of the keep rule")
        parser.add_argument("--prompts", type=int, default=None,
                            help="number of prompts (default trainer.prompts_per_step)")
        parser.add_argument("--rounds", type=int, default=2)

    cfg, args = parse_args(argv, __doc__.splitlines()[0], options)
    from actors.rollout import RolloutActor
    from glimpseprune.tiny import resolve_base_model
    from pipeline.synthetic import generate_split

    count = args.prompts or cfg.trainer.prompts_per_step
    synthetic = replace(cfg.data.synthetic, num_test=count)
    prompts = PromptBatch.from_rows(list(generate_split(synthetic, "test"))[:count])
    actor = RolloutActor(str(resolve_base_model(cfg.model, cfg.output_dir)), cfg.model,
                         cfg.glimpse, cfg.rollout, seed=cfg.trainer.seed)
    try:
        result = run(actor, prompts, cfg.rollout.n, args.keep_ratio, args.rounds,
                     cfg.trainer.seed)
    finally:
        actor.shutdown()
    print(f"{count} prompts x {cfg.rollout.n} samples x <= {cfg.rollout.max_new_tokens} new "
          f"tokens, median of {args.rounds} rounds (vLLM only; pre-pass apart)")
    print_table(result)


if __name__ == "__main__":
    main()
