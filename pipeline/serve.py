"""Answer a file of image questions through the glimpse pre-pass and vLLM on the kept tokens.

Owns the JSONL request/answer format of offline serving: each request line is
`{"image": PATH, "question": TEXT}` (optional "id"; a relative PATH is read from the request
file's folder), each answer line adds "answer", "kept_tokens", "visual_tokens",
"prompt_tokens", "finish_reason" and "error" (null, or why that request failed; the others
are still answered). Greedy decoding with the keep rule (actors.rollout.RolloutActor).
Must not train or score.

    python -m pipeline.serve --config configs/tiny.yaml model.path=glimpseprune/embedded/tiny \\
        --requests FILE.jsonl [--out FILE]

The model is `model.path` with the glimpse modules of `glimpse.modules_path` or, when that is
empty, the ones the folder carries (`<model.path>/glimpse_modules`); without either it refuses
to serve an untrained pruner. A request line that is not a JSON object, or whose image cannot
be read (corrupt, truncated, a decompression bomb), is answered with its error.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from pipeline.batch import PromptBatch
from pipeline.config import parse_args


def _open_image(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def read_requests(path: str | Path) -> tuple[PromptBatch, list[str | None]]:
    """The request file as prompts, and per request None or why its image could not be read."""
    path = Path(path)
    ids, images, questions, errors = [], [], [], []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            request = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            request = None
        if not isinstance(request, dict):  # answered with its error, like any failed request
            ids.append(str(number))
            questions.append("")
            images.append(None)
            errors.append(f"request line {number} is not a UTF-8 JSON object")
            continue
        ids.append(str(request.get("id", number)))
        questions.append(str(request.get("question", "")))
        image, error = None, None
        if request.get("image"):
            image_path = Path(str(request["image"]))
            image_path = image_path if image_path.is_absolute() else path.parent / image_path
            try:
                image = _open_image(image_path)
            except Exception as exc:  # noqa: BLE001 - unreadable, truncated, a bomb: this one fails
                error = f"cannot read image {image_path}: {type(exc).__name__}: {exc}"
        images.append(image)
        errors.append(error)
    prompts = PromptBatch(ids=ids, images=images, questions=questions, answers=[""] * len(ids))
    return prompts, errors


def answer(actor, prompts: PromptBatch, read_errors: list[str | None],
           batch_size: int = 16) -> list[dict]:
    """Greedy answers of `prompts` (one per prompt), in order, as answer-file rows."""
    tokenizer = actor.processor.tokenizer
    rows = []
    for start in range(0, len(prompts), batch_size):
        chunk = range(start, min(start + batch_size, len(prompts)))
        out = actor.generate(prompts.take(chunk), n=1, greedy=True)
        for k, i in enumerate(chunk):
            error = read_errors[i] or out.extras["error"][k]
            rows.append({
                "id": prompts.ids[i], "question": prompts.questions[i],
                "answer": None if error else tokenizer.decode(out.response_ids[k],
                                                              skip_special_tokens=True),
                "kept_tokens": out.extras["kept_tokens"][k],
                "visual_tokens": out.extras["visual_tokens"][k],
                "prompt_tokens": out.extras["prompt_tokens"][k],
                "finish_reason": out.extras["finish_reason"][k], "error": error})
    return rows


def main(argv: list[str] | None = None) -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--requests", required=True, help="JSONL of {image, question}")
        parser.add_argument("--out", default=None, help="answers JSONL (default: stdout)")

    cfg, args = parse_args(argv, __doc__.splitlines()[0], options)
    from actors.rollout import RolloutActor
    from glimpseprune.tiny import resolve_base_model

    base = resolve_base_model(cfg.model, cfg.output_dir)
    glimpse_cfg = cfg.glimpse
    if not glimpse_cfg.modules_path:  # a stage-1 / stage-2 export carries its modules
        if not (base / "glimpse_modules").is_dir():
            raise SystemExit(f"serve: {base} has no glimpse_modules/ and glimpse.modules_path is "
                             "empty, so the pruner would be untrained: set model.path to an "
                             "export (e.g. glimpseprune/embedded/tiny) or glimpse.modules_path")
        glimpse_cfg = replace(glimpse_cfg, modules_path=str(base / "glimpse_modules"))
    print(f"serving {base} with glimpse modules {glimpse_cfg.modules_path}", file=sys.stderr)
    prompts, read_errors = read_requests(args.requests)
    actor = RolloutActor(str(base), cfg.model, glimpse_cfg, cfg.rollout, seed=cfg.trainer.seed,
                         max_image_pixels=cfg.data.max_image_pixels)
    try:
        rows = answer(actor, prompts, read_errors)
    finally:
        actor.shutdown()
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    failed = sum(row["error"] is not None for row in rows)
    print(f"answered {len(rows) - failed} of {len(rows)} requests", file=sys.stderr)


if __name__ == "__main__":
    main()
