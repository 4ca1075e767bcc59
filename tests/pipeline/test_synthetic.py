"""The synthetic task: deterministic per seed, one answer per question, boxes on the target."""

from __future__ import annotations

import io
import json

import numpy as np

from pipeline.config import SyntheticConfig
from pipeline.synthetic import COLORS, SHAPES, generate_split, task_vocabulary


def _rows(**knobs):
    return list(generate_split(SyntheticConfig(**knobs), "train"))


def _png(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_same_rows_and_pixels():
    a, b = _rows(num_train=6, seed=3), _rows(num_train=6, seed=3)
    assert [r["question"] for r in a] == [r["question"] for r in b]
    assert [_png(r["image"]) for r in a] == [_png(r["image"]) for r in b]


def test_other_seed_other_rows():
    a, b = _rows(num_train=6, seed=3), _rows(num_train=6, seed=4)
    assert [_png(r["image"]) for r in a] != [_png(r["image"]) for r in b]


def test_smaller_split_is_a_prefix():
    short, long = _rows(num_train=3), _rows(num_train=8)
    assert [r["id"] for r in short] == [r["id"] for r in long[:3]]
    assert [_png(r["image"]) for r in short] == [_png(r["image"]) for r in long[:3]]


def test_answers_follow_from_the_objects_and_target_box():
    rows = _rows(num_train=40, questions_per_image=3)
    types = set()
    for row in rows:
        objects = json.loads(row["objects"])
        target = [o for o in objects if [float(v) for v in o["box"]] == row["boxes"][0]]
        assert len(target) == 1, row["id"]
        target = target[0]
        types.add(row["question_type"])
        if row["question_type"] == "color":
            assert row["answer"] == target["color"] and target["kind"] in row["question"]
        elif row["question_type"] == "shape":
            assert row["answer"] == target["kind"] in SHAPES
            assert sum(o["color"] in row["question"] for o in objects) == 1  # unambiguous
        else:
            assert row["answer"] == str(target["digit"]) and target["kind"] == "box"
        colors = [o["color"] for o in objects]
        assert len(set(colors)) == len(colors)  # every object its own colour
        kinds = [o["kind"] for o in objects if o["kind"] != "box"]
        assert len(set(kinds)) == len(kinds)  # every shape kind at most once
    assert types == {"color", "shape", "number"}


def test_target_pixels_carry_the_answer_colour():
    # The target box must contain the object: for a colour question, the box's pixels hold
    # that colour and the pixels outside every object are background.
    for row in _rows(num_train=10):
        if row["question_type"] != "color":
            continue
        x0, y0, x1, y1 = (int(v) for v in row["boxes"][0])
        patch = np.asarray(row["image"])[y0:y1, x0:x1].reshape(-1, 3)
        hits = (np.abs(patch.astype(int) - COLORS[row["answer"]]).sum(axis=1) < 10).mean()
        assert hits > 0.3, row["id"]


def test_question_types_knob_and_vocabulary():
    rows = _rows(num_train=10, question_types=["number"])
    assert {r["question_type"] for r in rows} == {"number"}
    vocab = set(task_vocabulary())
    for row in _rows(num_train=20, questions_per_image=3):
        assert set(row["question"].rstrip("?").split()) <= vocab
        assert row["answer"] in vocab
