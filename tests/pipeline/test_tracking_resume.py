"""A run resumed from a checkpoint continues its MLflow run; a checkpoint says which one."""

from __future__ import annotations

from pipeline.checkpoint import Checkpointer
from pipeline.config import load_config
from pipeline.tracking import Tracker


def test_resumed_tracker_reopens_the_run_and_tags_changed_params(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", "trainer.total_steps=2"])
    first = Tracker(cfg, "grpo")
    first.log({"policy/loss": 1.0}, 1)  # then the process is killed: the run stays RUNNING
    longer = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}",
                                               "trainer.total_steps=5"])
    again = Tracker(longer, "grpo", resume_run_id=first.run_id)
    assert again.run_id == first.run_id
    again.log({"policy/loss": 0.5}, 2)
    again.finish()
    run = again.client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.total_steps"] == "2"
    assert run.data.tags["resumed_with/trainer.total_steps"] == "5"
    history = again.client.get_metric_history(first.run_id, "policy/loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    # a run id this store does not have (another tracking server): a new run instead
    other = Tracker(cfg, "grpo", resume_run_id="0" * 32)
    assert other.run_id != first.run_id


def test_checkpoint_meta_is_readable_without_deepspeed(tmp_path):
    class Group:  # stands in for the policy ActorGroup: writes a shard folder
        def run(self, method, folder, state):
            (tmp_path / "ckpt" / ".tmp-step000003" / "state").mkdir(parents=True)

    saved = Checkpointer(tmp_path / "ckpt", keep_last=2).save(
        Group(), 3, {"data_position": 6, "mlflow_run_id": "abc"})
    assert Checkpointer.meta(saved) == {"data_position": 6, "mlflow_run_id": "abc", "step": 3}
    assert Checkpointer.meta(None) == {} and Checkpointer.meta(tmp_path) == {}
