"""Peak memory around a block of work, for the benchmark and the evaluation's columns.

Owns how "peak memory" is measured: CUDA's allocator peak on a GPU; on CPU the largest resident
set of this process and its children (vLLM's engine runs in this process, or in children with
`rollout.engine_process=separate`), sampled every 10 ms by a thread. Must not hold any other
measurement.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch


@contextmanager
def peak_memory(out: dict, key: str = "peak_mem_mb"):
    """Peak memory during the block into out[key], MB: CUDA's allocator peak on a GPU, else the
    largest resident set of this process and its children (a separate vLLM engine's processes),
    sampled every 10 ms."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        yield
        out[key] = torch.cuda.max_memory_allocated() / 2**20
        return
    import psutil

    me, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass  # a child ended between listing and reading
            peak[0] = max(peak[0], total)
            done.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        out[key] = peak[0] / 2**20
