"""glimpseprune.look refuses keep-rule flags no model can use, before loading anything."""

from __future__ import annotations

import pytest

from glimpseprune.look import main


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
