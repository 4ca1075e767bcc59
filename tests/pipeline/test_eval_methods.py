"""The methods `pipeline.evaluate --methods` compares: their signals match an independent
transformers forward, their masks keep what they say, the analytic prefill ratio, the
aggregates and the table."""

from __future__ import annotations

import pytest
import torch

from pipeline.embedded import EMBEDDED_DIR, MODULES_DIR
from pipeline.eval_methods import fixed_ratio_masks, prefill_flops_ratio, row_signals
from pipeline.eval_report import aggregate, table


def test_prefill_flops_ratio_by_hand():
    # 4 layers, K = 2, 16 text + 64 visual tokens, 8 kept: full = 80, pruned = 24 tokens.
    # exact: 3 layers x 80 + 1 layer x 24 = 264 of 4 x 80 = 320 -> 0.825
    assert prefill_flops_ratio("exact", 16, 64, 8, 4, 2, False) == pytest.approx(264 / 320)
    # vllm, no decoder scoring pass: 4 x 24 = 96 of 320 -> 0.3
    assert prefill_flops_ratio("vllm", 16, 64, 8, 4, 2, False) == pytest.approx(0.3)
    # vllm with the pre-pass (layers 0..2 over 80 tokens): 96 + 240 = 336 of 320 -> 1.05
    assert prefill_flops_ratio("vllm", 16, 64, 8, 4, 2, True) == pytest.approx(1.05)
    with pytest.raises(ValueError, match="inference form"):
        prefill_flops_ratio("hf", 16, 64, 8, 4, 2, False)


@pytest.fixture(scope="module")
def embedded_batch():
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.processor import load_processor
    from pipeline.config import load_config
    from pipeline.evaluate import _prompt_batch
    from pipeline.synthetic import generate_split

    cfg = load_config("configs/tiny.yaml", ["data.synthetic.num_train=3"])
    rows = list(generate_split(cfg.data.synthetic, "train"))[:4]
    model = GlimpsePruneModel.from_pretrained(EMBEDDED_DIR, cfg.glimpse,
                                              modules_path=str(MODULES_DIR))
    processor = load_processor(EMBEDDED_DIR, cfg.model)
    return model, processor, rows, _prompt_batch(processor, rows)


def test_fastv_signal_is_the_last_tokens_attention_in_a_plain_transformers_forward(
        embedded_batch):
    """The piecewise pass's layer-K logits, softmaxed, equal the attention weights an eager
    full forward of transformers reports for the last prompt token (and so rank alike)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model, processor, rows, inputs = embedded_batch
    signals = row_signals(model, inputs, [r["question"] for r in rows], processor.tokenizer)
    eager = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        EMBEDDED_DIR, attn_implementation="eager").eval()
    full = dict(processor(text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["question"]}]}],
        add_generation_prompt=True, tokenize=False) for r in rows],
        images=[r["image"] for r in rows], padding=True, return_tensors="pt"))
    with torch.no_grad():
        out = eager(**full, output_attentions=True)
    layer = model.glimpse_modules.spec.prune_layer
    for b, sig in enumerate(signals):
        weights_HK = out.attentions[layer][b, :, -1, :]
        logits_HK = sig.attention_HK.masked_fill(~sig.valid_K, float("-inf"))
        assert torch.allclose(torch.softmax(logits_HK, -1), weights_HK, atol=1e-5)
        # The question's tokens were found as one run (not the every-text-token fallback).
        question_ids = processor.tokenizer.encode(rows[b]["question"], add_special_tokens=False)
        assert sig.instruction_MD.shape[0] == len(question_ids)


def test_fixed_ratio_masks_keep_the_asked_share(embedded_batch):
    model, processor, rows, inputs = embedded_batch
    signals = row_signals(model, inputs, [r["question"] for r in rows], processor.tokenizer)
    generator = torch.Generator().manual_seed(0)
    for method in ("random", "fastv", "divprune", "cdpruner"):
        masks = fixed_ratio_masks(method, [64] * len(rows), signals, 1 / 9, generator)
        assert [int(m.sum()) for m in masks] == [7] * len(rows)  # round(64 / 9) = 7
    # FastV keeps the visual tokens the last token attends to most (mean over heads).
    sig = signals[0]
    weights_V = torch.softmax(sig.attention_HK.masked_fill(~sig.valid_K, float("-inf")),
                              -1)[:, sig.visual_index_V].mean(0)
    fastv = fixed_ratio_masks("fastv", [64], signals[:1], 1 / 9, generator)[0]
    assert weights_V[fastv].min() >= weights_V[~fastv].max()
    with pytest.raises(ValueError, match="unknown fixed-ratio method"):
        fixed_ratio_masks("pdrop", [64], signals[:1], 0.5, generator)


def _record(form, setting, exact, kept, qtype="color"):
    return {"form": form, "setting": setting, "method": setting.split("@")[0],
            "target_keep_ratio": None, "question_type": qtype, "exact": exact,
            "anls": exact, "visual_tokens": 64, "kept_tokens": kept, "kv_tokens": 16 + kept,
            "prefill_flops_ratio": 1.0}


def test_aggregate_and_table_by_hand():
    records = [_record("exact", "fastv@0.111", 1.0, 7), _record("exact", "fastv@0.111", 0.0, 7,
                                                                "shape"),
               _record("exact", "baseline", 1.0, 64), _record("vllm", "baseline", 0.0, 64)]
    rows = aggregate(records, {("exact", "fastv@0.111"): {"latency_s": 0.5,
                                                          "peak_mem_mb": 100.0}})
    fastv = rows[0]
    assert (fastv["form"], fastv["setting"], fastv["rows"]) == ("exact", "fastv@0.111", 2)
    assert fastv["accuracy"] == 0.5 and fastv["accuracy/color"] == 1.0
    assert fastv["accuracy/shape"] == 0.0
    assert fastv["keep_ratio"] == pytest.approx(7 / 64) and fastv["kv_tokens"] == 23
    assert fastv["latency_s_per_sample"] == 0.25  # 0.5 s over 2 rows
    assert [r["accuracy"] for r in rows[1:]] == [1.0, 0.0]
    text = table(rows)
    assert len(text.splitlines()) == 4 and "fastv@0.111" in text and "0.109" in text
