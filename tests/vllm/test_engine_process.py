"""Where the vLLM engine runs (`rollout.engine_process`): inline engines share vLLM's
process-wide state, so stopping one must leave the others answering, and a new engine must
start after all have stopped. And its KV block size: vLLM's default for a stock engine, 32 for
a pruned one on a CPU (same tokens either way). CPU, the tiny random model, greedy text-only
prompts.
"""

from __future__ import annotations

import os

import psutil
import pytest

from pipeline.config import ConfigError, ModelConfig, RolloutConfig, load_config

pytestmark = pytest.mark.slow
ROLLOUT = RolloutConfig(max_model_len=256, engine_process="inline")


def _greedy(llm) -> list[int]:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    return list(llm.generate([{"prompt_token_ids": list(range(10, 40))}], params,
                             use_tqdm=False)[0].outputs[0].token_ids)


def test_inline_engines_outlive_each_other(tiny_model_dir):
    from glimpseprune.vllm_engine import start_engine, stop_engine

    children = {p.pid for p in psutil.Process().children(recursive=True)}
    first = start_engine(tiny_model_dir, ModelConfig(), ROLLOUT)
    # inline: no engine-core or worker process was spawned for it
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= children
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0"  # not left set
    expected = _greedy(first)
    # A pruned engine's KV blocks are small enough for its short prompts to fill and share.
    second = start_engine(tiny_model_dir, ModelConfig(), ROLLOUT, pruned=True)
    assert _block_size(first) == 128 and _block_size(second) == 32
    assert _greedy(second) == expected
    stop_engine(first)
    assert _greedy(second) == expected  # the shared state was not torn down under it
    stop_engine(second)
    third = start_engine(tiny_model_dir, ModelConfig(), ROLLOUT)
    try:
        assert _greedy(third) == expected
    finally:
        stop_engine(third)


def _block_size(llm) -> int:
    return llm.llm_engine.vllm_config.cache_config.block_size


def test_kv_block_size_choice():
    from glimpseprune.vllm_engine import kv_block_size

    assert kv_block_size(RolloutConfig(), pruned=True, cuda=False) == 32
    assert kv_block_size(RolloutConfig(), pruned=False, cuda=False) is None  # vLLM's default
    assert kv_block_size(RolloutConfig(), pruned=True, cuda=True) is None
    assert kv_block_size(RolloutConfig(block_size=64), pruned=False, cuda=True) == 64
    with pytest.raises(ConfigError, match="rollout.block_size"):
        load_config("configs/tiny.yaml", ["rollout.block_size=-32"])


def test_engine_process_is_a_closed_choice():
    from glimpseprune.vllm_engine import runs_inline

    assert runs_inline(RolloutConfig(), cuda=False)
    assert not runs_inline(RolloutConfig(), cuda=True)
    assert not runs_inline(RolloutConfig(tensor_parallel_size=2), cuda=False)
    assert not runs_inline(RolloutConfig(engine_process="separate"), cuda=False)
    with pytest.raises(ConfigError, match="rollout.engine_process"):
        load_config("configs/tiny.yaml", ["rollout.engine_process=threads"])
