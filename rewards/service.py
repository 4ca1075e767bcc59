"""The reward service: scores whole RolloutBatches (a Ray actor in GRPO, a plain object here).

Owns combining the pure reward functions (rewards/functions.py) per the `reward` config:
correctness by `reward.correctness`, `reward.format_weight` x format, and the pruning bonus
`reward.prune_bonus.weight` x (1 - keep_ratio) paid only for a correct answer. Each component is
returned separately so the driver logs `reward/{total,accuracy,prune_bonus,format}`. A scoring
function that raises gives that row 0 and is counted (`errors`); it never stops the run. Rows
that failed in the rollout (extras["error"]) score 0 and are counted too.
Must not decode tokens (the driver sends the response texts) nor talk to MLflow.
"""

from __future__ import annotations

import logging

from pipeline.batch import RolloutBatch
from pipeline.config import RewardConfig
from rewards import functions

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
        if reward_cfg.correctness not in _CORRECTNESS:
            raise ValueError(f"reward.correctness={reward_cfg.correctness!r} is not available "
                             f"here; choose one of {sorted(_CORRECTNESS)} (the LLM judge is "
                             "not built yet)")
        self.cfg = reward_cfg
        self.correct = _CORRECTNESS[reward_cfg.correctness]

    def _row(self, text: str, reference: str, finished: bool, keep_ratio: float
             ) -> tuple[float, float, float]:
        correct = float(self.correct(text, reference))
        fmt = functions.format_reward(text, finished)
        bonus = functions.prune_bonus(correct, keep_ratio, self.cfg.prune_bonus.weight,
                                      self.cfg.prune_bonus.form)
        return correct, fmt, bonus

    def score(self, batch: RolloutBatch, texts: list[str]) -> dict[str, list[float] | int]:
        """Rewards of every row.

        Args:
            batch: the rollout (answers from its prompts; keep counts, finish reasons and
                errors from its extras).
            texts: each row's decoded response.

        Returns:
            per-row lists "total", "accuracy", "format", "prune_bonus", "keep_ratio", and the
            count "errors" of rows scored 0 because scoring or the rollout failed.
        """
        out: dict[str, list] = {k: [] for k in ("total", "accuracy", "format", "prune_bonus",
                                                "keep_ratio")}
        errors = 0
        extras = batch.extras
        for i, text in enumerate(texts):
            reference = batch.prompts.answers[batch.prompt_index_B[i]]
            visual = (extras.get("visual_tokens") or [None] * len(texts))[i]
            kept = (extras.get("kept_tokens") or [None] * len(texts))[i]
            keep_ratio = 1.0 if not visual else kept / visual
            finished = (extras.get("finish_reason") or ["stop"] * len(texts))[i] == "stop"
            failed = (extras.get("error") or [None] * len(texts))[i]
            try:
                if failed:
                    raise RuntimeError(f"rollout failed: {failed}")
                correct, fmt, bonus = self._row(text, reference, finished, keep_ratio)
            except Exception as exc:  # one bad row must not stop a long run
                log.warning("reward: row %d scored 0: %s", i, exc)
                errors += 1
                correct = fmt = bonus = 0.0
            out["accuracy"].append(correct)
            out["format"].append(fmt)
            out["prune_bonus"].append(bonus)
            out["keep_ratio"].append(keep_ratio)
            out["total"].append(correct + self.cfg.format_weight * fmt + bonus)
        return {**out, "errors": errors}
