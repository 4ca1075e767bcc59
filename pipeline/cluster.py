"""Joining or starting Ray for a driver.

Owns the one rule of where a driver's Ray comes from: the cluster named by `cluster.address` or
by `RAY_ADDRESS` (which `ray job submit` sets), else a private local cluster bound to loopback.
A private cluster is started with `address="local"`: a stale `ray_current_cluster` file from an
unclean stop would otherwise make `ray.init(num_cpus=...)` try to join a dead head.
Must not place actors (actors/group.py does).
"""

from __future__ import annotations

import os

from pipeline.config import ClusterConfig


def init_ray(cluster_cfg: ClusterConfig, *, log_to_driver: bool = True) -> str:
    """Connects this driver to Ray once; returns "joined <address>" or "local".

    Args:
        cluster_cfg: the `cluster` config section.
        log_to_driver: forward actors' stdout/stderr to the driver.
    """
    import ray

    if ray.is_initialized():
        return "already connected"
    address = cluster_cfg.address or os.environ.get("RAY_ADDRESS", "")
    # Actors import this project: ship the driver's import path so local code is found.
    runtime_env = {"env_vars": {"PYTHONPATH": os.pathsep.join(
        p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)}}
    if address:
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=runtime_env)
        return f"joined {address}"
    ray.init(address="local", num_cpus=cluster_cfg.num_cpus, num_gpus=cluster_cfg.num_gpus,
             include_dashboard=False, log_to_driver=log_to_driver, runtime_env=runtime_env,
             _node_ip_address="127.0.0.1")
    return "local"
