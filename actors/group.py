"""ActorGroup: N ranks of one Ray actor class in a placement group, wired for torch.distributed.

Owns placement (one bundle per rank; PACK, SPREAD or STRICT_SPREAD), the rendezvous (rank 0's
address and a free port, published to every rank as MASTER_ADDR / MASTER_PORT / RANK /
WORLD_SIZE / LOCAL_RANK; 127.0.0.1 when every rank runs on rank 0's node), torch.distributed's
store and sockets (bound to that address, never to every interface), and calling a method on
every rank, whole or with a batch split per data-parallel rank. Must not know what the actors
compute.

An actor class used here takes `dist: DistInfo` as its first constructor argument and calls
`dist.init_torch_distributed()` before its framework's own initialisation (DeepSpeed's
`init_distributed` then finds torch.distributed ready and uses it).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@dataclass(frozen=True)
class DistInfo:
    """Where a rank sits in its group and how to reach rank 0."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    backend: str  # gloo on CPU, nccl on GPU
    local: bool = False  # every rank runs on rank 0's node: master_addr is 127.0.0.1

    def export_env(self) -> None:
        """Sets the environment variables torch.distributed and DeepSpeed read."""
        os.environ.update(MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port),
                          RANK=str(self.rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_RANK="0")  # one device per actor: Ray sets its visible device

    def init_torch_distributed(self, timeout_s: float = 1800.0) -> None:
        """Exports the environment and joins the group's default process group.

        torch's env:// store listens on every interface and gloo on the host's address; here
        rank 0's store listens on a socket bound to master_addr only, and on one node gloo's
        sockets take the loopback interface (GLOO_SOCKET_IFNAME), so a single-node run opens
        nothing beyond 127.0.0.1. Across nodes they use the nodes' own addresses (NCCL's
        sockets follow NCCL_SOCKET_IFNAME, see ray_cluster.yaml).
        """
        import datetime

        import torch.distributed as torch_dist

        self.export_env()
        if torch_dist.is_initialized():
            return
        timeout = datetime.timedelta(seconds=timeout_s)
        if self.local and self.backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback_interface())
        store, _ = tcp_store(self.master_addr, self.master_port, self.world_size,
                             self.rank == 0, timeout_s)
        torch_dist.init_process_group(self.backend, store=store, rank=self.rank,
                                      world_size=self.world_size, timeout=timeout)


def tcp_store(host: str, port: int, world_size: int, is_master: bool, timeout_s: float):
    """A torch.distributed TCPStore; the master's listens on a socket bound to `host` only (a
    TCPStore left to itself listens on every interface). Port 0 on the master: the OS picks.
    Returns (store, port)."""
    import datetime

    import torch.distributed as torch_dist

    timeout = datetime.timedelta(seconds=timeout_s)
    if not is_master:
        return torch_dist.TCPStore(host, port, world_size, False, timeout=timeout), port
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen()
    port = listener.getsockname()[1]
    # detach: the store's daemon owns the descriptor from here on; Python must not close it
    store = torch_dist.TCPStore(host, port, world_size, True, timeout=timeout,
                                wait_for_workers=False, master_listen_fd=listener.detach(),
                                use_libuv=False)
    return store, port


