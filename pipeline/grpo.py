"""`python -m pipeline.grpo`: stage 2, GlimpsePrune+: GRPO on the model's own pruned inputs.

Owns the driver: where the run starts (a stage-1 or stage-2 export, or an MLflow model version),
starting the roles on Ray (rollout engines, reward service, reference, policy ranks), and the
GRPO step, which reads top to bottom as design.md's "one GRPO step"; every blocking wait is in
`grpo_step`. Also resume, periodic evaluation, checkpoints and the registered stage-2 export.
Must not hold GRPO maths (pipeline/algo.py), model code (glimpseprune/, actors/) or reward rules
(rewards/).

    python -m pipeline.grpo --config configs/tiny.yaml [dotted.key=value ...]
    ray job submit --working-dir . -- python -m pipeline.grpo --config configs/<x>.yaml
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import Config, check_grpo, parse_args


def starting_point(cfg: Config) -> tuple[Path, Path]:
    """(base model folder, glimpse modules folder) that stage 2 starts from.

    `trainer.init_from`: "" = the stage-1 export under <output_dir>/glimpse/final; a folder
    (stage 1: glimpse_modules/ + base_model.txt; stage 2: HF weights + glimpse_modules/); or
    "mlflow:<registered model name>/<version>" (downloaded under <output_dir>/grpo/init).
    `glimpse.modules_path`, when set, names the modules on the base of `model.path`.
    """
    from glimpseprune.tiny import resolve_base_model

    out = Path(cfg.output_dir)
    if cfg.glimpse.modules_path and not cfg.trainer.init_from:
        return resolve_base_model(cfg.model, out), Path(cfg.glimpse.modules_path)
    init = cfg.trainer.init_from
    if init.startswith("mlflow:"):
        folder = _download_version(cfg, init.removeprefix("mlflow:"), out / "grpo" / "init")
    else:
        folder = Path(init) if init else out / "glimpse" / "final"
    if not (folder / "glimpse_modules").is_dir():
        raise FileNotFoundError(
            f"no stage-1 model at {folder} (expected {folder}/glimpse_modules): run "
            "`python -m pipeline.glimpse` first, or set trainer.init_from to a stage-1/2 "
            "export folder or mlflow:<name>/<version>, or glimpse.modules_path")
    if (folder / "config.json").is_file():
        return folder, folder / "glimpse_modules"  # a stage-2 export carries its base
    pointer = folder / "base_model.txt"
    if not pointer.is_file():
        raise FileNotFoundError(f"{folder} has glimpse modules but neither HF weights nor "
                                "base_model.txt naming their base model")
    return Path(pointer.read_text().strip()), folder / "glimpse_modules"


def _download_version(cfg: Config, name_version: str, into: Path) -> Path:
    from mlflow.artifacts import download_artifacts

    from pipeline.tracking import tracking_client, tracking_uri

    name, _, version = name_version.rpartition("/")
    if not name or not version:
        raise ValueError(f"trainer.init_from=mlflow:{name_version}: expected "
                         "mlflow:<registered model name>/<version>")
    uri = tracking_uri(cfg)
    source = tracking_client(cfg).get_model_version(name, version).source
    into.mkdir(parents=True, exist_ok=True)
    return Path(download_artifacts(artifact_uri=source, dst_path=str(into), tracking_uri=uri))


class Roles:
    """The Ray actors of one GRPO run (started in `start`, stopped in `shutdown`)."""

    def __init__(self, cfg: Config, base: Path, glimpse_cfg, total_steps: int):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from actors.group import ActorGroup
        from actors.policy import PolicyActor
        from actors.reference import ReferenceActor
        from actors.rollout import RolloutActor
        from actors.weight_sync import WeightSync
        from rewards.service import RewardService

        p, r, strategy = cfg.policy, cfg.rollout, cfg.cluster.placement_strategy
        # The policy first: under PACK its ranks claim whole nodes before the smaller roles
        # fragment them.
        self.policy = ActorGroup(
            PolicyActor, p.num_ranks, cpus_per_rank=p.cpus_per_rank, gpus_per_rank=p.gpus_per_rank,
            strategy=strategy, resources=dict(p.ray_resources),
            args=(p, cfg.model, str(base), cfg.trainer.seed, total_steps),
            kwargs={"grpo": {"glimpse": glimpse_cfg, "algo": cfg.algo,
                             "mask_temperature": r.mask_temperature}})
        self.reference = None
        if cfg.algo.kl_coef > 0:
            ref = cfg.reference
            self.reference = ActorGroup(
                ReferenceActor, ref.num_ranks, cpus_per_rank=ref.cpus_per_rank,
                gpus_per_rank=ref.gpus_per_rank, strategy=strategy,
                resources=dict(ref.ray_resources),
                args=(ref, cfg.model, glimpse_cfg, str(base)))
        bundle = {"CPU": r.cpus_per_engine, **({"GPU": r.gpus_per_engine} if r.gpus_per_engine
                                               else {}), **dict(r.ray_resources)}
        self.rollout_placement = placement_group([dict(bundle)] * r.num_engines,
                                                 strategy=strategy)
        ray.get(self.rollout_placement.ready(), timeout=600)

        def start_rollout(i: int):
            return ray.remote(RolloutActor).options(
                num_cpus=r.cpus_per_engine, num_gpus=r.gpus_per_engine,
                resources=dict(r.ray_resources) or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.rollout_placement, placement_group_bundle_index=i)
            ).remote(str(base), cfg.model, glimpse_cfg, r, seed=cfg.trainer.seed + i,
                     max_image_pixels=cfg.data.max_image_pixels)

        self._start_rollout = start_rollout
        self.rollouts = [start_rollout(i) for i in range(r.num_engines)]
        self.seed, self.max_restarts = cfg.trainer.seed, r.max_restarts
        self.rollout_restarts = 0  # engines started again after a death, by this Roles
        self.group_restarts = 0  # times the run started every role again (pipeline.grpo.run)
        def start_reward():
            return ray.remote(RewardService).options(
                num_cpus=cfg.reward.cpus_per_worker).remote(cfg.reward)

        self._start_reward = start_reward
        self.rewards = [start_reward() for _ in range(cfg.reward.num_workers)]
        self.reward_timeout_s = cfg.reward.worker_timeout_s
        self.reward_timeouts = 0  # reward workers replaced after a timeout, by this Roles
        self.weight_sync = WeightSync(self.policy, self.rollouts, mode=r.weight_sync,
                                      timeout_s=r.weight_sync_timeout_s)

    def placement(self) -> dict[str, list[str]]:
        """The Ray node id of every rank / engine, from Ray's placement group tables."""
        import ray

        table = ray.util.placement_group_table(self.rollout_placement)
        out = {"policy": self.policy.node_ids(),
               "rollout": [table["bundles_to_node_id"][i] for i in range(len(self.rollouts))]}
        if self.reference is not None:
            out["reference"] = self.reference.node_ids()
        return out

    def generate(self, prompts: PromptBatch, n: int, greedy: bool = False,
                 step: int | None = None) -> RolloutBatch:
        """Prompts split over the engines, generated in parallel, rows back in prompt order.

        `step` seeds each engine's sampling from (trainer.seed, step, engine) alone, so a run
        resumed at a step draws the keep masks the uninterrupted run did. An engine that dies on the
        way is started again with the current weights and its part retried
        (rollout.max_restarts in all)."""
        import numpy as np
        import ray

        def seed(i: int) -> int | None:
            if step is None:
                return None
            return int(np.random.SeedSequence([self.seed, step, i]).generate_state(1)[0])

        parts = [part for part in prompts.split(len(self.rollouts)) if len(part)]
        refs = [engine.generate.remote(part, n, greedy, None, seed(i))
                for i, (engine, part) in enumerate(zip(self.rollouts, parts, strict=False))]
        results = []
        for i, (ref, part) in enumerate(zip(refs, parts, strict=False)):
            while True:
                try:
                    results.append(ray.get(ref))
                    break
                except Exception as exc:  # noqa: BLE001 - only engine deaths are retried
                    if not _engine_died(exc):
                        raise
                    self._restart_rollout(i, exc)
                    ref = self.rollouts[i].generate.remote(part, n, greedy, None, seed(i))
        return RolloutBatch.concat(results)

    def push_weights(self) -> dict[str, float]:
        """weight_sync.push, surviving an engine that dies on the way: each dead engine is
        started again with the policy's current weights (rollout.max_restarts in all) and the
        push repeated, so every engine ends on the same weights."""
        while True:
            try:
                return self.weight_sync.push()
            except Exception as exc:  # noqa: BLE001 - only engine deaths are retried
                if not _engine_died(exc):
                    raise
                dead = self._dead_engines()
                if not dead:
                    raise
                for i in dead:
                    self._restart_rollout(i, exc)

    def _dead_engines(self, timeout_s: float = 60.0) -> list[int]:
        """Engines whose actor or vLLM engine is gone (or that do not answer in time)."""
        import ray

        dead = []
        for i, engine in enumerate(self.rollouts):
            try:
                alive = ray.get(engine.engine_alive.remote(), timeout=timeout_s)
            except Exception:  # noqa: BLE001 - a dead or stuck actor
                alive = False
            if not alive:
                dead.append(i)
        return dead

    def _restart_rollout(self, i: int, cause: Exception) -> None:
        """Engine i died: a new actor in its placement bundle, given the policy's current
        weights. Raises once rollout.max_restarts restarts have been used."""
        import ray

        if self.rollout_restarts >= self.max_restarts:
            raise RuntimeError(f"rollout engine {i} died again after {self.rollout_restarts} "
                               f"restart(s) (rollout.max_restarts={self.max_restarts}): "
                               f"{cause}") from cause
        self.rollout_restarts += 1
        print(f"grpo: rollout engine {i} died ({type(cause).__name__}); starting it again "
              f"(restart {self.rollout_restarts} of at most {self.max_restarts})", flush=True)
        try:
            ray.kill(self.rollouts[i])  # frees its bundle when it is only half dead
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.rollouts[i] = self._start_rollout(i)
        self.weight_sync.replace_actor(i, self.rollouts[i])

    def score(self, rollout: RolloutBatch, texts: list[str]) -> dict:
        """The reward service over all rows (split between its workers), merged."""
        import ray

        from pipeline.batch import _chunks
        from rewards.service import RewardService

        chunks = [c for c in _chunks(len(rollout), len(self.rewards)) if len(c)]
        # The reward service reads no vision-tower outputs: do not ship them to it.
        rollout = replace(rollout, prompts=replace(rollout.prompts, vision=[]))
        refs = [w.score.remote(rollout.take(list(c)), texts[c.start:c.stop])
                for w, c in zip(self.rewards, chunks, strict=False)]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.reward_timeout_s)
        parts = []
        for k, (ref, chunk) in enumerate(zip(refs, chunks, strict=True)):
            if ref in ready:
                parts.append(ray.get(ref))
                continue
            # A hung worker (a deadlocked reward function, say): its rows score 0 and are
            # counted as errors, as rows whose scoring raises are; a new worker takes its place.
            print(f"grpo: reward worker {k} gave no answer in {self.reward_timeout_s:g} s "
                  "(reward.worker_timeout_s); its rows score 0, the worker is replaced",
                  flush=True)
            ray.kill(self.rewards[k])
            self.rewards[k] = self._start_reward()
            self.reward_timeouts += 1
            parts.append(RewardService.all_failed(len(chunk)))
        # per-row lists are joined; counts ("errors", "judge_fallbacks") are summed
        return {k: sum(part[k] for part in parts) if isinstance(parts[0][k], int)
                else [v for part in parts for v in part[k]] for k in parts[0]}

    def dead_actors(self, timeout_s: float = 60.0) -> list[str]:
        """Which actors of the roles are dead (e.g. ["policy rank 1"]), by asking each one;
        an actor still busy after `timeout_s` counts as alive."""
        from actors.group import dead_actors

        named = [(f"policy rank {i}", a) for i, a in enumerate(self.policy.actors)]
        if self.reference is not None:
            named += [(f"reference rank {i}", a) for i, a in enumerate(self.reference.actors)]
        named += [(f"rollout engine {i}", a) for i, a in enumerate(self.rollouts)]
        named += [(f"reward worker {i}", a) for i, a in enumerate(self.rewards)]
        return dead_actors(named, timeout_s)

    def shutdown(self) -> None:
        import ray

        for engine in self.rollouts:
            try:
                ray.get(engine.shutdown.remote(), timeout=60)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
            ray.kill(engine)
        for worker in self.rewards:
            ray.kill(worker)
        for group in (self.reference, self.policy):
            if group is not None:
                group.shutdown()
        ray.util.remove_placement_group(self.rollout_placement)


