"""`pipeline.grpo` on a Ray cluster that is already running (issue F7): submitted with
`ray job submit` to a `ray start --head`, placed by custom resources across the two nodes of a
`ray.cluster_utils.Cluster`, and refused before any work when the cluster lacks what it asks for.

Every Ray here is this test's own: its own ports and temp folder, bound to loopback, stopped by
process (never `ray stop`, which would stop every Ray on the machine). Ray rewrites a loopback
address ("127.0.0.1:port") to the machine's address before connecting, while nodes started with
node IP 127.0.0.1 listen on loopback only: the processes that start or join these clusters run
with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, under which Ray's own node address is 127.0.0.1 and
nothing is rewritten (a real cluster's nodes have routable addresses and need none of this).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).parent / "ray"
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
SMALL = ["model.max_pixels=50176", "data.synthetic.image_size=224", "data.synthetic.num_train=8",
         "data.synthetic.num_validation=4", "data.synthetic.num_test=2"]
# One policy rank and two eval rows: the least a two-step run needs.
RUN = ["trainer.total_steps=2", "trainer.prompts_per_step=2", "rollout.n=2",
       "trainer.eval_samples=2", "policy.num_ranks=1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny base model and seeded untrained glimpse modules, shared by every run here."""
    from glimpseprune.io import save_modules
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.tiny import resolve_base_model
    from pipeline.config import load_config

    folder = tmp_path_factory.mktemp("tiny")
    cfg = load_config("configs/tiny.yaml", [f"output_dir={folder}", *SMALL])
    base = resolve_base_model(cfg.model, folder)
    save_modules(GlimpsePruneModel.from_pretrained(base, cfg.glimpse, seed=0).glimpse_modules,
                 folder / "mods")
    return folder


def _args(tiny: Path, out: Path) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"output_dir={out}", f"model.path={tiny}/tiny_base",
            f"glimpse.modules_path={tiny}/mods", *SMALL, *RUN]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, **extra}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _short_temp_dir() -> str:
    # Ray's unix sockets live under its temp folder: pytest's tmp_path is too long for them.
    return tempfile.mkdtemp(prefix="f7ray", dir="/tmp")


def _wait_for_http(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"nothing answered at {url} in {timeout_s:.0f} s")


def _summary(out: Path) -> dict:
    return json.loads((out / "grpo" / "summary.json").read_text())


def test_a_config_bigger_than_the_cluster_fails_before_any_work(tiny, tmp_path):
    cmd = [sys.executable, "-m", "pipeline.grpo", *_args(tiny, tmp_path), "policy.gpus_per_rank=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    # 1 policy rank x 1 GPU asked; the private local Ray has no GPU.
    assert "ClusterError" in output and "asks for 1 GPUs (policy 1 x 1" in output, output[-3000:]
    assert not (tmp_path / "checkpoints").exists()  # nothing trained
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run either: it failed first


def test_roles_land_on_the_nodes_their_custom_resources_name(tiny, tmp_path, monkeypatch):
    from ray.cluster_utils import Cluster

    temp = _short_temp_dir()
    os.makedirs(f"{temp}/ray")
    monkeypatch.setenv("RAY_TMPDIR", temp)  # Cluster writes its address file under it
    node_args = {"node_ip_address": "127.0.0.1", "temp_dir": f"{temp}/ray",
                 "object_store_memory": 300 * 2**20}
    cluster = None
    try:
        # Head: policy + reference (+ the reward worker, which names no node); second: rollout.
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 3, "resources": {"policy_node": 4}, "include_dashboard": False,
            **node_args})
        second = cluster.add_node(num_cpus=2, resources={"rollout_node": 4}, **node_args)
        cluster.wait_for_nodes()
        head_id, second_id = cluster.head_node.node_id, second.node_id
        cmd = [sys.executable, "-m", "pipeline.grpo", *_args(tiny, tmp_path),
               f"cluster.address={cluster.address}", "cluster.num_nodes=2",
               "policy.ray_resources={policy_node: 1}", "reference.ray_resources={policy_node: 1}",
               "rollout.ray_resources={rollout_node: 1}"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                              env=_env(**LOOPBACK))
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    summary = _summary(tmp_path)
    assert summary["steps"] == 2
    placement = summary["placement"]
    assert placement == {"policy": [head_id], "reference": [head_id], "rollout": [second_id]}
    assert not set(placement["rollout"]) & set(placement["policy"])


def test_ray_job_submit_runs_grpo_on_a_running_head(tiny, tmp_path):
    temp = _short_temp_dir()
    dashboard = _free_port()
    address = f"http://127.0.0.1:{dashboard}"
    # Token authentication is on by default: the CLI, the head and the job need the mode set.
    env = _env(RAY_AUTH_MODE="token", **LOOPBACK)
    head_cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                f"--port={_free_port()}", "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                # own ports where Ray's defaults are fixed numbers another Ray may hold
                f"--dashboard-agent-listen-port={_free_port()}",
                f"--ray-client-server-port={_free_port()}",
                "--num-cpus=6", f"--temp-dir={temp}"]
    job_id = f"f7-{os.getpid()}-{time.monotonic_ns()}"
    head = subprocess.Popen(head_cmd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_http(f"{address}/api/version")
        # The repository is uploaded as the job's working dir (.gitignore'd paths are skipped);
        # the venv's python runs it, and the driver joins this head through RAY_ADDRESS.
        excludes = {"excludes": [".git", ".venv", "outputs", ".hypothesis", "tests"]}
        submit = [str(RAY), "job", "submit", "--address", address, "--submission-id", job_id,
                  "--working-dir", str(REPO), "--runtime-env-json", json.dumps(excludes), "--",
                  sys.executable, "-m", "pipeline.grpo", *_args(tiny, tmp_path)]
        done = subprocess.run(submit, capture_output=True, text=True, timeout=900, env=env)
        logs = done.stdout[-3000:] + done.stderr[-3000:]
        assert done.returncode == 0 and f"Job '{job_id}' succeeded" in done.stdout, logs
        status = subprocess.run([str(RAY), "job", "status", "--address", address, job_id],
                                capture_output=True, text=True, timeout=120, env=env)
        assert f"Job '{job_id}' succeeded" in status.stdout, status.stdout + status.stderr
        nodes = subprocess.run([str(RAY), "list", "nodes", "--address", address, "--format",
                                "json"], capture_output=True, text=True, timeout=120, env=env)
        head_ids = {node["node_id"] for node in json.loads(nodes.stdout)}
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=120)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        shutil.rmtree(temp, ignore_errors=True)
    summary = _summary(tmp_path)
    assert summary["steps"] == 2 and (tmp_path / "grpo" / "final" / "config.json").is_file()
    # Every role ran on the head's one node: the driver joined it, no private Ray of its own.
    assert set(summary["placement"]["policy"] + summary["placement"]["rollout"]) == head_ids
