"""Joining or starting Ray for a driver.

Owns the one rule of where a driver's Ray comes from: the cluster named by `cluster.address` or
by `RAY_ADDRESS` (which `ray job submit` sets), else a private local cluster bound to loopback.
A private cluster is started with `address="local"`: a stale `ray_current_cluster` file from an
unclean stop would otherwise make `ray.init(num_cpus=...)` try to join a dead head.
Also owns the resource check that runs before any work: what each role asks for
(`role_demands`) against what the cluster has (`check_resources`), so a config too big for the
cluster fails in seconds with numbers instead of hanging on a placement group.
Must not place actors (actors/group.py does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.config import ClusterConfig, Config, RolloutConfig


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
    with _single_machine_ray():
        ray.init(address="local", num_cpus=cluster_cfg.num_cpus,
                 num_gpus=cluster_cfg.num_gpus, include_dashboard=False,
                 log_to_driver=log_to_driver, runtime_env=runtime_env,
                 _node_ip_address="127.0.0.1")
    return "local"


# Ray's switch for its single-machine mode (the one it uses on macOS and Windows): the node's
# address stays 127.0.0.1, so GCS, raylet, agents and workers listen on loopback only.
# Without it Ray replaces 127.0.0.1 by the host's address and its gRPC servers listen on every
# interface, whatever `_node_ip_address` says.
RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextmanager
def _single_machine_ray() -> Iterator[None]:
    """Ray in its single-machine mode while a private local Ray starts; as before afterwards,
    so that a later `ray start` or join from this process (tests do) is not refused."""
    from ray._private import ray_constants

    before_env = os.environ.get(RAY_SINGLE_MACHINE_ENV)
    before = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_SINGLE_MACHINE_ENV] = "0"  # for the processes ray.init starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import, which may be done already
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if before_env is None:
            os.environ.pop(RAY_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[RAY_SINGLE_MACHINE_ENV] = before_env


class ClusterError(RuntimeError):
    """The Ray cluster cannot hold what the config asks for; the message says what is short."""


@dataclass(frozen=True)
class RoleDemand:
    """What one role asks of the cluster: `count` bundles of `cpus` CPUs and `gpus` GPUs."""

    name: str
    count: int
    cpus: float
    gpus: float
    custom: tuple[tuple[str, float], ...] = ()  # the role's ray_resources, per bundle


def role_demands(cfg: Config) -> list[RoleDemand]:
    """The bundles a GRPO run places, role by role (`cfg`: the resolved config).

    The reference role appears only when `algo.kl_coef > 0` (it is skipped otherwise). A
    rollout bundle is one whole vLLM engine: its tensor-parallel workers share one bundle.
    """
    p, r = cfg.policy, cfg.rollout
    roles = [RoleDemand("policy", p.num_ranks, p.cpus_per_rank, p.gpus_per_rank,
                        tuple(sorted(p.ray_resources.items()))),
             RoleDemand("rollout", r.num_engines, r.cpus_per_engine, r.gpus_per_engine,
                        tuple(sorted(r.ray_resources.items())))]
    if cfg.algo.kl_coef > 0:
        ref = cfg.reference
        roles.append(RoleDemand("reference", ref.num_ranks, ref.cpus_per_rank, ref.gpus_per_rank,
                                tuple(sorted(ref.ray_resources.items()))))
    roles.append(RoleDemand("reward", cfg.reward.num_workers, cfg.reward.cpus_per_worker, 0))
    return roles


def gpu_rollout_check(rollout: RolloutConfig) -> None:
    """Raises ClusterError unless a GPU engine's bundle holds exactly its tensor-parallel GPUs.

    vLLM puts one tensor-parallel worker on each GPU; a bundle with more GPUs leaves some idle
    and one with fewer cannot start the engine.
    """
    gpus, tp = rollout.gpus_per_engine, rollout.tensor_parallel_size
    if gpus > 0 and gpus != tp:
        raise ClusterError(f"rollout.gpus_per_engine ({gpus:g}) must equal "
                           f"rollout.tensor_parallel_size ({tp}) on GPUs")


def _alive_resources(nodes: list[dict] | None) -> list[dict[str, float]]:
    if nodes is None:
        import ray  # lazily, as in init_ray: checks of fake node lists need no Ray

        nodes = ray.nodes()
    return [dict(n.get("Resources", {})) for n in nodes if n.get("Alive", True)]


def _fits(role: RoleDemand, node: dict[str, float]) -> bool:
    return role.cpus <= node.get("CPU", 0) and role.gpus <= node.get("GPU", 0) and all(
        amount <= node.get(name, 0) for name, amount in role.custom)


def _total_problems(roles: list[RoleDemand], nodes: list[dict[str, float]]) -> list[str]:
    problems = []
    for resource, field in (("GPU", "gpus"), ("CPU", "cpus")):
        wanted = sum(r.count * getattr(r, field) for r in roles)
        have = sum(n.get(resource, 0) for n in nodes)
        if wanted > have + 1e-9:  # Ray keeps fractional resources as floats
            shares = ", ".join(f"{r.name} {r.count} x {getattr(r, field):g}" for r in roles)
            problems.append(f"the config asks for {wanted:g} {resource}s ({shares}) "
                            f"but the cluster has {have:g}")
    return problems


def _placement_problems(cfg: Config, roles: list[RoleDemand],
                        nodes: list[dict[str, float]]) -> list[str]:
    problems = []
    # A CPU-only head runs the driver, not the ranks: when GPUs are asked for, only GPU nodes
    # count towards cluster.num_nodes.
    wants_gpus = any(r.gpus > 0 for r in roles)
    usable = [n for n in nodes if n.get("GPU", 0) > 0] if wants_gpus else nodes
    kind = "alive nodes with GPUs" if wants_gpus else "alive nodes"
    if len(usable) < cfg.cluster.num_nodes:
        problems.append(f"cluster.num_nodes is {cfg.cluster.num_nodes} but the cluster has "
                        f"{len(usable)} {kind}")
    for role in roles:
        if role.count > 0 and not any(_fits(role, n) for n in nodes):
            biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)), default={})
            custom = "".join(f", {amount:g} {name}" for name, amount in role.custom)
            problems.append(f"one {role.name} bundle needs {role.gpus:g} GPUs and "
                            f"{role.cpus:g} CPUs{custom} but no single node has that (largest: "
                            f"{biggest.get('GPU', 0):g} GPUs, {biggest.get('CPU', 0):g} CPUs)")
    policy = roles[0]  # role_demands lists the policy first
    hosts = sum(_fits(policy, n) for n in nodes)
    if cfg.cluster.placement_strategy == "STRICT_SPREAD" and policy.count > hosts:
        problems.append(f"cluster.placement_strategy STRICT_SPREAD puts each of the "
                        f"{policy.count} policy ranks on its own node but only {hosts} nodes "
                        f"can hold one")
    return problems


def check_resources(cfg: Config, nodes: list[dict] | None = None) -> None:
    """Fails fast, before any actor starts, when the cluster cannot hold the config.

    Checks CPU and GPU totals, `cluster.num_nodes`, that every bundle fits on one node,
    STRICT_SPREAD's node per policy rank and a GPU engine's bundle against its tensor-parallel
    size; every problem found is reported at once.

    Args:
        cfg: the resolved config.
        nodes: records as `ray.nodes()` returns them (`Alive`, `Resources`); None: ask the
            connected Ray. Dead nodes are ignored.

    Raises:
        ClusterError: names each shortfall with the config's and the cluster's numbers.
    """
    gpu_rollout_check(cfg.rollout)
    roles = role_demands(cfg)
    alive = _alive_resources(nodes)
    problems = _total_problems(roles, alive) + _placement_problems(cfg, roles, alive)
    if problems:
        raise ClusterError("the Ray cluster cannot hold this config: " + "; ".join(problems))
