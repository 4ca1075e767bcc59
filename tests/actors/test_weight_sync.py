"""Weight sync (F6 acceptance): after one GRPO update and `WeightSync.push()`, the rollout
engine answers exactly as a fresh engine started on the policy's HF export does.

On local Ray: a 1-rank GRPO PolicyActor group and a Ray-wrapped RolloutActor on the same tiny
base (224-px images: 64 visual tokens), then a second, fresh RolloutActor on the export folder.
Greedy decoding on fixed keep masks makes the two engines comparable token by token.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.batch import PromptBatch
from pipeline.config import SyntheticConfig, load_config
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow
VISUAL = 64  # 224 px / 14 px patches = 16 x 16, merged 2 x 2 -> 8 x 8 tokens


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.cluster import init_ray

    init_ray(load_config("configs/tiny.yaml").cluster, log_to_driver=False)
    yield
    ray.shutdown()


def _start_rollout(model_dir, cfg, glimpse_cfg):
    import ray

    from actors.rollout import RolloutActor

    return ray.remote(RolloutActor).options(num_cpus=1).remote(
        str(model_dir), cfg.model, glimpse_cfg, cfg.rollout, seed=0)


def _stop_rollout(actor):
    import ray

    try:
        ray.get(actor.shutdown.remote(), timeout=60)
    finally:
        ray.kill(actor)


def _max_diff(a_rows, b_rows):
    return max(abs(a - b) for a, b_ in zip(a_rows, b_rows, strict=True)
               for a, b in zip(a, b_, strict=False))


def test_synced_engine_answers_as_a_fresh_engine_on_the_export(ray_local, tiny_model_dir,
                                                               tmp_path):
    import ray
    from transformers import Qwen2_5_VLForConditionalGeneration

    from actors.group import ActorGroup
    from actors.policy import PolicyActor
    from actors.weight_sync import WeightSync
    from glimpseprune.io import save_modules
    from glimpseprune.model import GlimpsePruneModel

    cfg = load_config("configs/tiny.yaml", [
        "policy.num_ranks=1", "policy.lr=1e-2", "policy.warmup_ratio=0", "algo.kl_coef=0",
        "rollout.max_new_tokens=6"])
    modules = save_modules(GlimpsePruneModel.from_pretrained(tiny_model_dir, cfg.glimpse, seed=0)
                           .glimpse_modules, tmp_path / "glimpse_modules")
    glimpse_cfg = replace(cfg.glimpse, modules_path=str(modules))
    prompts = PromptBatch.from_rows(list(generate_split(
        SyntheticConfig(num_train=2, image_size=224), "train")))
    generator = torch.Generator().manual_seed(7)
    masks = [(torch.rand(VISUAL, generator=generator) < 0.4).tolist() for _ in range(4)]

    policy = ActorGroup(PolicyActor, 1, args=(cfg.policy, cfg.model, str(tiny_model_dir), 0, 10),
                        kwargs={"grpo": {"glimpse": glimpse_cfg, "algo": cfg.algo,
                                         "mask_temperature": 1.0}})
    rollout = _start_rollout(tiny_model_dir, cfg, glimpse_cfg)
    try:
        before = ray.get(rollout.generate.remote(prompts, 2, True, masks))
        vip_before = ray.get(rollout.prepass.remote(prompts))[0][0].vip_logits_V
        # One GRPO update on the engine's own samples (sampled keep masks), weights move.
        batch = ray.get(rollout.generate.remote(prompts, 2))
        assert batch.extras["error"] == [None] * 4
        batch.advantages_B = [1.0, -1.0, 1.0, -1.0]
        stats = policy.run_split("train_step", batch, "grpo")[0]
        # Same weights on both sides before the update: vLLM's and the replay's log-probs agree.
        assert stats["logprob_abs_diff"] < 1e-4, stats
        # Small buckets, so the sync really sends several and loads their union.
        sync = WeightSync(policy, [rollout], bucket_numel=300_000).push()
        synced = ray.get(rollout.generate.remote(prompts, 2, True, masks))
        vip_synced = ray.get(rollout.prepass.remote(prompts))[0][0].vip_logits_V
        policy.run("export_hf", str(tmp_path / "export"))
    finally:
        _stop_rollout(rollout)
        policy.shutdown()

    export = tmp_path / "export"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    fresh = _start_rollout(export, cfg, replace(
        cfg.glimpse, modules_path=str(export / "glimpse_modules")))
    try:
        expected = ray.get(fresh.generate.remote(prompts, 2, True, masks))
        vip_fresh = ray.get(fresh.prepass.remote(prompts))[0][0].vip_logits_V
    finally:
        _stop_rollout(fresh)

    assert synced.extras["error"] == [None] * 4 and expected.extras["error"] == [None] * 4
    assert synced.keep_mask_BV == expected.keep_mask_BV == masks
    assert synced.response_ids == expected.response_ids
    diff = _max_diff(synced.rollout_logprobs, expected.rollout_logprobs)
    # (zip without strict: the moved weights may end a greedy answer at another step)
    moved = _max_diff(synced.rollout_logprobs, before.rollout_logprobs)
    print(f"synced vs fresh max |dlogprob| {diff:.2e}; the sync changed them by {moved:.2e}; "
          f"{sync}")
    assert diff < 1e-5
    assert moved > 1e-2  # the engine really runs the new weights
    # The pre-pass copy was synced too (the base under layers 0..K moved; the modules did not).
    assert torch.allclose(vip_synced, vip_fresh, atol=1e-5)
    assert not torch.allclose(vip_synced, vip_before, atol=1e-3)

    # Only what training changes was sent: the language model and head, not the frozen
    # vision tower (freeze_vision) nor the glimpse modules (algo.train_vip is off).
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    names = [n for n, _ in base.named_parameters()]
    trainable = [n for n in names if not n.startswith("model.visual.")]
    assert len(trainable) < len(names)
    assert sync["weight_sync/tensors"] == len(trainable)
    assert sync["weight_sync/buckets"] > 1 and sync["weight_sync/version"] == 1
    assert sync["timing_s/weight_sync"] > 0.0
