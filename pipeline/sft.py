"""`python -m pipeline.sft`: supervised fine-tuning of the base model (answers only in the loss).

Owns what SFT adds to the one training loop (pipeline/trainer.py): batches whose responses
are the reference answers (with, per answer, the target box and the question's naming words
for the attention terms of actors/answer_attention.py), the dense-then-answer phases, the sft
section's own engine settings (ZeRO stage, vision tower), greedy exact-match evaluation per
question type, and the HF export. On the embedded default it is the warm start that makes the
random tiny model the demo's base; users of real models usually skip it. Must not hold model
maths (actors/policy.py).

    python -m pipeline.sft --config configs/tiny.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import Config, check_sft, parse_args


def _answer_target(offset: int, row: dict, tokenizer) -> tuple[int, list, list[int]]:
    """(offset of the answer in the response, the question's target boxes, the token ids of
    the question's words that name the target - each as it appears inside a question, after a
    space) for the attention terms of actors/answer_attention.py."""
    from pipeline.synthetic import naming_words

    words = naming_words(row["question"]) if row.get("boxes") else []
    ids = [i for w in words for i in tokenizer.encode(f" {w}", add_special_tokens=False)]
    return offset, row.get("boxes") or [], ids


def answer_batch(rows: list[dict], tokenizer) -> RolloutBatch:
    """The rows as a RolloutBatch whose responses are the reference answers + end of turn."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return RolloutBatch(
        prompts=PromptBatch.from_rows(rows), prompt_index_B=list(range(len(rows))),
        response_ids=[tokenizer.encode(r["answer"], add_special_tokens=False) + [eos]
                      for r in rows],
        extras={"answer_boxes": [[_answer_target(0, r, tokenizer)] for r in rows]})


