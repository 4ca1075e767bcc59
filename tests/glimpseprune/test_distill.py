"""Soft pruning is the replay form made differentiable: hard probabilities reproduce it."""

from __future__ import annotations

import pytest
import torch

from glimpseprune.distill import distill_losses
from pipeline.config import GlimpseConfig, SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    from transformers import AutoProcessor

    from glimpseprune.model import GlimpsePruneModel

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.tokenizer.padding_side = "left"
    model = GlimpsePruneModel.from_pretrained(tiny_model_dir, GlimpseConfig(prune_layer=2))
    rows = list(generate_split(SyntheticConfig(num_train=2), "train"))
    # Different question lengths: the batch is left-padded.
    questions = [rows[0]["question"], rows[1]["question"] + " What"]
    inputs = dict(processor(text=[prompt_text(processor, q) for q in questions],
                            images=[r["image"] for r in rows], padding=True,
                            return_tensors="pt"))
    inputs.pop("mm_token_type_ids", None)
    return model, inputs, [[40, 41, 2], [50, 2]]


def _student_logprobs(model, inputs, answers, vip_logits):
    """Per-row answer log-probs of the soft-pruned forward, read through the loss: with a
    zero-KL teacher swap this is what the student computes."""
    import glimpseprune.distill as distill

    captured = {}
    original = distill._answer_logits

    def spy(*args):
        out = original(*args)
        captured.setdefault("calls", []).append(out)
        return out

    distill._answer_logits = spy
    try:
        distill_losses(model, inputs, answers, 0.0, vip_logits)
    finally:
        distill._answer_logits = original
    student = torch.log_softmax(captured["calls"][1], -1)  # calls: teacher, then student
    longest = max(len(a) for a in answers)
    return [student[b, longest - len(a):].gather(-1, torch.tensor(a)[:, None])[:, 0]
            for b, a in enumerate(answers)]


def test_keep_probability_one_is_the_unpruned_model(setup):
    model, inputs, answers = setup
    losses, info = distill_losses(model, inputs, answers, 0.0, [torch.full((256,), 30.0)] * 2)
    assert losses.abs().max() < 1e-6 and info["mean_keep_prob"] > 0.999


def test_hard_probabilities_reproduce_the_replay_form(setup):
    model, inputs, answers = setup
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(256, generator=generator) < 0.3,
             torch.rand(256, generator=generator) < 0.6]
    vip = [torch.where(m, 30.0, -60.0) for m in masks]
    soft = _student_logprobs(model, inputs, answers, vip)
    replay = model.replay_logprobs(inputs, masks, answers)
    full = model.replay_logprobs(inputs, [None, None], answers)
    assert max((s - r).abs().max().item() for s, r in zip(soft, replay, strict=True)) < 1e-5
    # and the check can fail: pruning moves these log-probs far more than the tolerance
    assert max((r - f).abs().max().item() for r, f in zip(replay, full, strict=True)) > 1e-3


def test_gradient_reaches_only_the_glimpse_modules(setup):
    model, inputs, answers = setup
    model.stage1()
    model.zero_grad()
    losses, _ = distill_losses(model, inputs, answers, sparsity=0.1)
    losses.sum().backward()
    assert all(p.grad is None for p in model.base.parameters())
    vip_grads = [p.grad for p in model.glimpse_modules.vip.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in vip_grads)
    model.eval()
