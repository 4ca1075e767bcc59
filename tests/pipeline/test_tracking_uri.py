"""A tracking URI that nothing answers at stops the run at once, with the URI in the message."""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.config import load_config
from pipeline.tracking import Tracker, TrackingUnreachable, check_reachable


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_server_fails_fast_and_names_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{_closed_port()}"
    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", f"tracking.uri={uri}"])
    start = time.perf_counter()
    with pytest.raises(TrackingUnreachable, match=rf"tracking\.uri {uri}: nothing answers"):
        Tracker(cfg, "grpo")
    assert time.perf_counter() - start < 10  # not MLflow's minutes of retries


def test_reachable_server_and_local_stores_pass(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # no server to reach
    check_reachable(str(tmp_path / "mlruns"))
