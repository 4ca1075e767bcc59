"""`pipeline.glimpse` (stage 1) end to end: figures reported, modules registered and loadable."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow


def test_stage1_run_reports_and_registers_loadable_modules(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.glimpse", "--config", "configs/tiny.yaml",
           f"output_dir={tmp_path}", "data.synthetic.num_train=32",
           "data.synthetic.num_validation=8", "data.synthetic.num_test=2",
           "glimpse.train_steps=3", "glimpse.train_eval_every=3", "glimpse.train_lr=1e-3",
           "glimpse.train_prompts_per_step=4", "policy.micro_batch_size=2",
           "trainer.eval_samples=8"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "glimpse" / "summary.json").read_text())
    for key in ("eval/accuracy", "eval/accuracy_unpruned", "eval/keep_ratio", "eval/box_recall"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["eval/keep_ratio"] < 1.0  # the keep rule dropped something

    import mlflow
    from mlflow.tracking import MlflowClient

    from glimpseprune.model import GlimpsePruneModel
    from pipeline.config import load_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    version = MlflowClient(uri).search_model_versions("name='glimpseprune-plus-glimpse'")[0]
    assert version.tags["stage"] == "glimpse" and version.tags["step"] == "3"
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                dst_path=str(tmp_path / "dl"), tracking_uri=uri)
    cfg = load_config("configs/tiny.yaml")
    loaded = GlimpsePruneModel.from_pretrained(tmp_path / "tiny_base", cfg.glimpse,
                                               modules_path=f"{local}/glimpse_modules")
    fresh = GlimpsePruneModel.from_pretrained(tmp_path / "tiny_base", cfg.glimpse, seed=0)
    trained = dict(loaded.glimpse_modules.named_parameters())
    assert any(not torch.equal(p, trained[k])
               for k, p in fresh.glimpse_modules.named_parameters())
