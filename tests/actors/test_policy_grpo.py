"""GRPO on one ZeRO-3 policy rank: the mask log-likelihood, the replay log-probs, one update.

The policy is a real PolicyActor in GRPO mode on local Ray (tiny Qwen2.5-VL + seeded untrained
glimpse modules, 224-px images: 8 x 8 = 64 visual tokens); the keep masks are fixed random
draws, as a rollout would hand them over.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import SyntheticConfig, load_config
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow
VISUAL = 64  # 224 px / 14 px patches = 16 x 16 patches, merged 2 x 2 -> 8 x 8 tokens


def test_mask_log_likelihood_by_hand():
    from actors.policy_grpo import mask_log_likelihood

    # sigmoid(0) = 1/2 (kept: log 1/2); sigmoid(ln 3) = 3/4 (dropped: log(1 - 3/4) = log 1/4).
    # mean = (ln 1/2 + ln 1/4) / 2 = -3/2 ln 2 = -1.0397...
    logits = torch.tensor([0.0, math.log(3.0)])
    mask = torch.tensor([True, False])
    expected = -1.5 * math.log(2.0)
    assert float(mask_log_likelihood(logits, mask, 1.0)) == pytest.approx(expected, abs=1e-6)
    # Temperature 2 on [0, ln 9] gives the same probabilities: ln 9 / 2 = ln 3.
    doubled = torch.tensor([0.0, math.log(9.0)])
    assert float(mask_log_likelihood(doubled, mask, 2.0)) == pytest.approx(expected, abs=1e-6)
    # Flipping the mask: ln(1 - 1/2) and ln(3/4): mean = (ln 1/2 + ln 3/4) / 2 = -0.4904...
    flipped = 0.5 * (math.log(0.5) + math.log(0.75))
    assert float(mask_log_likelihood(logits, ~mask, 1.0)) == pytest.approx(flipped, abs=1e-6)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from pipeline.cluster import init_ray

    init_ray(load_config("configs/tiny.yaml").cluster, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cfg(tiny_model_dir, tmp_path_factory):
    """tiny.yaml for one rank, no KL, a wide clip and a large constant LR; fresh modules."""
    from glimpseprune.io import save_modules
    from glimpseprune.model import GlimpsePruneModel

    cfg = load_config("configs/tiny.yaml", [
        "policy.num_ranks=1", "policy.lr=1e-2", "policy.warmup_ratio=0",
        "policy.lr_schedule=constant", "algo.kl_coef=0", "algo.clip_low=0.99",
        "algo.clip_high=100", "algo.train_vip=false"])
    modules = tmp_path_factory.mktemp("grpo_modules") / "glimpse_modules"
    save_modules(GlimpsePruneModel.from_pretrained(tiny_model_dir, cfg.glimpse, seed=0)
                 .glimpse_modules, modules)
    return replace(cfg, glimpse=replace(cfg.glimpse, modules_path=str(modules)))


@pytest.fixture(scope="module")
def policy(ray_local, cfg, tiny_model_dir):
    from actors.group import ActorGroup
    from actors.policy import PolicyActor

    group = ActorGroup(PolicyActor, 1, args=(cfg.policy, cfg.model, str(tiny_model_dir), 0, 10),
                       kwargs={"grpo": {"glimpse": cfg.glimpse, "algo": cfg.algo,
                                        "mask_temperature": 1.0}})
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def prompts():
    return PromptBatch.from_rows(list(generate_split(
        SyntheticConfig(num_train=2, image_size=224), "train")))


def _masks(count, seed):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.rand(VISUAL, generator=generator) < 0.4).tolist() for _ in range(count)]


def _ids(tiny_model_dir, *texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tok(text)["input_ids"] + [tok.eos_token_id] for text in texts]


def test_compute_logprobs_is_the_replay_forward_on_the_keep_masks(policy, prompts, cfg,
                                                                  tiny_model_dir):
    from transformers import AutoProcessor

    from actors.batching import keep_masks_of, prompt_inputs
    from glimpseprune.model import GlimpsePruneModel

    # 2 prompts x 2 rows; the last row keeps every visual token (mask None).
    responses = _ids(tiny_model_dir, "red", "blue circle", "3", "green square")
    batch = RolloutBatch(prompts=prompts, prompt_index_B=[0, 0, 1, 1], response_ids=responses,
                         keep_mask_BV=_masks(3, seed=1) + [None])
    actor = policy.run_split("compute_logprobs", batch)[0]
    # The same weights as the rank holds now (whatever ran before in this module).
    state = policy.run("gathered_state_dict")[0]
    model = GlimpsePruneModel.from_pretrained(tiny_model_dir, cfg.glimpse)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not set(missing) & set(dict(model.named_parameters()))
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    rows = range(len(batch))
    with torch.no_grad():
        inputs = prompt_inputs(processor, batch, rows, torch.device("cpu"))
        expected = model.replay_logprobs(inputs, keep_masks_of(batch, rows, torch.device("cpu")),
                                         batch.response_ids)
    assert [len(lp) for lp in actor] == [len(r) for r in responses]
    worst = max(abs(a - b) for got, want in zip(actor, expected, strict=True)
                for a, b in zip(got, want.tolist(), strict=True))
    assert worst < 1e-6, worst
    # The keep mask matters: the same row with every visual token kept scores differently.
    full = policy.run_split("compute_logprobs", replace(batch, keep_mask_BV=None))[0]
    assert max(abs(a - b) for a, b in zip(full[0], actor[0], strict=True)) > 1e-4


def test_one_update_moves_rows_by_their_advantage_sign(policy, prompts, tiny_model_dir):
    # Two rows of prompt 0, each on its own keep mask: a 3-token answer with advantage +1 and
    # a 1-token answer with advantage -1.
    responses = _ids(tiny_model_dir, "red circle", "")
    assert [len(r) for r in responses] == [3, 1]
    batch = RolloutBatch(prompts=prompts, prompt_index_B=[0, 0], response_ids=responses,
                         keep_mask_BV=_masks(2, seed=2), advantages_B=[1.0, -1.0])
    before = policy.run_split("compute_logprobs", batch)[0]
    batch.rollout_logprobs = before  # as if vLLM had sampled with exactly the trainer's numbers
    stats = policy.run_split("train_step", batch, "grpo")[0]
    after = policy.run_split("compute_logprobs", batch)[0]
    print(f"sum log p: +1 row {sum(before[0]):.4f} -> {sum(after[0]):.4f}, "
          f"-1 row {sum(before[1]):.4f} -> {sum(after[1]):.4f}")
    assert sum(after[0]) > sum(before[0]) + 1e-3
    assert sum(after[1]) < sum(before[1]) - 1e-3
    # On-policy: ratio 1, so per token -A; token mean over 3 + 1 tokens:
    # loss = -(3 * (+1) + 1 * (-1)) / 4 = -0.5. Nothing clipped, no KL (kl_coef 0).
    assert stats["loss"] == pytest.approx(-0.5, abs=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["kl"] == 0.0
    assert stats["tokens"] == 4.0 and stats["lr"] == pytest.approx(1e-2)  # constant, no warmup
    assert stats["logprob_abs_diff"] < 1e-6, stats["logprob_abs_diff"]
    assert stats["grad_norm"] > 0.0

    # The mismatch figure: rollout log-probs 0.5 above the trainer's on the first row only.
    # mean |trainer - rollout| over the 4 tokens = (3 * 0.5 + 1 * 0) / 4 = 0.375.
    batch.rollout_logprobs = [[lp + 0.5 for lp in after[0]], list(after[1])]
    stats = policy.run_split("train_step", batch, "grpo")[0]
    assert stats["logprob_abs_diff"] == pytest.approx(0.375, abs=1e-5)