def loopback_interface() -> str:
    """The name of the network interface that holds 127.0.0.1 ("lo" on Linux)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    raise RuntimeError("no network interface holds 127.0.0.1")


def get_all(refs: list) -> list:
    """`ray.get` of a group's calls that fails as soon as one rank fails, rather than waiting
    for peers that may be stuck in a collective with it (the driver then finds out who died:
    `dead_actors`)."""
    results, pending = {}, list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        results[ready[0]] = ray.get(ready[0])
    return [results[ref] for ref in refs]


def dead_actors(named: list[tuple[str, Any]], timeout_s: float = 60.0) -> list[str]:
    """The names of the `(name, actor)` pairs whose actor is dead, by asking each one; an
    actor still busy after `timeout_s` counts as alive. A dead rank often surfaces as its
    peers' error (gloo: "connection closed by peer"), so a failed group call is followed by
    this to learn who is really gone."""
    from ray.exceptions import RayActorError

    pings = {actor.__ray_ready__.remote(): name for name, actor in named}
    ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=timeout_s)
    dead = []
    for ref in ready:
        try:
            ray.get(ref)
        except RayActorError:
            dead.append(pings[ref])
    return sorted(dead)


def count_restart(who: str, dead: list[str], restarts: int, max_restarts: int, error: Exception,
                  resume_from, what: str) -> int:
    """The rule both drivers (GRPO's roles, the training loop's ranks) apply after a failed
    step: re-raise `error` when nothing is `dead` (not a death: a restart would fail the same
    way), stop with a clear error once `max_restarts` (trainer.max_restarts) are used, else
    say what restarts from where and return the new restart count."""
    if not dead:
        raise error
    if restarts >= max_restarts:
        raise RuntimeError(f"{who}: {', '.join(dead)} died again after {restarts} restart(s) of "
                           f"the {what} (trainer.max_restarts={max_restarts}): {error}") from error
    print(f"{who}: {', '.join(dead)} died ({type(error).__name__}); starting every "
          f"{what.removesuffix('s')} again from {resume_from} (restart {restarts + 1} of at "
          f"most {max_restarts})", flush=True)
    return restarts + 1


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Runs in rank 0's bundle: this node's address and a port free on it right now."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return ray.util.get_node_ip_address(), port


class ActorGroup:
    """Starts `num_ranks` actors of `actor_cls` and calls their methods together.

    Args:
        actor_cls: a plain class (made a Ray actor here) whose constructor takes `dist` first.
        num_ranks: world size.
        cpus_per_rank / gpus_per_rank: resources of each rank's bundle.
        strategy: placement strategy of the group (PACK, SPREAD, STRICT_SPREAD).
        resources: custom Ray resources per bundle (pins the ranks to nodes that offer them).
        args / kwargs: further constructor arguments, the same for every rank.
    """

    def __init__(self, actor_cls: type, num_ranks: int, *, cpus_per_rank: float = 1,
                 gpus_per_rank: float = 0, strategy: str = "PACK", args: tuple = (),
                 kwargs: dict | None = None, ready_timeout_s: float = 600,
                 resources: dict[str, float] | None = None):
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {}),
                  **(resources or {})}
        self.placement = placement_group([dict(bundle) for _ in range(num_ranks)],
                                         strategy=strategy)
        ray.get(self.placement.ready(), timeout=ready_timeout_s)
        addr, port = ray.get(_rendezvous_address.options(
            scheduling_strategy=self._in_bundle(0)).remote())
        self.world_size = num_ranks
        local = len(set(self.node_ids())) == 1
        addr = "127.0.0.1" if local else addr
        backend = "nccl" if gpus_per_rank else "gloo"
        remote_cls = ray.remote(actor_cls)
        self.actors = [
            remote_cls.options(num_cpus=cpus_per_rank, num_gpus=gpus_per_rank,
                               resources=resources or None,
                               scheduling_strategy=self._in_bundle(rank)).remote(
                DistInfo(rank, num_ranks, addr, port, backend, local), *args, **(kwargs or {}))
            for rank in range(num_ranks)]

    def _in_bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.placement,
                                                placement_group_bundle_index=index)

    def run(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Calls `method` with the same arguments on every rank; returns each rank's result."""
        return get_all([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def run_split(self, method: str, batch: Any, *args: Any, **kwargs: Any) -> list[Any]:
        """Calls `method(shard, ...)` on every rank with `batch.split(world_size)[rank]`."""
        return get_all(self.submit_split(method, batch, *args, **kwargs))

    def submit_split(self, method: str, batch: Any, *args: Any, **kwargs: Any) -> list:
        """`run_split` without waiting: one ObjectRef per rank (the driver overlaps roles)."""
        shards = batch.split(self.world_size)
        return [getattr(a, method).remote(shard, *args, **kwargs)
                for a, shard in zip(self.actors, shards, strict=True)]

    def node_ids(self) -> list[str]:
        """The Ray node each rank runs on (from Ray's own placement information)."""
        table = ray.util.placement_group_table(self.placement)
        return [table["bundles_to_node_id"][i] for i in range(self.world_size)]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.placement)
