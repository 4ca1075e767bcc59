"""A torch-extension build lock left by a killed process no longer hangs DeepSpeed's start."""

from __future__ import annotations

import os
import threading
import time

from torch.utils.file_baton import FileBaton

from actors.build_locks import extensions_root, remove_stale_locks, stale_lock_watchdog


def _lock(root, op: str, age_s: float):
    (root / op).mkdir(parents=True)
    lock = root / op / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


def test_only_old_locks_are_removed(tmp_path):
    stale, fresh = _lock(tmp_path, "dead_op", 900), _lock(tmp_path, "busy_op", 2)
    assert remove_stale_locks(tmp_path, max_age_s=300) == [stale]
    assert not stale.exists() and fresh.exists()


def test_a_waiter_on_a_dead_lock_is_released(tmp_path):
    """What torch does when another process holds the lock: FileBaton.wait() until it goes."""
    stale = _lock(tmp_path, "deepspeed_shm_comm", 900)
    done = threading.Event()
    with stale_lock_watchdog(tmp_path, max_age_s=300, poll_s=0.05):
        waiter = threading.Thread(target=lambda: (FileBaton(str(stale)).wait(), done.set()),
                                  daemon=True)
        waiter.start()
        assert done.wait(timeout=10), "FileBaton.wait() still blocked on a stale lock"
    without = _lock(tmp_path, "other_op", 900)  # no watchdog: it would wait forever
    blocked = threading.Thread(target=FileBaton(str(without), wait_seconds=0.01).wait,
                               daemon=True)
    blocked.start()
    blocked.join(timeout=0.5)
    assert blocked.is_alive()
    without.unlink()
    blocked.join(timeout=5)


def test_the_root_is_torchs_extension_folder_of_this_venv(monkeypatch, tmp_path):
    import sys
    from pathlib import Path

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extensions_root() == tmp_path  # a user's own choice stays
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert extensions_root() == Path(sys.prefix) / "torch_extensions"
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(Path(sys.prefix) / "torch_extensions")
