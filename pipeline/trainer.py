"""The one training loop of the project: every stage (sft, glimpse, grpo's policy updates) runs
its optimiser steps through `train` with a `Stage` that says what differs.

Owns, in this order per step: seeded data order with a saved position (exact resume, no row
twice in an epoch), the batch, `policy_group.train_step` on every ZeRO-3 rank, MLflow metrics,
periodic held-out evaluation, atomic checkpoints with rotation, then the final export and its
registration as an MLflow model version. When a rank dies, every rank is started again from
the run's last checkpoint (trainer.max_restarts times at most; `faults/group_restarts`), in
the same MLflow run and data record. Must not hold a stage's maths (actors/policy.py) nor
its batch contents (the Stage).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol

from pipeline.batch import RolloutBatch
from pipeline.config import Config


class Stage(Protocol):
    """What a training stage tells the loop."""

    name: str  # sft | glimpse; names the MLflow run, checkpoint and export folders
    total_steps: int
    prompts_per_step: int
    eval_every: int
    checkpoint_every: int

    def actor_kwargs(self, cfg: Config, base: Path) -> dict:
        """Keyword arguments of PolicyActor beyond (dist, policy, model, path, seed, steps)."""

    def make_batch(self, rows: list[dict]) -> RolloutBatch: ...

    def step_args(self, step: int) -> tuple:
        """Arguments of `PolicyActor.train_step` after the batch, e.g. ("sft", 0.0)."""

    def step_record(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """MLflow metrics of a step from rank 0's train_step result."""

    def evaluate(self, group, validation) -> dict[str, float]: ...

    def export(self, group, folder: Path) -> dict[str, Any]:
        """Writes the stage's result to `folder`; returns tags for its model version."""


