"""`python -m pipeline.sft`: supervised fine-tuning of the base model (answers only in the loss).

Owns the SFT driver loop, read top to bottom: rows -> RolloutBatch of reference answers ->
policy_group.train_step (ZeRO-3 ranks) -> MLflow -> periodic held-out evaluation ->
checkpoint. On the embedded default it is the warm start that makes the random tiny model the
demo's base; users of real models usually skip it. Must not hold model maths (actors/policy.py).

    python -m pipeline.sft --config configs/tiny.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import Config, parse_args


def answer_batch(rows: list[dict], tokenizer) -> RolloutBatch:
    """The rows as a RolloutBatch whose responses are the reference answers + end of turn."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return RolloutBatch(
        prompts=PromptBatch.from_rows(rows), prompt_index_B=list(range(len(rows))),
        response_ids=[tokenizer.encode(r["answer"], add_special_tokens=False) + [eos]
                      for r in rows])


def evaluate(group, dataset, tokenizer, limit: int) -> dict[str, float]:
    """Greedy exact match on the first `limit` rows, overall and per question type."""
    rows = [dataset[i] for i in range(min(limit, len(dataset)))]
    hits = [h for shard in group.run_split("evaluate", answer_batch(rows, tokenizer))
            for h in shard]
    by_type = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        by_type[row.get("question_type") or "all"].append(hit)
    result = {"eval/accuracy": sum(hits) / len(hits)}
    result.update({f"eval/accuracy_{t}": sum(v) / len(v) for t, v in sorted(by_type.items())})
    return result


def run(cfg: Config) -> dict:
    """Trains, evaluates, checkpoints and exports; returns the final summary."""
    from transformers import AutoTokenizer

    from actors.group import ActorGroup
    from actors.policy import PolicyActor
    from glimpseprune.tiny import resolve_base_model
    from pipeline.checkpoint import Checkpointer
    from pipeline.cluster import init_ray
    from pipeline.data import epoch_order, load_split
    from pipeline.tracking import Tracker

    out = Path(cfg.output_dir)
    base = resolve_base_model(cfg.model, out)
    train, train_report = load_split(cfg.data, "train", out)
    validation, _ = load_split(cfg.data, "validation", out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    init_ray(cfg.cluster)
    tracker = Tracker(cfg, "sft")
    sft = cfg.sft
    dense = sft.vision_pretrain_steps > 0 or sft.dense_loss_weight > 0
    group = ActorGroup(PolicyActor, cfg.policy.num_ranks,
                       strategy=cfg.cluster.placement_strategy,
                       args=(replace(cfg.policy, lr=sft.lr), cfg.model, str(base),
                             cfg.trainer.seed, sft.total_steps),
                       kwargs={"dense_heads": dense, "vision_lr_scale": sft.vision_lr_scale})
    checkpoints = Checkpointer(out / "checkpoints" / "sft", cfg.checkpoint.keep_last)
    start_step, position = 0, 0
    resume_from = checkpoints.resolve(cfg.checkpoint.resume, tracker.client)
    if resume_from is not None:
        state = group.run("load_checkpoint", str(resume_from))[0]
        start_step, position = state["step"], state["data_position"]
        print(f"sft: resumed from {resume_from} at step {start_step}")
    tracker.log({"data/skipped": train_report.skipped}, start_step)

    evaluation: dict[str, float] = {}
    consumed_log = out / "sft" / "consumed.jsonl"
    consumed_log.parent.mkdir(parents=True, exist_ok=True)
    for step in range(start_step + 1, sft.total_steps + 1):
        t_step = time.perf_counter()
        indices = epoch_order(len(train), cfg.trainer.seed, position, sft.prompts_per_step)
        position += len(indices)
        rows = [train[i] for i in indices]
        batch = answer_batch(rows, tokenizer)
        with consumed_log.open("a") as handle:  # which rows each step used: resume audits
            handle.write(json.dumps({"step": step, "ids": [r["id"] for r in rows]}) + "\n")
        t_train = time.perf_counter()
        phase = "dense" if step <= sft.vision_pretrain_steps else "sft"
        metrics = group.run_split("train_step", batch, phase, sft.dense_loss_weight)[0]
        record = {"policy/grad_norm": metrics["grad_norm"], "policy/lr": metrics["lr"],
                  "timing_s/train": time.perf_counter() - t_train}
        if phase == "sft":
            record["policy/loss"] = metrics["loss"]
        if dense:
            record["policy/dense_loss"] = metrics["dense_loss"]
            record.update({f"policy/{k}": v for k, v in metrics.items()
                           if k.startswith("dense_acc_")})
        if step % sft.eval_every == 0 or step == sft.total_steps:
            evaluation = evaluate(group, validation, tokenizer, cfg.trainer.eval_samples)
            record.update(evaluation)
        if step % cfg.checkpoint.every_steps == 0 or step == sft.total_steps:
            folder = checkpoints.save(group, step, {"data_position": position})
            tracker.client.set_tag(tracker.run_id, "checkpoint_dir", str(folder.resolve()))
        record["timing_s/step"] = time.perf_counter() - t_step
        tracker.log(record, step)
        print(f"sft step {step}/{sft.total_steps} {phase} loss {metrics['loss']:.4f} "
              f"lr {metrics['lr']:.2e} acc {evaluation.get('eval/accuracy', float('nan')):.3f} "
              f"{record['timing_s/step']:.2f}s", flush=True)

    export = out / "sft" / "final"
    group.run("export_hf", str(export))
    summary = {"stage": "sft", "steps": sft.total_steps, "export": str(export),
               "mlflow_run_id": tracker.run_id, **evaluation}
    summary["model_version"] = tracker.log_checkpoint(
        export, "checkpoint", f"{cfg.tracking.experiment}-sft",
        {"step": sft.total_steps, "accuracy": evaluation.get("eval/accuracy", "")})
    (out / "sft" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    tracker.finish()
    group.shutdown()
    return summary


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(argv, "Supervised fine-tuning of the base model on the configured data.")
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
