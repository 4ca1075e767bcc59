"""Weight sync: the policy's new weights -> every rollout engine, after each GRPO step.

Owns the transfer. Policy rank 0 gathers the ZeRO-3 partitions of the parameters that training
changes, in buckets sized by their full element count (`ds_numel`: under ZeRO-3 a parameter's
`numel()` is its local shard, often 0), and puts each bucket in Ray's object store; every rollout
actor then loads the union of the buckets at once (vLLM workers + its pre-pass copy). Frozen
parameters (the vision tower, and the glimpse modules unless algo.train_vip) are never sent.

This is the CPU path, and on GPU it works too (tensors travel through the object store, across
nodes when rollout and policy sit on different ones). A dedicated NCCL group between policy
rank 0 and the vLLM workers (the faster GPU path OpenRLHF and verl use) is not built: no GPU
was available to test it. Must not decide when to sync (the driver does).
"""

from __future__ import annotations

import time

import ray

DEFAULT_BUCKET_NUMEL = 64 * 1024 * 1024  # elements per bucket: 256 MB of fp32, 128 MB of bf16


class WeightSync:
    """Pushes policy weights to rollout actors.

    Args:
        policy_group: the ActorGroup of PolicyActor ranks (all join the gather).
        rollout_actors: Ray handles of RolloutActor engines.
        bucket_numel: elements per bucket (bounds rank 0's extra memory during the gather).
    """

    def __init__(self, policy_group, rollout_actors: list,
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL):
        self.policy_group, self.rollout_actors = policy_group, rollout_actors
        self.bucket_numel = bucket_numel
        self.version = 0

    def push(self) -> dict[str, float]:
        """Gathers, sends and loads; returns timing and size figures for the step's record."""
        start = time.perf_counter()
        refs = self.policy_group.run("trainable_buckets", self.bucket_numel)[0]
        gathered = time.perf_counter()
        counts = ray.get([actor.load_weight_buckets.remote(*refs)
                          for actor in self.rollout_actors])
        self.version += 1
        return {"timing_s/weight_sync": time.perf_counter() - start,
                "timing_s/weight_gather": gathered - start,
                "weight_sync/tensors": float(counts[0]) if counts else 0.0,
                "weight_sync/buckets": float(len(refs)), "weight_sync/version": self.version}
