"""The cluttered scenes of the hard embedded task (`data.synthetic.scene: cluttered`).

Owns what makes an answer read off the whole image wrong and pruning useful: many small objects
with near-duplicates (the same shape in other colours, a colour shared by a shape and a box),
grey clutter on the background, adjacent shape-box pairs that two-step questions walk across
("What number is in the box right of the red star?", "What is left of the blue box?" ->
"red star", a two-token answer), and the question types that stay unambiguous in such a scene.
Every question names its target through a combination of attributes that holds for exactly one
object. Must not read or write files; pipeline/synthetic.py dispatches here and draws.

Why the pairs are built, not found: in a random layout "right of" rarely picks one box, so each
pair is placed with a gap of at most PAIR_GAP px and every other object keeps LONE_MARGIN px
from everything; a relation then holds for exactly the built pair (checked, not assumed).
"""

from __future__ import annotations

import numpy as np
from PIL import ImageDraw

from pipeline.config import SyntheticConfig

PAIR_GAP = (2, 4)  # px between a pair's shape and its box
RELATION_GAP = 6  # a box is "right of" a shape when it starts at most this far after it
LONE_MARGIN = 10  # every object not in a pair keeps this far from every other
HARD_TEMPLATES = {
    "number_right_of": "What number is in the box right of the {color} {shape}?",
    "object_left_of": "What is left of the {color} box?",
}


def _free(box, placed, margin: int) -> bool:
    return all(box[2] + margin <= o.box[0] or o.box[2] + margin <= box[0]
               or box[3] + margin <= o.box[1] or o.box[3] + margin <= box[1] for o in placed)


def _spot(rng, size: int, width: int, height: int, placed, margin: int):
    """A free top-left corner for a width x height footprint, or None after 200 tries."""
    if width + 2 * margin > size or height + 2 * margin > size:
        return None
    for _ in range(200):
        x0 = int(rng.integers(margin, size - width - margin + 1))
        y0 = int(rng.integers(margin, size - height - margin + 1))
        if _free((x0, y0, x0 + width, y0 + height), placed, margin):
            return x0, y0
    return None


def make_cluttered_scene(cfg: SyntheticConfig, rng: np.random.Generator) -> list:
    """Shapes with unique (colour, kind) pairs but repeated colours and kinds, boxes with
    distinct colours and digits, `pairs_per_image` of the boxes placed right of a shape."""
    from pipeline.synthetic import BOX_KIND, COLORS, SHAPES, SceneObject

    n_shapes = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
    n_boxes = int(rng.integers(cfg.min_boxes, cfg.max_boxes + 1))
    colors = list(COLORS)
    if n_shapes > len(colors) * len(SHAPES) or n_boxes > len(colors):
        raise ValueError(f"data.synthetic asks for {n_shapes} shapes and {n_boxes} boxes; a "
                         f"cluttered scene has {len(colors) * len(SHAPES)} (colour, shape) "
                         f"pairs and {len(colors)} box colours")
    combos = [(c, k) for c in colors for k in SHAPES]
    shape_ids = rng.permutation(len(combos))[:n_shapes]
    box_colors = list(rng.permutation(colors))[:n_boxes]
    digits = list(rng.permutation(10))[:n_boxes]
    lo, hi = cfg.min_object_px, min(cfg.max_object_px, cfg.image_size // 4)
    objects: list = []
    n_pairs = min(cfg.pairs_per_image, n_boxes, n_shapes)
    for i in range(n_pairs):  # pairs first: they need the most room
        color, kind = combos[shape_ids[i]]
        side, box_side = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1) * 1.2)
        gap = int(rng.integers(PAIR_GAP[0], PAIR_GAP[1] + 1))
        spot = _spot(rng, cfg.image_size, side + gap + box_side, max(side, box_side), objects,
                     LONE_MARGIN)
        if spot is None:
            continue
        x0, y0 = spot
        top = y0 + (max(side, box_side) - side) // 2
        box_top = y0 + (max(side, box_side) - box_side) // 2
        objects.append(SceneObject(kind=kind, color=color, box=(x0, top, x0 + side, top + side)))
        bx = x0 + side + gap
        objects.append(SceneObject(kind=BOX_KIND, color=str(box_colors[i]), digit=int(digits[i]),
                                   box=(bx, box_top, bx + box_side, box_top + box_side)))
    rest = [("shape", j) for j in range(n_pairs, n_shapes)] + \
           [("box", j) for j in range(n_pairs, n_boxes)]
    for what, j in rest:
        side = int(rng.integers(lo, hi + 1) * (1.2 if what == "box" else 1.0))
        spot = _spot(rng, cfg.image_size, side, side, objects, LONE_MARGIN)
        if spot is None:
            continue  # crowded image: fewer objects, never touching ones
        box = (spot[0], spot[1], spot[0] + side, spot[1] + side)
        if what == "box":
            objects.append(SceneObject(kind=BOX_KIND, color=str(box_colors[j]),
                                       digit=int(digits[j]), box=box))
        else:
            color, kind = combos[shape_ids[j]]
            objects.append(SceneObject(kind=kind, color=color, box=box))
    return objects


