"""Glimpse modules: stage-1 gradients, ViT feature order, save/load, and the look command."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from glimpseprune.grid import boxes_to_token_mask
from pipeline.config import GlimpseConfig, SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model path, GlimpsePruneModel with untrained modules, processor, two synthetic rows)."""
    from transformers import AutoProcessor

    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.tiny import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    model = GlimpsePruneModel.from_pretrained(path, GlimpseConfig())
    rows = list(generate_split(SyntheticConfig(num_train=2), "train"))
    return path, model, processor, rows


def _batch(processor, rows):
    return dict(processor(text=[prompt_text(processor, r["question"]) for r in rows],
                          images=[r["image"] for r in rows], padding=True, return_tensors="pt"))


def test_stage1_trains_only_glimpse_and_vip(tiny):
    _, model, processor, rows = tiny
    model.stage1()
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    modules_before = {k: v.clone() for k, v in model.glimpse_modules.state_dict().items()}
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3)
    logits = model.vip_logits(_batch(processor, rows))
    targets = [torch.from_numpy(boxes_to_token_mask(r["boxes"], r["image"].size[::-1],
                                                    (16, 16))).flatten().float() for r in rows]
    loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(lg, t)
               for lg, t in zip(logits, targets, strict=True))
    loss.backward()
    base_params = dict(model.base.named_parameters())
    assert all(p.grad is None for p in base_params.values())
    k = model.glimpse_modules.spec.prune_layer
    for name, param in model.glimpse_modules.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if name == "glimpse_token.vectors_LD":  # layers 0..K feed the VIP, later ones do not
            assert param.grad[: k + 1].abs().sum() > 0 and param.grad[k + 1:].abs().sum() == 0
        else:
            assert param.grad.abs().sum() > 0, name
    optimizer.step()
    assert all(torch.equal(v, base_before[k]) for k, v in model.base.state_dict().items())
    changed = [k for k, v in model.glimpse_modules.state_dict().items()
               if not torch.equal(v, modules_before[k])]
    assert "vip.out_proj.weight" in changed and "glimpse_token.proj.weight" in changed
    model.glimpse_modules.load_state_dict(modules_before)
    model.glimpse_modules.zero_grad(set_to_none=True)
    model.glimpse_modules.eval()


def test_vit_features_are_in_the_llms_token_order(tiny):
    from glimpseprune.layout import pooled_vit_features

    _, model, processor, rows = tiny
    inputs = _batch(processor, rows[:1])
    visual = model.base.model.visual
    with torch.no_grad():
        out = model.base.model.get_image_features(inputs["pixel_values"],
                                                  inputs["image_grid_thw"],
                                                  output_hidden_states=True, return_dict=True)
        # Block -1 reads the patch embedding (entry 0), which is per patch: the processor lays
        # patches out merge unit by merge unit in row-major cell order, the LLM's order.
        ours = pooled_vit_features(visual, out.hidden_states, inputs["image_grid_thw"], [-1])[0]
        direct = visual.patch_embed(inputs["pixel_values"]).view(-1, 4, ours.shape[-1]).mean(1)
        in_window_order = out.hidden_states[0].view(-1, 4, ours.shape[-1]).mean(1)
    assert torch.allclose(ours, direct, atol=1e-6)
    assert not torch.allclose(in_window_order, direct, atol=1e-3)  # the reordering matters


def test_save_load_round_trip(tiny, tmp_path):
    from glimpseprune.io import load_modules, save_modules
    from glimpseprune.model import GlimpsePruneModel

    path, model, processor, rows = tiny
    with torch.no_grad():  # make the weights differ from any fresh init
        for param in model.glimpse_modules.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    save_modules(model.glimpse_modules, tmp_path / "mods")
    loaded = load_modules(tmp_path / "mods")
    assert loaded.spec == model.glimpse_modules.spec
    mine, theirs = model.glimpse_modules.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    reloaded = GlimpsePruneModel.from_pretrained(path, GlimpseConfig(),
                                                 modules_path=str(tmp_path / "mods"))
    inputs = _batch(processor, rows)
    with torch.no_grad():
        a, b = model.vip_logits(inputs), reloaded.vip_logits(inputs)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ValueError, match="prune_layer"):
        GlimpsePruneModel.from_pretrained(path, GlimpseConfig(prune_layer=1),
                                          modules_path=str(tmp_path / "mods"))


def test_look_command_writes_png(tiny, tmp_path):
    from PIL import Image

    path, _, _, rows = tiny
    rows[0]["image"].save(tmp_path / "img.png")
    out = subprocess.run(
        [sys.executable, "-m", "glimpseprune.look", "--model", str(path), "--image",
         str(tmp_path / "img.png"), "--question", rows[0]["question"], "--out",
         str(tmp_path / "out"), "--max-new-tokens", "3"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["modules"] == "untrained" and record["visual_tokens"] == 256
    assert 1 <= record["kept_tokens"] <= 256
    assert record["keep_ratio"] == pytest.approx(record["kept_tokens"] / 256)
    with Image.open(record["png"]) as png:
        assert png.size == rows[0]["image"].size


def test_highlight_dims_pruned_cells():
    from PIL import Image

    from glimpseprune.look import highlight

    image = Image.new("RGB", (64, 32), (200, 200, 200))
    keep = torch.tensor([True, False, False, False, False, False, False, False])
    out = highlight(image, keep, (2, 4)).convert("RGB")
    assert out.getpixel((8, 8)) == (200, 200, 200)  # inside the kept cell (row 0, col 0)
    assert out.getpixel((40, 24))[0] < 200  # a pruned cell is darker


def test_vip_attention_stays_inside_each_image(tiny):
    _, model, _, _ = tiny
    vip, spec = model.glimpse_modules.vip, model.glimpse_modules.spec
    torch.manual_seed(0)
    rows_N = torch.arange(12) // 4 % 3
    cols_N = torch.arange(12) % 4
    image_N = (torch.arange(12) >= 8).long()  # tokens 0..7 image 0, 8..11 image 1
    attn_NH = torch.randn(12, spec.text_heads)
    features = [torch.randn(12, spec.vision_hidden_size) for _ in spec.vit_layers]
    with torch.no_grad():
        before = vip(attn_NH, features, rows_N, cols_N, image_N)
        changed = [f.clone() for f in features]
        for f in changed:
            f[8:] += 1.0  # only image 1's features move
        after = vip(attn_NH, changed, rows_N, cols_N, image_N)
        same_image = vip(attn_NH, changed, rows_N, cols_N, torch.zeros_like(image_N))
    assert torch.equal(before[:8], after[:8])
    assert not torch.allclose(before[8:], after[8:])
    assert not torch.allclose(after[:8], same_image[:8])  # one image: they would interact
