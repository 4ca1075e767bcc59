"""`python -m pipeline.evaluate --methods ...` end to end on the embedded default: every method
through both inference forms (transformers exact and vLLM), its files and its MLflow run."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

from pipeline.embedded import EMBEDDED_DIR, MODULES_DIR


def test_methods_through_both_forms(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "pipeline.evaluate", "--config", "configs/tiny.yaml",
           "--model", str(EMBEDDED_DIR), "--modules", str(MODULES_DIR), "--plus",
           str(EMBEDDED_DIR), "--split", "test", "--limit", "8", "--methods", "all",
           f"output_dir={out}", "data.synthetic.num_train=4", "data.synthetic.num_test=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = out / "evaluate" / "test-methods"
    summary = json.loads((folder / "summary.json").read_text())
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    results = {(r["form"], r["setting"]): r for r in summary["results"]}
    matched = summary["matched_keep_ratio"]
    # 2 learned + baseline + 4 fixed-ratio methods x (3 ratios + the matched one), both forms.
    assert len(results) == 2 * (3 + 4 * 4) and len(samples) == 8 * len(results)
    assert 0 < matched < 0.3  # the embedded pruner keeps about 11%
    for form in ("exact", "vllm"):
        assert results[(form, "baseline")]["keep_ratio"] == 1.0
        assert results[(form, "baseline")]["accuracy"] >= 0.75  # the model answers (0.988)
        assert results[(form, "glimpseprune")]["keep_ratio"] < 0.3
        assert results[(form, "fastv@0.111")]["kept_tokens"] == 7  # round(64 / 9)
        assert f"divprune@{matched:.3f}" in {s for f, s in results if f == form}
    by_key = defaultdict(dict)
    for s in samples:
        by_key[(s["setting"], s["id"])][s["form"]] = s
    for (setting, _), pair in by_key.items():
        exact, vllm = pair["exact"], pair["vllm"]
        # The same masks in both forms (the learned ones from each form's own pre-pass), and
        # vLLM's KV cache holds exactly text + kept tokens, as the exact form counts them.
        assert exact["kept_tokens"] == vllm["kept_tokens"], setting
        assert exact["kv_tokens"] == vllm["kv_tokens"], setting
    assert (folder / "accuracy_vs_keep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fastv@0.111" in (folder / "table.txt").read_text()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("glimpseprune-plus").experiment_id])
    run = [r for r in runs if r.data.tags.get("stage") == "evaluate"][0]
    assert run.data.metrics["vllm/baseline/accuracy"] == results[("vllm", "baseline")]["accuracy"]
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluate")}
    assert "evaluate/accuracy_vs_keep.png" in names and "evaluate/samples.jsonl" in names
