"""An ActorGroup on one node: its torch.distributed group works and opens no socket beyond
127.0.0.1 (torch's own env:// store would listen on every interface and gloo on the host's
address). Two gloo ranks on a private local Ray, each reporting the listening sockets its
process gained while joining the group."""

from __future__ import annotations

import pytest

from pipeline.config import load_config

pytestmark = pytest.mark.slow


class _Rank:
    """A rank that joins the group in its constructor, as PolicyActor and ReferenceActor do."""

    def __init__(self, dist):
        import psutil

        def listening() -> set[tuple[str, int]]:
            return {(c.laddr.ip, c.laddr.port)
                    for c in psutil.Process().net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN}

        before = listening()
        dist.init_torch_distributed(timeout_s=120)
        self.opened = sorted(listening() - before)
        self.dist = dist

    def report(self) -> dict:
        import torch
        import torch.distributed as torch_dist

        total = torch.tensor([float(self.dist.rank + 1)])
        torch_dist.all_reduce(total)
        return {"opened": self.opened, "sum": float(total),
                "master": (self.dist.master_addr, self.dist.local)}


def test_a_one_node_group_listens_on_loopback_only():
    import sys

    import ray
    from ray import cloudpickle

    # this test file is not importable in Ray's workers: ship _Rank by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from actors.group import ActorGroup
    from pipeline.cluster import init_ray

    init_ray(load_config("configs/tiny.yaml").cluster, log_to_driver=False)
    try:
        group = ActorGroup(_Rank, 2, cpus_per_rank=0.5)
        try:
            reports = group.run("report")
        finally:
            group.shutdown()
    finally:
        ray.shutdown()
    assert [r["sum"] for r in reports] == [3.0, 3.0]  # the group really communicates
    assert all(r["master"] == ("127.0.0.1", True) for r in reports)
    # rank 0 opened the store and a gloo socket, rank 1 a gloo socket: all on 127.0.0.1
    assert len(reports[0]["opened"]) >= 2 and len(reports[1]["opened"]) >= 1, reports
    assert {ip for r in reports for ip, _ in r["opened"]} == {"127.0.0.1"}, reports
