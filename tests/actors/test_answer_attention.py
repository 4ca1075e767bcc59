"""Box-attention supervision: the loss by hand, the hooks on a real tiny model, the LR restart."""

from __future__ import annotations

import math

import pytest
import torch

from actors.answer_attention import AttentionCapture, box_attention_loss, word_attention_loss
from actors.policy import _group_lr_lambdas, _lr_lambda
from pipeline.config import PolicyConfig

IMAGE = 9


def test_loss_is_minus_log_of_the_head_mean_mass_on_the_box():
    # One row: [text, 4 visual tokens (2 x 2 merged cells of a 56 x 56 image), text]; the
    # answer is predicted at position 5. The box [0, 0, 28, 28] covers cell 0 only, i.e.
    # sequence position 1.
    input_ids = torch.tensor([[1, IMAGE, IMAGE, IMAGE, IMAGE, 2]])
    attn = torch.zeros(1, 2, 6, 6)
    attn[0, 0, 5, 1], attn[0, 0, 5, 0] = 0.5, 0.5  # head 0: half its mass on the box
    attn[0, 1, 5, 1], attn[0, 1, 5, 3] = 0.1, 0.9  # head 1: a tenth
    weights = {2: attn, 3: attn}
    loss, count, mass = box_attention_loss(weights, [2, 3], input_ids, IMAGE,
                                           [[(5, [[0, 0, 28, 28]], [])]],
                                           torch.tensor([[1, 4, 4]]), [(56, 56)])
    # head mean 0.3 in both layers: (-log 0.3 - log 0.3) / 2 layers = -log 0.3
    assert float(loss) == pytest.approx(-math.log(0.3 + 1e-6), rel=1e-6)
    assert count == 1 and mass == pytest.approx(0.3)


def test_rows_and_answers_without_boxes_are_skipped():
    input_ids = torch.tensor([[1, IMAGE, IMAGE, IMAGE, IMAGE, 2]])
    loss, count, mass = box_attention_loss({2: torch.full((1, 2, 6, 6), 1 / 6)}, [2], input_ids,
                                           IMAGE, [[(5, [], [])]], torch.tensor([[1, 4, 4]]),
                                           [(56, 56)])
    assert float(loss) == 0.0 and count == 0 and mass == 0.0


def test_word_loss_uses_the_latest_occurrence_of_each_naming_word():
    # ids: 0 [7 = " red" in an earlier question] 2 3 [7 = " red" again] [8 = " box"] 9; the
    # answer is predicted at position 6, so positions 4 and 5 are this question's words.
    input_ids = torch.tensor([[0, 7, 2, 3, 7, 8, 9]])
    attn = torch.zeros(1, 2, 7, 7)
    attn[0, 0, 6, 4], attn[0, 0, 6, 5], attn[0, 0, 6, 1] = 0.3, 0.3, 0.4  # head 0: 0.6
    attn[0, 1, 6, 4], attn[0, 1, 6, 0] = 0.2, 0.8  # head 1: 0.2
    loss, count, mass = word_attention_loss({0: attn}, [0], input_ids, [[(6, [[0, 0, 1, 1]],
                                                                          [7, 8, 11])]])
    # head mean (0.6 + 0.2) / 2 = 0.4; id 11 is not in the text and is ignored
    assert float(loss) == pytest.approx(-math.log(0.4 + 1e-6), rel=1e-6)
    assert count == 1 and mass == pytest.approx(0.4)


def test_capture_reads_the_real_models_attention(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir,
                                                               attn_implementation="eager")
    capture = AttentionCapture(model.model.language_model.layers, [2, 3])
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert sorted(capture.weights) == [2, 3]
    rows = capture.weights[3][0].sum(-1)  # softmax rows sum to 1
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    with pytest.raises(ValueError, match="decoder layers 0..3"):
        AttentionCapture(model.model.language_model.layers, [4])


def test_sdpa_attention_is_refused_with_a_clear_error(tiny_model_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir,
                                                               attn_implementation="sdpa")
    AttentionCapture(model.model.language_model.layers, [2])
    with pytest.raises(RuntimeError, match="eager"), torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8]]))


def test_lr_restarts_with_its_own_warmup_and_cosine():
    factor = _lr_lambda(PolicyConfig(warmup_ratio=0.1), total_steps=20, restart_at=10)
    # phase 1: steps 0..9, warm-up round(0.1 * 10) = 1 step; step 9: 0.5 (1 + cos(pi 8/9))
    assert factor(0) == 1.0
    assert factor(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 9)))
    # phase 2 starts again at full LR after its own 1-step warm-up
    assert factor(10) == 1.0 and factor(15) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 9)))
    plain = _lr_lambda(PolicyConfig(warmup_ratio=0.1), total_steps=20)
    assert plain(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 18)))


def test_vision_tower_has_its_own_lr_only_while_it_pretrains():
    text, vision = _group_lr_lambdas(PolicyConfig(warmup_ratio=0.1), 20, 10, vision_boost=6.0)
    # e.g. sft.lr 1e-3 x vision_lr_scale 0.5 = 5e-4 for the tower, vision_pretrain_lr 3e-3: x 6
    assert vision(3) == pytest.approx(6.0 * text(3)) and vision(12) == text(12)
