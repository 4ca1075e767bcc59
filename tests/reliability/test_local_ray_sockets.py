"""The private local Ray that every command starts on one machine (pipeline.cluster.init_ray)
listens on loopback only: GCS, raylet, its agents and every worker. Without Ray's
single-machine mode it replaces 127.0.0.1 by the host's address and its gRPC servers listen on
every interface (seen with `ss`: `*:port` for gcs_server, raylet and each worker).

A fresh driver process starts the local Ray, runs an actor, and reports the listening sockets
of itself and every process under it (Ray's own processes are its descendants)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

DRIVER = r"""
import json, os, psutil, ray
from pipeline.cluster import init_ray
from pipeline.config import ClusterConfig

init_ray(ClusterConfig(num_cpus=1), log_to_driver=False)

@ray.remote
class Echo:
    def pid(self):
        return os.getpid()

echo = Echo.remote()
actor_pid = ray.get(echo.pid.remote())
me = psutil.Process()
sockets = []
for proc in [me, *me.children(recursive=True)]:
    try:
        for c in proc.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN:
                sockets.append([proc.name(), c.laddr.ip, c.laddr.port])
    except psutil.Error:
        pass
switch = os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
print(json.dumps({"actor_pid": actor_pid, "env": switch, "sockets": sockets}))
ray.shutdown()
"""


def test_the_private_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private Ray
    done = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    names = {name for name, _, _ in report["sockets"]}
    # not vacuous: Ray's servers and the actor's worker were seen listening
    assert {"gcs_server", "raylet"} <= names, report
    assert any(name.startswith("ray::Echo") for name in names), report
    loopback = ("127.0.0.1", "::ffff:127.0.0.1", "::1")
    outside = [s for s in report["sockets"] if s[1] not in loopback]
    assert not outside, outside
    assert report["env"] is None  # the switch was only set while Ray started
