"""The weight-sync collective: a gloo group of its own between policy rank 0 and the rollout
actors, and the bucket protocol that travels over it.

Owns the group's rendezvous and the wire format. Rank 0 (policy rank 0) opens a TCP store
(`actors.group.tcp_store`) on a socket bound to 127.0.0.1 when every member runs on its node and
to the node's own address otherwise (never the wildcard address torch's TCPStore binds by
default); every member
then builds a `ProcessGroupGloo` whose device listens on that same address. The group is
separate from DeepSpeed's: policy ranks 1.. and the engines never join each other's groups.

Wire format, per bucket and dtype: a broadcast int64 [1] header length, the header (UTF-8 JSON:
dtype and [name, shape] per tensor) as uint8, then the tensors' bytes as one flat uint8 buffer
(any dtype, bf16 included, travels as bytes); a header length of 0 ends the push. Receivers
rebuild the named tensors from the header, so nothing is agreed in advance. Must not gather
ZeRO-3 partitions or load weights (actors/policy.py and actors/rollout.py do).
"""

from __future__ import annotations

import datetime
import json

import torch

from actors.group import tcp_store

STORE_PREFIX = "glimpseprune-weight-sync"


class WeightChannel:
    """One member's end of the group (rank 0 sends, the others receive).

    Args:
        host: the address rank 0's store listens on; this member's gloo device binds to
            `device_host` (default: `host`, right when everyone is on one node).
        port: the store's port.
        rank, world_size: 0 for policy rank 0, 1.. for rollout actors.
        timeout_s: how long a rendezvous or a broadcast may wait for the others.
        store: rank 0 passes the store it opened with `actors.group.tcp_store` (the others
            connect to it).
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float,
                 store=None, device_host: str | None = None):
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        if store is None:
            store, _ = tcp_store(host, port, world_size, False, timeout_s)
        self._store = store  # the group reads it during its rendezvous; keep it alive
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=device_host or host)]
        options._timeout = timeout
        self.group = dist.ProcessGroupGloo(dist.PrefixStore(STORE_PREFIX, store), rank,
                                           world_size, options)
        self.rank, self.world_size = rank, world_size
        self.bytes_sent = 0

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        options = dist.BroadcastOptions()
        options.rootRank = 0
        self.group.broadcast([tensor], options).wait()
        return tensor

    def send_bucket(self, tensors: dict[str, torch.Tensor]) -> None:
        """Rank 0: one bucket of named CPU tensors, one message per dtype."""
        by_dtype: dict[torch.dtype, list] = {}
        for name, tensor in tensors.items():
            by_dtype.setdefault(tensor.dtype, []).append((name, tensor.contiguous()))
        for dtype, items in by_dtype.items():
            header = json.dumps({"dtype": str(dtype).removeprefix("torch."),
                                 "tensors": [[n, list(t.shape)] for n, t in items]}).encode()
            flat = torch.cat([t.reshape(-1).view(torch.uint8) for _, t in items])
            self._broadcast(torch.tensor([len(header)], dtype=torch.int64))
            self._broadcast(torch.frombuffer(bytearray(header), dtype=torch.uint8))
            self._broadcast(flat)
            self.bytes_sent += flat.numel()

    def end_push(self) -> None:
        """Rank 0: tells the receivers that every bucket of this push has gone."""
        self._broadcast(torch.zeros(1, dtype=torch.int64))

    def receive_push(self) -> dict[str, torch.Tensor]:
        """Ranks 1..: every bucket of one push, as {name: tensor}, until rank 0's end."""
        received: dict[str, torch.Tensor] = {}
        while True:
            length = int(self._broadcast(torch.zeros(1, dtype=torch.int64))[0])
            if length == 0:
                return received
            header = json.loads(bytes(self._broadcast(
                torch.empty(length, dtype=torch.uint8)).numpy()).decode())
            dtype = getattr(torch, header["dtype"])
            sizes = [int(torch.Size(shape).numel()) * dtype.itemsize
                     for _, shape in header["tensors"]]
            flat = self._broadcast(torch.empty(sum(sizes), dtype=torch.uint8))
            for (name, shape), chunk in zip(header["tensors"], flat.split(sizes), strict=True):
                received[name] = chunk.view(dtype).reshape(shape)
