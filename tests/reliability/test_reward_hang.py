"""A reward worker that hangs (a deadlocked reward function) holds a GRPO step for at most
reward.worker_timeout_s: its rows score 0 and count as errors, the worker is replaced, and the
next step is scored by the new one. Roles.score on a private local Ray, with stand-in reward
workers (one that never answers, and the real RewardService as the replacement)."""

from __future__ import annotations

import sys
import time

import pytest

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import RewardConfig, SyntheticConfig
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow


class _Hung:
    def score(self, batch, texts):
        time.sleep(3600)


def _rollout(rows: int) -> tuple[RolloutBatch, list[str]]:
    prompts = PromptBatch.from_rows(list(generate_split(SyntheticConfig(num_train=rows),
                                                        "train")))
    batch = RolloutBatch(prompts=prompts, prompt_index_B=list(range(rows)),
                         response_ids=[[1]] * rows,
                         extras={"error": [None] * rows, "visual_tokens": [64] * rows,
                                 "kept_tokens": [8] * rows, "finish_reason": ["stop"] * rows})
    return batch, [prompts.answers[i] for i in range(rows)]  # every answer right


def test_a_hung_reward_worker_costs_one_timeout_and_is_replaced():
    import ray
    from ray import cloudpickle

    from pipeline.cluster import init_ray
    from pipeline.config import ClusterConfig
    from pipeline.grpo import Roles
    from rewards.service import RewardService

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # _Hung, for Ray's workers
    init_ray(ClusterConfig(num_cpus=4), log_to_driver=False)
    try:
        roles = Roles.__new__(Roles)  # only the reward side of the roles
        roles.rewards = [ray.remote(_Hung).remote()]
        roles._start_reward = lambda: ray.remote(RewardService).remote(RewardConfig())
        roles.reward_timeout_s, roles.reward_timeouts = 2.0, 0
        batch, texts = _rollout(3)
        start = time.monotonic()
        hung = roles.score(batch, texts)
        waited = time.monotonic() - start
        assert 2.0 <= waited < 30, waited  # bounded by the timeout, not the hang
        assert hung["total"] == [0.0] * 3 and hung["errors"] == 3
        assert roles.reward_timeouts == 1
        # The replacement answers (once started: a new worker process imports torch, which on
        # a loaded 2-core box can take longer than this test's 2-s timeout by itself).
        ray.get(roles.rewards[0].__ray_ready__.remote(), timeout=120)
        scored = roles.score(batch, texts)
        assert scored["errors"] == 0 and scored["accuracy"] == [1.0] * 3
        assert roles.reward_timeouts == 1
    finally:
        ray.shutdown()
