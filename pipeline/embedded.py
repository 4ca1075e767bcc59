"""The embedded default's trained files: the committed tiny bases, their stage-1 modules, cards.

Owns where the shipped checkpoints live (`glimpseprune/embedded/tiny`, the easy task's default;
`glimpseprune/embedded/tiny_hard`, the hard task's base of configs/tiny_hard.yaml), the card
inside each (how it
was made: command, seed, steps, hardware, wall time, measured figures, and the SHA-256 of every
file) and the check that the files on disk are the ones the card describes. The card's figures
come from the runs' own outputs (summary.json, pipeline.evaluate's JSON, MLflow run times),
never typed in. Must not train or evaluate.

    python -m pipeline.embedded --output-dir RUN --command "python -m pipeline.sft ..." \
        [--command "python -m pipeline.glimpse ..."] --hardware "..." [--name tiny_hard]
    python -m pipeline.embedded --verify [--name tiny_hard]             # check the hashes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

# One folder laid out like a stage-2 export (HF weights + glimpse_modules/), so that it works
# as `model.path`, as `trainer.init_from` and in `glimpseprune.look` alike.
EMBEDDED_ROOT = Path(__file__).resolve().parent.parent / "glimpseprune" / "embedded"
EMBEDDED_DIR = EMBEDDED_ROOT / "tiny"
MODULES_DIR = EMBEDDED_DIR / "glimpse_modules"
HARD_DIR = EMBEDDED_ROOT / "tiny_hard"  # configs/tiny_hard.yaml's base (issue F8)
CARD_NAME = "card.json"


def file_hashes(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` but the card, by path relative to it."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != CARD_NAME}


def verify(folder: Path = EMBEDDED_DIR) -> dict:
    """Checks every file under `folder` against its card's hash; returns the card.

    Raises:
        FileNotFoundError: the card or a file it lists is missing.
        ValueError: a file differs from the card's hash, or a file is not on the card.
    """
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        raise FileNotFoundError(f"no embedded card at {card_path}")
    card = json.loads(card_path.read_text())
    listed, found = card["files"], file_hashes(folder)
    for name, digest in listed.items():
        if name not in found:
            raise FileNotFoundError(f"{folder / name} is on the card but missing")
        if found[name] != digest:
            raise ValueError(f"{folder / name} does not match its card's SHA-256: the file "
                             "changed after the card was written")
    extra = sorted(set(found) - set(listed))
    if extra:
        raise ValueError(f"files under {folder} that the card does not list: {extra}")
    return card


def _stage_record(output_dir: Path, stage: str, command: str) -> dict:
    """Command, seed, steps, wall time (the MLflow run's start to end) and the last
    validation figures of one stage of the run in `output_dir`."""
    from mlflow.tracking import MlflowClient

    summary = json.loads((output_dir / stage / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{output_dir.resolve() / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    return {"command": command, "seed": int(run.data.params["trainer.seed"]),
            "steps": summary["steps"],
            "wall_s": round((run.info.end_time - run.info.start_time) / 1000.0, 1),
            "final_validation": {k: v for k, v in summary.items() if k.startswith("eval/")}}


def write(output_dir: Path, commands: list[str], hardware: str, note: str = "",
          target: Path = EMBEDDED_DIR) -> dict:
    """Copies a run's SFT export and stage-1 modules into `target` (glimpseprune/embedded/<name>)
    and writes the card (figures from the run's summaries and `output_dir/evaluate/*.json`,
    including a `--methods` comparison's summary.json)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(output_dir / "sft" / "final", target)
    shutil.copytree(output_dir / "glimpse" / "final" / "glimpse_modules",
                    target / "glimpse_modules")
    evaluations = {p.stem: json.loads(p.read_text())
                   for p in sorted((output_dir / "evaluate").glob("*.json"))}
    for methods in sorted((output_dir / "evaluate").glob("*-methods/summary.json")):
        evaluations[methods.parent.name] = json.loads(methods.read_text())
    card = {
        "what": "the embedded default's trained tiny Qwen2.5-VL (pipeline.sft) with its stage-1 "
                "glimpse modules (pipeline.glimpse) in glimpse_modules/; made by the project, "
                "nothing downloaded",
        "hardware": hardware, "note": note,
        "base": _stage_record(output_dir, "sft", commands[0]),
        "glimpse": _stage_record(output_dir, "glimpse", commands[-1]),
        "evaluate": evaluations,
        "files": file_hashes(target),
    }
    (target / CARD_NAME).write_text(json.dumps(card, indent=2) + "\n")
    return card


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", type=Path, help="the run whose exports to embed")
    parser.add_argument("--command", action="append", default=[],
                        help="the command of each stage, SFT first (repeat)")
    parser.add_argument("--hardware", default="", help="where it was trained")
    parser.add_argument("--note", default="", help="anything a reader of the card should know")
    parser.add_argument("--verify", action="store_true", help="check the files against the card")
    parser.add_argument("--name", default="tiny", help="which embedded model: tiny (the easy "
                                                        "default) or tiny_hard")
    args = parser.parse_args(argv)
    target = EMBEDDED_ROOT / args.name
    if args.verify:
        card = verify(target)
        print(f"the {len(card['files'])} files under {target} match their card")
        return
    if not args.output_dir or not args.command:
        parser.error("--output-dir and --command are needed (or --verify)")
    card = write(args.output_dir, args.command, args.hardware, args.note, target)
    print(f"wrote {target / CARD_NAME}: {len(card['files'])} files")


if __name__ == "__main__":
    main()