def _engine_died(exc: Exception) -> bool:
    """Whether a rollout call failed because its actor's process or its vLLM engine died (a
    restart helps), not because of what it was asked (a restart would fail the same way)."""
    from ray.exceptions import RayActorError, RayTaskError

    from actors.rollout import EngineDied

    if isinstance(exc, RayActorError):
        return True
    return isinstance(exc, RayTaskError) and isinstance(exc.cause, EngineDied)


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def grpo_step(cfg: Config, roles: Roles, prompts: PromptBatch, tokenizer,
              step: int | None = None) -> dict[str, float]:
    """One GRPO step, top to bottom; returns its MLflow record. `step` seeds the rollout's
    sampling (see Roles.generate)."""
    import torch

    from actors.group import get_all
    from pipeline import algo

    # 1. Rollout: G samples per prompt, each on its own keep mask (the mask is part of the action).
    t0 = time.perf_counter()
    rollout = roles.generate(prompts, cfg.rollout.n, step=step)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in rollout.response_ids]
    usable = [i for i, err in enumerate(rollout.extras["error"]) if err is None]
    batch = rollout.take(usable)
    t_rollout = time.perf_counter() - t0
    if len(usable) < max(cfg.policy.num_ranks, cfg.reference.num_ranks):
        # Too few rows to give every rank one: no update this step (the driver counts these).
        errors = sorted({e for e in rollout.extras["error"] if e})
        return {"rollout/failed": len(rollout) - len(usable), "policy/skipped_step": 1.0,
                "timing_s/rollout": t_rollout, "faults/rollout_restarts": roles.rollout_restarts,
                "faults/group_restarts": roles.group_restarts, "errors": errors[:3]}

    # 2. In parallel: rewards of every row, reference log-probs on the replayed keep masks.
    ref_refs = roles.reference.submit_split("compute_logprobs", batch) if roles.reference else []
    t1 = time.perf_counter()
    rewards = roles.score(rollout, texts)
    t_reward = time.perf_counter() - t1
    if ref_refs:
        batch.extras["ref_logprobs"] = [lp for part in get_all(ref_refs) for lp in part]
    t_reference = time.perf_counter() - t1  # wall time until the reference was done (it
    # runs beside the reward service, so the two overlap)

    # 3. Advantages within each prompt's group (failed rows were left out and are counted).
    rewards_B = torch.tensor([rewards["total"][i] for i in usable])
    group_B = torch.tensor(batch.prompt_index_B)
    advantages_B = algo.group_advantages(rewards_B, group_B, cfg.algo.advantage,
                                         cfg.algo.advantage_eps)
    if cfg.algo.dynamic_sampling:
        varied = algo.dynamic_sampling_keep(rewards_B, group_B).nonzero().squeeze(-1).tolist()
        if len(varied) >= cfg.policy.num_ranks:  # else train on all: adv 0, only the KL acts
            batch, advantages_B = batch.take(varied), advantages_B[varied]
    batch.advantages_B = advantages_B.tolist()

    # 4. Policy update on every ZeRO-3 rank, then 5. weight sync policy -> rollout engines.
    t2 = time.perf_counter()
    train = roles.policy.run_split("train_step", batch, "grpo")[0]
    t_train = time.perf_counter() - t2
    sync = roles.push_weights()

    extras = rollout.extras
    kept = [k for k, e in zip(extras["kept_tokens"], extras["error"], strict=True) if e is None]
    visual = [v for v, e in zip(extras["visual_tokens"], extras["error"], strict=True)
              if e is None]
    new_tokens = sum(len(rollout.response_ids[i]) for i in usable)
    return {
        "reward/total": _mean(rewards["total"]), "reward/accuracy": _mean(rewards["accuracy"]),
        "reward/prune_bonus": _mean(rewards["prune_bonus"]),
        "reward/format": _mean(rewards["format"]), "reward/errors": rewards["errors"],
        "reward/judge_fallbacks": rewards.get("judge_fallbacks", 0),
        "rollout/keep_ratio": sum(kept) / max(sum(visual), 1),
        # ~0: the samples of a group saw (almost) the same tokens, so the bonus cannot act
        "rollout/keep_ratio_group_std": algo.mean_group_std(
            torch.tensor([k / max(v, 1) for k, v in zip(kept, visual, strict=True)]),
            torch.tensor([rollout.prompt_index_B[i] for i in usable])),
        "rollout/visual_tokens": _mean(visual), "rollout/kept_tokens": _mean(kept),
        "rollout/response_length": new_tokens / max(len(usable), 1),
        "rollout/tokens_per_s": new_tokens / max(extras["generate_s"][0], 1e-9),
        "rollout/failed": len(rollout) - len(usable), "rollout/trained_rows": len(batch),
        "faults/rollout_restarts": roles.rollout_restarts,  # since the roles last started
        "faults/group_restarts": roles.group_restarts,
        "faults/reward_timeouts": roles.reward_timeouts,
        "policy/skipped_step": 0.0,
        "policy/loss": train["loss"], "policy/kl": train["kl"],
        "policy/clip_frac": train["clip_frac"], "policy/grad_norm": train["grad_norm"],
        "policy/lr": train["lr"], "policy/logprob_abs_diff": train["logprob_abs_diff"],
        "policy/vip_loss": train["vip_loss"], "policy/entropy": train["entropy"],
        # the rollout's two halves, on the slowest engine (engines run side by side)
        "timing_s/prepass": max(extras["prepass_s"]),
        "timing_s/generate": max(extras["generate_s"]),
        "timing_s/rollout": t_rollout, "timing_s/reward": t_reward,
        "timing_s/reference": t_reference, "timing_s/train": t_train, **sync}


