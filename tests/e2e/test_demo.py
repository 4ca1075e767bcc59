"""`python -m pipeline.demo` runs on the embedded default and reports what it did."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_and_engines_agree(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--config", "configs/tiny.yaml",
         f"output_dir={tmp_path}", "data.synthetic.num_train=16",
         "data.synthetic.num_validation=6", "data.synthetic.num_test=2", "sft.total_steps=3",
         "sft.eval_every=3", "glimpse.train_steps=2", "glimpse.train_eval_every=2",
         "trainer.eval_samples=4", "trainer.total_steps=1", "trainer.prompts_per_step=2",
         "rollout.n=2"],
        capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== demo: what ran ==" in out.stdout
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    # 6 validation images x 5 questions (configs/tiny.yaml); the demo answers the first 16
    assert summary["validation_questions"] == 16
    # Same weights, greedy, fp32: vLLM and transformers give the same answers token for token.
    assert summary["same_tokens_vllm_vs_transformers"] == 16
    assert 0.0 < summary["chance"] < 0.3
    # ... on the committed embedded base, which answers (measured 16 of 16 when committed)
    assert summary["accuracy_vllm"] >= 0.8 and summary["accuracy_transformers"] >= 0.8
    assert summary["sft"]["steps"] == 3 and summary["glimpse"]["steps"] == 2
    assert summary["grpo"]["steps"] == 1
    assert (tmp_path / "grpo" / "final" / "glimpse_modules").is_dir()
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "glimpse" / "final" / "glimpse_modules").is_dir()
    assert Path(summary["look"]["png"]).is_file()
    # One parent MLflow run with the stages as its children.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("glimpseprune-plus").experiment_id])
    parent = summary["mlflow_parent_run_id"]
    children = {r.data.tags["stage"] for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent}
    assert children == {"sft", "glimpse", "grpo"}


def test_missing_model_path_is_a_clear_error(tmp_path):
    from glimpseprune.tiny import resolve_base_model
    from pipeline.config import ModelConfig

    with pytest.raises(FileNotFoundError, match="model.path .* holds no config.json"):
        resolve_base_model(ModelConfig(path=str(tmp_path / "nowhere")), tmp_path)
