"""The reward service: scores whole RolloutBatches (a Ray actor in GRPO, a plain object here).

Owns combining the pure reward functions (rewards/functions.py) per the `reward` config:
correctness by `reward.correctness`, `reward.format_weight` x format, and the pruning bonus
`reward.prune_bonus.weight` x (1 - keep_ratio) paid only for a correct answer. Each component is
returned separately so the driver logs `reward/{total,accuracy,prune_bonus,format}`. A scoring
function that raises gives that row 0 and is counted (`errors`); it never stops the run. Rows
that failed in the rollout (extras["error"]) score 0 and are counted too. With
`reward.correctness=judge` an LlmJudge (rewards/judge.py) scores every row's correctness
concurrently; rows it could not answer are scored by its fallback rule and counted
(`judge_fallbacks`).
Must not decode tokens (the driver sends the response texts) nor talk to MLflow.
"""

from __future__ import annotations

import logging

from pipeline.batch import RolloutBatch
from pipeline.config import RewardConfig
from rewards import functions
from rewards.judge import LlmJudge

log = logging.getLogger(__name__)

_CORRECTNESS = {
    "exact": functions.exact_match,
    "numeric": functions.numeric_match,
    "choice": functions.choice_match,
    "anls": functions.anls,
}


class RewardService:
    """Scores rows of a RolloutBatch.

    Args:
        reward_cfg: the `reward` config section.
    """

    def __init__(self, reward_cfg: RewardConfig):
        known = [*_CORRECTNESS, "judge"]
        if reward_cfg.correctness not in known:
            raise ValueError(f"reward.correctness={reward_cfg.correctness!r} is unknown; "
                             f"choose one of {known}")
        self.cfg = reward_cfg
        self.correct = _CORRECTNESS.get(reward_cfg.correctness)
        self.judge = LlmJudge(reward_cfg.judge) if reward_cfg.correctness == "judge" else None

    def _row(self, text: str, reference: str, finished: bool, keep_ratio: float,
             judged: float | None) -> tuple[float, float, float]:
        correct = judged if judged is not None else float(self.correct(text, reference))
        fmt = functions.format_reward(text, finished)
        bonus = functions.prune_bonus(correct, keep_ratio, self.cfg.prune_bonus.weight,
                                      self.cfg.prune_bonus.form)
        return correct, fmt, bonus

    @staticmethod
    def all_failed(rows: int) -> dict[str, list[float] | int]:
        """What `score` returns when none of `rows` rows could be scored: every component 0,
        every row counted as an error."""
        return {"total": [0.0] * rows, "accuracy": [0.0] * rows, "format": [0.0] * rows,
                "prune_bonus": [0.0] * rows, "keep_ratio": [0.0] * rows, "errors": rows,
                "judge_fallbacks": 0}

    def score(self, batch: RolloutBatch, texts: list[str]) -> dict[str, list[float] | int]:
        """Rewards of every row.

        Args:
            batch: the rollout (answers from its prompts; keep counts, finish reasons and
                errors from its extras).
            texts: each row's decoded response.

        Returns:
            per-row lists "total", "accuracy", "format", "prune_bonus", "keep_ratio"; the
            count "errors" of rows scored 0 because scoring or the rollout failed; the count
            "judge_fallbacks" of rows the judge could not answer (0 without a judge).
        """
        out: dict[str, list] = {k: [] for k in ("total", "accuracy", "format", "prune_bonus",
                                                "keep_ratio")}
        errors = 0
        extras = batch.extras
        failed_B = extras.get("error") or [None] * len(texts)
        judged_B: list[float | None] = [None] * len(texts)
        fallbacks = 0
        if self.judge is not None:  # all rows at once: the judge's requests run concurrently
            rows = [i for i in range(len(texts)) if not failed_B[i]]
            prompt_B = batch.prompt_index_B
            verdicts = self.judge.score_many([
                (batch.prompts.questions[prompt_B[i]], texts[i],
                 batch.prompts.answers[prompt_B[i]]) for i in rows])
            for i, (score, source) in zip(rows, verdicts, strict=True):
                judged_B[i] = score
                fallbacks += source != "judge"
        for i, text in enumerate(texts):
            reference = batch.prompts.answers[batch.prompt_index_B[i]]
            visual = (extras.get("visual_tokens") or [None] * len(texts))[i]
            kept = (extras.get("kept_tokens") or [None] * len(texts))[i]
            keep_ratio = 1.0 if not visual else kept / visual
            finished = (extras.get("finish_reason") or ["stop"] * len(texts))[i] == "stop"
            try:
                if failed_B[i]:
                    raise RuntimeError(f"rollout failed: {failed_B[i]}")
                correct, fmt, bonus = self._row(text, reference, finished, keep_ratio,
                                                judged_B[i])
            except Exception as exc:  # one bad row must not stop a long run
                log.warning("reward: row %d scored 0: %s", i, exc)
                errors += 1
                correct = fmt = bonus = 0.0
            out["accuracy"].append(correct)
            out["format"].append(fmt)
            out["prune_bonus"].append(bonus)
            out["keep_ratio"].append(keep_ratio)
            out["total"].append(correct + self.cfg.format_weight * fmt + bonus)
        return {**out, "errors": errors, "judge_fallbacks": fallbacks}