def evaluate(cfg: Config, roles: Roles, rows: list[dict], tokenizer) -> dict[str, float]:
    """Greedy answers with the keep rule (the deployed behaviour) on held-out rows."""
    return greedy_scores(roles.generate(PromptBatch.from_rows(rows), 1, greedy=True), rows,
                         tokenizer)


def greedy_scores(out, rows: list[dict], tokenizer) -> dict[str, float]:
    """Exact-match accuracy and keep ratio of one greedy answer per row (a RolloutBatch)."""
    from pipeline.prompts import normalise_answer

    hits, kept, visual = [], 0, 0
    for i, ids in enumerate(out.response_ids):
        answer = tokenizer.decode(ids, skip_special_tokens=True)
        hits.append(normalise_answer(answer) == normalise_answer(rows[i]["answer"]))
        kept += out.extras["kept_tokens"][i] or 0
        visual += out.extras["visual_tokens"][i] or 0
    return {"eval/accuracy": sum(hits) / len(rows), "eval/keep_ratio": kept / max(visual, 1)}


MAX_SKIPPED_STEPS = 3  # consecutive steps without an update before the run stops


def _summary_line(step: int, total: int, record: dict) -> str:
    if record["policy/skipped_step"]:
        return (f"grpo step {step}/{total} skipped: {record['rollout/failed']} rollout rows "
                f"failed {record['timing_s/step']:.1f}s")
    return (f"grpo step {step}/{total} reward {record['reward/total']:.3f} "
            f"acc {record['reward/accuracy']:.3f} keep {record['rollout/keep_ratio']:.3f} "
            f"kl {record['policy/kl']:.2e} |dlogp| {record['policy/logprob_abs_diff']:.1e} "
            + (f"eval_acc {record['eval/accuracy']:.3f} " if "eval/accuracy" in record else "")
            + f"{record['timing_s/step']:.1f}s")


