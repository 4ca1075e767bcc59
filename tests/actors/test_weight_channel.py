"""The weight-sync collective's wire protocol, without Ray: a sender and two receivers (threads
of this process, a real gloo group over 127.0.0.1) exchange buckets of mixed dtypes and shapes;
the sockets listen on 127.0.0.1 only; a receiver whose sender never sends fails within its
timeout instead of hanging."""

from __future__ import annotations

import threading

import psutil
import pytest
import torch

from actors.group import tcp_store
from actors.weight_channel import WeightChannel


def _group(world: int, timeout_s: float = 30.0):
    """(sender, receivers) of one group on 127.0.0.1; the rendezvous runs in threads."""
    store, port = tcp_store("127.0.0.1", 0, world, True, timeout_s)
    members: dict[int, WeightChannel] = {}

    def join(rank: int) -> None:
        members[rank] = WeightChannel("127.0.0.1", port, rank, world, timeout_s,
                                      store=store if rank == 0 else None)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(members) == list(range(world)), "the rendezvous did not complete"
    return members[0], [members[rank] for rank in range(1, world)], port


def _listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN}


def test_buckets_of_mixed_dtypes_arrive_whole_on_every_receiver():
    before = _listening()
    sender, receivers, port = _group(3)
    opened = _listening() - before
    generator = torch.Generator().manual_seed(0)
    buckets = [
        {"a.weight": torch.randn(4, 3, generator=generator),
         "a.bias": torch.randn(3, generator=generator).to(torch.bfloat16),
         "steps": torch.tensor([7, -2], dtype=torch.int64)},
        {"b.weight": torch.randn(2, 5, generator=generator).to(torch.float16),
         "empty": torch.zeros(0, 4), "scalar": torch.tensor(1.5)},
    ]
    received: dict[int, dict] = {}

    def receive(k: int) -> None:
        received[k] = receivers[k].receive_push()

    threads = [threading.Thread(target=receive, args=(k,)) for k in range(len(receivers))]
    for thread in threads:
        thread.start()
    for bucket in buckets:
        sender.send_bucket(bucket)
    sender.end_push()
    for thread in threads:
        thread.join(timeout=60)

    expected = {name: t for bucket in buckets for name, t in bucket.items()}
    for k in range(len(receivers)):
        assert set(received[k]) == set(expected)
        for name, tensor in expected.items():
            got = received[k][name]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert torch.equal(got, tensor), name
    assert sender.bytes_sent == sum(t.numel() * t.element_size() for t in expected.values())

    # Nothing of the group listens beyond this machine: the store and every gloo device are
    # bound to 127.0.0.1, not the wildcard address torch's TCPStore takes by default.
    assert ("127.0.0.1", port) in opened and len(opened) >= 2, opened
    assert {ip for ip, _ in opened} == {"127.0.0.1"}, opened


def test_a_receiver_without_a_sender_times_out():
    _, receivers, _ = _group(2, timeout_s=2.0)
    with pytest.raises(RuntimeError):
        receivers[0].receive_push()
