"""Weight sync: the policy's new weights -> every rollout engine, after each GRPO step.

Owns the transfer, by one of two routes (rollout.weight_sync). Either way the policy ranks
gather the ZeRO-3 partitions of the parameters that training changes, in buckets sized by their
full element count (`ds_numel`: under ZeRO-3 a parameter's `numel()` is its local shard, often
0), and every rollout actor loads the union of the buckets at once (vLLM workers + its pre-pass
copy). Frozen parameters (the vision tower, and the glimpse modules unless algo.train_vip) are
never sent.
- object_store: rank 0 puts each bucket in Ray's object store; each actor fetches them all.
- collective: a gloo group of its own between policy rank 0 and the actors
  (actors/weight_channel.py), set up once; rank 0 broadcasts each bucket while the next is
  gathered, as OpenRLHF and verl do over NCCL. Buckets travel as CPU tensors, so the same code
  runs on GPU clusters; a CUDA-tensor NCCL group straight into the vLLM workers is not built
  (no GPU was available to test it).
Must not decide when to sync (the driver does).
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
                 bucket_numel: int = DEFAULT_BUCKET_NUMEL, mode: str = "object_store",
                 timeout_s: float = 600.0):
        if mode not in ("object_store", "collective"):
            raise ValueError(f"weight sync mode {mode!r}: choose object_store or collective")
        self.policy_group, self.rollout_actors = policy_group, rollout_actors
        self.bucket_numel, self.mode, self.timeout_s = bucket_numel, mode, timeout_s
        self.version = 0
        self._channel_open = False

    def _open_channel(self) -> None:
        """Sets the gloo group up: 127.0.0.1 when policy rank 0 and every actor share a node,
        else rank 0's node address for the store and each member's own for its device."""
        sender = self.policy_group.actors[0]
        own = ray.get([sender.node_address.remote()]
                      + [a.node_address.remote() for a in self.rollout_actors])
        local = len(set(own)) == 1
        host = "127.0.0.1" if local else own[0]
        world = 1 + len(self.rollout_actors)
        port = ray.get(sender.open_weight_channel.remote(host, world, self.timeout_s))
        ray.get([sender.join_weight_channel.remote(host if local else own[0])]
                + [a.join_weight_channel.remote(host, port, rank, world, self.timeout_s,
                                                host if local else own[rank])
                   for rank, a in enumerate(self.rollout_actors, start=1)])
        self._channel_open = True

    def push(self) -> dict[str, float]:
        """Gathers, sends and loads; returns timing and size figures for the step's record."""
        if self.mode == "collective":
            return self._push_collective()
        start = time.perf_counter()
        refs = self.policy_group.run("trainable_buckets", self.bucket_numel)[0]
        gathered = time.perf_counter()
        loaded = ray.get([actor.load_weight_buckets.remote(*refs)
                          for actor in self.rollout_actors])
        tensors, sent = loaded[0] if loaded else (0, 0)
        return self._record(start, gathered, tensors, len(refs), sent)

    def replace_actor(self, index: int, actor) -> None:
        """A restarted rollout actor takes engine `index`'s place: it gets the policy's current
        weights now (through the object store: the collective's group has a dead member), and
        the next collective push sets up a new group with it."""
        self.rollout_actors[index] = actor
        self._channel_open = False
        if self.version == 0:
            return  # nothing pushed yet: the files it loaded are the policy's weights
        refs = self.policy_group.run("trainable_buckets", self.bucket_numel)[0]
        ray.get(actor.load_weight_buckets.remote(*refs))

    def _push_collective(self) -> dict[str, float]:
        if not self._channel_open:
            self._open_channel()
        start = time.perf_counter()
        # The receivers wait in the group first; then every policy rank gathers and rank 0
        # broadcasts bucket by bucket.
        loads = [a.receive_weights.remote() for a in self.rollout_actors]
        sent, sent_buckets = self.policy_group.run("send_weight_buckets", self.bucket_numel)[0]
        gathered = time.perf_counter()
        counts = ray.get(loads)
        return self._record(start, gathered, counts[0] if counts else 0, sent_buckets, sent)

    def _record(self, start: float, gathered: float, tensors: int, buckets: int,
                sent_bytes: int) -> dict[str, float]:
        """One push done: its version, and the timing and size figures for the step's record."""
        self.version += 1
        seconds = time.perf_counter() - start
        return {"timing_s/weight_sync": seconds, "timing_s/weight_gather": gathered - start,
                "weight_sync/tensors": float(tensors), "weight_sync/buckets": float(buckets),
                "weight_sync/mb": sent_bytes / 2**20,
                "weight_sync/mb_per_s": sent_bytes / 2**20 / seconds if seconds else 0.0,
                "weight_sync/version": self.version}
