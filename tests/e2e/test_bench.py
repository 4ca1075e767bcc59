"""`python -m pipeline.bench` end to end on a tiny grid: stock vLLM on pixels, then the
RolloutActor with its pre-pass, on the same prompts; the cells, the table and the plot."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_runs_both_sides_on_one_grid(tmp_path):
    cmd = [sys.executable, "-m", "pipeline.bench", "--config", "configs/tiny.yaml",
           "--image-sizes", "224", "--keep-ratios", "0.25", "--group-sizes", "2",
           "--new-tokens", "4", "--mask-modes", "shared,sampled", "--prompts", "2",
           "--rounds", "1", f"output_dir={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    print(done.stdout)  # the table, for a reader of `pytest -s`
    assert done.returncode == 0, done.stderr[-3000:]
    cells = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert [c["mask_mode"] for c in cells] == ["shared", "sampled"]
    for cell in cells:
        pruned, stock = cell["pruned"], cell["stock"]
        # 224 px = 8 x 8 merged tokens; 25% kept = 16. vLLM holds text + kept (pruned) and
        # text + all 64 (stock): the same text on both sides.
        assert (cell["visual_tokens"], cell["kept_tokens"]) == (64, 16)
        assert pruned["kv_tokens"] == cell["text_tokens"] + 16
        assert stock["kv_tokens"] == cell["text_tokens"] + 64
        assert pruned["prepass_s"] > 0 and pruned["seconds"] >= pruned["prepass_s"]
        for key in ("tokens_per_s", "prefill_s", "kv_tokens", "peak_mem_mb"):
            assert math.isfinite(cell["ratio"][key]) and cell["ratio"][key] > 0, key
        assert 0 < cell["predicted"]["tokens_per_s"] < 10
        assert cell["predicted"]["kv_tokens"] == pytest.approx(cell["ratio"]["kv_tokens"])
    assert "224px k0.25 G2 T4 sampled" in (tmp_path / "bench" / "table.txt").read_text()
    assert (tmp_path / "bench" / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
