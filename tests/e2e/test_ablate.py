"""`python -m pipeline.ablate` end to end at a toy budget: plain GRPO (every token kept) and
the more-SFT control from the embedded default, their child runs under one MLflow parent, the
summary with test accuracy per arm, and the curves plot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.embedded import EMBEDDED_DIR

pytestmark = pytest.mark.slow


def test_ablate_full_grpo_and_sft_arms(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "pipeline.ablate", "--config", "configs/tiny.yaml",
           "--init", str(EMBEDDED_DIR), "--seeds", "0", "--arms", "full,sft_more",
           "--sft-steps", "2", "--test-limit", "4", f"output_dir={tmp_path}",
           "data.synthetic.num_train=8", "data.synthetic.num_validation=4",
           "data.synthetic.num_test=2", "trainer.total_steps=2", "trainer.prompts_per_step=2",
           "rollout.n=2", "trainer.eval_samples=4", "trainer.eval_every=1",
           "sft.prompts_per_step=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((tmp_path / "ablate" / "summary.json").read_text())
    assert set(summary["arms"]) == {"full", "sft_more"}
    full = summary["runs"]["full"][0]
    # Plain GRPO never prunes: its model still has stage 1's modules, and the exact-form test
    # figure with the keep rule is there beside the unpruned one.
    assert 0 <= full["test/accuracy_pruned"] <= 1 and 0 < full["test/keep_ratio"] < 1
    # ... and the vLLM form's (every layer on the kept tokens only): the same keep rule, so the
    # same kept tokens up to the pre-pass's round-off
    assert 0 <= full["test/accuracy_pruned_vllm"] <= 1
    assert full["test/keep_ratio_vllm"] == pytest.approx(full["test/keep_ratio"], abs=0.02)
    assert "test/accuracy_pruned_vllm" in summary["arms"]["full"]
    assert summary["runs"]["sft_more"][0]["sft_steps"] == 2
    assert summary["base"]["test/accuracy_unpruned"] >= 0.5  # the embedded model answers
    assert (tmp_path / "ablate" / "curves.png").read_bytes()[:4] == b"\x89PNG"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("glimpseprune-plus")
    runs = client.search_runs([experiment.experiment_id])
    parent = [r for r in runs if r.data.tags.get("stage") == "ablate"][0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in children) == ["grpo", "sft"]
    grpo = [r for r in children if r.data.tags["stage"] == "grpo"][0]
    assert grpo.data.params["rollout.mask_mode"] == "full"
    assert grpo.data.metrics["eval/keep_ratio"] == 1.0  # every token, in evaluation too
    assert "full/test/accuracy_pruned_mean" in parent.data.metrics

    # The same command again (as after an interruption) reuses both finished runs: no new
    # child run, the same figures; another budget in the same folder is refused.
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
    assert again.stdout.count("reused") == 2
    resumed = json.loads((tmp_path / "ablate" / "summary.json").read_text())
    assert resumed["runs"] == summary["runs"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["stage"] for r in runs if r.data.tags.get("stage") != "ablate") \
        == ["grpo", "sft"]
    other = subprocess.run(cmd[:-1] + ["sft.prompts_per_step=3"], capture_output=True,
                           text=True, timeout=900, env=env)
    assert other.returncode != 0 and "another output_dir" in other.stderr
