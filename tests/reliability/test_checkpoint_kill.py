"""A training driver SIGKILLed at random moments - inside checkpoint writes too - never leaves a
checkpoint behind `latest` that is half written, never loses a completed one, and its
`consumed.jsonl` reads, after the resume cut, as the uninterrupted run's.

The child process is the driver's checkpoint path without the model: `Checkpointer.save` with a
stand-in group that writes three shard files slowly (so kills land inside the write), re-saves a
step now and then (what a run resumed from an earlier step does), and appends a consumed line
before each step as the drivers do. Kill times are drawn from a seeded generator.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import Checkpointer, consumed_log

CHILD = r"""
import json, sys, time
from pathlib import Path
from pipeline.checkpoint import Checkpointer

class SlowGroup:
    def run(self, method, folder, state):
        shards = Path(folder) / "state"
        shards.mkdir(parents=True)
        for rank in range(3):
            (shards / f"shard{rank}.txt").write_text(json.dumps(state))
            time.sleep(0.02)
        return [None] * 3

root = Path(sys.argv[1])
ckpt = Checkpointer(root / "checkpoints", keep_last=2)
step = 0
while True:
    step += 1
    with (root / "consumed.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": step, "ids": [step * 10, step * 10 + 1]}) + "\n")
    time.sleep(0.01)
    ckpt.save(SlowGroup(), step, {"data_position": step * 2})
    print("saved", step, flush=True)
    if step % 4 == 0:  # a resumed run saving a step again
        ckpt.save(SlowGroup(), step, {"data_position": step * 2})
        print("saved", step, flush=True)
"""


class _Group:
    """Stands in for an ActorGroup whose ranks write their shards at once."""

    def run(self, method, folder, state):
        (Path(folder) / "state").mkdir(parents=True)
        (Path(folder) / "state" / "shard0.txt").write_text(json.dumps(state))
        return [None]


def _kill_at(root, after_s: float) -> int:
    """Runs the child for `after_s` seconds, SIGKILLs it; returns the last step it saved."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE,
                             text=True)
    time.sleep(after_s)
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
    return max(saved, default=0)


@pytest.mark.parametrize("trial", range(6))
def test_a_kill_anywhere_resumes_from_the_last_complete_checkpoint(tmp_path, trial):
    after_s = 1.0 + random.Random(trial).uniform(0.0, 1.5)  # past the child's imports
    last_saved = _kill_at(tmp_path, after_s)
    assert last_saved >= 1, "the child saved nothing: raise the kill time"
    ckpt = Checkpointer(tmp_path / "checkpoints", keep_last=2)
    resumed = ckpt.resolve("latest")
    assert resumed is not None
    step = Checkpointer.meta(resumed)["step"]
    # at least the last save the child finished; at most the one it was inside when killed
    assert last_saved <= step <= last_saved + 1
    shards = sorted((resumed / "state").iterdir())
    assert [s.name for s in shards] == ["shard0.txt", "shard1.txt", "shard2.txt"]
    assert all(json.loads(s.read_text())["step"] == step for s in shards)  # one step, whole
    assert Checkpointer.meta(resumed)["data_position"] == step * 2

    log = consumed_log(tmp_path / "consumed.jsonl", step)
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == list(range(1, step + 1))  # each step once, none after the checkpoint


def test_latest_naming_a_folder_moved_aside_falls_back_to_it(tmp_path):
    """A kill between the two renames of a re-save: `latest` names step N, which is gone, and
    the previous save of step N sits in `.old-stepN`."""
    ckpt = Checkpointer(tmp_path, keep_last=3)
    ckpt.save(_Group(), 1, {})
    ckpt.save(_Group(), 2, {})
    (tmp_path / "step000002").rename(tmp_path / ".old-step000002")
    assert ckpt.resolve("latest") == tmp_path / ".old-step000002"


def test_latest_naming_nothing_complete_is_a_clear_error(tmp_path):
    (tmp_path / "latest").write_text("step000007\n")
    with pytest.raises(FileNotFoundError, match="step000007"):
        Checkpointer(tmp_path, keep_last=2).resolve("latest")


def test_consumed_log_drops_later_steps_and_a_torn_line(tmp_path):
    path = tmp_path / "consumed.jsonl"
    path.write_text("".join(json.dumps({"step": s, "ids": [s]}) + "\n" for s in range(1, 6))
                    + '{"step": 6, "ids": [')
    consumed_log(path, 3)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    consumed_log(path, 0)  # a fresh run starts the record over
    assert path.read_text() == ""
