"""Weight sync (F6 acceptance): after one GRPO update and `WeightSync.push()`, the rollout
engine answers exactly as a fresh engine started on the policy's HF export does.

On local Ray: a 1-rank GRPO PolicyActor group and a Ray-wrapped RolloutActor on the same tiny
base (224-px images: 64 visual tokens), then a second, fresh RolloutActor on the export folder.
Greedy decoding on fixed keep masks makes the two engines comparable token by token. Runs for
full fine-tuning and for LoRA (policy.lora.enabled: adapters injected into the base, merged
W + scale * B @ A sent and exported under the base's own names). LoRA syncs through Ray's object
store, full fine-tuning through the gloo collective (rollout.weight_sync=collective), so the
same exactness check holds both routes.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

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


def _config(lora: bool):
    return load_config("configs/tiny.yaml", [
        "policy.num_ranks=1", "policy.lr=1e-2", "policy.warmup_ratio=0", "algo.kl_coef=0",
        "rollout.max_new_tokens=6", f"policy.lora.enabled={str(lora).lower()}",
        "algo.train_vip=false"])


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


@pytest.fixture(scope="module")
def base_engine(ray_local, tiny_model_dir, tmp_path_factory):
    """One RolloutActor on the tiny base, shared by the tests (an engine start is the slow
    part), with what it answers before any sync: greedy generations on fixed keep masks, the
    pre-pass VIP logits, and a sampled GRPO batch (non-zero advantages) to train on.

    `engine_for(lora)` hands it out while it still answers for the test: LoRA needs the base's
    weights; full fine-tuning sends every weight a LoRA sync wrote (the language model's
    Linear weights), so it may follow one. Otherwise the engine is restarted on the base."""
    import ray

    from glimpseprune.io import save_modules
    from glimpseprune.model import GlimpsePruneModel

    cfg = _config(False)
    modules = save_modules(GlimpsePruneModel.from_pretrained(tiny_model_dir, cfg.glimpse, seed=0)
                           .glimpse_modules, tmp_path_factory.mktemp("glimpse") / "modules")
    glimpse_cfg = replace(cfg.glimpse, modules_path=str(modules))
    prompts = PromptBatch.from_rows(list(generate_split(
        SyntheticConfig(num_train=2, image_size=224), "train")))
    generator = torch.Generator().manual_seed(7)
    masks = [(torch.rand(VISUAL, generator=generator) < 0.4).tolist() for _ in range(4)]
    shared = SimpleNamespace(glimpse_cfg=glimpse_cfg, prompts=prompts, masks=masks,
                             synced=None, engine=_start_rollout(tiny_model_dir, cfg, glimpse_cfg))

    def engine_for(lora: bool):
        if shared.synced not in (None, "lora") or (lora and shared.synced is not None):
            _stop_rollout(shared.engine)
            shared.engine = _start_rollout(tiny_model_dir, cfg, glimpse_cfg)
        shared.synced = "lora" if lora else "full"  # from the push on (it may fail midway)
        return shared.engine

    shared.engine_for = engine_for
    try:
        shared.before = ray.get(shared.engine.generate.remote(prompts, 2, True, masks))
        shared.vip_before = ray.get(shared.engine.prepass.remote(prompts))[0][0].vip_logits_V
        # The GRPO batch: the engine's own samples (sampled keep masks) on the base weights.
        shared.batch = ray.get(shared.engine.generate.remote(prompts, 2))
        assert shared.before.extras["error"] == [None] * 4
        assert shared.batch.extras["error"] == [None] * 4
        shared.batch.advantages_B = [1.0, -1.0, 1.0, -1.0]
        yield shared
    finally:
        _stop_rollout(shared.engine)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])  # LoRA first: see above
def test_synced_engine_answers_as_a_fresh_engine_on_the_export(base_engine, tiny_model_dir,
                                                               tmp_path, lora):
    import ray
    from transformers import Qwen2_5_VLForConditionalGeneration

    from actors.group import ActorGroup
    from actors.policy import PolicyActor
    from actors.weight_sync import WeightSync

    cfg, shared = _config(lora), base_engine
    prompts, masks, glimpse_cfg = shared.prompts, shared.masks, shared.glimpse_cfg
    rollout = shared.engine_for(lora)
    policy = ActorGroup(PolicyActor, 1, args=(cfg.policy, cfg.model, str(tiny_model_dir), 0, 10),
                        kwargs={"grpo": {"glimpse": glimpse_cfg, "algo": cfg.algo,
                                         "mask_temperature": 1.0}})
    try:
        # One GRPO update, weights move (with LoRA: B starts at zero, the step makes it not).
        stats = policy.run_split("train_step", shared.batch, "grpo")[0]
        # Same weights on both sides before the update: vLLM's and the replay's log-probs agree.
        assert stats["logprob_abs_diff"] < 1e-4, stats
        # Small buckets, so the sync really sends several and loads their union.
        sync = WeightSync(policy, [rollout], bucket_numel=300_000,
                          mode="object_store" if lora else "collective", timeout_s=120).push()
        synced = ray.get(rollout.generate.remote(prompts, 2, True, masks))
        vip_synced = ray.get(rollout.prepass.remote(prompts))[0][0].vip_logits_V
        policy.run("export_hf", str(tmp_path / "export"))
    finally:
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
    moved = _max_diff(synced.rollout_logprobs, shared.before.rollout_logprobs)
    print(f"[{'lora' if lora else 'full'}] synced vs fresh max |dlogprob| {diff:.2e}; the sync "
          f"changed them by {moved:.2e}; {sync}")
    assert diff < 1e-5
    assert moved > 1e-2  # the engine really runs the new weights
    # The pre-pass copy was synced too (the base under layers 0..K moved; the modules did not).
    assert torch.allclose(vip_synced, vip_fresh, atol=1e-5)
    assert not torch.allclose(vip_synced, shared.vip_before, atol=1e-3)
    assert sync["weight_sync/buckets"] > 1 and sync["weight_sync/version"] == 1
    assert sync["timing_s/weight_sync"] > 0.0
    assert sync["weight_sync/mb"] > 0.0 and sync["weight_sync/mb_per_s"] > 0.0

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    names = [n for n, _ in base.named_parameters()]
    exported, saved_base = _safetensors(export), _safetensors(tiny_model_dir)
    # The export is a plain HF checkpoint: adapters merged, none left, the base's own names.
    assert not [k for k in exported if "lora_" in k or "base_layer" in k]
    assert set(exported) == set(saved_base)
    if not lora:
        # Only what training changes was sent: the language model and head, not the frozen
        # vision tower (freeze_vision) nor the glimpse modules (algo.train_vip is off).
        trainable = [n for n in names if not n.startswith("model.visual.")]
        assert len(trainable) < len(names)
        assert sync["weight_sync/tensors"] == len(trainable)
        return
    # LoRA: one merged weight per adapted Linear (7 per decoder layer), nothing else (the
    # adapters are all that trains; the glimpse modules stay frozen without algo.train_vip).
    layers = base.config.text_config.num_hidden_layers
    adapted = [n for n, m in base.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model.")
               and n.rsplit(".", 1)[-1] in cfg.policy.lora.target_modules]
    assert len(adapted) == 7 * layers
    # ... plus the biases of the adapted layers that have one (q/k/v): vLLM rebuilds its packed
    # qkv layer whole on reload, so a weight without its bias would leave the bias undefined.
    biased = [n for n in adapted if dict(base.named_modules())[n].bias is not None]
    assert len(biased) == 3 * layers
    assert sync["weight_sync/tensors"] == len(adapted) + len(biased)
    # The merge moved exactly the adapted weights; every other exported tensor (biases, norms,
    # embeddings, head, vision tower) is the base's. (The files use HF's checkpoint names,
    # "model.layers..." for the module's "model.language_model.layers...".)
    changed = sorted(k for k, v in exported.items() if not torch.equal(v, saved_base[k]))
    assert changed == sorted(n.replace("model.language_model.", "model.") + ".weight"
                             for n in adapted)


def _safetensors(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))
