"""The seeded synthetic grounded-VQA task of the embedded default.

Owns the drawing of images (coloured shapes and white boxes holding a seven-segment digit), the
questions whose answer lives in one small region, the target boxes, and the per-object records
that later stages turn into dense per-cell labels. Every image is a pure function of
(seed, split, index), so a split of 100 images is the prefix of a split of 2,000.
Must not read or write files: pipeline/data.py stores and loads the splits.

Why these choices (see shared docs tiny-task.md): every object has its own colour and every shape
kind appears at most once per image, so each question has exactly one answer; the distractors
(other shapes, the other box) make an answer read off the whole image wrong; digits are drawn as
seven-segment glyphs so no font file is needed and the pixels are identical on every machine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import SyntheticConfig

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 190),
    "orange": (245, 130, 20),
    "cyan": (20, 190, 200),
}
SHAPES = ("circle", "square", "triangle", "star")
BOX_KIND = "box"
BACKGROUND = (235, 235, 235)
SPLITS = ("train", "validation", "test")

# Segments a..g of a seven-segment glyph, and the digits that light each of them.
_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}

QUESTION_TEMPLATES = {
    "color": "What color is the {shape}?",
    "shape": "What shape is {color}?",
    "number": "What number is in the {color} box?",
}


def task_vocabulary() -> list[str]:
    """Every word the task's questions and answers use (the easy and the cluttered scenes');
    the tiny tokenizer makes each one token."""
    from pipeline.synthetic_hard import HARD_TEMPLATES

    words = set(COLORS) | set(SHAPES) | {BOX_KIND} | {str(n) for n in range(100)}
    for template in (*QUESTION_TEMPLATES.values(), *HARD_TEMPLATES.values()):
        words |= set(template.replace("?", " ").replace("{", " ").replace("}", " ").split())
    return sorted(words)


def naming_words(question: str) -> list[str]:
    """The words of a synthetic question that name its target object (its colour or kind):
    "What number is in the blue box?" -> ["blue", "box"]; the words that say what is asked
    ("color", "shape", "number") are not among them."""
    names = set(COLORS) | set(SHAPES) | {BOX_KIND}
    return [w for w in question.replace("?", " ").split() if w in names]


@dataclass
class SceneObject:
    kind: str  # one of SHAPES or "box"
    color: str
    box: tuple[int, int, int, int]  # xyxy pixels, inclusive-exclusive
    digit: int = -1  # boxes only

    def as_dict(self) -> dict:
        return {"kind": self.kind, "color": self.color, "box": list(self.box),
                "digit": self.digit}


def _draw_digit(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], digit: int) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    t = max(2, int(min(w, h) * 0.12))  # stroke thickness
    left, right = x0 + w * 0.28, x1 - w * 0.28
    top, mid, bottom = y0 + h * 0.2, y0 + h * 0.5, y1 - h * 0.2
    segments = {
        "a": (left, top, right, top), "g": (left, mid, right, mid),
        "d": (left, bottom, right, bottom), "f": (left, top, left, mid),
        "b": (right, top, right, mid), "e": (left, mid, left, bottom),
        "c": (right, mid, right, bottom),
    }
    for name in _SEGMENTS[digit]:
        sx0, sy0, sx1, sy1 = segments[name]
        draw.rectangle([sx0 - t / 2, sy0 - t / 2, sx1 + t / 2, sy1 + t / 2], fill=(20, 20, 20))


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x0, y0, x1, y1 = obj.box
    rgb = COLORS[obj.color]
    if obj.kind == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif obj.kind == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
    elif obj.kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=rgb)
    elif obj.kind == "star":
        cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        draw.polygon([(cx + rr * np.cos(a), cy - rr * np.sin(a))
                      for a, rr in zip(angles, radii, strict=True)], fill=rgb)
    else:  # a white box with a coloured border and a digit inside
        border = max(3, (x1 - x0) // 12)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=rgb)
        draw.rectangle([x0 + border, y0 + border, x1 - 1 - border, y1 - 1 - border],
                       fill=(255, 255, 255))
        _draw_digit(draw, obj.box, obj.digit)


def _place(rng: np.random.Generator, size: int, placed: list[SceneObject], lo: int,
           hi: int) -> tuple[int, int, int, int] | None:
    """A random square spot that keeps a margin from every placed object; None if none found."""
    margin = 6
    for _ in range(200):
        side = int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(margin, size - side - margin + 1))
        y0 = int(rng.integers(margin, size - side - margin + 1))
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + margin <= o.box[0] or o.box[2] + margin <= box[0]
               or box[3] + margin <= o.box[1] or o.box[3] + margin <= box[1] for o in placed):
            return box
    return None


def make_scene(cfg: SyntheticConfig, rng: np.random.Generator) -> list[SceneObject]:
    """Draws the objects of one image: distinct colours, distinct shape kinds, distinct digits."""
    n_shapes = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    n_boxes = int(rng.integers(cfg.min_boxes, cfg.max_boxes + 1))
    if n_shapes > len(SHAPES) or n_shapes + n_boxes > len(COLORS):
        raise ValueError(f"data.synthetic asks for {n_shapes} shapes and {n_boxes} boxes; at most "
                         f"{len(SHAPES)} shapes and {len(COLORS)} objects fit one image")
    colors = list(rng.permutation(list(COLORS)))
    kinds = list(rng.permutation(list(SHAPES)))[:n_shapes] + [BOX_KIND] * n_boxes
    digits = list(rng.permutation(10))
    objects: list[SceneObject] = []
    for i, kind in enumerate(kinds):
        # Boxes are drawn a little larger so their digit stays legible after the 14 px patching.
        lo, hi = (cfg.min_object_px, cfg.max_object_px)
        if kind == BOX_KIND:
            lo, hi = int(lo * 1.2), int(hi * 1.2)
        box = _place(rng, cfg.image_size, objects, lo, min(hi, cfg.image_size // 2))
        if box is None:
            continue  # crowded image: fewer objects, never overlapping ones
        digit = int(digits[i]) if kind == BOX_KIND else -1
        objects.append(SceneObject(kind=kind, color=str(colors[i]), box=box, digit=digit))
    return objects


def render(cfg: SyntheticConfig, objects: list[SceneObject],
           rng: np.random.Generator) -> Image.Image:
    from pipeline.synthetic_hard import draw_clutter

    canvas = np.empty((cfg.image_size, cfg.image_size, 3), dtype=np.float32)
    canvas[:] = BACKGROUND
    if cfg.background_noise > 0:
        canvas += rng.normal(0.0, cfg.background_noise, size=canvas.shape)
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    draw_clutter(draw, cfg, rng)
    for obj in objects:
        draw_object(draw, obj)
    return image


def _distinct_candidates(cfg: SyntheticConfig, objects: list[SceneObject]) -> list[tuple]:
    candidates = []
    for obj in objects:
        if obj.kind == BOX_KIND:
            if "number" in cfg.question_types:
                candidates.append(("number", QUESTION_TEMPLATES["number"].format(color=obj.color),
                                   str(obj.digit), obj, None))
            continue
        if "color" in cfg.question_types:
            candidates.append(("color", QUESTION_TEMPLATES["color"].format(shape=obj.kind),
                               obj.color, obj, None))
        if "shape" in cfg.question_types:
            candidates.append(("shape", QUESTION_TEMPLATES["shape"].format(color=obj.color),
                               obj.kind, obj, None))
    return candidates


def make_questions(cfg: SyntheticConfig, objects: list[SceneObject],
                   rng: np.random.Generator) -> list[tuple]:
    """Up to `questions_per_image` distinct (type, question, answer, target, anchor) tuples;
    the anchor is the object a two-step question starts from (None for one-step ones)."""
    from pipeline.synthetic_hard import cluttered_candidates

    candidates = (cluttered_candidates(cfg, objects) if cfg.scene == "cluttered"
                  else _distinct_candidates(cfg, objects))
    # Pick a question type first, then a question of that type, so types stay balanced even
    # though an image has more shapes than boxes.
    by_type: dict[str, list] = {}
    for cand in candidates:
        by_type.setdefault(cand[0], []).append(cand)
    chosen = []
    while by_type and len(chosen) < cfg.questions_per_image:
        qtype = sorted(by_type)[int(rng.integers(len(by_type)))]
        pool = by_type[qtype]
        chosen.append(pool.pop(int(rng.integers(len(pool)))))
        if not pool:
            del by_type[qtype]
    return chosen


def generate_split(cfg: SyntheticConfig, split: str) -> Iterator[dict]:
    """Yields the rows of one split in the common schema (plus task fields).

    Row fields: id, image (PIL), question, answer, boxes (list of xyxy pixel boxes: the target,
    then the anchor of a two-step question, since both are needed to answer it),
    question_type, image_id, objects (JSON list of every object in the image).
    """
    from pipeline.synthetic_hard import make_cluttered_scene

    count = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}[split]
    for index in range(count):
        rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
        objects = (make_cluttered_scene(cfg, rng) if cfg.scene == "cluttered"
                   else make_scene(cfg, rng))
        image = render(cfg, objects, rng)
        objects_json = json.dumps([o.as_dict() for o in objects])
        for q, (qtype, question, answer, target, anchor) in enumerate(
                make_questions(cfg, objects, rng)):
            yield {
                "id": f"{split}-{index:06d}-q{q}",
                "image": image,
                "question": question,
                "answer": answer,
                "boxes": [[float(v) for v in o.box] for o in (target, anchor) if o],
                "question_type": qtype,
                "image_id": f"{split}-{index:06d}",
                "objects": objects_json,
            }
