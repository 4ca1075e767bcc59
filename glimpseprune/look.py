"""Look at what a GlimpsePrune model keeps: one image, one question, the answer and a picture.

Owns the command-line inspection tool: it runs the pruned generation on one image and question,
prints a JSON line (answer, kept / total visual tokens, keep ratio, which modules) and writes a
PNG of the image with the kept tokens' cells highlighted and the pruned ones dimmed. Must not
train or change any weights.

    python -m glimpseprune.look --model DIR [--modules DIR] --image PATH --question TEXT [--out DIR]
        [--min-pixels N] [--max-pixels N]

Images are resized into [--min-pixels, --max-pixels] (the `model.min_pixels` / `max_pixels`
defaults unless given), not into the sizes the checkpoint's processor saved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from pipeline.config import GlimpseConfig, ModelConfig


def highlight(image: Image.Image, keep_mask_V: torch.Tensor,
              grid_hw: tuple[int, int]) -> Image.Image:
    """The image with pruned cells dimmed and kept cells outlined (grid over the whole image)."""
    rows, cols = grid_hw
    out = image.convert("RGB")
    if out.width < 4 * cols or out.height < 4 * rows:  # e.g. a 1 x 1 image: cells under a pixel
        out = out.resize((28 * cols, 28 * rows), Image.NEAREST)  # the size the model saw
    shade = Image.new("RGB", out.size, (0, 0, 0))
    dim_mask = Image.new("L", out.size, 0)
    draw_dim = ImageDraw.Draw(dim_mask)
    width, height = out.size
    keep_RC = keep_mask_V.view(rows, cols).tolist()
    boxes = []
    for r in range(rows):
        for c in range(cols):
            box = (c * width / cols, r * height / rows, (c + 1) * width / cols - 1,
                   (r + 1) * height / rows - 1)
            if keep_RC[r][c]:
                boxes.append(box)
            else:
                draw_dim.rectangle(box, fill=150)
    out = Image.composite(shade, out, dim_mask)
    draw = ImageDraw.Draw(out)
    for box in boxes:
        draw.rectangle(box, outline=(255, 215, 0))
    return out


def look(model_dir: str, image_path: str, question: str, out_dir: str,
         modules_dir: str | None = None, max_new_tokens: int = 16, threshold: float = 0.5,
         max_keep_ratio: float | None = None, model_cfg: ModelConfig | None = None) -> dict:
    """Runs one pruned generation and writes the highlight PNG. Returns the printed record.

    `model_cfg` gives the image sizes and trust_remote_code (None: the `model` defaults).
    """
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.processor import image_shape_problem, load_processor
    from pipeline.prompts import prompt_text

    processor = load_processor(model_dir, model_cfg or ModelConfig())
    glimpse_cfg = GlimpseConfig(threshold=threshold, max_keep_ratio=max_keep_ratio)
    try:
        image = Image.open(image_path).convert("RGB")
    except Image.DecompressionBombError as exc:
        raise SystemExit(f"look: image {image_path!r} is too large to open safely: {exc}") \
            from None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"look: cannot read image {image_path!r}: {exc}") from None
    if problem := image_shape_problem(*image.size):
        raise SystemExit(f"look: {image_path!r}: {problem}")
    if modules_dir is None and (Path(model_dir) / "glimpse_modules").is_dir():
        modules_dir = str(Path(model_dir) / "glimpse_modules")  # a stage-2 export carries them
    model = GlimpsePruneModel.from_pretrained(model_dir, glimpse_cfg, modules_path=modules_dir)
    inputs = processor(text=[prompt_text(processor, question)], images=[image],
                       return_tensors="pt")
    result = model.generate(dict(inputs), max_new_tokens=max_new_tokens)
    _, grid_h, grid_w = inputs["image_grid_thw"][0].tolist()
    merge = model.base.config.vision_config.spatial_merge_size
    keep_mask_V = result.keep_masks[0].cpu()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"look_{Path(image_path).stem}.png"
    highlight(image, keep_mask_V[: (grid_h // merge) * (grid_w // merge)],
              (grid_h // merge, grid_w // merge)).save(png)
    kept, total = result.num_kept[0], result.num_visual[0]
    return {"answer": processor.tokenizer.decode(result.tokens[0], skip_special_tokens=True),
            "kept_tokens": kept, "visual_tokens": total, "keep_ratio": kept / max(total, 1),
            "modules": modules_dir or "untrained", "png": str(png)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Show what a GlimpsePrune model keeps.")
    parser.add_argument("--model", required=True, help="base Qwen2.5-VL checkpoint folder")
    parser.add_argument("--modules", default=None, help="saved glimpse modules folder "
                        "(default: MODEL/glimpse_modules when it exists, else untrained)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--out", default=".", help="folder for the PNG (default: here)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=0.5, help="keep = sigmoid > this")
    parser.add_argument("--max-keep-ratio", type=float, default=None, help="cap, e.g. 0.111")
    defaults = ModelConfig()
    parser.add_argument("--min-pixels", type=int, default=defaults.min_pixels,
                        help="resize images up to at least this many pixels (model.min_pixels; "
                        "default %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="resize images down to at most this many pixels (model.max_pixels; "
                        "default %(default)s)")
    args = parser.parse_args(argv)
    # the ranges pipeline.config enforces for glimpse.threshold / glimpse.max_keep_ratio
    if not 0.0 < args.threshold < 1.0:
        parser.error(f"--threshold {args.threshold}: must lie strictly between 0 and 1")
    if args.max_keep_ratio is not None and not 0.0 < args.max_keep_ratio <= 1.0:
        parser.error(f"--max-keep-ratio {args.max_keep_ratio}: must lie in (0, 1]")
    model_cfg = ModelConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    record = look(args.model, args.image, args.question, args.out, args.modules,
                  args.max_new_tokens, args.threshold, args.max_keep_ratio, model_cfg)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
