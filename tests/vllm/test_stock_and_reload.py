"""The pruned engine against stock vLLM (keep-all) and against a fresh engine (weight reload).

Three engines, started one after another (CPU, fp32): stock vLLM Qwen2.5-VL fed pixels (its
outputs are collected, then it stops), the rollout actor's engine on the base weights - in its
own process, so that weight reloads cross vLLM's IPC as they do on a GPU - and a second actor
started on changed weights saved to disk. Keep-all requests carrying only embeddings must give
stock vLLM's greedy tokens and top-k log-probs at every step; after `load_weights` with the
changed weights, the first actor must answer as the fresh one does, without vLLM's insecure
(pickle) serialization switched on.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from pipeline.batch import PromptBatch
from pipeline.config import GlimpseConfig, ModelConfig, RolloutConfig, SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow
STEPS, TOP_K = 8, 5
ROLLOUT = RolloutConfig(n=2, max_new_tokens=STEPS, max_model_len=512, mask_mode="sampled")


def _params():
    from vllm import SamplingParams

    # ignore_eos: every step is compared even if the random model ends its turn early.
    return SamplingParams(temperature=0.0, max_tokens=STEPS, logprobs=TOP_K, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts():
    return PromptBatch.from_rows(list(generate_split(SyntheticConfig(num_train=2), "train")))


@pytest.fixture(scope="module")
def stock_outputs(tiny_model_dir, prompts):
    """Stock vLLM on raw images (its own vision tower), then stopped."""
    from transformers import AutoProcessor

    from glimpseprune.vllm_engine import start_engine, stop_engine

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    llm = start_engine(tiny_model_dir, ModelConfig(), ROLLOUT)
    try:
        requests = [{"prompt": prompt_text(processor, q), "multi_modal_data": {"image": image}}
                    for q, image in zip(prompts.questions, prompts.images, strict=True)]
        return llm.generate(requests, _params(), use_tqdm=False)
    finally:
        stop_engine(llm)


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    from actors.rollout import RolloutActor

    actor = RolloutActor(str(tiny_model_dir), ModelConfig(), GlimpseConfig(prune_layer=2),
                         replace(ROLLOUT, engine_process="separate"), seed=0)
    yield actor
    actor.shutdown()


def _keep_all_requests(actor, prompts):
    from glimpseprune.vllm_plugin import pruned_image_item

    prepass, errors = actor.prepass(prompts)
    assert errors == [None] * len(prompts)
    requests = []
    for item in prepass:
        mask_V = torch.ones(item.vision.embeds_VD.shape[0], dtype=torch.bool)
        image = pruned_image_item(item.vision.embeds_VD, item.grid_thw, mask_V)
        requests.append({"prompt": item.text, "multi_modal_data": {"image": image}})
    return requests


def test_keep_all_embeddings_match_stock_vllm_on_pixels(actor, prompts, stock_outputs):
    mine = actor.llm.generate(_keep_all_requests(actor, prompts), _params(), use_tqdm=False)
    worst = 0.0
    for ours, stock in zip(mine, stock_outputs, strict=True):
        assert list(ours.prompt_token_ids) == list(stock.prompt_token_ids)
        assert list(ours.outputs[0].token_ids) == list(stock.outputs[0].token_ids)
        assert len(ours.outputs[0].logprobs) == STEPS
        for step_ours, step_stock in zip(ours.outputs[0].logprobs, stock.outputs[0].logprobs,
                                         strict=True):
            assert set(step_ours) == set(step_stock)  # the same top-k (and sampled) tokens
            worst = max(worst, max(abs(step_ours[t].logprob - step_stock[t].logprob)
                                   for t in step_stock))
    print(f"keep-all vs stock vLLM: max |dlogprob| over {STEPS} steps x top-{TOP_K}: "
          f"{worst:.2e}")
    assert worst < 1e-5


def _changed_checkpoint(tiny_model_dir, folder):
    """The base weights with every language-model weight scaled by a random 0.9..1.1."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    # every layer, not only the 0..K the actor's pre-pass copy holds: vLLM gets all of them
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(3)
    changed = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.language_model.") or name.startswith("lm_head."):
            scale = 0.9 + 0.2 * torch.rand(tensor.shape, generator=generator)
            changed[name] = tensor * scale
    model.load_state_dict(changed, strict=False)
    model.save_pretrained(folder, safe_serialization=True)
    AutoProcessor.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return changed


def test_load_weights_answers_as_a_fresh_engine_on_those_weights(actor, prompts, tiny_model_dir,
                                                                 tmp_path):
    from actors.rollout import RolloutActor

    assert not actor.inline  # the reload below goes through vLLM's msgpack IPC
    assert os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION", "0") == "0"
    with pytest.raises(TypeError, match="VLLM_ALLOW_INSECURE_SERIALIZATION"):
        actor.llm.collective_rpc(len)  # a callable would need pickle: refused
    generator = torch.Generator().manual_seed(5)
    masks = [torch.rand(256, generator=generator) < 0.4 for _ in range(len(prompts) * 2)]
    before = actor.generate(prompts, n=2, greedy=True, keep_masks=masks)
    changed = _changed_checkpoint(tiny_model_dir, tmp_path / "changed")
    actor.load_weights(changed)
    after = actor.generate(prompts, n=2, greedy=True, keep_masks=masks)
    fresh = RolloutActor(str(tmp_path / "changed"), ModelConfig(), GlimpseConfig(prune_layer=2),
                         ROLLOUT, seed=0)
    try:
        expected = fresh.generate(prompts, n=2, greedy=True, keep_masks=masks)
        fresh_vip = fresh.prepass(prompts)[0][0].vip_logits_V
    finally:
        fresh.shutdown()
    assert after.response_ids == expected.response_ids
    diff = max(abs(a - b) for x, y in zip(after.rollout_logprobs, expected.rollout_logprobs,
                                          strict=True) for a, b in zip(x, y, strict=True))
    # (zip without strict: changed weights may end a greedy answer at another step)
    change = max(abs(a - b) for x, y in zip(after.rollout_logprobs, before.rollout_logprobs,
                                            strict=True) for a, b in zip(x, y, strict=False))
    print(f"reloaded vs fresh engine max |dlogprob| {diff:.2e}; reload changed them by "
          f"{change:.2e}")
    assert diff < 1e-5 and change > 1e-2
    # The pre-pass copy was updated too: same VIP logits as a model loaded from the new files.
    assert torch.allclose(actor.prepass(prompts)[0][0].vip_logits_V, fresh_vip, atol=1e-5)
