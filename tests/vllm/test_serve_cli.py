"""`python -m pipeline.serve` answers a JSONL file end to end; a bad line fails alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from pipeline.config import SyntheticConfig
from pipeline.embedded import EMBEDDED_DIR
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow


def test_serve_answers_each_request_and_reports_bad_ones(tmp_path):
    rows = list(generate_split(SyntheticConfig(num_train=2), "train"))
    lines = []
    for i, row in enumerate(rows):
        row["image"].save(tmp_path / f"img{i}.png")
        lines.append({"id": f"r{i}", "image": f"img{i}.png", "question": row["question"]})
    lines.append({"id": "missing", "image": "nope.png", "question": "What color is it?"})
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 400M pixels, a small file
    lines.append({"id": "bomb", "image": "bomb.png", "question": "What color is it?"})
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines) + "{not json\n")
    out = tmp_path / "answers.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.serve", "--config", "configs/tiny.yaml",
         "--requests", str(requests), "--out", str(out), f"output_dir={tmp_path}",
         f"model.path={EMBEDDED_DIR}", "rollout.max_new_tokens=4"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"glimpse modules {EMBEDDED_DIR}/glimpse_modules" in done.stderr  # trained, not new
    answers = {a["id"]: a for a in map(json.loads, out.read_text().splitlines())}
    assert set(answers) == {"r0", "r1", "missing", "bomb", "5"}
    assert "DecompressionBombError" in answers["bomb"]["error"]
    assert "line 5 is not a UTF-8 JSON object" in answers["5"]["error"]
    for key in ("r0", "r1"):
        assert answers[key]["error"] is None
        # configs/tiny.yaml's max_pixels (224 x 224) resizes the 448 px images: 8 x 8 tokens
        assert answers[key]["visual_tokens"] == 64
        assert 1 <= answers[key]["kept_tokens"] <= 64
    assert "nope.png" in answers["missing"]["error"]
