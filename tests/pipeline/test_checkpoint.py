"""Checkpoint folders: atomic save, `latest`, rotation, and every form of checkpoint.resume."""

from __future__ import annotations

import pytest

from pipeline.checkpoint import Checkpointer


class _FakeGroup:
    """Stands in for an ActorGroup: each 'rank' writes a shard file like DeepSpeed would."""

    def __init__(self, fail_at_step=None):
        self.fail_at_step = fail_at_step

    def run(self, method, folder, state):
        assert method == "save_checkpoint"
        from pathlib import Path

        (Path(folder) / "state").mkdir(parents=True)
        if state["step"] == self.fail_at_step:
            raise RuntimeError("rank died mid-save")
        (Path(folder) / "state" / "shard0.pt").write_text(str(state))
        return [None]


def test_save_rotates_and_points_latest(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (10, 20, 30):
        ckpt.save(_FakeGroup(), step, {"data_position": step * 8})
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step000020", "step000030"]
    assert ckpt.resolve("latest") == tmp_path / "step000030"
    assert "'data_position': 240" in (tmp_path / "step000030/state/shard0.pt").read_text()


def test_failed_save_leaves_latest_on_the_last_good_one(tmp_path):
    ckpt = Checkpointer(tmp_path, keep_last=3)
    ckpt.save(_FakeGroup(), 10, {})
    with pytest.raises(RuntimeError):
        ckpt.save(_FakeGroup(fail_at_step=20), 20, {})
    assert ckpt.resolve("latest") == tmp_path / "step000010"
    assert not (tmp_path / "step000020").exists()  # only a hidden temporary folder


def test_resolve_forms(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep_last=1)
    assert ckpt.resolve("") is None
    assert ckpt.resolve("latest") is None  # nothing saved yet: start fresh
    saved = ckpt.save(_FakeGroup(), 5, {})
    assert ckpt.resolve(str(saved)) == saved
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        ckpt.resolve(str(tmp_path))

    class _Run:
        class data:  # noqa: N801 - mimics MlflowClient.get_run(...).data
            tags = {"checkpoint_dir": str(saved)}

    class _Client:
        def get_run(self, run_id):
            assert run_id == "abc123"
            return _Run()

    assert ckpt.resolve("mlflow:abc123", _Client()) == saved
