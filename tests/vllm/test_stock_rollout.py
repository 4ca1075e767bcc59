"""The rollout actor in plain-GRPO mode (rollout.mask_mode=full): stock vLLM on pixels.

One stock engine for the module (CPU, fp32, the tiny random model). Its sampled rows must look
like the pruned path's (n rows per prompt, every visual token kept, KV = text + every visual
token), its log-probs must equal the transformers replay forward with every token kept (what
the policy trains on), and `load_weights` must change its answers and refuse unknown names.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.batch import PromptBatch
from pipeline.config import GlimpseConfig, ModelConfig, RolloutConfig, SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow
ROLLOUT = RolloutConfig(n=3, max_new_tokens=6, max_model_len=512, mask_mode="full",
                        ignore_eos=True)


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    from actors.rollout import RolloutActor

    actor = RolloutActor(str(tiny_model_dir), ModelConfig(), GlimpseConfig(prune_layer=2),
                         ROLLOUT, seed=0)
    yield actor
    actor.shutdown()


@pytest.fixture(scope="module")
def prompts():
    return PromptBatch.from_rows(list(generate_split(SyntheticConfig(num_train=2), "train")))


def test_stock_rows_keep_every_token_and_share_the_prompt(actor, prompts):
    assert actor.model is None  # no pre-pass copy in this mode
    out = actor.generate(prompts, n=3)
    assert out.prompt_index_B == [0, 0, 0, 1, 1, 1]
    assert out.extras["error"] == [None] * 6
    assert all(len(ids) == 6 for ids in out.response_ids)
    assert out.extras["visual_tokens"] == [256] * 6  # 448 px: 16 x 16 merged cells
    assert out.extras["kept_tokens"] == out.extras["visual_tokens"]
    assert all(mask == [True] * 256 for mask in out.keep_mask_BV)
    text = len(actor.processor.tokenizer(prompt_text(actor.processor,
                                                     prompts.questions[0]))["input_ids"]) - 1
    # the prompt string holds one placeholder; vLLM expands it to the 256 visual tokens
    assert out.extras["prompt_tokens"][0] == text + 256
    with pytest.raises(ValueError, match="stock vLLM"):
        actor.generate(prompts, n=1, keep_masks=[[True] * 64] * 2)


def test_stock_logprobs_match_the_replay_forward_with_every_token(actor, prompts,
                                                                   tiny_model_dir):
    from glimpseprune.model import GlimpsePruneModel

    model = GlimpsePruneModel.from_pretrained(tiny_model_dir, GlimpseConfig(prune_layer=2))
    out = actor.generate(prompts, n=3)
    worst = 0.0
    for row, i in enumerate(out.prompt_index_B):
        inputs = dict(actor.processor(text=[prompt_text(actor.processor, prompts.questions[i])],
                                      images=[prompts.images[i]], return_tensors="pt"))
        mask_V = torch.tensor(out.keep_mask_BV[row])
        with torch.no_grad():
            replay = model.replay_logprobs(inputs, [mask_V], [out.response_ids[row]])[0]
        worst = max(worst, float((torch.tensor(out.rollout_logprobs[row]) - replay).abs().max()))
    print(f"stock vLLM vs replay (every token) max |dlogprob| {worst:.2e}")
    assert worst < 1e-4


def test_load_weights_changes_the_stock_engine_and_refuses_unknown_names(actor, prompts,
                                                                         tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    before = actor.generate(prompts, n=1, greedy=True)
    with pytest.raises(KeyError, match="does not have"):
        actor.load_weights({"model.language_model.no_such.weight": torch.zeros(1)})
    generator = torch.Generator().manual_seed(3)
    changed = {name: tensor * (0.5 + torch.rand(tensor.shape, generator=generator))
               for name, tensor in base.state_dict().items()
               if name.startswith("model.language_model.layers.")}
    changed["glimpse_modules.anything"] = torch.zeros(1)  # no glimpse modules here: dropped
    actor.load_weights(changed)
    after = actor.generate(prompts, n=1, greedy=True)
    change = max(abs(a - b) for x, y in zip(after.rollout_logprobs, before.rollout_logprobs,
                                            strict=True) for a, b in zip(x, y, strict=False))
    assert change > 1e-2
