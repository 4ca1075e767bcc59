"""`python -m pipeline.demo` runs on the embedded default and reports what it did."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_and_engines_agree(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.demo", "--config", "configs/tiny.yaml",
         f"output_dir={tmp_path}", "data.synthetic.num_train=8",
         "data.synthetic.num_validation=6", "data.synthetic.num_test=2"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "== demo: what ran ==" in out.stdout
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert summary["validation_questions"] == 6
    # Same weights, greedy, fp32: vLLM and transformers give the same answers token for token.
    assert summary["same_tokens_vllm_vs_transformers"] == 6
    assert 0.0 < summary["chance"] < 0.3
    assert (tmp_path / "tiny_base" / "model.safetensors").is_file()


def test_missing_model_path_is_a_clear_error(tmp_path):
    from glimpseprune.tiny import resolve_base_model
    from pipeline.config import ModelConfig

    with pytest.raises(FileNotFoundError, match="model.path .* holds no config.json"):
        resolve_base_model(ModelConfig(path=str(tmp_path / "nowhere")), tmp_path)
