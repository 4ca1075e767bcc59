"""`python -m pipeline.glimpse`: stage 1, GlimpsePrune: train the glimpse token + VIP with the
base model frozen.

Owns what stage 1 adds to the one training loop (pipeline/trainer.py): batches of prompts with
their target boxes (box loss) or reference answers (distillation loss), held-out accuracy with
and without pruning, keep ratio and target-box recall (from the modules exported at each
evaluation), and the export of the trained modules beside the base. Must not hold model
maths (glimpseprune/).

    python -m pipeline.glimpse --config configs/tiny.yaml [dotted.key=value ...]
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.batch import RolloutBatch
from pipeline.config import Config, parse_args


class GlimpseStage:
    """Stage 1 with the box loss (rows without boxes are left out of its batches and counted)
    or the distillation loss (on the reference answers; boxes only feed the recall figure)."""

    name = "glimpse"

    def __init__(self, cfg: Config, base: Path):
        from transformers import AutoTokenizer

        from glimpseprune.processor import load_processor

        g = cfg.glimpse
        self.cfg, self.base = cfg, base
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.processor = load_processor(base, cfg.model)  # evaluation's; model.*_pixels
        self.total_steps, self.prompts_per_step = g.train_steps, g.train_prompts_per_step
        self.eval_every = g.train_eval_every
        self.checkpoint_every = cfg.checkpoint.every_steps
        self.rows_without_boxes = 0

    def actor_kwargs(self, cfg: Config, base: Path) -> dict:
        return {"lr": cfg.glimpse.train_lr, "glimpse_cfg": cfg.glimpse}

    def make_batch(self, rows: list[dict]) -> RolloutBatch:
        from pipeline.sft import answer_batch

        if self.cfg.glimpse.train_loss == "distill":
            return answer_batch(rows, self.tokenizer)
        boxed = [r for r in rows if r.get("boxes")]
        self.rows_without_boxes += len(rows) - len(boxed)
        if not boxed:
            raise ValueError("glimpse.train_loss=box needs target boxes, and a whole batch had "
                             "none: give the data a boxes column (data.columns.boxes)")
        return answer_batch(boxed, self.tokenizer)  # answers feed box+distill's KL term

    def step_args(self, step: int) -> tuple:
        return (f"glimpse_{self.cfg.glimpse.train_loss}",)

    def step_record(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        return {"policy/loss": metrics["loss"], "policy/keep_ratio": metrics["keep_ratio"],
                "policy/box_recall": metrics["box_recall"],
                "data/no_boxes": self.rows_without_boxes}

    def evaluate(self, group, validation) -> dict[str, float]:
        from glimpseprune.model import GlimpsePruneModel
        from pipeline.evaluate import evaluate_glimpse

        with tempfile.TemporaryDirectory() as folder:
            group.run("export_glimpse", folder)
            model = GlimpsePruneModel.from_pretrained(self.base, self.cfg.glimpse,
                                                      modules_path=folder)
        rows = [validation[i] for i in range(min(self.cfg.trainer.eval_samples,
                                                  len(validation)))]
        return evaluate_glimpse(model, self.processor, rows, self.cfg.rollout.max_new_tokens)

    def export(self, group, folder: Path) -> dict:
        group.run("export_glimpse", str(folder / "glimpse_modules"))
        (folder / "base_model.txt").write_text(f"{self.base}\n")  # modules sit on this base
        return {}


def run(cfg: Config, parent_run_id: str | None = None) -> dict:
    """Trains, evaluates, checkpoints and exports the glimpse modules; returns the summary."""
    from glimpseprune.tiny import resolve_base_model
    from pipeline.trainer import train

    return train(cfg, GlimpseStage(cfg, resolve_base_model(cfg.model, cfg.output_dir)),
                 parent_run_id)


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_args(argv, "Stage 1: train the glimpse token + VIP, base frozen.")
    print(json.dumps(run(cfg), indent=2))


if __name__ == "__main__":
    main()
