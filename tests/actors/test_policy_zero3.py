"""ZeRO-3 over gloo: two ranks train exactly like one (same seed and data)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import SyntheticConfig, load_config
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.cluster import init_ray

    init_ray(load_config("configs/tiny.yaml").cluster, log_to_driver=False)
    yield
    ray.shutdown()


def _batch(model_dir, rows=6):
    from transformers import AutoTokenizer

    from pipeline.sft import answer_batch

    tok = AutoTokenizer.from_pretrained(model_dir)
    return answer_batch(list(generate_split(SyntheticConfig(num_train=rows), "train")), tok)


def _train(model_dir, ranks, steps=3):
    from actors.group import ActorGroup
    from actors.policy import PolicyActor

    cfg = load_config("configs/tiny.yaml", ["policy.micro_batch_size=2", "policy.lr=1e-3"])
    group = ActorGroup(PolicyActor, ranks, args=(cfg.policy, cfg.model, str(model_dir), 0, 10))
    try:
        batch = _batch(model_dir, rows=5)
        losses = [group.run_split("train_step", batch)[0]["loss"] for _ in range(steps)]
        state = group.run("gathered_state_dict")[0]
        logprobs = [lp for shard in group.run_split("compute_logprobs", batch) for lp in shard]
    finally:
        group.shutdown()
    return losses, state, logprobs


def test_two_ranks_equal_one_rank(ray_local, tiny_model_dir):
    losses_1, state_1, logprobs_1 = _train(tiny_model_dir, 1)
    losses_2, state_2, logprobs_2 = _train(tiny_model_dir, 2)
    # 5 rows, micro-batches of 2: one rank runs 3 micro-batches (2+2+1); two ranks get 3 and 2
    # rows, i.e. 2 and 1 micro-batches, so rank 1 repeats one with weight 0 (or both would hang
    # in ZeRO-3's all-gather). Sums are ordered differently: fp32 round-off is all that differs.
    assert losses_1[0] == pytest.approx(losses_2[0], abs=1e-6)
    assert losses_1[-1] < losses_1[0]  # it trains
    assert losses_2 == pytest.approx(losses_1, abs=1e-5)
    assert state_1.keys() == state_2.keys() and len(state_1) > 50
    from transformers import Qwen2_5_VLForConditionalGeneration

    initial = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
                   .named_parameters())
    diff = max((state_1[k] - state_2[k]).abs().max().item() for k in state_1)
    moved = max((state_1[k] - initial[k]).abs().max().item() for k in state_1)
    # Round-off only: Adam divides each gradient by its own running RMS, so a last-bit
    # difference in a near-zero gradient can move that weight by a good part of lr; 1% of how
    # far training moved the weights (3 steps at lr 1e-3) bounds it (the difference measured
    # 1.4e-5 on one CPU, under 1e-5 on another); a wrong split or a missed gradient moves them
    # by the movement's own size.
    assert diff < 0.01 * moved, (diff, moved)
    vision = [k for k in state_1 if k.startswith("model.visual.")]
    language = [k for k in state_1 if k.startswith("model.language_model.")]
    assert vision and language and set(state_1) == set(initial)
    # The frozen vision tower did not move; the language model trained.
    assert all(torch.equal(state_1[k], initial[k]) for k in vision)
    assert sum(not torch.equal(state_1[k], initial[k]) for k in language) > len(language) // 2
    assert max((torch.tensor(a) - torch.tensor(b)).abs().max().item()
               for a, b in zip(logprobs_1, logprobs_2, strict=True)) < 1e-5


@pytest.mark.parametrize("loss", ["glimpse_box", "glimpse_distill", "glimpse_box+distill"])
def test_stage1_trains_only_glimpse_modules_and_base_stays_bit_identical(ray_local,
                                                                         tiny_model_dir, loss):
    from actors.group import ActorGroup
    from actors.policy import PolicyActor
    from glimpseprune.model import GlimpsePruneModel

    # 448 px, the size the fixture's checkpoint was saved at and this test was written for: the
    # ranks now take model.max_pixels (tiny.yaml: 224 px), and at 64 tokens the random model's
    # distillation loss does not fall within four steps.
    cfg = load_config("configs/tiny.yaml", ["policy.micro_batch_size=2",
                                            "model.max_pixels=200704"])
    group = ActorGroup(PolicyActor, 2, args=(cfg.policy, cfg.model, str(tiny_model_dir), 0, 10),
                       kwargs={"lr": 1e-3, "glimpse_cfg": cfg.glimpse})
    try:
        batch = _batch(tiny_model_dir)
        first = group.run_split("train_step", batch, loss)[0]
        for _ in range(3):
            last = group.run_split("train_step", batch, loss)[0]
        state = group.run("gathered_state_dict")[0]
    finally:
        group.shutdown()
    assert last["loss"] < first["loss"]  # the same 6 rows four times: the loss goes down
    assert 0.0 < last["keep_ratio"] <= 1.0 and 0.0 <= last["box_recall"] <= 1.0
    initial = GlimpsePruneModel.from_pretrained(tiny_model_dir, cfg.glimpse, seed=0)
    before = dict(initial.named_parameters())
    base = [k for k in state if k.startswith("base.")]
    modules = [k for k in state if k.startswith("glimpse_modules.")]
    assert base and modules and set(state) == set(before)
    assert all(torch.equal(state[k], before[k]) for k in base)  # bit-identical base
    moved = [k for k in modules if not torch.equal(state[k], before[k])]
    assert len(moved) > len(modules) // 2


def test_lora_trains_adapters_and_exports_merged_hf_weights(ray_local, tiny_model_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from actors.group import ActorGroup
    from actors.policy import PolicyActor

    cfg = load_config("configs/tiny.yaml", ["policy.micro_batch_size=3", "policy.lr=1e-2",
                                            "policy.lora.enabled=true", "policy.lora.r=4"])
    group = ActorGroup(PolicyActor, 1, args=(cfg.policy, cfg.model, str(tiny_model_dir), 0, 10))
    try:
        batch = _batch(tiny_model_dir)
        losses = [group.run_split("train_step", batch)[0]["loss"] for _ in range(3)]
        group.run("export_hf", str(tmp_path / "merged"))
        after = [lp for shard in group.run_split("compute_logprobs", batch) for lp in shard]
    finally:
        group.shutdown()
    assert losses[-1] < losses[0]
    base = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
                .named_parameters())
    merged_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged")
    merged = dict(merged_model.named_parameters())
    assert merged.keys() == base.keys()  # plain HF names: no lora_ or base_layer keys
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q_proj], base[q_proj])  # the adapter was merged in
    embed = "model.language_model.embed_tokens.weight"
    assert torch.equal(merged[embed], base[embed])  # LoRA leaves untargeted weights alone
    # The merged export computes what the trainer computed (at the config's image size).
    from glimpseprune.processor import load_processor
    from pipeline.prompts import prompt_text

    with torch.no_grad():
        processor = load_processor(tiny_model_dir, cfg.model)
        row = batch.prompts
        enc = processor(text=[prompt_text(processor, row.questions[0])], images=[row.images[0]],
                        return_tensors="pt")
        ids = torch.cat([enc["input_ids"], torch.tensor([batch.response_ids[0]])], 1)
        # mm_token_type_ids: M-RoPE (t, h, w) ids, as the trainer uses (1-D without it).
        image_token = merged_model.config.image_token_id
        logits = merged_model(input_ids=ids, pixel_values=enc["pixel_values"],
                              image_grid_thw=enc["image_grid_thw"],
                              mm_token_type_ids=(ids == image_token).long()).logits[0]
        n = len(batch.response_ids[0])
        logp = torch.log_softmax(logits[-n - 1:-1], -1).gather(
            -1, torch.tensor(batch.response_ids[0])[:, None])[:, 0]
    assert torch.allclose(logp, torch.tensor(after[0]), atol=1e-4)


def test_trainer_logprobs_use_mrope_positions_like_the_pruned_forward(ray_local, tiny_model_dir):
    """The SFT trainer's forward must place tokens as generation, the pruned prefill and vLLM
    do (M-RoPE (t, h, w) ids). Regression: without mm_token_type_ids transformers 5 silently
    used 1-D positions, so a base trained that way answered differently at inference.
    Also the rank's processor takes model.max_pixels: tiny_model_dir saved 448 x 448, and
    tiny.yaml's 224 x 224 turns the 448 px images into 8 x 8 = 64 tokens (256 at the saved size:
    the log-probs would not match)."""
    from actors.batching import prompt_inputs
    from actors.group import ActorGroup
    from actors.policy import PolicyActor
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.processor import load_processor

    cfg = load_config("configs/tiny.yaml")
    batch = _batch(tiny_model_dir, rows=3)
    group = ActorGroup(PolicyActor, 1, args=(cfg.policy, cfg.model, str(tiny_model_dir), 0, 10))
    try:
        trainer = group.run("compute_logprobs", batch)[0]
    finally:
        group.shutdown()
    model = GlimpsePruneModel.from_pretrained(tiny_model_dir, cfg.glimpse)
    inputs = prompt_inputs(load_processor(tiny_model_dir, cfg.model), batch, range(3),
                           torch.device("cpu"))
    assert inputs["image_grid_thw"].tolist() == [[1, 16, 16]] * 3  # 224 px / 14: 16 x 16
    with torch.no_grad():
        replay = model.replay_logprobs(inputs, [None] * 3, batch.response_ids)
    diff = max((torch.tensor(t) - r).abs().max().item() for t, r in zip(trainer, replay,
                                                                         strict=True))
    assert diff < 1e-4, diff  # was ~1e-2 on a random model, ~1 on a trained one
