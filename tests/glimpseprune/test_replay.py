"""The replay forward: response log-probs on pruned prompts, all layers on the pruned sequence."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(base model, processor, a padded batch of two prompts, two responses)."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from glimpseprune.tiny import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()
    rows = list(generate_split(SyntheticConfig(num_train=2), "train"))
    questions = [rows[0]["question"], rows[1]["question"] + " Answer with one word"]
    inputs = dict(processor(text=[prompt_text(processor, q) for q in questions],
                            images=[r["image"] for r in rows], padding=True,
                            return_tensors="pt"))
    tok = processor.tokenizer
    responses = [tok.encode(r["answer"], add_special_tokens=False) + [tok.eos_token_id]
                 for r in rows]
    responses[1] = responses[1] + tok.encode(" red blue", add_special_tokens=False)
    return base, processor, inputs, responses


def _plain_logprobs(base, inputs, responses):
    """Unmodified transformers on prompt + response (one row at a time, no padding)."""
    out = []
    for b, response in enumerate(responses):
        valid = inputs["attention_mask"][b].bool()
        ids = torch.cat([inputs["input_ids"][b, valid], torch.tensor(response)])[None]
        types = torch.cat([inputs["mm_token_type_ids"][b, valid],
                           torch.zeros(len(response), dtype=torch.long)])[None]
        patches = inputs["image_grid_thw"].prod(-1).tolist()
        start = sum(patches[:b])
        with torch.no_grad():
            logits = base(input_ids=ids, mm_token_type_ids=types,
                          pixel_values=inputs["pixel_values"][start:start + patches[b]],
                          image_grid_thw=inputs["image_grid_thw"][b:b + 1]).logits[0]
        logprobs = torch.log_softmax(logits[-len(response) - 1:-1].float(), -1)
        out.append(logprobs.gather(-1, torch.tensor(response)[:, None]).squeeze(-1))
    return out


def _independent_pruned_logprobs(base, inputs, masks, responses, contiguous=False):
    """transformers' own forward on inputs_embeds of the kept tokens with explicit position_ids."""
    core = base.model
    embeds = core.get_input_embeddings()(inputs["input_ids"])
    image = torch.cat(core.get_image_features(inputs["pixel_values"],
                                              inputs["image_grid_thw"]).pooler_output)
    is_image = inputs["input_ids"] == base.config.image_token_id
    embeds = embeds.masked_scatter(is_image[..., None], image)
    positions, _ = core.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                       inputs["image_grid_thw"],
                                       attention_mask=inputs["attention_mask"])
    out = []
    for b, response in enumerate(responses):
        keep = inputs["attention_mask"][b].bool().clone()
        keep[is_image[b].nonzero().squeeze(-1)[~masks[b]]] = False
        response_t = torch.tensor(response)
        row = torch.cat([embeds[b, keep], core.get_input_embeddings()(response_t)])[None]
        pos = positions[:, b, keep]
        pos = torch.cat([pos, pos.max() + 1 + torch.arange(len(response))[None].expand(3, -1)], 1)
        if contiguous:
            pos = torch.arange(pos.shape[1])[None].expand(3, -1)
        with torch.no_grad():
            logits = base(inputs_embeds=row, position_ids=pos[:, None]).logits[0]
        logprobs = torch.log_softmax(logits[-len(response) - 1:-1].float(), -1)
        out.append(logprobs.gather(-1, response_t[:, None]).squeeze(-1))
    return out


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_keep_all_replay_equals_plain_model(tiny):
    from glimpseprune.replay import replay_logprobs

    base, _, inputs, responses = tiny
    with torch.no_grad():
        mine = replay_logprobs(base, inputs, [None, None], responses)
    plain = _plain_logprobs(base, inputs, responses)
    assert [len(m) for m in mine] == [len(r) for r in responses]
    diff = _max_diff(mine, plain)
    assert diff < 1e-4, diff
    print(f"keep-all replay vs plain transformers: max |dlogprob| {diff:.2e}")


def test_pruned_replay_equals_independent_computation(tiny):
    from glimpseprune.replay import replay_logprobs

    base, _, inputs, responses = tiny
    gen = torch.Generator().manual_seed(1)
    masks = [torch.rand(256, generator=gen) < p for p in (0.15, 0.5)]
    with torch.no_grad():
        mine = replay_logprobs(base, inputs, masks, responses)
    independent = _independent_pruned_logprobs(base, inputs, masks, responses)
    diff = _max_diff(mine, independent)
    assert diff < 1e-4, diff
    # Sensitivity: the same kept tokens at contiguous positions give other log-probs, and so
    # does keeping everything: the check above can tell positions and masks apart.
    contiguous = _independent_pruned_logprobs(base, inputs, masks, responses, contiguous=True)
    moved = _max_diff(mine, contiguous)
    unpruned = _max_diff(mine, _plain_logprobs(base, inputs, responses))
    assert moved > 1e-3 and unpruned > 1e-3, (moved, unpruned)
    print(f"pruned replay vs independent {diff:.2e}; contiguous positions move it {moved:.2e}; "
          f"keep-all moves it {unpruned:.2e}")


def test_replay_is_differentiable(tiny):
    from glimpseprune.replay import replay_logprobs

    base, _, inputs, responses = tiny
    masks = [torch.arange(256) % 3 == 0, torch.arange(256) < 40]
    logprobs = replay_logprobs(base, inputs, masks, responses)
    sum(lp.sum() for lp in logprobs).backward()
    grad = base.model.language_model.layers[0].self_attn.q_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    base.zero_grad(set_to_none=True)
