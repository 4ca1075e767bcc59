"""GRPO's training forward runs the vision tower and the VIP once per prompt, not per sample.

The G samples of a prompt share its image, so `GlimpsePruneModel.forward` on the distinct
prompts with `prompt_rows` must give every row exactly the replay log-probs, the VIP logits and,
through the policy's objective, the gradients of the per-row forward it replaces.
"""

from __future__ import annotations

import torch

from actors.batching import prompt_inputs
from actors.policy_grpo import mask_log_likelihood
from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import GlimpseConfig, SyntheticConfig
from pipeline.synthetic import generate_split


def _vip_loss_and_grads(model, inputs, masks, advantages, **dedup):
    model.zero_grad()
    responses = [[5, 6, 7][:1 + b % 3] for b in range(len(masks))]
    logprobs, vip = model(response_ids=responses, keep_masks=masks, with_vip=True,
                          **dedup, **inputs)
    loss = sum(-a * mask_log_likelihood(v, m, 1.0)
               for v, m, a in zip(vip, masks, advantages, strict=True))
    (loss + sum(lp.sum() for lp in logprobs)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [v.detach() for v in vip], [lp.detach() for lp in logprobs], grads


def test_vip_once_per_prompt_equals_once_per_row(tiny_model_dir):
    from transformers import AutoProcessor

    from glimpseprune.model import GlimpsePruneModel

    model = GlimpsePruneModel.from_pretrained(tiny_model_dir, GlimpseConfig(prune_layer=2))
    model.requires_grad_(True)  # the base too: the replay's gradients are compared as well
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    prompts = PromptBatch.from_rows(list(generate_split(SyntheticConfig(num_train=2,
                                                                        image_size=224),
                                                        "train")))
    # 5 rows: prompt 0 three times, prompt 1 twice, interleaved as a shard may hold them
    batch = RolloutBatch(prompts=prompts, prompt_index_B=[0, 1, 0, 0, 1],
                         response_ids=[[5, 6]] * 5)
    rows = list(range(5))
    generator = torch.Generator().manual_seed(0)
    masks = [torch.rand(64, generator=generator) < 0.3 for _ in rows]
    advantages = [1.0, -0.5, 0.25, -1.0, 0.75]
    inputs = prompt_inputs(processor, batch, rows, torch.device("cpu"))
    per_row, logp_row, grads_row = _vip_loss_and_grads(model, inputs, masks, advantages)
    distinct = prompt_inputs(processor, batch, [0, 1], torch.device("cpu"))
    once, logp_once, grads_once = _vip_loss_and_grads(model, distinct, masks, advantages,
                                                      prompt_rows=[0, 1, 0, 0, 1])
    assert len(once) == 5 and [len(lp) for lp in logp_once] == [1, 2, 3, 1, 2]
    for a, b in zip(per_row + logp_row, once + logp_once, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    # and both equal the two halves run on their own (each with its own vision-tower pass)
    with torch.no_grad():
        alone_vip = model.vip_logits(inputs)
        alone_logp = model.replay_logprobs(inputs, masks, [[5, 6, 7][:1 + b % 3] for b in rows])
    for a, b in zip(alone_vip + alone_logp, per_row + logp_row, strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert grads_row and set(grads_row) == set(grads_once)
    worst = max(float((grads_row[n] - grads_once[n]).abs().max()) for n in grads_row)
    scale = max(float(g.abs().max()) for g in grads_row.values())
    assert scale > 0 and worst <= 1e-5 * max(scale, 1.0), (worst, scale)