def train(cfg: Config, stage: Stage, parent_run_id: str | None = None) -> dict:
    """Runs `stage` from the base model (or a checkpoint) to the end; returns a summary.

    Args:
        cfg: the resolved config.
        stage: what this stage trains and how (see `Stage`).
        parent_run_id: nest the stage's MLflow run under this run (the demo's).
    """
    from transformers import AutoTokenizer  # noqa: F401  (import cost paid before Ray starts)

    from actors.group import ActorGroup
    from actors.policy import PolicyActor
    from glimpseprune.tiny import resolve_base_model
    from pipeline.checkpoint import Checkpointer
    from pipeline.cluster import init_ray
    from pipeline.data import load_split
    from pipeline.tracking import Tracker, tracking_client

    out = Path(cfg.output_dir)
    base = resolve_base_model(cfg.model, out)
    train_set, train_report = load_split(cfg.data, "train", out)
    validation, _ = load_split(cfg.data, "validation", out)
    init_ray(cfg.cluster)
    checkpoints = Checkpointer(out / "checkpoints" / stage.name, cfg.checkpoint.keep_last)
    resume_from = checkpoints.resolve(cfg.checkpoint.resume, tracking_client(cfg))
    # a resumed run continues the MLflow run that wrote its checkpoint (not a second one)
    tracker = Tracker(cfg, stage.name, parent_run_id,
                      resume_run_id=Checkpointer.meta(resume_from).get("mlflow_run_id"))
    tracker.log({"data/skipped": train_report.skipped}, 0)

    def start_ranks() -> ActorGroup:
        return ActorGroup(PolicyActor, cfg.policy.num_ranks,
                          strategy=cfg.cluster.placement_strategy,
                          args=(cfg.policy, cfg.model, str(base), cfg.trainer.seed,
                                stage.total_steps),
                          kwargs=stage.actor_kwargs(cfg, base))

    group = start_ranks()
    # the newest complete checkpoint of this run, and how often the ranks were started again
    progress = {"checkpoint": resume_from, "restarts": 0}
    try:
        while True:
            try:
                evaluation = _steps(cfg, stage, group, tracker, train_set, validation,
                                    checkpoints, progress)
                break
            except Exception as exc:  # noqa: BLE001 - only a dead rank is restarted
                group = _restart_if_a_rank_died(cfg, stage, group, start_ranks, progress, exc)
        export = out / stage.name / "final"
        tags = stage.export(group, export)
        summary = {"stage": stage.name, "steps": stage.total_steps, "export": str(export),
                   "mlflow_run_id": tracker.run_id, **evaluation}
        tags.update(step=stage.total_steps, accuracy=evaluation.get("eval/accuracy", ""),
                    keep_ratio=evaluation.get("eval/keep_ratio", ""))
        summary["model_version"] = tracker.log_checkpoint(
            export, "checkpoint", f"{cfg.tracking.experiment}-{stage.name}", tags)
        (out / stage.name / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException:
        tracker.finish("FAILED")
        group.shutdown()
        raise
    tracker.finish()
    group.shutdown()
    return summary


def _restart_if_a_rank_died(cfg: Config, stage: Stage, group, start_ranks, progress: dict,
                            error: Exception):
    """After a failed step: when a rank is dead, stops the group and returns a new one (the
    step loop then resumes from progress["checkpoint"]); re-raises `error` when no rank is dead
    (the failure is not a death) and stops the run once trainer.max_restarts are used."""
    from actors.group import count_restart, dead_actors

    dead = dead_actors([(f"rank {i}", a) for i, a in enumerate(group.actors)])
    progress["restarts"] = count_restart(stage.name, dead, progress["restarts"],
                                         cfg.trainer.max_restarts, error,
                                         progress["checkpoint"] or "the base model", "ranks")
    group.shutdown()
    return start_ranks()


def _steps(cfg: Config, stage: Stage, group, tracker, train_set, validation, checkpoints,
           progress: dict) -> dict:
    """The step loop (resume, batches, train, log, evaluate, checkpoint) from
    progress["checkpoint"] (None: the base model), which follows each save; returns the last
    evaluation."""
    from pipeline.checkpoint import consumed_log
    from pipeline.data import epoch_order

    out = Path(cfg.output_dir)
    start_step, position = 0, 0
    resume_from = progress["checkpoint"]
    if resume_from is not None:
        state = group.run("load_checkpoint", str(resume_from))[0]
        start_step, position = state["step"], state["data_position"]
        print(f"{stage.name}: resumed from {resume_from} at step {start_step}")

    evaluation: dict[str, float] = {}
    consumed = consumed_log(out / stage.name / "consumed.jsonl", start_step)
    for step in range(start_step + 1, stage.total_steps + 1):
        t_step = time.perf_counter()
        indices = epoch_order(len(train_set), cfg.trainer.seed, position, stage.prompts_per_step)
        position += len(indices)
        rows = [train_set[i] for i in indices]
        batch = stage.make_batch(rows)
        with consumed.open("a") as handle:  # which rows each step used: resume audits
            handle.write(json.dumps({"step": step, "ids": [r["id"] for r in rows]}) + "\n")
        t_train = time.perf_counter()
        metrics = group.run_split("train_step", batch, *stage.step_args(step))[0]
        record = {"policy/grad_norm": metrics["grad_norm"], "policy/lr": metrics["lr"],
                  "timing_s/train": time.perf_counter() - t_train,
                  "faults/group_restarts": progress["restarts"],
                  **stage.step_record(step, metrics)}
        if step % stage.eval_every == 0 or step == stage.total_steps:
            evaluation = stage.evaluate(group, validation)
            record.update(evaluation)
        record["timing_s/step"] = time.perf_counter() - t_step
        # Metrics first: a run killed right after a checkpoint has logged every step it saved.
        tracker.log(record, step)
        if step % stage.checkpoint_every == 0 or step == stage.total_steps:
            folder = checkpoints.save(group, step, {"data_position": position,
                                                    "mlflow_run_id": tracker.run_id})
            tracker.client.set_tag(tracker.run_id, "checkpoint_dir", str(folder.resolve()))
            progress["checkpoint"] = folder
        shown = " ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in record.items()
                         if k in ("policy/loss", "policy/box_attention_mass",
                                  "policy/word_attention_mass", "eval/accuracy",
                                  "eval/keep_ratio"))
        print(f"{stage.name} step {step}/{stage.total_steps} {shown} "
              f"{record['timing_s/step']:.2f}s", flush=True)
    return evaluation