def run(cfg: Config, parent_run_id: str | None = None) -> dict:
    """Runs GRPO from the starting point (or a checkpoint) to trainer.total_steps; returns a
    summary (also written to <output_dir>/grpo/summary.json)."""
    from transformers import AutoTokenizer

    from actors.group import count_restart
    from pipeline.checkpoint import Checkpointer
    from pipeline.cluster import check_resources, init_ray
    from pipeline.data import load_split
    from pipeline.tracking import Tracker, tracking_client

    check_grpo(cfg)
    out = Path(cfg.output_dir)
    base, modules = starting_point(cfg)
    glimpse_cfg = replace(cfg.glimpse, modules_path=str(modules))
    train_set, report = load_split(cfg.data, "train", out)
    validation, _ = load_split(cfg.data, "validation", out)
    eval_rows = [validation[i] for i in range(min(cfg.trainer.eval_samples, len(validation)))]
    tokenizer = AutoTokenizer.from_pretrained(base)
    init_ray(cfg.cluster)
    check_resources(cfg)  # before any work: say what the cluster lacks
    checkpoints = Checkpointer(out / "checkpoints" / "grpo", cfg.checkpoint.keep_last)
    resume_from = checkpoints.resolve(cfg.checkpoint.resume, tracking_client(cfg))
    # a resumed run continues the MLflow run that wrote its checkpoint (not a second one)
    tracker = Tracker(cfg, "grpo", parent_run_id,
                      resume_run_id=Checkpointer.meta(resume_from).get("mlflow_run_id"))
    tracker.client.set_tag(tracker.run_id, "init_from", f"{base} + {modules}")
    tracker.log({"data/skipped": report.skipped}, 0)
    total = cfg.trainer.total_steps
    roles = Roles(cfg, base, glimpse_cfg, total)
    placement = roles.placement()  # Ray node id per rank / engine: the record of where work ran
    tracker.client.set_tag(tracker.run_id, "placement", json.dumps(placement))
    progress = {"checkpoint": resume_from}  # the newest complete checkpoint of this run
    try:
        while True:
            try:
                evaluation = _steps(cfg, roles, tracker, checkpoints, progress, train_set,
                                    eval_rows, tokenizer)
                break
            except Exception as exc:  # noqa: BLE001 - only a dead actor is restarted
                # A dead rank often surfaces as its peers' error (gloo: "connection closed by
                # peer"), so the actors themselves are asked who is gone.
                restarts = count_restart("grpo", roles.dead_actors(), roles.group_restarts,
                                         cfg.trainer.max_restarts, exc,
                                         progress["checkpoint"] or "the starting point", "roles")
                roles.shutdown()
                roles = Roles(cfg, base, glimpse_cfg, total)
                roles.group_restarts = restarts
        export = out / "grpo" / "final"
        roles.policy.run("export_hf", str(export))
        tags = {"step": total, "accuracy": evaluation.get("eval/accuracy", ""),
                "keep_ratio": evaluation.get("eval/keep_ratio", "")}
        version = tracker.log_checkpoint(export, "checkpoint",
                                         f"{cfg.tracking.experiment}-grpo", tags)
        summary = {"stage": "grpo", "steps": total, "export": str(export),
                   "mlflow_run_id": tracker.run_id, "model_version": version,
                   "placement": placement, **evaluation}
        (out / "grpo" / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    except BaseException:
        tracker.finish("FAILED")
        roles.shutdown()
        raise
    tracker.finish()
    roles.shutdown()
    return summary


def _steps(cfg: Config, roles: Roles, tracker, checkpoints, progress: dict, train_set,
           eval_rows: list[dict], tokenizer) -> dict[str, float]:
    """The step loop from `progress["checkpoint"]` (None: the starting point) to the end;
    `progress["checkpoint"]` follows each save. Returns the last evaluation."""
    from tqdm import tqdm

    from pipeline.checkpoint import consumed_log
    from pipeline.data import epoch_order

    out, total = Path(cfg.output_dir), cfg.trainer.total_steps
    start, position, resume_from = 0, 0, progress["checkpoint"]
    if resume_from is not None:
        state = roles.policy.run("load_checkpoint", str(resume_from))[0]
        start, position = state["step"], state["data_position"]
    # which rows each step used: resume audits (steps after the checkpoint are rerun)
    consumed = consumed_log(out / "grpo" / "consumed.jsonl", start)
    if resume_from is not None:
        roles.push_weights()  # the engines start from the files, not the checkpoint
        print(f"grpo: resumed from {resume_from} at step {start}", flush=True)
    elif not roles.group_restarts:
        tracker.log(evaluate(cfg, roles, eval_rows, tokenizer), 0)
    evaluation: dict[str, float] = {}
    skipped_in_a_row = 0
    bar = tqdm(range(start + 1, total + 1), desc="grpo", unit="step", initial=start,
               total=total)
    for step in bar:
        t_step = time.perf_counter()
        indices = epoch_order(len(train_set), cfg.trainer.seed, position,
                              cfg.trainer.prompts_per_step)
        position += len(indices)
        prompts = PromptBatch.from_rows([train_set[i] for i in indices])
        with consumed.open("a") as handle:
            handle.write(json.dumps({"step": step, "ids": prompts.ids}) + "\n")
        record = grpo_step(cfg, roles, prompts, tokenizer, step)
        errors = record.pop("errors", [])
        skipped_in_a_row = skipped_in_a_row + 1 if record["policy/skipped_step"] else 0
        if skipped_in_a_row >= MAX_SKIPPED_STEPS:
            raise RuntimeError(f"{skipped_in_a_row} GRPO steps in a row had too few usable "
                               f"rollout rows to train; rollout errors: {errors}")
        if step % cfg.trainer.eval_every == 0 or step == total:
            evaluation = evaluate(cfg, roles, eval_rows, tokenizer)
            record.update(evaluation)
        record["timing_s/step"] = time.perf_counter() - t_step
        tracker.log(record, step)  # before the checkpoint: a resumed run has no gap
        if step % cfg.checkpoint.every_steps == 0 or step == total:
            folder = checkpoints.save(roles.policy, step, {"data_position": position,
                                                           "mlflow_run_id": tracker.run_id})
            progress["checkpoint"] = folder
            tracker.client.set_tag(tracker.run_id, "checkpoint_dir", str(folder.resolve()))
        bar.write(_summary_line(step, total, record))
    return evaluation


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(argv, "Stage 2: GRPO with vLLM rollouts on pruned prompts (GlimpsePrune+).")
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
