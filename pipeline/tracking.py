"""MLflow tracking for the driver: runs, params, metrics, checkpoints and model versions.

Owns the tracking URI rule (`tracking.uri`, else $MLFLOW_TRACKING_URI, else a SQLite file under
output_dir with artifacts beside it), one run per stage (nested under a pipeline parent run when
one is given; a run resumed from a checkpoint continues the MLflow run that made it), the
resolved config as flattened params, metric-key sanitising, and logging a checkpoint folder as
an artifact registered as a model version with tags.
Only the driver imports this; actors return numbers and the driver logs them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pipeline.config import Config, flatten

_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /:]")


def sanitise_key(key: str) -> str:
    """MLflow accepts letters, digits and `_-. /:` in keys; anything else becomes `_`."""
    return _BAD_KEY_CHARS.sub("_", key)


def tracking_uri(cfg: Config) -> str:
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.output_dir).resolve() / 'mlflow.db'}"


def tracking_client(cfg: Config):
    """An MLflow client of the run's store, before the run itself is opened (e.g. to read the
    run a checkpoint names)."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    check_reachable(uri)  # a clear error now, not minutes of retries inside MLflow
    return MlflowClient(uri)


class TrackingUnreachable(RuntimeError):
    """tracking.uri names a server nothing answers at."""


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """For an http(s) tracking URI, that something accepts connections at its host and port.
    MLflow's client would otherwise retry with back-off for minutes and then fail deep in a
    stack; file and database URIs need no server.

    Raises:
        TrackingUnreachable: naming the URI, the address and what the connection got.
    """
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise TrackingUnreachable(
            f"tracking.uri {uri}: nothing answers at {parsed.hostname}:{port} ({exc}); start "
            "the MLflow server (`mlflow server --host 127.0.0.1 --port ...`) or leave "
            "tracking.uri empty for a SQLite file under output_dir") from None


class Tracker:
    """One MLflow run of one stage.

    Args:
        cfg: the resolved config (logged as params).
        stage: sft, glimpse, grpo, evaluate or demo; tagged and used in the run name.
        parent_run_id: nest this run under a pipeline (demo) run.
    """

    def __init__(self, cfg: Config, stage: str, parent_run_id: str | None = None,
                 resume_run_id: str | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(cfg)
        check_reachable(self.uri)
        self.client = MlflowClient(self.uri)
        self.register = cfg.tracking.register_models
        self.stage = stage
        if resume_run_id and self._reopen(resume_run_id, flatten(cfg)):
            return
        experiment = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if experiment is None:
            # Artifacts next to the database, not in ./mlruns of whatever folder we run from.
            artifacts = (Path(cfg.output_dir).resolve() / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(cfg.tracking.experiment,
                                                          artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        tags = {"stage": stage}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=stage, tags=tags)
        self.run_id = run.info.run_id
        self._log_params(flatten(cfg))

    def _reopen(self, run_id: str, params: dict[str, Any]) -> bool:
        """Continues the run a resumed checkpoint was made by (False: it is not in this store).
        Its status goes back to RUNNING; params it lacks are logged, and a changed value (e.g.
        a larger trainer.total_steps) is recorded as a `resumed_with/<key>` tag, since MLflow
        never changes a logged param."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        logged = run.data.params
        new = {k: v for k, v in params.items() if sanitise_key(k) not in logged}
        self._log_params(new)
        for key, value in params.items():
            old = logged.get(sanitise_key(key))
            if old is not None and old != str(value)[:6000]:
                self.client.set_tag(run_id, sanitise_key(f"resumed_with/{key}"),
                                    str(value)[:5000])
        return True

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(sanitise_key(k), str(v)[:6000]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Logs numeric metrics at `step` (keys sanitised; None values skipped)."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(sanitise_key(k), float(v), now, step)
                 for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_checkpoint(self, folder: str | Path, artifact_path: str, model_name: str,
                       tags: dict[str, Any]) -> str | None:
        """Logs a checkpoint folder as artifacts and registers it as a model version.

        Returns the model version number, or None when registration is off.
        """
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        if not self.register:
            return None
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise  # a real failure (server down, permissions), not "already registered"
        source = f"{self.client.get_run(self.run_id).info.artifact_uri}/{artifact_path}"
        version = self.client.create_model_version(
            model_name, source=source, run_id=self.run_id,
            tags={k: str(v) for k, v in {"stage": self.stage, **tags}.items()})
        return version.version

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
