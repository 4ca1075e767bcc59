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


def test_vip_logits_skip_layer_k_but_equal_the_full_glimpse_pass():
    """vip_logits runs of layer K only its keys (what the glimpse query reads); the logits are
    the full glimpse pass's (the exact prefill's) bit for bit, on a padded batch of two image
    sizes, and layer K's attention and MLP really are skipped."""
    from PIL import Image

    from glimpseprune.decoder import text_model
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.processor import load_processor
    from pipeline.config import load_config
    from pipeline.prompts import prompt_text

    cfg = load_config("configs/tiny.yaml", ["model.max_pixels=200704"])
    model = GlimpsePruneModel.from_pretrained(EMBEDDED_DIR, cfg.glimpse,
                                              modules_path=str(MODULES_DIR))
    processor = load_processor(EMBEDDED_DIR, cfg.model)
    processor.tokenizer.padding_side = "left"
    generator = torch.Generator().manual_seed(0)
    images = [Image.fromarray(torch.randint(0, 255, (px, px, 3), generator=generator,
                                            dtype=torch.uint8).numpy()) for px in (448, 336)]
    texts = [prompt_text(processor, q) for q in ("What number is in the red box?",
                                                 "Which shape is left of the blue star?")]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    layer_k = text_model(model.base).layers[model.glimpse_modules.spec.prune_layer]
    calls = []
    hook = layer_k.mlp.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        fast = model.vip_logits(inputs)
        assert not calls  # layer K's MLP never ran
        full = model._glimpse_pass(inputs)[-1]
        assert calls  # ... where the exact prefill's pass runs it
    hook.remove()
    assert [len(v) for v in fast] == [256, 144]
    for got, want in zip(fast, full, strict=True):
        assert torch.equal(got, want)
