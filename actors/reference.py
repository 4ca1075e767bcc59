"""ReferenceActor: one rank of the frozen reference model (ZeRO-3 inference) for GRPO's KL term.

Owns a DeepSpeed ZeRO-3 engine without an optimiser over a GlimpsePruneModel loaded from the
stage-2 starting point, and the replay log-probs of a RolloutBatch on each row's keep mask (the
same pruned sequence vLLM sampled from and the policy trains on). The driver skips this role
when algo.kl_coef is 0. Must not train, hold optimiser state or talk to MLflow.
"""

from __future__ import annotations

import os

import torch

from actors.batching import equal_micro_batches, prompt_inputs
from actors.build_locks import stale_lock_watchdog
from actors.group import DistInfo
from pipeline.batch import RolloutBatch
from pipeline.config import GlimpseConfig, ModelConfig, ReferenceConfig


class ReferenceActor:
    """A frozen copy of the starting model. Public methods are collective over the group.

    Args:
        dist: this rank's place in the group.
        reference_cfg: the `reference` config section.
        model_cfg: the `model` section (dtype, trust_remote_code, image sizes).
        glimpse_cfg: the `glimpse` section (the modules are loaded but never run here).
        model_path: HF checkpoint folder of the stage-2 starting point.
    """

    def __init__(self, dist: DistInfo, reference_cfg: ReferenceConfig, model_cfg: ModelConfig,
                 glimpse_cfg: GlimpseConfig, model_path: str):
        import deepspeed

        from glimpseprune.model import GlimpsePruneModel
        from glimpseprune.processor import load_processor

        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        dist.init_torch_distributed()  # its store and sockets on 127.0.0.1 on one node
        with stale_lock_watchdog():  # its JIT op build must not hang on a dead lock
            deepspeed.init_distributed(dist_backend=dist.backend)
        self.dist, self.cfg = dist, reference_cfg
        self.device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        bf16 = self.device.type == "cuda" and model_cfg.dtype == "bfloat16"
        self.processor = load_processor(model_path, model_cfg)
        model = GlimpsePruneModel.from_pretrained(
            model_path, glimpse_cfg, dtype=torch.bfloat16 if bf16 else torch.float32)
        model.requires_grad_(False).eval()
        # ZeRO-3 with no optimiser: parameters are partitioned and gathered per forward, so a
        # 7B reference costs each rank 1/world_size of its weights between calls.
        config = {"train_micro_batch_size_per_gpu": reference_cfg.micro_batch_size,
                  "train_batch_size": reference_cfg.micro_batch_size * dist.world_size,
                  "zero_optimization": {"stage": 3}, "bf16": {"enabled": bf16},
                  "steps_per_print": 10**9}
        self.engine, *_ = deepspeed.initialize(model=model, config=config)

    def _micro_batches(self, batch: RolloutBatch) -> list[tuple[list[int], int]]:
        return equal_micro_batches(len(batch), self.cfg.micro_batch_size)

    def _prompt_inputs(self, batch: RolloutBatch, rows: range) -> dict:
        return prompt_inputs(self.processor, batch, rows, self.device)

    def compute_logprobs(self, batch: RolloutBatch) -> list[list[float]]:
        """Per row of this rank's shard, the reference log-probs of its response tokens on its
        keep mask (the replay forward)."""
        from actors.policy_grpo import replay_logprobs

        return replay_logprobs(self, batch)