def draw_clutter(draw: ImageDraw.ImageDraw, cfg: SyntheticConfig,
                 rng: np.random.Generator) -> None:
    """`clutter` short grey strokes and specks on the background (drawn under the objects):
    edges a shortcut detector would fire on, in no colour a question names."""
    for _ in range(cfg.clutter):
        grey = int(rng.integers(110, 190))
        x0, y0 = (int(v) for v in rng.integers(0, cfg.image_size, 2))
        length, width = int(rng.integers(4, 14)), int(rng.integers(1, 3))
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x0 + length, y0 + width], fill=(grey, grey, grey))
        else:
            draw.rectangle([x0, y0, x0 + width, y0 + length], fill=(grey, grey, grey))


def right_of(box, anchor) -> bool:
    """`box` starts within RELATION_GAP px after `anchor` ends and they overlap vertically by at
    least half the smaller height."""
    gap = box[0] - anchor[2]
    overlap = min(box[3], anchor[3]) - max(box[1], anchor[1])
    return 0 <= gap <= RELATION_GAP and overlap >= 0.5 * min(box[3] - box[1],
                                                             anchor[3] - anchor[1])


def cluttered_candidates(cfg: SyntheticConfig, objects: list) -> list[tuple]:
    """Every unambiguous (type, question, answer, target, anchor) of a cluttered scene; the
    anchor is the object a two-step question walks from (None for one-step questions)."""
    from pipeline.synthetic import BOX_KIND, QUESTION_TEMPLATES

    shapes = [o for o in objects if o.kind != BOX_KIND]
    boxes = [o for o in objects if o.kind == BOX_KIND]
    types, out = cfg.question_types, []
    for obj in shapes:
        if "color" in types and sum(o.kind == obj.kind for o in shapes) == 1:
            out.append(("color", QUESTION_TEMPLATES["color"].format(shape=obj.kind), obj.color,
                        obj, None))
        if "shape" in types and sum(o.color == obj.color for o in objects) == 1:
            out.append(("shape", QUESTION_TEMPLATES["shape"].format(color=obj.color), obj.kind,
                        obj, None))
        right = [b for b in boxes if right_of(b.box, obj.box)]
        if "number_right_of" in types and len(right) == 1 and \
                sum(o.kind != BOX_KIND and right_of(right[0].box, o.box) for o in objects) == 1:
            question = HARD_TEMPLATES["number_right_of"].format(color=obj.color, shape=obj.kind)
            out.append(("number_right_of", question, str(right[0].digit), right[0], obj))
    for box in boxes:
        if "number" in types:
            out.append(("number", QUESTION_TEMPLATES["number"].format(color=box.color),
                        str(box.digit), box, None))
        left = [o for o in objects if right_of(box.box, o.box)]
        if "object_left_of" in types and len(left) == 1 and left[0].kind != BOX_KIND:
            out.append(("object_left_of", HARD_TEMPLATES["object_left_of"].format(
                color=box.color), f"{left[0].color} {left[0].kind}", left[0], box))
    return out
