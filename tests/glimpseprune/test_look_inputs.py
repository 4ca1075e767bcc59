"""glimpseprune.look on inputs a user may give it: impossible flags, tiny and huge images."""

from __future__ import annotations

import pytest
from PIL import Image

from glimpseprune.look import main
from pipeline.embedded import EMBEDDED_DIR


@pytest.mark.parametrize("flags,message", [
    (["--threshold", "2"], "--threshold 2.0"), (["--threshold", "-1"], "--threshold -1.0"),
    (["--max-keep-ratio", "1.5"], "--max-keep-ratio 1.5"),
    (["--max-keep-ratio", "0"], "--max-keep-ratio 0.0"),
])
def test_impossible_keep_rule_flags_stop_with_their_name(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(tmp_path / "nowhere"), "--image", "x.png", "--question", "q",
              *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_one_pixel_image_is_answered_and_drawn(tmp_path, capsys):
    Image.new("RGB", (1, 1), (200, 20, 20)).save(tmp_path / "dot.png")
    main(["--model", str(EMBEDDED_DIR), "--image", str(tmp_path / "dot.png"), "--question",
          "What color is the shape?", "--out", str(tmp_path)])
    assert '"visual_tokens": 4' in capsys.readouterr().out  # resized up to min_pixels
    assert Image.open(tmp_path / "look_dot.png").size == (56, 56)  # the 2 x 2 grid, drawn


def test_a_decompression_bomb_is_refused_with_a_message(tmp_path):
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png")  # 400M pixels, a small file
    with pytest.raises(SystemExit, match="too large to open safely"):
        main(["--model", str(EMBEDDED_DIR), "--image", str(tmp_path / "bomb.png"),
              "--question", "q", "--out", str(tmp_path)])
