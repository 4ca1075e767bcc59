"""`make demo`: run every stage that exists on the embedded default and say what it did.

Owns the order of the demo's stages and its report. Today (issue F1) that is: build the tiny
Qwen2.5-VL, build the synthetic grounded-VQA splits, and answer validation questions with the
base model through transformers and through vLLM, comparing the two. Later stages (sft, glimpse,
grpo) join here as they land. Must not hold stage logic of its own.

    python -m pipeline.demo --config configs/tiny.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.config import parse_args

CHANCE = {"color": 1 / 7, "shape": 1 / 4, "number": 1 / 10}  # uniform guess over the answers


def _transformers_answers(model_path, rows, max_new_tokens: int) -> list[list[int]]:
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from pipeline.prompts import prompt_text

    processor = AutoProcessor.from_pretrained(model_path)
    processor.tokenizer.padding_side = "left"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_path, dtype=torch.float32)
    texts = [prompt_text(processor, row["question"]) for row in rows]
    inputs = processor(text=texts, images=[row["image"] for row in rows], padding=True,
                       return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    answers = []
    for seq in out[:, inputs["input_ids"].shape[1]:].tolist():
        answers.append(seq[: seq.index(eos) + 1] if eos in seq else seq)
    return answers


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(argv, "Run the embedded default's stages end to end.")
    from transformers import AutoTokenizer

    from glimpseprune.tiny import resolve_base_model
    from glimpseprune.vllm_engine import start_engine, stop_engine
    from pipeline.data import load_split
    from pipeline.prompts import normalise_answer, prompt_text

    did = []
    t0 = time.perf_counter()
    base = resolve_base_model(cfg.model, cfg.output_dir)
    did.append(f"base model: {base} ({'given by model.path' if cfg.model.path else 'tiny, built'}"
               f", {time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    splits = {name: load_split(cfg.data, name, cfg.output_dir)
              for name in ("train", "validation", "test")}
    sizes = ", ".join(f"{name} {len(ds)} (skipped {rep.skipped})"
                      for name, (ds, rep) in splits.items())
    did.append(f"data ({cfg.data.source}): {sizes} ({time.perf_counter() - t0:.1f} s)")
    rows = [splits["validation"][0][i] for i in range(min(16, len(splits["validation"][0])))]

    t0 = time.perf_counter()
    hf_ids = _transformers_answers(base, rows, cfg.rollout.max_new_tokens)
    did.append(f"transformers greedy answers to {len(rows)} validation questions "
               f"({time.perf_counter() - t0:.1f} s)")
    t0 = time.perf_counter()
    from vllm import SamplingParams

    llm = start_engine(base, cfg.model, cfg.rollout, seed=cfg.trainer.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    requests = [{"prompt": prompt_text(processor, r["question"]),
                 "multi_modal_data": {"image": r["image"]}} for r in rows]
    outs = llm.generate(requests, SamplingParams(temperature=0.0,
                                                 max_tokens=cfg.rollout.max_new_tokens))
    vllm_ids = [list(o.outputs[0].token_ids) for o in outs]
    stop_engine(llm)
    did.append(f"vLLM ({'GPU' if _cuda() else 'CPU'}) greedy answers to the same questions "
               f"(engine start + generate {time.perf_counter() - t0:.1f} s)")

    def accuracy(ids_list):
        hits = [normalise_answer(tokenizer.decode(ids, skip_special_tokens=True))
                == normalise_answer(r["answer"]) for ids, r in zip(ids_list, rows, strict=True)]
        return sum(hits) / len(hits)

    summary = {
        "base_model": str(base),
        "validation_questions": len(rows),
        "accuracy_transformers": accuracy(hf_ids),
        "accuracy_vllm": accuracy(vllm_ids),
        "chance": sum(CHANCE.get(r.get("question_type"), 0.0) for r in rows) / len(rows),
        "same_tokens_vllm_vs_transformers": sum(a == b for a, b in zip(hf_ids, vllm_ids,
                                                                          strict=True)),
        "example": {"question": rows[0]["question"], "answer": rows[0]["answer"],
                    "vllm_said": tokenizer.decode(vllm_ids[0], skip_special_tokens=True)},
    }
    print("\n== demo: what ran ==")
    for line in did:
        print(" -", line)
    print(" - not run yet: sft warm start, stage 1 (glimpse), stage 2 (grpo): issues F3-F6")
    if not cfg.model.path:
        print(" - note: the tiny base is untrained (random weights), so its accuracy is about "
              "chance or below; the point here is that both engines load it and agree")
    summary_path = Path(cfg.output_dir) / "demo_summary.json"
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    print(f"(summary written to {summary_path})")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
