"""The exact pruned prefill and generation on the tiny Qwen2.5-VL (fp32, CPU).

Keep-all must reproduce unmodified transformers; pruning must be batch-invariant, compact the
cache to text + kept tokens, and keep the original M-RoPE ids.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import GlimpseConfig, SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GlimpsePruneModel with keep-all threshold, processor, two synthetic rows)."""
    from transformers import AutoProcessor

    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.tiny import write_tiny_model

    path = write_tiny_model(tmp_path_factory.mktemp("tiny"))
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    # threshold -1: sigmoid(logit) > -1 always, so the keep rule keeps every visual token.
    model = GlimpsePruneModel.from_pretrained(path, GlimpseConfig(threshold=-1.0))
    rows = list(generate_split(SyntheticConfig(num_train=2), "train"))
    return model, processor, rows


def _batch(processor, rows, questions):
    return dict(processor(text=[prompt_text(processor, q) for q in questions],
                          images=[r["image"] for r in rows], padding=True, return_tensors="pt"))


def _two_questions(rows):
    return [rows[0]["question"], rows[1]["question"] + " Answer with one word and no other word"]


def _check_keep_all_matches_transformers(model, inputs):
    base = model.base
    with torch.no_grad():
        reference = base(**inputs).logits
        state = model.prefill(inputs, all_logits=True)
        generated = base.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
    mine = model.generate(inputs, max_new_tokens=NEW_TOKENS)
    assert state.num_kept == state.num_visual == [256] * len(state.num_kept)
    valid = inputs["attention_mask"].bool()
    prefill_diff = (reference[valid] - state.logits_BNV[state.attention_mask_BN]).abs().max()
    step_diff = max((a - b).abs().max()
                    for a, b in zip(generated.logits, mine.step_logits, strict=True))
    assert prefill_diff < 1e-4 and step_diff < 1e-4, (prefill_diff, step_diff)
    eos = base.generation_config.eos_token_id
    expected = []
    for row in generated.sequences[:, inputs["input_ids"].shape[1]:].tolist():
        cut = row.index(eos) + 1 if eos in row else len(row)
        expected.append(row[:cut])
    assert mine.tokens == expected
    print(f"keep-all: prefill max |dlogit| {prefill_diff:.2e}, decode {step_diff:.2e}")


def test_keep_all_equals_transformers_single(tiny):
    model, processor, rows = tiny
    _check_keep_all_matches_transformers(model, _batch(processor, rows[:1],
                                                       [rows[0]["question"]]))


def test_keep_all_equals_transformers_padded_batch(tiny):
    model, processor, rows = tiny
    inputs = _batch(processor, rows, _two_questions(rows))
    lengths = inputs["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1]  # different question lengths: row 0 is left-padded
    _check_keep_all_matches_transformers(model, inputs)


def _threshold_for_different_counts(model, inputs):
    """A threshold between the VIP logits of the rows so they keep clearly different counts."""
    with torch.no_grad():
        logits = model.vip_logits(inputs)
    quantiles = [torch.quantile(v, q) for v, q in zip(logits, (0.3, 0.8), strict=True)]
    return float(torch.sigmoid(torch.stack(quantiles).mean()))


def test_batch_with_different_kept_counts_matches_one_by_one(tiny):
    model, processor, rows = tiny
    questions = _two_questions(rows)
    batch = _batch(processor, rows, questions)
    old = model.threshold
    try:
        model.threshold = _threshold_for_different_counts(model, batch)
        together = model.generate(batch, max_new_tokens=NEW_TOKENS)
        alone = [model.generate(_batch(processor, [r], [q]), max_new_tokens=NEW_TOKENS)
                 for r, q in zip(rows, questions, strict=True)]
    finally:
        model.threshold = old
    kept = together.num_kept
    assert kept[0] != kept[1] and 0 < min(kept) and max(kept) < 256, kept
    assert [a.num_kept[0] for a in alone] == kept
    assert together.tokens == [a.tokens[0] for a in alone]
    diff = max((together.step_logits[s][b] - alone[b].step_logits[s][0]).abs().max()
               for b in range(2) for s in range(min(len(together.step_logits),
                                                    len(alone[b].step_logits))))
    assert diff < 1e-4
    print(f"kept {kept} of 256; batch vs alone max |dlogit| {diff:.2e}")


def test_pruned_cache_holds_text_and_kept_tokens_only(tiny):
    model, processor, rows = tiny
    inputs = _batch(processor, rows, _two_questions(rows))
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand(256, generator=gen) < p for p in (0.2, 0.6)]
    with torch.no_grad():
        state = model.prefill(inputs, keep_masks=masks)
        full = model.prefill(inputs, keep_masks=[None, None])
    text_tokens = (inputs["attention_mask"].sum(1) - 256).tolist()
    expected = [t + int(m.sum()) for t, m in zip(text_tokens, masks, strict=True)]
    assert state.attention_mask_BN.sum(1).tolist() == expected
    for layer in state.cache.layers:  # padded to the longest row, no glimpse slot
        assert layer.keys.shape[2] == layer.values.shape[2] == max(expected)
    # Kept tokens keep their original (t, h, w) ids; decoding continues at original last + 1.
    original, _ = model.base.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"])
    for b in range(2):
        slots = state.attention_mask_BN[b]
        index = state.token_index_BN[b, slots]
        assert torch.equal(state.position_ids_3BN[:, b, slots], original[:, b, index])
        assert int(state.next_position_B[b]) == int(original[:, b].max()) + 1
        assert int(state.next_position_B[b]) != expected[b]  # not the compacted length
    # Layers 0..K's entries are gathered from the full pass, not recomputed (layer K+1's keys
    # too: they project layer K's output, which saw every token); the output differs.
    k = model.glimpse_modules.spec.prune_layer
    for i in range(k + 2):
        for b in range(2):
            slots = state.attention_mask_BN[b]
            full_index = full.token_index_BN[b, full.attention_mask_BN[b]]
            where = torch.searchsorted(full_index, state.token_index_BN[b, slots])
            theirs = full.cache.layers[i].keys[b][:, full.attention_mask_BN[b]][:, where]
            assert torch.equal(state.cache.layers[i].keys[b][:, slots], theirs), (i, b)
    change = (state.logits_BNV[:, -1] - full.logits_BNV[:, -1]).abs().max()
    assert change > 1e-3, change


def test_several_images_per_sample(tiny):
    model, processor, rows = tiny
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                        {"type": "text", "text": "Which is red?"}]}]
    one = [{"role": "user", "content": [{"type": "image"},
                                        {"type": "text", "text": rows[1]["question"]}]}]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
             for m in (two, one)]
    images = [rows[0]["image"], rows[1]["image"].resize((224, 336)), rows[1]["image"]]
    inputs = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    with torch.no_grad():
        reference = model.base(**inputs).logits
        state = model.prefill(inputs, all_logits=True)
    assert state.num_visual == [256 + 12 * 8, 256]  # 224x336 -> 8 x 12 merged cells
    valid = inputs["attention_mask"].bool()
    assert (reference[valid] - state.logits_BNV[state.attention_mask_BN]).abs().max() < 1e-4
    old = model.threshold, model.max_keep_ratio
    try:  # the cap counts all of a sample's visual tokens: floor(0.3 * 352) = 105
        model.threshold, model.max_keep_ratio = 0.0, 0.3
        with torch.no_grad():
            assert model.prefill(inputs).num_kept == [105, 76]
    finally:
        model.threshold, model.max_keep_ratio = old
