"""Checkpoint folders of a training run: atomic saves, a `latest` pointer, keep-last-k rotation.

Owns the layout <root>/step000010/ (DeepSpeed shards with optimiser, scheduler and the driver's
client state: step and data position) and <root>/latest, and how `checkpoint.resume` resolves
(`latest`, a folder, or `mlflow:<run_id>`, which reads the run's `checkpoint_dir` tag).
Must not know what is inside a shard: the policy actors write and read those.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


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
        final = self.root / f"step{step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        pointer = self.root / ".latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, self.root / "latest")
        for old in sorted(self.root.glob("step*"))[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        return final

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
