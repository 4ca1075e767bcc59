"""The policy and reference can reuse the rollout pre-pass's vision-tower outputs.

With `rollout.reuse_vision` the pruned rollout ships each prompt's merged image embeddings and
the VIP's pooled ViT features (`PromptVision`) with the batch; GRPO's training forward and the
reference replay then skip the frozen vision tower. They must give exactly what running the
tower gives (log-probs, VIP logits, every trained parameter's gradient), never call the tower,
and refuse features that do not fit the prompts.
"""

from __future__ import annotations

import pytest
import torch

from actors.batching import prompt_inputs
from actors.policy_grpo import mask_log_likelihood
from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import GlimpseConfig, SyntheticConfig
from pipeline.synthetic import generate_split

RESPONSES = [[5, 6], [7], [5, 6, 7], [8, 9]]


def _setup(tiny_model_dir):
    from transformers import AutoProcessor

    from glimpseprune.model import GlimpsePruneModel

    model = GlimpsePruneModel.from_pretrained(tiny_model_dir, GlimpseConfig(prune_layer=2))
    model.requires_grad_(True)
    model.base.model.visual.requires_grad_(False)  # GRPO's policy.freeze_vision
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    prompts = PromptBatch.from_rows(list(generate_split(
        SyntheticConfig(num_train=2, image_size=224), "train")))
    with torch.no_grad():  # what the rollout pre-pass makes and ships (CPU tensors)
        _, vision = model.vip_logits_and_vision(
            prompt_inputs(processor, RolloutBatch(prompts, [0, 1], [[], []]), [0, 1],
                          torch.device("cpu")))
    batch = RolloutBatch(prompts=prompts, prompt_index_B=[0, 1, 1, 0],
                         response_ids=RESPONSES)
    generator = torch.Generator().manual_seed(1)
    masks = [torch.rand(64, generator=generator) < 0.4 for _ in RESPONSES]
    return model, processor, batch, vision, masks


def _forward(model, inputs, masks, with_vip):
    model.zero_grad()
    logprobs, vip = model(response_ids=RESPONSES, keep_masks=masks, with_vip=with_vip,
                          prompt_rows=[0, 1, 1, 0], **inputs)
    loss = sum(lp.sum() for lp in logprobs)
    if with_vip:
        loss = loss + sum(-mask_log_likelihood(v, m, 1.0) for v, m in zip(vip, masks,
                                                                         strict=True))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [lp.detach() for lp in logprobs], [v.detach() for v in vip or []], grads


@pytest.mark.parametrize("with_vip", [True, False])
def test_reused_vision_equals_running_the_tower(tiny_model_dir, with_vip):
    model, processor, batch, vision, masks = _setup(tiny_model_dir)
    pixels = prompt_inputs(processor, batch, [0, 1], torch.device("cpu"))
    assert "vision" not in pixels and "pixel_values" in pixels
    logp_px, vip_px, grads_px = _forward(model, pixels, masks, with_vip)

    shipped = RolloutBatch(prompts=PromptBatch.concat([batch.prompts.take([0]),
                                                       batch.prompts.take([1])]),
                           prompt_index_B=batch.prompt_index_B, response_ids=RESPONSES)
    shipped.prompts.vision = vision
    reused = prompt_inputs(processor, shipped, [0, 1], torch.device("cpu"))
    assert "pixel_values" not in reused and len(reused["vision"]) == 2
    calls = []
    hook = model.base.model.visual.register_forward_hook(lambda *_: calls.append(1))
    logp_re, vip_re, grads_re = _forward(model, reused, masks, with_vip)
    hook.remove()
    assert calls == []  # the vision tower never ran
    assert len(vip_re) == (4 if with_vip else 0)
    for a, b in zip(logp_px + vip_px, logp_re + vip_re, strict=True):
        assert torch.allclose(a, b, atol=1e-6), float((a - b).abs().max())
    assert grads_px and set(grads_px) == set(grads_re)
    assert not any(".visual." in f".{n}" for n in grads_re)
    assert any(n.startswith("glimpse_modules.") for n in grads_re) == with_vip
    worst = max(float((grads_px[n] - grads_re[n]).abs().max()) for n in grads_px)
    scale = max(float(g.abs().max()) for g in grads_px.values())
    assert scale > 0 and worst <= 1e-5 * max(scale, 1.0), (worst, scale)


def test_vision_that_does_not_fit_is_refused(tiny_model_dir):
    from glimpseprune.layout import PromptVision, build_layout

    model, processor, batch, vision, _ = _setup(tiny_model_dir)
    inputs = prompt_inputs(processor, batch, [0, 1], torch.device("cpu"))
    short = [PromptVision(v.embeds_VD[:-4], [f[:-4] for f in v.vit_features]) for v in vision]
    with pytest.raises(ValueError, match="120 image embeddings for 128 image tokens"):
        build_layout(model.base, inputs, None, short)
    layers = model.glimpse_modules.spec.vit_layers
    fewer = [PromptVision(v.embeds_VD, v.vit_features[:-1]) for v in vision]
    with pytest.raises(ValueError, match="ViT feature layers given"):
        build_layout(model.base, inputs, layers, fewer)


def test_batches_carry_vision_with_their_prompts():
    from glimpseprune.layout import PromptVision

    def prompts(tag: str, n: int, vision: bool) -> PromptBatch:
        return PromptBatch(ids=[f"{tag}{i}" for i in range(n)], images=[None] * n,
                           questions=["q"] * n, answers=["a"] * n,
                           vision=[PromptVision(torch.full((2, 3), float(i)), [])
                                   for i in range(n)] if vision else [])

    joined = PromptBatch.concat([prompts("a", 2, True), prompts("b", 1, True)])
    assert [float(v.embeds_VD[0, 0]) for v in joined.vision] == [0.0, 1.0, 0.0]
    # one part without: none at all, so no prompt is paired with another's features
    assert PromptBatch.concat([prompts("a", 2, True), prompts("b", 1, False)]).vision == []
    rollout = RolloutBatch(prompts=prompts("p", 3, True), prompt_index_B=[0, 0, 2, 2],
                           response_ids=[[1]] * 4)
    first, second = rollout.split(2)
    assert first.prompts.ids == ["p0"] and float(first.prompts.vision[0].embeds_VD[0, 0]) == 0
    assert second.prompts.ids == ["p2"] and float(second.prompts.vision[0].embeds_VD[0, 0]) == 2
