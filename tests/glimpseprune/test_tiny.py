"""The tiny Qwen2.5-VL factory: deterministic, a tokenizer that fits the task, loads and runs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import torch

from pipeline.config import SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split, task_vocabulary


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_gives_identical_files(tiny_model_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "glimpseprune.tiny", "--out", str(tmp_path / "a"),
                          "--seed", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["parameters"] > 1_000_000
    assert _digests(tmp_path / "a") == _digests(tiny_model_dir)


def test_other_seed_other_weights(tiny_model_dir, tmp_path):
    from glimpseprune.tiny import write_tiny_model

    other = _digests(write_tiny_model(tmp_path / "b", seed=1))
    mine = _digests(tiny_model_dir)
    assert other["model.safetensors"] != mine["model.safetensors"]
    assert other["tokenizer.json"] == mine["tokenizer.json"]


def test_every_task_word_is_one_token(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for word in task_vocabulary():
        assert len(tok.encode(word, add_special_tokens=False)) == 1, word
        assert len(tok.encode(" " + word, add_special_tokens=False)) == 1, word
    text = "What number is in the red box? 42 and ünïcode!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # bytes cover the rest


def test_transformers_loads_and_generates_with_an_image(tiny_model_dir):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    row = next(generate_split(SyntheticConfig(num_train=1), "train"))
    inputs = processor(text=[prompt_text(processor, row["question"])], images=[row["image"]],
                       return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or out[0, -1] == 2
    # The image matters: a blank image changes the next-token distribution.
    blank = processor(text=[prompt_text(processor, row["question"])],
                      images=[row["image"].point(lambda _: 128)], return_tensors="pt")
    with torch.no_grad():
        a = model(**inputs).logits[0, -1]
        b = model(**blank).logits[0, -1]
    assert (a - b).abs().max() > 1e-4
