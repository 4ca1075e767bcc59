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


HARD = dict(scene="cluttered", image_size=336, min_shapes=6, max_shapes=7, min_boxes=2,
            max_boxes=3, pairs_per_image=2, min_object_px=28, max_object_px=44, clutter=40,
            questions_per_image=5,
            question_types=["color", "shape", "number", "number_right_of", "object_left_of"])


def test_cluttered_scene_has_near_duplicates_and_unambiguous_questions():
    from pipeline.synthetic_hard import right_of

    rows = _rows(num_train=30, **HARD)
    assert {r["question_type"] for r in rows} == set(HARD["question_types"])
    repeated_color = repeated_kind = 0
    for row in rows:
        objects = json.loads(row["objects"])
        shapes = [o for o in objects if o["kind"] != "box"]
        boxes = [o for o in objects if o["kind"] == "box"]
        assert len(objects) >= 8, row["id"]  # 6-7 shapes + 2-3 boxes, all placed
        repeated_color += len({o["color"] for o in objects}) < len(objects)
        repeated_kind += len({o["kind"] for o in shapes}) < len(shapes)
        assert len({(o["color"], o["kind"]) for o in shapes}) == len(shapes)
        assert len({o["color"] for o in boxes}) == len(boxes)
        target = [o for o in objects if [float(v) for v in o["box"]] == row["boxes"][0]][0]
        qtype, question = row["question_type"], row["question"]
        if qtype == "number_right_of":
            anchor = [o for o in shapes if [float(v) for v in o["box"]] == row["boxes"][1]][0]
            assert f"the {anchor['color']} {anchor['kind']}?" in question
            assert [b for b in boxes if right_of(b["box"], anchor["box"])] == [target]
            assert row["answer"] == str(target["digit"])
        elif qtype == "object_left_of":
            box = [o for o in boxes if [float(v) for v in o["box"]] == row["boxes"][1]][0]
            assert f"the {box['color']} box?" in question
            assert [o for o in objects if right_of(box["box"], o["box"])] == [target]
            assert row["answer"] == f"{target['color']} {target['kind']}"  # two tokens
        elif qtype == "color":  # the named kind occurs once among the shapes
            assert sum(o["kind"] in question for o in shapes) == 1
            assert row["answer"] == target["color"]
        elif qtype == "shape":  # the named colour occurs once among all objects
            assert sum(o["color"] in question.split() or f"{o['color']}?" in question
                       for o in objects) == 1
            assert row["answer"] == target["kind"]
        else:
            assert row["answer"] == str(target["digit"]) and target["color"] in question
    # Near-duplicates in almost every image: the point of the cluttered scene.
    images = len({r["image_id"] for r in rows})
    assert repeated_color >= 0.8 * len(rows) and repeated_kind >= 0.8 * len(rows), images


def test_cluttered_words_are_task_vocabulary():
    vocab = set(task_vocabulary())
    for row in _rows(num_train=10, **HARD):
        assert set(row["question"].rstrip("?").split()) <= vocab
        assert set(row["answer"].split()) <= vocab


def test_two_step_questions_need_the_cluttered_scene():
    import pytest

    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="scene=cluttered"):
        load_config("configs/tiny.yaml",
                    ["data.synthetic.question_types=[number,number_right_of]"])
