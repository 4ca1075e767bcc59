"""Packed multi-turn SFT samples: the chat format exactly, loss on the answers only."""

from __future__ import annotations

from pipeline.config import SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.sft import packed_batch
from pipeline.synthetic import generate_split


def test_packed_sample_equals_the_chat_template_and_masks_questions(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    tok = processor.tokenizer
    rows = list(generate_split(SyntheticConfig(num_train=1, questions_per_image=3), "train"))
    siblings = {rows[0]["image_id"]: rows}
    batch = packed_batch([rows[1]], siblings, tok, turns=3)
    # The same conversation written by the chat template: row 1's question with the image,
    # then rows 0 and 2 as text-only turns, each answered.
    messages = [{"role": "user", "content": [{"type": "text", "text": rows[1]["question"]},
                                             {"type": "image"}]},
                {"role": "assistant", "content": rows[1]["answer"]}]
    for other in (rows[0], rows[2]):
        messages += [{"role": "user", "content": [{"type": "text", "text": other["question"]}]},
                     {"role": "assistant", "content": other["answer"]}]
    full = processor.apply_chat_template(messages, tokenize=False).rstrip("\n")
    prompt = prompt_text(processor, rows[1]["question"])
    assert full.startswith(prompt)
    expected = tok.encode(full[len(prompt):], add_special_tokens=False)
    assert batch.response_ids[0] == expected
    mask = batch.extras["loss_mask"][0]
    scored = [t for t, m in zip(batch.response_ids[0], mask, strict=True) if m]
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    answers = [tok.convert_tokens_to_ids(tok.tokenize(r["answer"]))[0] for r in
               (rows[1], rows[0], rows[2])]
    assert scored == [answers[0], eos, answers[1], eos, answers[2], eos]


def test_single_turn_when_no_siblings(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    row = next(generate_split(SyntheticConfig(num_train=1), "train"))
    batch = packed_batch([row], {}, tok, turns=5)
    assert batch.extras["loss_mask"][0] == [1, 1]  # the answer token and end of turn


def test_answer_boxes_point_at_each_answer_and_carry_its_question_box(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = list(generate_split(SyntheticConfig(num_train=1, questions_per_image=3), "train"))
    batch = packed_batch([rows[2]], {rows[0]["image_id"]: rows}, tok, turns=3)
    starts = batch.extras["answer_boxes"][0]
    assert [boxes for _, boxes, _ in starts] == [r["boxes"] for r in (rows[2], rows[0], rows[1])]
    for (offset, _, words), row in zip(starts, (rows[2], rows[0], rows[1]), strict=True):
        assert batch.response_ids[0][offset] == tok.encode(row["answer"],
                                                           add_special_tokens=False)[0]
        # the naming words are tokens of the question as the model reads it
        question_ids = tok.encode(row["question"], add_special_tokens=False)
        assert words and set(words) <= set(question_ids)


def test_naming_words_are_the_targets_colour_or_kind():
    from pipeline.synthetic import naming_words

    assert naming_words("What shape is red?") == ["red"]
    assert naming_words("What color is the triangle?") == ["triangle"]
    assert naming_words("What number is in the blue box?") == ["blue", "box"]
