"""The tiny Qwen2.5-VL factory: a small, random, real Qwen2.5-VL checkpoint built offline.

Owns the tiny model's tokenizer (byte-level BPE trained on the synthetic task's words, with the
Qwen special tokens), its chat template, its processor and its weights, written in HF format so
that transformers and vLLM load it like any Qwen2.5-VL. Deterministic: the same seed and sizes
give byte-identical safetensors and tokenizer files.
Must not train anything (pipeline.sft does) nor download anything.

    python -m glimpseprune.tiny --out DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.config import ModelConfig, TinyModelConfig

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|image_pad|>", "<|video_pad|>",
]
# Qwen2.5-VL's chat format (the answer follows `<|im_start|>assistant\n`) with one change: the
# user turn's text comes BEFORE its images. Under causal attention the visual tokens can then
# read the question, which is what made a tiny model ground its answers on CPU (shared docs
# tiny-task.md). Real Qwen checkpoints keep their own template. No default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CHAT_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "Answer", "with",
               "one", "word", "Yes", "No", "yes", "no", "and", "of", "to", "what", "which"]


def build_tokenizer():
    """A byte-level BPE whose merges make every task word (with and without a leading space) one
    token; bytes cover any other text. Training on a fixed corpus is deterministic."""
    from transformers import PreTrainedTokenizerFast

    from pipeline.synthetic import task_vocabulary

    words = sorted(set(task_vocabulary()) | set(_CHAT_WORDS))
    # Each word alone (an answer right after "assistant\n") and after a space (inside a
    # question), many times, so BPE merges both forms whole.
    corpus = [form for w in words for form in (w, f" {w}") for _ in range(8)]
    corpus += ["?\n", ". ", ", "] * 8
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>",
                              "vision_eos_token": "<|vision_end|>"},
        model_max_length=32768)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model_config(sizes: TinyModelConfig, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    # A vocabulary padded to a multiple of 64 keeps the embedding shapes friendly to kernels.
    vocab_size = (len(tokenizer) + 63) // 64 * 64
    head_dim = sizes.text_hidden_size // sizes.text_heads
    # M-RoPE splits head_dim / 2 rotary frequencies over (t, h, w) as Qwen2.5-VL does (16/24/24
    # of 64 for 7B, so 1/4, 3/8, 3/8).
    half = head_dim // 2
    mrope = [half // 4, (half - half // 4) // 2]
    mrope.append(half - sum(mrope))
    text = dict(
        vocab_size=vocab_size, hidden_size=sizes.text_hidden_size,
        intermediate_size=sizes.text_intermediate_size, num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads, num_key_value_heads=sizes.text_kv_heads,
        max_position_embeddings=sizes.max_position_embeddings, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": mrope},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"])
    vision = dict(
        depth=sizes.vision_depth, hidden_size=sizes.vision_hidden_size,
        intermediate_size=sizes.vision_intermediate_size, num_heads=sizes.vision_heads,
        out_hidden_size=sizes.text_hidden_size, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, window_size=sizes.vision_window_size,
        fullatt_block_indexes=list(sizes.vision_fullatt_blocks))
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
        architectures=["Qwen2_5_VLForConditionalGeneration"])


def build_processor(tokenizer, min_pixels: int, max_pixels: int):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, merge_size=2,
                                            temporal_patch_size=2)
    return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def write_tiny_model(out_dir: str | Path, model_cfg: ModelConfig | None = None,
                     seed: int | None = None) -> Path:
    """Builds the tiny Qwen2.5-VL and writes it as an HF checkpoint.

    Args:
        out_dir: destination folder (created; existing files are overwritten).
        model_cfg: sizes (`model.tiny`) and processor pixel limits; defaults if None.
        seed: weight-initialisation seed; None takes `model.tiny.seed`.

    Returns:
        The folder, holding config.json, model.safetensors, tokenizer, processor and
        chat template, plus `tiny_card.json` recording how it was made.
    """
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    model_cfg = model_cfg or ModelConfig()
    sizes = model_cfg.tiny
    seed = sizes.seed if seed is None else seed
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = build_model_config(sizes, tokenizer)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=config.text_config.eos_token_id, pad_token_id=config.text_config.pad_token_id,
        do_sample=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_processor(tokenizer, model_cfg.min_pixels, model_cfg.max_pixels).save_pretrained(out_dir)
    card = {"made_by": "python -m glimpseprune.tiny", "seed": seed, "sizes": vars(sizes),
            "parameters": sum(p.numel() for p in model.parameters()),
            "trained": False}
    card["sizes"]["vision_fullatt_blocks"] = list(sizes.vision_fullatt_blocks)
    (out_dir / "tiny_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return out_dir


def resolve_base_model(model_cfg: ModelConfig, output_dir: str | Path) -> Path:
    """The base checkpoint folder a run uses: `model.path`, or the tiny model built once.

    With `model.path` empty the tiny model is written to <output_dir>/tiny_base (atomically:
    a temporary folder renamed into place) unless a complete one is already there.

    Raises:
        FileNotFoundError: `model.path` is set but holds no config.json.
    """
    if model_cfg.path:
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.path '{path}' holds no config.json: not an HF "
                                    "checkpoint folder (nothing is downloaded at run time)")
        return path
    target = Path(output_dir) / "tiny_base"
    if (target / "tiny_card.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny_base-", dir=target.parent))
    write_tiny_model(tmp, model_cfg)
    try:
        os.rename(tmp, target)
    except OSError:  # a concurrent run finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Qwen2.5-VL checkpoint.")
    parser.add_argument("--out", required=True, help="destination folder")
    parser.add_argument("--seed", type=int, default=None, help="weight seed (default 0)")
    args = parser.parse_args(argv)
    out = write_tiny_model(args.out, seed=args.seed)
    card = json.loads((out / "tiny_card.json").read_text())
    print(json.dumps({"out": str(out), "seed": card["seed"], "parameters": card["parameters"]}))


if __name__ == "__main__":
    main()
