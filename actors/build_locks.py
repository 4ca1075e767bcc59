"""Stale torch-extension build locks: why a DeepSpeed rank never hangs on one.

DeepSpeed builds its C++ ops just in time (on CPU: `deepspeed_shm_comm`, inside
`deepspeed.init_distributed`) under torch's FileBaton: a `lock` file created exclusively in the
op's build folder and removed when the build is done. A process killed while it holds the lock
leaves the file behind, and every later process waits on it forever, at 0% CPU and with no
message. Each virtual environment gets its own build folder, and `make install` builds the op
there once (`prebuild_ops`), so at run time the lock is held only
for ninja's no-op check, well under a second; `stale_lock_watchdog` removes, with a message, any
lock older than `max_age_s` while its caller starts DeepSpeed. Must not build anything itself
beyond `prebuild_ops`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

MAX_LOCK_AGE_S = 300.0  # far above a real build of these ops on a slow 2-core box (~40 s)


def extensions_root() -> Path:
    """Where torch builds extensions: TORCH_EXTENSIONS_DIR, which this sets (when unset) to a
    folder of this virtual environment. torch's default is one folder per user, shared by every
    checkout: two checkouts' runs would rebuild the op in turn (its sources' paths differ) and
    wait on each other's locks."""
    from torch.utils.cpp_extension import _get_build_directory

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    return Path(_get_build_directory("deepspeed_shm_comm", verbose=False)).parent


def remove_stale_locks(root: Path, max_age_s: float, now: float | None = None) -> list[Path]:
    """Deletes every `<root>/<op>/lock` older than `max_age_s`; returns the paths removed."""
    now = time.time() if now is None else now
    removed = []
    for lock in root.glob("*/lock"):
        try:
            if now - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:  # its owner finished meanwhile
            continue
    for lock in removed:
        print(f"removed a stale torch-extension build lock {lock} (older than {max_age_s:.0f} s: "
              "left by a process killed during a build)", file=sys.stderr, flush=True)
    return removed


@contextlib.contextmanager
def stale_lock_watchdog(root: Path | None = None, max_age_s: float = MAX_LOCK_AGE_S,
                        poll_s: float = 5.0):
    """While the body runs, a daemon thread removes stale build locks every `poll_s` seconds,
    so a FileBaton.wait() inside the body returns instead of waiting forever."""
    root = extensions_root() if root is None else root
    stop = threading.Event()

    def watch() -> None:
        while True:
            remove_stale_locks(root, max_age_s)
            if stop.wait(poll_s):
                return

    thread = threading.Thread(target=watch, name="stale-build-locks", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=poll_s + 1)


def prebuild_ops() -> None:
    """Builds the ops DeepSpeed would build at its first run on this machine (make install)."""
    import deepspeed.ops  # noqa: F401 - registers the compatible ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        with stale_lock_watchdog():
            builder.load()
        print(f"built {builder.NAME}")


if __name__ == "__main__":
    prebuild_ops()
