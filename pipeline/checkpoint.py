"""Checkpoint folders of a training run: atomic saves, a `latest` pointer, keep-last-k rotation.

Owns the layout <root>/step000010/ (DeepSpeed shards with optimiser, scheduler and the driver's
client state: step, data position, MLflow run id; the same state as meta.json, readable before
any actor starts) and <root>/latest, and how `checkpoint.resume` resolves
(`latest`, a folder, or `mlflow:<run_id>`, which reads the run's `checkpoint_dir` tag).
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

    def resolve(self, resume: str, tracking_client=None) -> Path | None:
        """The folder `checkpoint.resume` names; None for "" or a `latest` with nothing saved.

        Raises:
            FileNotFoundError: an explicit path or MLflow run that holds no checkpoint.
        """
        if not resume:
            return None
        if resume == "latest":
            pointer = self.root / "latest"
            return self.root / pointer.read_text().strip() if pointer.is_file() else None
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
