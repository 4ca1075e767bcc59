"""`pipeline.sft` end to end: MLflow run contents, and a killed run resumed from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

ARGS = ["data.synthetic.num_train=40", "data.synthetic.num_validation=8",
        "data.synthetic.num_test=2", "sft.total_steps=4", "sft.eval_every=2",
        "trainer.eval_samples=8", "checkpoint.every_steps=2", "sft.lr=1e-3",
        "sft.prompts_per_step=4", "sft.checkpoint_every=2", "sft.vision_pretrain_steps=0"]


def _sft(out, *extra, background=False):
    cmd = [sys.executable, "-m", "pipeline.sft", "--config", "configs/tiny.yaml",
           f"output_dir={out}", *ARGS, *extra]
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _client(out):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{out}/mlflow.db")


def _losses(out):
    client = _client(out)
    losses = {}
    for run in client.search_runs([client.get_experiment_by_name("glimpseprune-plus")
                                   .experiment_id], order_by=["attributes.start_time ASC"]):
        for m in client.get_metric_history(run.info.run_id, "policy/loss"):
            losses[m.step] = m.value  # a resumed run's value replaces the killed run's
    return [losses[s] for s in sorted(losses)]


def _consumed(out):
    steps = {}
    for line in (out / "sft" / "consumed.jsonl").read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = record["ids"]
    return steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_a")
    _sft(out)
    return out


def test_mlflow_run_holds_params_metrics_and_a_loadable_model_version(uninterrupted, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    client = _client(uninterrupted)
    run = client.search_runs([client.get_experiment_by_name("glimpseprune-plus")
                              .experiment_id])[0]
    assert run.data.params["sft.total_steps"] == "4"
    assert run.data.tags["stage"] == "sft"
    assert len(client.get_metric_history(run.info.run_id, "policy/loss")) == 4
    assert len(client.get_metric_history(run.info.run_id, "eval/accuracy")) == 2
    # the box-attention term ran (eager attention in training) and reports a mass in (0, 1)
    masses = client.get_metric_history(run.info.run_id, "policy/box_attention_mass")
    assert len(masses) == 4 and all(0 < m.value < 1 for m in masses)
    versions = client.search_model_versions("name='glimpseprune-plus-sft'")
    assert len(versions) == 1 and versions[0].tags["step"] == "4"
    assert versions[0].run_id == run.info.run_id
    import mlflow

    # (mlflow.set_tracking_uri would export MLFLOW_TRACKING_URI to later subprocesses)
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=versions[0].source, dst_path=str(tmp_path),
        tracking_uri=f"sqlite:///{uninterrupted}/mlflow.db")
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(local)
    assert sum(p.numel() for p in model.parameters()) > 1_000_000
    assert (uninterrupted / "checkpoints" / "sft" / "latest").read_text().strip() == "step000004"


def test_killed_run_resumes_with_the_same_losses_and_data(uninterrupted, tmp_path):
    proc = _sft(tmp_path, background=True)
    latest = tmp_path / "checkpoints" / "sft" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and
                                          latest.read_text().strip() == "step000002"):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    assert not (tmp_path / "sft" / "summary.json").exists()  # it really did not finish
    done = _sft(tmp_path, "checkpoint.resume=latest")
    assert "resumed from" in done.stdout
    assert _losses(tmp_path) == pytest.approx(_losses(uninterrupted), abs=1e-6)
    consumed, reference = _consumed(tmp_path), _consumed(uninterrupted)
    assert consumed == reference
    lines = (tmp_path / "sft" / "consumed.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # each step once
    client = _client(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("glimpseprune-plus")
                               .experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the killed run, continued
    first_epoch = [i for s in sorted(consumed) for i in consumed[s]]
    assert len(first_epoch) == len(set(first_epoch))  # 16 of 40 rows: none twice
