"""Load on a rollout engine (issue F9 item 6): a burst of ten GRPO batches at once, and a batch
whose responses run to the longest the engine allows, both with KV space for only two
maximum-length sequences. vLLM must queue and preempt within that space - never grow it, fail a
request or crash - and every response must come back whole (log-probs for each token).

The KV space is set in blocks (`num_gpu_blocks_override`, 32 blocks of 32 tokens: 1,024
tokens) because at the tiny model's size even `rollout.cpu_kv_cache_gib=1` holds every request
of the burst at once, and nothing would be under pressure.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipeline.batch import PromptBatch
from pipeline.config import GlimpseConfig, ModelConfig, RolloutConfig, SyntheticConfig, load_config
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow
MAX_MODEL_LEN, KV_BLOCKS = 512, 32
TINY = load_config("configs/tiny.yaml")
BATCH_PROMPTS, GROUP = TINY.trainer.prompts_per_step, TINY.rollout.n  # one GRPO step: 16 x 4


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def _preemptions(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    from actors.rollout import RolloutActor

    cfg = RolloutConfig(n=GROUP, max_new_tokens=TINY.rollout.max_new_tokens,
                        max_model_len=MAX_MODEL_LEN, mask_mode="sampled")
    actor = RolloutActor(str(tiny_model_dir), ModelConfig(), GlimpseConfig(prune_layer=2), cfg,
                         seed=0, num_gpu_blocks_override=KV_BLOCKS, disable_log_stats=False)
    yield actor
    actor.shutdown()


@pytest.fixture(scope="module")
def prompts():
    rows = list(generate_split(SyntheticConfig(num_train=10 * BATCH_PROMPTS), "train"))
    return PromptBatch.from_rows(rows[:10 * BATCH_PROMPTS])


def _kv_blocks(actor) -> int:
    return actor.llm.llm_engine.vllm_config.cache_config.num_gpu_blocks


def test_a_burst_of_ten_batches_is_queued_within_the_kv_space(actor, prompts):
    assert _kv_blocks(actor) == KV_BLOCKS
    preempted, rss = _preemptions(actor.llm), _rss_mib()
    out = actor.generate(prompts, GROUP, seed=1)
    grew = _rss_mib() - rss
    print(f"burst of {len(out.response_ids)} sequences: {_preemptions(actor.llm) - preempted:.0f} "
          f"preemptions, RSS +{grew:.0f} MiB")
    assert len(out.response_ids) == 10 * BATCH_PROMPTS * GROUP
    assert out.extras["error"] == [None] * len(out.response_ids)
    assert all(1 <= len(r) <= TINY.rollout.max_new_tokens for r in out.response_ids)
    assert [len(lp) for lp in out.rollout_logprobs] == [len(r) for r in out.response_ids]
    assert _kv_blocks(actor) == KV_BLOCKS  # queued and preempted within it, not grown
    assert _preemptions(actor.llm) > preempted  # the space really was too small at once
    assert grew < 1024  # the burst's pre-pass outputs and vLLM's queues, not a second cache


def test_responses_at_the_longest_allowed_length_stop_at_max_model_len(actor, prompts):
    old = actor.cfg
    actor.cfg = replace(old, max_new_tokens=MAX_MODEL_LEN)  # more than any prompt leaves
    preempted = _preemptions(actor.llm)
    try:
        out = actor.generate(prompts.take([0, 1, 2, 3]), 2, seed=2)  # 8 x ~330 tokens
    finally:
        actor.cfg = old
    extras = out.extras
    assert extras["error"] == [None] * 8
    capped = [b for b, reason in enumerate(extras["finish_reason"]) if reason == "length"]
    assert len(capped) >= 4  # the random model rarely ends its turn
    for b in capped:  # prompt + response fill the context exactly
        assert extras["prompt_tokens"][b] + len(out.response_ids[b]) == MAX_MODEL_LEN
    assert [len(lp) for lp in out.rollout_logprobs] == [len(r) for r in out.response_ids]
    assert _kv_blocks(actor) == KV_BLOCKS
    assert _preemptions(actor.llm) > preempted  # 8 long sequences in room for 2
