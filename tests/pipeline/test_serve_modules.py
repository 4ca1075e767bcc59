"""pipeline.serve refuses to serve an untrained pruner (issue F9: it used to, silently)."""

from __future__ import annotations

import pytest

from pipeline.serve import main


def test_a_base_without_glimpse_modules_is_refused(tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text('{"image": "x.png", "question": "q"}\n')
    # configs/tiny.yaml without model.path: the random tiny base, which carries no modules
    with pytest.raises(SystemExit, match="no glimpse_modules/ and glimpse.modules_path is empty"):
        main(["--config", "configs/tiny.yaml", "--requests", str(requests),
              f"output_dir={tmp_path}"])