def packed_batch(rows: list[dict], siblings: dict[str, list[dict]], tokenizer,
                 turns: int) -> RolloutBatch:
    """Each row becomes one multi-turn sample: its own question first (the one the image
    follows), then up to `turns - 1` other questions about the same image as text-only turns.
    `extras["loss_mask"]` marks the answer tokens (and their end-of-turn) as the only ones the
    loss sees; `extras["answer_boxes"]` gives each answer's offset in the response, its
    question's target boxes and the ids of the question's words naming the target (for the
    attention terms)."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    responses, masks, answer_boxes = [], [], []
    for row in rows:
        others = [r for r in siblings.get(row.get("image_id") or row["id"], [])
                  if r["id"] != row["id"]][: turns - 1]
        ids, mask, starts = [], [], []
        for k, turn in enumerate([row, *others]):
            if k:  # the scaffold and question of a follow-up turn: context, no loss
                text = f"\n<|im_start|>user\n{turn['question']}<|im_end|>\n<|im_start|>assistant\n"
                scaffold = tokenizer.encode(text, add_special_tokens=False)
                ids += scaffold
                mask += [0] * len(scaffold)
            answer = tokenizer.encode(turn["answer"], add_special_tokens=False) + [eos]
            starts.append(_answer_target(len(ids), turn, tokenizer))
            ids += answer
            mask += [1] * len(answer)
        responses.append(ids)
        masks.append(mask)
        answer_boxes.append(starts)
    return RolloutBatch(prompts=PromptBatch.from_rows(rows), prompt_index_B=list(range(len(rows))),
                        response_ids=responses,
                        extras={"loss_mask": masks, "answer_boxes": answer_boxes})


def evaluate(group, dataset, tokenizer, limit: int) -> dict[str, float]:
    """Greedy exact match on the first `limit` rows, overall and per question type."""
    rows = [dataset[i] for i in range(min(limit, len(dataset)))]
    hits = [h for shard in group.run_split("evaluate", answer_batch(rows, tokenizer))
            for h in shard]
    by_type = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        by_type[row.get("question_type") or "all"].append(hit)
    result = {"eval/accuracy": sum(hits) / len(hits)}
    result.update({f"eval/accuracy_{t}": sum(v) / len(v) for t, v in sorted(by_type.items())})
    return result


class SftStage:
    """Supervised answers, optionally after / beside the dense per-cell vision loss."""

    name = "sft"

    def __init__(self, cfg: Config, tokenizer, train_rows=None):
        self.cfg, self.sft, self.tokenizer = cfg, cfg.sft, tokenizer
        # image_id -> its rows (questions and answers only: the image comes with the row)
        self.siblings: dict[str, list[dict]] = {}
        if cfg.sft.turns_per_sample > 1 and train_rows is not None:
            columns = ["id", "image_id", "question", "answer"]
            columns += ["boxes"] if "boxes" in train_rows.column_names else []
            for row in train_rows.select_columns(columns):
                self.siblings.setdefault(row["image_id"], []).append(row)
        self.total_steps = cfg.sft.total_steps
        self.prompts_per_step = cfg.sft.prompts_per_step
        self.eval_every = cfg.sft.eval_every
        self.checkpoint_every = cfg.sft.checkpoint_every or cfg.checkpoint.every_steps
        self.dense = cfg.sft.vision_pretrain_steps > 0 or cfg.sft.dense_loss_weight > 0

    def actor_kwargs(self, cfg: Config, base: Path) -> dict:
        # The answer phase after the dense pretraining gets its own warm-up and cosine (it
        # would otherwise start mid-decay; tiny-task.md's working recipe had two schedules).
        return {"dense_heads": self.dense, "vision_lr_scale": self.sft.vision_lr_scale,
                "lr": self.sft.lr, "lr_restart_step": self.sft.vision_pretrain_steps,
                "vision_pretrain_lr": self.sft.vision_pretrain_lr,
                "box_attention": {"weight": self.sft.box_attention_weight,
                                  "layers": list(self.sft.box_attention_layers),
                                  "word_weight": self.sft.word_attention_weight,
                                  "word_layers": list(self.sft.word_attention_layers)}}

    def make_batch(self, rows: list[dict]) -> RolloutBatch:
        if self.sft.turns_per_sample > 1:
            return packed_batch(rows, self.siblings, self.tokenizer, self.sft.turns_per_sample)
        return answer_batch(rows, self.tokenizer)

    def step_args(self, step: int) -> tuple:
        phase = "dense" if step <= self.sft.vision_pretrain_steps else "sft"
        return phase, self.sft.dense_loss_weight

    def step_record(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        record = {}
        if step > self.sft.vision_pretrain_steps:
            record["policy/loss"] = metrics["loss"]
            record.update({f"policy/{k}": metrics[k] for k in (
                "box_attention_loss", "box_attention_mass", "word_attention_loss",
                "word_attention_mass") if k in metrics})
        if self.dense:
            record["policy/dense_loss"] = metrics["dense_loss"]
            record.update({f"policy/{k}": v for k, v in metrics.items()
                           if k.startswith("dense_acc_")})
        return record

    def evaluate(self, group, validation) -> dict[str, float]:
        return evaluate(group, validation, self.tokenizer, self.cfg.trainer.eval_samples)

    def export(self, group, folder: Path) -> dict:
        group.run("export_hf", str(folder))
        return {}


def run(cfg: Config, parent_run_id: str | None = None) -> dict:
    """Trains, evaluates, checkpoints and exports the warm start; returns the summary."""
    from transformers import AutoTokenizer

    from glimpseprune.tiny import resolve_base_model
    from pipeline.data import load_split
    from pipeline.trainer import train

    check_sft(cfg)
    # The sft section may run the policy engine differently from the later stages.
    policy = cfg.policy
    if cfg.sft.zero_stage is not None:
        policy = replace(policy, zero_stage=cfg.sft.zero_stage)
    if cfg.sft.train_vision is not None:
        policy = replace(policy, freeze_vision=not cfg.sft.train_vision)
    cfg = replace(cfg, policy=policy)
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(cfg.model, cfg.output_dir))
    train_rows = None
    if cfg.sft.turns_per_sample > 1:
        train_rows = load_split(cfg.data, "train", cfg.output_dir)[0]
        if "image_id" not in train_rows.column_names:
            raise ValueError("sft.turns_per_sample > 1 needs an image_id column to find the "
                             "other questions about an image")
    return train(cfg, SftStage(cfg, tokenizer, train_rows), parent_run_id)


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(argv, "Supervised fine-tuning of the base model on the configured data.")
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
