"""`make demo`: run every stage that exists on the embedded default and say what it did.

Owns the order of the demo's stages, its short step budgets and its report. Today that is:
build the tiny Qwen2.5-VL and the synthetic splits, a short SFT warm start from the random
tiny model (the full recipe takes about 25 minutes, so the demo only shows it running), then,
from the committed embedded default (glimpseprune/embedded/tiny: the recipe's grounded base and
its stage-1 modules), a short stage 1 (glimpse token + VIP), a short GRPO (stage 2: vLLM
rollouts on sampled keep masks, reward with the pruning bonus, ZeRO-3 policy + reference,
weight sync), a look at what the embedded pruner keeps (PNG), and greedy answers from the
embedded base through transformers and through vLLM compared token for token. All stages are
child runs of one MLflow "demo" run. Must not hold stage logic of its own.

    python -m pipeline.demo --config configs/tiny.yaml [dotted.key=value ...]

The demo shortens the stages (DEMO_BUDGET below); pass e.g. `sft.total_steps=3000` to override.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from pipeline.config import parse_args

# Short enough for a CPU box in a few minutes; the full recipes are the configs' own numbers.
DEMO_BUDGET = ["sft.total_steps=60", "sft.eval_every=60", "sft.vision_pretrain_steps=20",
               "sft.checkpoint_every=1000", "glimpse.train_steps=30",
               "glimpse.train_eval_every=30", "trainer.eval_samples=32",
               "trainer.total_steps=4", "trainer.eval_every=4", "trainer.prompts_per_step=4",
               "data.synthetic.num_train=400", "data.synthetic.num_validation=64",
               "data.synthetic.num_test=64", "checkpoint.every_steps=1000"]
CHANCE = {"color": 1 / 7, "shape": 1 / 4, "number": 1 / 10}  # uniform guess over the answers


def _greedy_ids_transformers(model_path, model_cfg, rows,
                             max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy answer ids per row, and the mean visual tokens per image they were given."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from glimpseprune.processor import load_processor
    from pipeline.prompts import prompt_text

    processor = load_processor(model_path, model_cfg)
    processor.tokenizer.padding_side = "left"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
    inputs = processor(text=[prompt_text(processor, r["question"]) for r in rows],
                       images=[r["image"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    merge = model.config.vision_config.spatial_merge_size
    visual = int(inputs["image_grid_thw"].prod(-1).sum()) / merge**2 / len(rows)
    return [seq[: seq.index(eos) + 1] if eos in seq else seq
            for seq in out[:, inputs["input_ids"].shape[1]:].tolist()], visual


def _greedy_ids_vllm(cfg, model_path, rows) -> list[list[int]]:
    from vllm import SamplingParams

    from glimpseprune.processor import load_processor
    from glimpseprune.vllm_engine import start_engine, stop_engine
    from pipeline.prompts import prompt_text

    processor = load_processor(model_path, cfg.model)
    llm = start_engine(model_path, cfg.model, cfg.rollout, seed=cfg.trainer.seed)
    requests = [{"prompt": prompt_text(processor, r["question"]),
                 "multi_modal_data": {"image": r["image"]}} for r in rows]
    outs = llm.generate(requests, SamplingParams(temperature=0.0,
                                                 max_tokens=cfg.rollout.max_new_tokens))
    stop_engine(llm)
    return [list(o.outputs[0].token_ids) for o in outs]


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_at = argv.index("--config") + 2 if "--config" in argv else 0
    cfg, _ = parse_args(argv[:config_at] + DEMO_BUDGET + argv[config_at:],
                        "Run the embedded default's stages end to end.")
    from transformers import AutoTokenizer

    from glimpseprune.look import look
    from glimpseprune.tiny import resolve_base_model
    from pipeline import glimpse, grpo, sft
    from pipeline.data import load_split
    from pipeline.embedded import EMBEDDED_DIR, MODULES_DIR, verify
    from pipeline.prompts import normalise_answer
    from pipeline.tracking import Tracker

    out, did, timer = Path(cfg.output_dir), [], time.perf_counter
    parent = Tracker(cfg, "demo")
    t0 = timer()
    base = resolve_base_model(cfg.model, out)
    did.append(f"base model {base} ({'model.path' if cfg.model.path else 'tiny, built'}, "
               f"{timer() - t0:.0f} s)")
    t0 = timer()
    splits = {name: load_split(cfg.data, name, out) for name in ("train", "validation", "test")}
    did.append("data (" + cfg.data.source + "): " + ", ".join(
        f"{n} {len(ds)} rows, {rep.skipped} skipped" for n, (ds, rep) in splits.items())
        + f" ({timer() - t0:.0f} s)")
    t0 = timer()
    sft_summary = sft.run(cfg, parent_run_id=parent.run_id)
    zero = cfg.policy.zero_stage if cfg.sft.zero_stage is None else cfg.sft.zero_stage
    did.append(f"sft: {cfg.sft.total_steps} steps on {cfg.policy.num_ranks} ZeRO-{zero} ranks, "
               f"held-out accuracy {sft_summary.get('eval/accuracy', float('nan')):.3f} "
               f"({timer() - t0:.0f} s) -> {sft_summary['export']}")
    # Later stages start from the committed grounded base (the demo's SFT is too short to
    # make one); its card says how it was made.
    tuned = EMBEDDED_DIR
    verify(EMBEDDED_DIR)
    t0 = timer()
    g_cfg = replace(cfg, model=replace(cfg.model, path=str(tuned)))
    g_summary = glimpse.run(g_cfg, parent_run_id=parent.run_id)
    did.append(f"glimpse (stage 1) on the embedded base {tuned}: "
               f"{cfg.glimpse.train_steps} steps, held-out accuracy "
               f"{g_summary['eval/accuracy']:.3f} pruned vs "
               f"{g_summary['eval/accuracy_unpruned']:.3f} unpruned at keep ratio "
               f"{g_summary['eval/keep_ratio']:.3f}, box recall {g_summary['eval/box_recall']:.3f}"
               f" ({timer() - t0:.0f} s)")

    t0 = timer()
    r_summary = grpo.run(replace(g_cfg, trainer=replace(
        cfg.trainer, init_from=str(EMBEDDED_DIR))), parent_run_id=parent.run_id)
    did.append(f"grpo (stage 2) from the embedded base + stage-1 modules: "
               f"{cfg.trainer.total_steps} steps x {cfg.trainer.prompts_per_step}"
               f" prompts x {cfg.rollout.n} samples, held-out accuracy "
               f"{r_summary['eval/accuracy']:.3f} at keep ratio {r_summary['eval/keep_ratio']:.3f}"
               f" ({timer() - t0:.0f} s) -> {r_summary['export']}")

    rows = [splits["validation"][0][i] for i in range(min(16, len(splits["validation"][0])))]
    rows[0]["image"].save(out / "demo_image.png")
    seen = look(str(tuned), str(out / "demo_image.png"), rows[0]["question"], str(out),
                modules_dir=str(MODULES_DIR), model_cfg=cfg.model)
    did.append(f"look: '{rows[0]['question']}' -> '{seen['answer']}' keeping "
               f"{seen['kept_tokens']}/{seen['visual_tokens']} visual tokens, PNG {seen['png']}")
    t0 = timer()
    hf_ids, visual_tokens = _greedy_ids_transformers(tuned, cfg.model, rows,
                                                     cfg.rollout.max_new_tokens)
    vllm_ids = _greedy_ids_vllm(cfg, tuned, rows)
    tokenizer = AutoTokenizer.from_pretrained(tuned)

    def accuracy(ids_list):
        return sum(normalise_answer(tokenizer.decode(ids, skip_special_tokens=True))
                   == normalise_answer(r["answer"]) for ids, r in zip(ids_list, rows,
                                                                       strict=True)) / len(rows)

    same = sum(a == b for a, b in zip(hf_ids, vllm_ids, strict=True))
    did.append(f"vLLM vs transformers on the embedded base, {len(rows)} questions: {same} "
               f"identical greedy answers at {visual_tokens:.0f} visual tokens per image "
               f"(model.max_pixels {cfg.model.max_pixels}), accuracy {accuracy(vllm_ids):.3f} "
               f"({timer() - t0:.0f} s)")
    summary = {"sft": sft_summary, "glimpse": g_summary, "grpo": r_summary, "look": seen,
               "validation_questions": len(rows), "accuracy_transformers": accuracy(hf_ids),
               "accuracy_vllm": accuracy(vllm_ids), "same_tokens_vllm_vs_transformers": same,
               "visual_tokens_per_image": visual_tokens,
               "chance": sum(CHANCE.get(r.get("question_type"), 0.0) for r in rows) / len(rows),
               "mlflow_parent_run_id": parent.run_id}
    parent.log({"eval/accuracy": summary["accuracy_vllm"]}, 0)
    parent.finish()
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n== demo: what ran ==")
    for line in did:
        print(" -", line)
    print(f" - note: demo budgets are short ({' '.join(DEMO_BUDGET[:3])} ...): the demo's own SFT"
          " stays near chance; the embedded base is the full recipe's (its card: "
          f"{EMBEDDED_DIR / 'card.json'})")
    print(json.dumps({k: v for k, v in summary.items()
                      if k not in ("sft", "glimpse", "grpo", "look")},
                     indent=2))
    print(f"(summary written to {out / 'demo_summary.json'})")


if __name__ == "__main__":
    main()
