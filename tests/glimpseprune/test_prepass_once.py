"""The rollout pre-pass runs the vision tower once and gives what separate passes give."""

from __future__ import annotations

import torch

from pipeline.embedded import EMBEDDED_DIR, MODULES_DIR


def test_vip_logits_and_vision_from_one_vision_pass():
    from glimpseprune.layout import build_layout
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.processor import load_processor
    from pipeline.config import load_config
    from pipeline.evaluate import _prompt_batch
    from pipeline.synthetic import generate_split

    cfg = load_config("configs/tiny.yaml", ["data.synthetic.num_train=2"])
    rows = list(generate_split(cfg.data.synthetic, "train"))[:3]
    model = GlimpsePruneModel.from_pretrained(EMBEDDED_DIR, cfg.glimpse,
                                              modules_path=str(MODULES_DIR))
    inputs = _prompt_batch(load_processor(EMBEDDED_DIR, cfg.model), rows)
    visual = model.base.model.visual
    calls = []
    hook = visual.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        vip_logits, vision = model.vip_logits_and_vision(inputs)
        assert len(calls) == 1  # one vision-tower forward for the whole batch
        hook.remove()
        expected_logits = model.vip_logits(inputs)
        expected_embeds = model.base.model.get_image_features(
            inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        expected_vit = build_layout(model.base, inputs,
                                    model.glimpse_modules.spec.vit_layers).vit_features
    for b in range(len(rows)):
        assert torch.equal(vip_logits[b], expected_logits[b])
        assert torch.equal(vision[b].embeds_VD, expected_embeds[b])
        assert len(vision[b].vit_features) == len(expected_vit[b]) > 0
        for got, want in zip(vision[b].vit_features, expected_vit[b], strict=True):
            assert torch.equal(got, want)
