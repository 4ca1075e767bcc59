"""Checkpoint folders of a training run: atomic saves, a `latest` pointer, keep-last-k rotation.

Owns the layout <root>/step000010/ (DeepSpeed shards with optimiser, scheduler and the driver's
client state: step, data position, MLflow run id; the same state as meta.json, readable before
any actor starts) and <root>/latest, and how `checkpoint.resume` resolves
(`latest`, a folder, or `mlflow:<run_id>`, which reads the run's `checkpoint_dir` tag), and
the `consumed.jsonl` record of which rows each step used, cut back to the resumed step.
Must not know what is inside a shard: the policy actors write and read those.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling folder to write into; on success it replaces `folder` whole
    (a crash leaves the previous `folder` untouched, never a half-written one)."""
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    yield tmp
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


META_NAME = "meta.json"


def consumed_log(path: str | Path, resumed_step: int) -> Path:
    """The record of which rows each step used (one JSON line per step), ready for appending
    from step `resumed_step + 1`: the lines of later steps (written by a run that was killed
    after its last checkpoint, and about to be run again) and a half-written last line are
    dropped, so the file reads as the uninterrupted run's. A fresh run (0) starts it empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if resumed_step > 0 and path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                continue  # the line a kill cut short
            if step <= resumed_step:
                kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)
    return path


class Checkpointer:
    """Saves through an ActorGroup whose actors have save_checkpoint / load_checkpoint."""

    def __init__(self, root: str | Path, keep_last: int):
        self.root = Path(root)
        self.keep_last = max(1, keep_last)

    def save(self, group, step: int, client_state: dict) -> Path:
        """Every rank writes into a temporary folder, then the folder is renamed into place and
        `latest` is replaced: a crash mid-save never leaves a half checkpoint behind `latest`."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        group.run("save_checkpoint", str(tmp), {**client_state, "step": step})
        # What the driver needs before it starts any actor (which MLflow run to continue),
        # inside the folder so that it is renamed into place with the weights.
        (tmp / META_NAME).write_text(json.dumps({**client_state, "step": step}) + "\n")
        final = self.root / f"step{step:06d}"
        if final.exists():  # a run resumed from before this step saves it again
            os.rename(final, self.root / f".old-step{step:06d}")
        os.rename(tmp, final)
        shutil.rmtree(self.root / f".old-step{step:06d}", ignore_errors=True)
        pointer = self.root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.root / "latest")
        # Rotation by save time, never the folder just written: after resuming from an older
        # step, checkpoints of the abandoned later steps are the oldest writes' peers.
        others = sorted((p for p in self.root.glob("step*") if p != final),
                        key=lambda p: p.stat().st_mtime)
        for old in others[:max(0, len(others) - (self.keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def meta(folder: Path | None) -> dict:
        """The client state a checkpoint folder was saved with ({} for None or an older one)."""
        path = None if folder is None else folder / META_NAME
        return json.loads(path.read_text()) if path is not None and path.is_file() else {}

    def _latest(self) -> Path | None:
        """What `latest` names, when it is a complete checkpoint; else the complete one of the
        highest step (a crash while a step was saved again can leave `latest` naming a folder
        that was moved aside: `.old-stepN` then holds it); None when nothing was saved."""
        pointer = self.root / "latest"
        named = self.root / pointer.read_text().strip() if pointer.is_file() else None
        if named is not None and _complete(named):
            return named
        found = [p for p in self.root.glob("step*") if _complete(p)] + \
            [p for p in self.root.glob(".old-step*") if _complete(p)]
        if not found:
            if named is not None:
                raise FileNotFoundError(f"{pointer} names {named.name}, which holds no complete "
                                        "checkpoint, and no other complete one is there")
            return None
        return max(found, key=_step_of)

    def resolve(self, resume: str, tracking_client=None) -> Path | None:
        """The folder `checkpoint.resume` names; None for "" or a `latest` with nothing saved.

        Raises:
            FileNotFoundError: an explicit path or MLflow run that holds no checkpoint.
        """
        if not resume:
            return None
        if resume == "latest":
            return self._latest()
        if resume.startswith("mlflow:"):
            run_id = resume.split(":", 1)[1]
            tag = tracking_client.get_run(run_id).data.tags.get("checkpoint_dir")
            if not tag:
                raise FileNotFoundError(f"MLflow run {run_id} has no checkpoint_dir tag")
            resume = tag
        path = Path(resume)
        if not (path / "state").is_dir():
            raise FileNotFoundError(f"checkpoint.resume '{resume}' holds no checkpoint "
                                    "(expected a step folder with a 'state' subfolder)")
        return path


def _complete(folder: Path) -> bool:
    """A checkpoint folder as `save` leaves it: a step folder is only ever renamed into place
    whole, so its name and the actors' state mark it complete (`.tmp-*` ones are not)."""
    return (folder / "state").is_dir()


def _step_of(folder: Path) -> int:
    return int(folder.name.rsplit("step", 1)[1])
