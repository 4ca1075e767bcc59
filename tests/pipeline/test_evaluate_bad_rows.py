"""pipeline.evaluate leaves out a row the model's processor refuses, counted by reason, instead
of stopping the whole evaluation at it (issue F9: no per-row isolation)."""

from __future__ import annotations

import pytest


class _RefusesOneQuestion:
    """The embedded processor, except that it raises on one question (a fault the loader's
    checks cannot see, injected)."""

    def __init__(self, processor, bad_question):
        self._processor, self._bad = processor, bad_question
        self.tokenizer = processor.tokenizer

    def __call__(self, *, text, **kwargs):
        if any(self._bad in prompt for prompt in text):
            raise ValueError("cannot resize this image")
        return self._processor(text=text, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self._processor.apply_chat_template(*args, **kwargs)


def test_a_refused_row_is_left_out_and_counted():
    from transformers import AutoProcessor

    from pipeline.config import load_config
    from pipeline.data import DataError, SkipReport
    from pipeline.embedded import EMBEDDED_DIR
    from pipeline.evaluate import drop_unprocessable
    from pipeline.synthetic import generate_split

    cfg = load_config("configs/tiny.yaml", ["data.synthetic.num_test=2"])
    rows = list(generate_split(cfg.data.synthetic, "test"))[:4]
    processor = _RefusesOneQuestion(AutoProcessor.from_pretrained(EMBEDDED_DIR),
                                 rows[1]["question"])
    assert len({r["question"] for r in rows}) == 4
    report = SkipReport(source="synthetic", split="test", total=4)
    kept = drop_unprocessable(processor, rows, report)
    assert [r["id"] for r in kept] == [rows[0]["id"], rows[2]["id"], rows[3]["id"]]
    assert dict(report.counts) == {"processor refused it": 1}
    assert report.example_ids["processor refused it"] == [rows[1]["id"]]
    with pytest.raises(DataError, match="refused every row.*cannot resize"):
        drop_unprocessable(processor, [rows[1]], SkipReport(source="s", split="test"))
