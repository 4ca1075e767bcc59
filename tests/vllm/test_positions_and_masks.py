"""Pure parts of the vLLM path (no engine): pruned M-RoPE ids and sampled keep masks."""

from __future__ import annotations

import torch


def test_pruned_positions_are_the_original_ids_of_the_kept_tokens(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from glimpseprune.vllm_model import pruned_mrope_positions
    from pipeline.config import SyntheticConfig
    from pipeline.prompts import prompt_text
    from pipeline.synthetic import generate_split

    row = next(generate_split(SyntheticConfig(num_train=1), "train"))
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    inputs = processor(text=[prompt_text(processor, row["question"])], images=[row["image"]],
                       return_tensors="pt")
    ids = inputs["input_ids"][0]
    original_3P, _ = base.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                               inputs["image_grid_thw"])
    visual_P = ids == base.config.image_token_id
    mask_V = torch.rand(256, generator=torch.Generator().manual_seed(0)) < 0.3
    keep_P = torch.ones_like(visual_P)
    keep_P[visual_P.nonzero().squeeze(-1)[~mask_V]] = False
    offset = int(visual_P.nonzero()[0])
    positions_3L, delta = pruned_mrope_positions(int(keep_P.sum()),
                                                 [(offset, 1, 16, 16, mask_V.numpy())])
    assert torch.equal(positions_3L, original_3P[:, 0, keep_P])
    # The next token goes where it goes in the unpruned prompt: original last + 1.
    assert int(keep_P.sum()) + delta == int(original_3P.max()) + 1


def test_sampled_masks_keep_the_budget_and_follow_the_probabilities():
    from glimpseprune.mask_sampling import sample_keep_masks

    logits_V = torch.tensor([4.0] * 50 + [-4.0] * 50)  # p = 0.982 and 0.018
    generator = torch.Generator().manual_seed(0)
    masks_GV = sample_keep_masks(logits_V, 200, generator=generator)
    rates = masks_GV.float().mean(0)
    assert rates[:50].mean() > 0.95 and rates[50:].mean() < 0.05
    assert len({tuple(m.tolist()) for m in masks_GV}) > 1  # samples differ
    # Budget: floor(0.3 * 100) = 30 caps the ~50 kept; the cap keeps the highest logits.
    capped_GV = sample_keep_masks(logits_V, 20, min_keep=1, max_keep_ratio=0.3,
                                  generator=generator)
    assert (capped_GV.sum(1) == 30).all() and not capped_GV[:, 50:].any()
    # Floor: at temperature 100 every p is ~0.5; min_keep 90 lifts every draw to >= 90.
    floored_GV = sample_keep_masks(logits_V, 20, temperature=100.0, min_keep=90,
                                   generator=generator)
    assert (floored_GV.sum(1) >= 90).all()
