"""Loading data: the synthetic cache, user JSONL / disk sets, and every bad-row kind."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.data import SKIP_REASONS, DataError, load_split, synthetic_cache_dir


def test_synthetic_splits_are_cached_and_reloaded(small_cfg):
    train, report = load_split(small_cfg.data, "train", small_cfg.output_dir)
    # configs/tiny.yaml: 5 questions per image (fewer when an image has fewer objects)
    assert len(set(train["image_id"])) == 12 and 12 < len(train) <= 60
    assert report.skipped == 0
    folder = synthetic_cache_dir(small_cfg.data, small_cfg.output_dir)
    stamp = (folder / "dataset_dict.json").stat().st_mtime_ns
    again, _ = load_split(small_cfg.data, "train", small_cfg.output_dir)
    assert (folder / "dataset_dict.json").stat().st_mtime_ns == stamp  # not regenerated
    assert again["id"] == train["id"]
    row = again[0]
    assert isinstance(row["image"], Image.Image) and row["image"].size == (224, 224)
    assert len(row["boxes"]) == 1 and len(row["boxes"][0]) == 4
    val, _ = load_split(small_cfg.data, "validation", small_cfg.output_dir)
    assert len(set(val["image_id"])) == 4 and not set(val["image_id"]) & set(train["image_id"])


def _image(path, size=(64, 48), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path.name


def _jsonl_cfg(tmp_path, rows, *extra):
    file = tmp_path / "rows.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path}", "data.source=jsonl", f"data.path={file}",
        f"data.image_root={tmp_path}", *extra])


def test_every_bad_row_kind_is_skipped_and_counted(tmp_path, caplog):
    ok = _image(tmp_path / "ok.png")
    big = _image(tmp_path / "big.png", size=(300, 300))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.new("RGB", (64, 48), (9, 9, 9)).save(tmp_path / "whole.jpg", quality=90)
    whole = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:len(whole) * 2 // 3])  # a truncated download
    good = {"question": "What color?", "answer": "red", "image": ok}
    rows = [
        {**good, "id": "good-1", "boxes": [[0, 0, 10, 10]]},
        {**good, "id": "good-2"},  # no boxes at all is fine
        {**good, "id": "no-image", "image": "missing.png"},
        {**good, "id": "null-image", "image": None},
        {**good, "id": "broken", "image": "broken.png"},
        {**good, "id": "too-big", "image": big},
        {**good, "id": "no-question", "question": "  "},
        {**good, "id": "no-answer", "answer": ""},
        {**good, "id": "bad-box", "boxes": [[10, 10, 5, 20]]},
        {**good, "id": "short-box", "boxes": [[1, 2, 3]]},
        {**good, "id": "outside", "boxes": [[0, 0, 65, 10]]},  # image is 64 wide
        {**good, "id": "jpeg", "image": "whole.jpg"},
        {**good, "id": "cut-jpeg", "image": "cut.jpg"},
        {**good, "id": "essay", "question": "Why? " * 1000},
        {**good, "id": "sliver", "image": _image(tmp_path / "sliver.png", size=(2000, 4))},
        {**good, "id": "listed", "question": ["What", "color?"]},
        {**good, "id": "number-answer", "answer": 7},  # numbers are text enough
        {**good, "id": "placeholder", "question": "What <|image_pad|> colour?"},
        {**good, "id": "turn-end", "answer": "red<|im_end|>"},
    ]
    cfg = _jsonl_cfg(tmp_path, rows, "data.max_image_pixels=10000")
    with open(cfg.data.path, "ab") as file:  # lines that are no row at all
        file.write(b'{"question": "caf\xe9?", "answer": "a", "image": "ok.png"}\n')
        file.write(b"{not json\n")
        file.write(b"[1, 2, 3]\n")
    with caplog.at_level("WARNING"):
        ds, report = load_split(cfg.data, "train", cfg.output_dir)
    assert ds["id"] == ["good-1", "good-2", "jpeg", "number-answer"]
    assert ds[0]["boxes"] == [[0.0, 0.0, 10.0, 10.0]] and ds[1]["boxes"] == []
    assert report.total == 22 and report.skipped == 18
    assert dict(report.counts) == {
        "missing image": 2, "unreadable image": 2, "image over pixel limit": 1,
        "extreme aspect ratio": 1, "question or answer not text": 1,
        "empty question": 1, "question too long": 1, "empty answer": 1, "malformed boxes": 2,
        "box outside image": 1, "line not UTF-8": 1, "line not a JSON object": 2,
        "special-token marker in text": 2}
    assert report.example_ids["line not UTF-8"] == ["rows.jsonl:20"]  # where it is
    assert set(report.counts) == set(SKIP_REASONS)  # every kind exercised
    assert report.example_ids["missing image"] == ["no-image", "null-image"]
    warnings = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(warnings) == 1 and "too-big" in warnings[0]  # reported once, with row ids


def test_all_rows_bad_is_a_clear_error(tmp_path):
    cfg = _jsonl_cfg(tmp_path, [{"question": "q", "answer": "a", "image": "nope.png"}] * 3)
    with pytest.raises(DataError, match="every row .* is bad: 3 missing image"):
        load_split(cfg.data, "train", cfg.output_dir)


def test_visual_cot_layout_reads_as_is(tmp_path):
    (tmp_path / "gqa").mkdir()
    name = _image(tmp_path / "gqa" / "1.jpg", size=(80, 60))
    row = {"question": "<image>\nWhat is on the table?", "answer": "a cup",
           "image": f"gqa/{name}", "width": 80, "height": 60, "bboxs": [[5, 6, 40, 50]],
           "dataset": "gqa"}
    cfg = _jsonl_cfg(tmp_path, [row])
    ds, report = load_split(cfg.data, "train", cfg.output_dir)
    assert report.skipped == 0
    assert ds[0]["question"] == "What is on the table?"
    assert ds[0]["boxes"] == [[5.0, 6.0, 40.0, 50.0]]
    assert ds[0]["image"].size == (80, 60) and ds[0]["dataset"] == "gqa"


def test_split_placeholder_and_missing_file(tmp_path):
    name = _image(tmp_path / "a.png")
    (tmp_path / "val.jsonl").write_text(json.dumps(
        {"question": "q?", "answer": "x", "image": name}) + "\n")
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path}", "data.source=jsonl", f"data.path={tmp_path}/{{split}}.jsonl",
        f"data.image_root={tmp_path}", "data.validation_split=val"])
    ds, _ = load_split(cfg.data, "validation", cfg.output_dir)
    assert len(ds) == 1
    with pytest.raises(DataError, match="train.jsonl"):
        load_split(cfg.data, "train", cfg.output_dir)


def test_disk_source_with_mapped_columns(tmp_path):
    images = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(3)]
    split = datasets.Dataset.from_dict({
        "img": images, "prompt": ["a?", "b?", ""], "label": ["1", "2", "3"],
        "key": ["k0", "k1", "k2"]}).cast_column("img", datasets.Image())
    datasets.DatasetDict({"train": split}).save_to_disk(str(tmp_path / "set"))
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path}", "data.source=disk", f"data.path={tmp_path}/set",
        "data.columns.image=img", "data.columns.question=prompt", "data.columns.answer=label",
        "data.columns.id=key"])
    ds, report = load_split(cfg.data, "train", cfg.output_dir)
    assert ds["id"] == ["k0", "k1"] and ds["question"] == ["a?", "b?"]
    assert report.example_ids == {"empty question": ["k2"]}
    assert ds[1]["image"].getpixel((0, 0)) == (40, 0, 0)
    with pytest.raises(DataError, match="lacks column"):
        load_split(load_config("configs/tiny.yaml", [
            f"output_dir={tmp_path}", "data.source=disk", f"data.path={tmp_path}/set"]).data,
            "train", tmp_path)
