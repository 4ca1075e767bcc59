"""Grounded-VQA data in one schema: the synthetic set and the user's own data.

Owns where rows come from (the seeded synthetic set, cached under <output_dir>/data; a local
`datasets` folder; a hub data set; a JSONL file plus an image folder such as Visual-CoT's), the
mapping of their columns onto the common schema, and the checking of every row: a bad row is
skipped, counted by reason and reported once with its id; a split where every row is bad is an
error. Must not tokenize or touch the model: prompts are built by the stages.

Common schema: id (str), image (datasets Image), question (str), answer (str),
boxes (list of [x0, y0, x1, y1] in the image's pixels; may be empty), plus any extra columns the
source has (the synthetic set adds question_type, image_id and objects).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from glimpseprune.processor import image_shape_problem
from pipeline.config import DataConfig
from pipeline.synthetic import generate_split

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1  # bump when pipeline/synthetic.py draws differently: invalidates caches
SKIP_REASONS = ("missing image", "unreadable image", "image over pixel limit",
                "extreme aspect ratio", "question or answer not text", "empty question",
                "question too long", "empty answer", "malformed boxes", "box outside image",
                "line not UTF-8", "line not a JSON object", "special-token marker in text")
# A chat or vision marker such as <|image_pad|> in a question is read by the tokenizer as the
# token itself: one more image placeholder than images, or a turn ended early.
_SPECIAL_MARKER = re.compile(r"<\|[A-Za-z0-9_]+\|>")
_SKIP = "__skip_reason__"  # a JSONL line that is no row: its reason, counted like a bad row


class DataError(ValueError):
    """The data cannot be used at all (no such file, a missing column, every row bad)."""


@dataclass
class SkipReport:
    """What was skipped while loading one split, by reason, with the first few row ids."""

    source: str
    split: str
    total: int = 0
    counts: Counter = field(default_factory=Counter)
    example_ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, row_id: str) -> None:
        self.counts[reason] += 1
        ids = self.example_ids.setdefault(reason, [])
        if len(ids) < 5:
            ids.append(row_id)

    def summary(self) -> str:
        parts = [f"{n} {reason} (e.g. {', '.join(self.example_ids[reason])})"
                 for reason, n in sorted(self.counts.items())]
        return (f"data: {self.source} split '{self.split}': kept {self.total - self.skipped} of "
                f"{self.total} rows; skipped " + ("; ".join(parts) if parts else "none"))


def _features() -> datasets.Features:
    return datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(),
        "question": datasets.Value("string"), "answer": datasets.Value("string"),
        "boxes": datasets.List(datasets.List(datasets.Value("float32"))),
        "question_type": datasets.Value("string"), "image_id": datasets.Value("string"),
        "objects": datasets.Value("string"),
    })


def synthetic_cache_dir(data_cfg: DataConfig, output_dir: str | Path) -> Path:
    """Where the synthetic set for this config lives: keyed on every generator knob."""
    knobs = json.dumps({"version": GENERATOR_VERSION, **asdict(data_cfg.synthetic)},
                       sort_keys=True)
    digest = hashlib.sha256(knobs.encode()).hexdigest()[:12]
    return Path(output_dir) / "data" / f"synthetic-{digest}"


def build_synthetic(data_cfg: DataConfig, output_dir: str | Path) -> Path:
    """Generates (once) and stores the synthetic train/validation/test splits.

    Returns the `datasets` folder; an existing complete folder for the same knobs is reused.
    The write is atomic (temporary folder, then rename), so a killed run leaves no half set.
    """
    target = synthetic_cache_dir(data_cfg, output_dir)
    if (target / "dataset_dict.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in ("train", "validation", "test"):
        rows, encoded = [], {}
        for row in generate_split(data_cfg.synthetic, split):
            if row["image_id"] not in encoded:  # an image's questions share one encoding
                buffer = io.BytesIO()
                row["image"].save(buffer, format="PNG")  # bytes, not PIL: memory stays small
                encoded = {row["image_id"]: buffer.getvalue()}
            rows.append({**row, "image": {"bytes": encoded[row["image_id"]], "path": None}})
        splits[split] = datasets.Dataset.from_list(rows, features=_features())
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=target.parent))
    datasets.DatasetDict(splits).save_to_disk(str(tmp))
    (tmp / "knobs.json").write_text(json.dumps(asdict(data_cfg.synthetic), indent=2) + "\n")
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _source_dataset(data_cfg: DataConfig, split: str, output_dir: str | Path) -> tuple[Any, str]:
    """The raw rows of a split (a `datasets.Dataset`, or a list of dicts for JSONL) and a label."""
    source, path = data_cfg.source, data_cfg.path
    if source == "synthetic":
        path = str(build_synthetic(data_cfg, output_dir))
        source = "disk"
    if source == "disk":
        if not Path(path).exists():
            raise DataError(f"data.path '{path}' does not exist (data.source=disk)")
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"split '{split}' not in {path}; it has {sorted(loaded)}")
            loaded = loaded[split]
        return loaded, f"disk:{path}"
    if source == "hub":
        return datasets.load_dataset(path, split=split), f"hub:{path}"
    file = Path(path.format(split=split))
    if not file.is_file():
        raise DataError(f"JSONL file '{file}' not found (data.path={path!r}, split {split!r})")
    rows = []
    with file.open("rb") as handle:  # bytes: one bad line must not stop the others
        for line_no, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            where = {"id": f"{file.name}:{line_no}"}
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                rows.append({**where, _SKIP: "line not UTF-8"})
                continue
            except json.JSONDecodeError:
                row = None
            rows.append(row if isinstance(row, dict) else
                        {**where, _SKIP: "line not a JSON object"})
    return rows, f"jsonl:{file}"


def _open_image(value: Any, image_root: str) -> tuple[Image.Image | None, str | None, Any]:
    """Opens an image cell lazily (header only). Returns (image, failure reason, storable value)."""
    if value is None or value == "" or value == {}:
        return None, "missing image", None
    if isinstance(value, Image.Image):
        return value, None, value
    if isinstance(value, dict) and value.get("bytes"):
        try:
            return Image.open(io.BytesIO(value["bytes"])), None, value
        except Exception:
            return None, "unreadable image", None
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str) or not path:
        return None, "missing image", None
    full = Path(image_root, path) if image_root and not os.path.isabs(path) else Path(path)
    if not full.is_file():
        return None, "missing image", None
    try:
        return Image.open(full), None, str(full)
    except Image.DecompressionBombError:
        return None, "image over pixel limit", None
    except Exception:
        return None, "unreadable image", None


def _check_boxes(boxes: Any, width: int, height: int) -> tuple[list | None, str | None]:
    if boxes is None:
        return [], None
    try:
        parsed = [[float(v) for v in box] for box in boxes]
    except (TypeError, ValueError):
        return None, "malformed boxes"
    for x0, y0, x1, y1 in (b if len(b) == 4 else (0, 0, -1, -1) for b in parsed):
        if not (x0 < x1 and y0 < y1):
            return None, "malformed boxes"
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            return None, "box outside image"
    return parsed, None


def _jpeg_is_complete(stored: Any) -> bool:
    """Whether a JPEG file (path) or bytes cell holds its end-of-image marker near its end: a
    truncated download does not, and decoding it later would fail deep inside a stage."""
    if isinstance(stored, dict):
        tail = stored["bytes"][-4096:]
    else:
        with open(stored, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 4096))
            tail = handle.read()
    return b"\xff\xd9" in tail


def check_row(row: dict, data_cfg: DataConfig) -> tuple[dict | None, str | None]:
    """Checks one row already mapped to the common schema.

    Returns (the row ready to store, None) or (None, the skip reason).
    """
    image, reason, stored = _open_image(row.get("image"), data_cfg.image_root)
    if reason:
        return None, reason
    try:
        width, height = image.size
        if width * height > data_cfg.max_image_pixels:
            return None, "image over pixel limit"
        if not isinstance(stored, Image.Image):
            image.verify()  # catches corrupt files (and truncated PNGs) without a full decode
            if image.format == "JPEG" and not _jpeg_is_complete(stored):
                return None, "unreadable image"  # verify() does not read a JPEG's end
    except Exception:
        return None, "unreadable image"
    if image_shape_problem(width, height):
        return None, "extreme aspect ratio"
    if not all(isinstance(row.get(key), (str, int, float, type(None)))
               for key in ("question", "answer")):
        return None, "question or answer not text"  # e.g. a list: str() would accept its repr
    question = str(row.get("question") or "").replace("<image>", "").strip()
    answer = str(row.get("answer") or "").strip()
    if not question:
        return None, "empty question"
    if len(question) > data_cfg.max_question_chars:
        return None, "question too long"
    if not answer:
        return None, "empty answer"
    if _SPECIAL_MARKER.search(question) or _SPECIAL_MARKER.search(answer):
        return None, "special-token marker in text"
    boxes, reason = _check_boxes(row.get("boxes"), width, height)
    if reason:
        return None, reason
    return {**row, "image": stored, "question": question, "answer": answer,
            "boxes": boxes}, None


def _map_columns(row: dict, data_cfg: DataConfig, index: int, split: str) -> dict:
    cols = data_cfg.columns
    mapped = {key: value for key, value in row.items()
              if key not in {cols.id, cols.image, cols.question, cols.answer, cols.boxes}}
    boxes = row.get(cols.boxes, row.get("bboxs"))  # Visual-CoT names the column `bboxs`
    mapped.pop("bboxs", None)
    mapped.update(id=str(row.get(cols.id) or f"{split}-{index}"), image=row.get(cols.image),
                  question=row.get(cols.question), answer=row.get(cols.answer), boxes=boxes)
    return mapped


def load_split(data_cfg: DataConfig, split: str,
               output_dir: str | Path) -> tuple[datasets.Dataset, SkipReport]:
    """Loads one split in the common schema with every bad row skipped and counted.

    Args:
        data_cfg: the `data` config section.
        split: "train", "validation" or "test" (mapped through data.<name>_split).
        output_dir: the run's output folder (the synthetic set is cached under it).

    Returns:
        (the dataset, with `image` decoding to PIL; the skip report, already logged once).

    Raises:
        DataError: the source or split cannot be read, a required column is missing, or every
            row is bad.
    """
    split_name = getattr(data_cfg, f"{split}_split", split)
    raw, label = _source_dataset(data_cfg, split_name, output_dir)
    if isinstance(raw, datasets.Dataset):
        names = set(raw.column_names)
        needed = {data_cfg.columns.image, data_cfg.columns.question, data_cfg.columns.answer}
        if needed - names:
            raise DataError(f"{label} split '{split_name}' lacks column(s) {sorted(needed - names)}"
                            f"; it has {sorted(names)} (map them with data.columns.*)")
        if isinstance(raw.features.get(data_cfg.columns.image), datasets.Image):
            raw = raw.cast_column(data_cfg.columns.image, datasets.Image(decode=False))
    report = SkipReport(source=label, split=split_name)
    good: list[dict] = []
    for index, row in enumerate(raw):
        report.total += 1
        if _SKIP in row:
            report.add(row[_SKIP], row["id"])
            continue
        mapped = _map_columns(row, data_cfg, index, split_name)
        checked, reason = check_row(mapped, data_cfg)
        if reason:
            report.add(reason, mapped["id"])
        else:
            good.append(checked)
    if not good:
        raise DataError(f"every row of {label} split '{split_name}' is bad: "
                        + report.summary().split("skipped ", 1)[1])
    if report.skipped:
        log.warning(report.summary())
    dataset = datasets.Dataset.from_list(good)
    return dataset.cast_column("image", datasets.Image()), report


def epoch_order(num_rows: int, seed: int, position: int, count: int) -> list[int]:
    """Row indices `position .. position + count - 1` of an endless stream of seeded epochs.

    Epoch e is a fixed permutation seeded by (seed, e), so a run resumed at a saved position
    sees exactly the rows an uninterrupted run would, and none twice within an epoch.
    """
    import numpy as np

    out, perms = [], {}
    for p in range(position, position + count):
        epoch, index = divmod(p, num_rows)
        if epoch not in perms:
            perms[epoch] = np.random.default_rng([seed, epoch]).permutation(num_rows)
        out.append(int(perms[epoch][index]))
    return out
