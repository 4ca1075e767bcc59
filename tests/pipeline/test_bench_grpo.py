"""pipeline.bench_grpo's arithmetic and its two runs' configs (no run: the GRPO drivers it
calls are covered by tests/e2e/test_grpo.py and test_ablate.py)."""

from __future__ import annotations

import argparse

import pytest

from pipeline.bench_grpo import measured_steps, ratios, side_figures, side_overrides, table
from pipeline.config import load_config


def _record(step: float, train: float, evaluated: bool = False) -> dict[str, float]:
    record = {"timing_s/step": step, "timing_s/train": train, "timing_s/prepass": 0.5,
              "rollout/keep_ratio": 0.1}
    return record | ({"eval/accuracy": 1.0} if evaluated else {})


def test_the_first_step_and_evaluated_steps_are_not_timed():
    records = {1: _record(9, 9), 2: _record(2, 1), 3: _record(4, 3), 4: _record(3, 2),
               5: _record(8, 2, evaluated=True)}
    assert measured_steps(records) == [2, 3, 4]
    figures = side_figures(records)
    assert figures["timing_s/step"] == 3 and figures["timing_s/train"] == 2  # medians
    with pytest.raises(ValueError, match="at least 3 steps"):
        side_figures({1: _record(1, 1), 2: _record(1, 1, evaluated=True)})


def test_ratios_skip_the_pre_pass_plain_grpo_does_not_run():
    pruned = {"timing_s/step": 3.0, "timing_s/train": 1.0, "timing_s/prepass": 0.5}
    plain = {"timing_s/step": 6.0, "timing_s/train": 4.0, "timing_s/prepass": 0.001}
    assert ratios(pruned, plain) == {"step": 0.5, "train": 0.25}
    text = table({"image_size": 896, "prompts": 4, "group": 8, "new_tokens": 32,
                  "pruned": dict(pruned, steps=[2, 3]), "plain": dict(plain, steps=[2, 3]),
                  "ratios": ratios(pruned, plain)})
    assert "step" in text and "0.500" in text and "0.250" in text


def test_both_sides_load_and_differ_only_in_pruning(tmp_path):
    args = argparse.Namespace(image_size=896, steps=5, prompts=4, group=8, new_tokens=32,
                              keep_ratio=0.1, init="glimpseprune/embedded/tiny")
    pruned = load_config("configs/tiny.yaml", side_overrides(args, "pruned", tmp_path))
    plain = load_config("configs/tiny.yaml", side_overrides(args, "plain", tmp_path))
    for cfg in (pruned, plain):
        assert cfg.model.max_pixels == 896 * 896 and cfg.data.synthetic.image_size == 896
        assert cfg.rollout.ignore_eos and cfg.rollout.max_new_tokens == 32
        assert cfg.rollout.max_model_len > 1024 + 32  # 1,024 visual tokens fit
        assert cfg.trainer.prompts_per_step == 4 and cfg.rollout.n == 8
    assert pruned.rollout.mask_mode == "sampled" and pruned.glimpse.max_keep_ratio == 0.1
    assert pruned.glimpse.min_keep == 102  # 10% of 1,024: floor = cap
    assert plain.rollout.mask_mode == "full" and not plain.algo.train_vip
    assert plain.reward.prune_bonus.weight == 0


def test_pruned_pixels_side_differs_from_pruned_only_in_reusing_vision(tmp_path):
    args = argparse.Namespace(image_size=448, steps=3, prompts=2, group=4, new_tokens=8,
                              keep_ratio=0.1, init="glimpseprune/embedded/tiny")
    pruned = load_config("configs/tiny.yaml", side_overrides(args, "pruned", tmp_path))
    pixels = load_config("configs/tiny.yaml", side_overrides(args, "pruned_pixels", tmp_path))
    assert pruned.rollout.reuse_vision and not pixels.rollout.reuse_vision
    assert (pixels.glimpse.min_keep, pixels.glimpse.max_keep_ratio) == \
        (pruned.glimpse.min_keep, pruned.glimpse.max_keep_ratio) == (26, 0.1)
    sides = {"pruned": {"timing_s/step": 3.0, "steps": [2]},
             "pruned_pixels": {"timing_s/step": 4.5, "steps": [2]},
             "plain": {"timing_s/step": 6.0, "steps": [2]}}
    by_side = {s: ratios(sides[s], sides["plain"]) for s in ("pruned", "pruned_pixels")}
    text = table({"image_size": 448, "prompts": 2, "group": 4, "new_tokens": 8, **sides,
                  "ratios": by_side["pruned"], "ratios_by_side": by_side})
    assert "pruned_pixels" in text and "0.500" in text and "0.750" in text


def test_pruned_collective_side_differs_from_pruned_only_in_the_weight_sync_route(tmp_path):
    args = argparse.Namespace(image_size=448, steps=3, prompts=2, group=4, new_tokens=8,
                              keep_ratio=0.1, init="glimpseprune/embedded/tiny")
    pruned = load_config("configs/tiny.yaml", side_overrides(args, "pruned", tmp_path))
    collective = load_config("configs/tiny.yaml",
                             side_overrides(args, "pruned_collective", tmp_path))
    assert pruned.rollout.weight_sync == "object_store"
    assert collective.rollout.weight_sync == "collective"
    assert collective.rollout.reuse_vision and collective.glimpse.min_keep == 26
    # what one push moved and how fast, per side, in the table
    sides = {side: {"timing_s/step": 3.0, "steps": [2], "weight_sync/mb": 13.7,
                    "weight_sync/mb_per_s": rate}
             for side, rate in (("pruned", 124.0), ("pruned_collective", 150.0),
                                ("plain", 64.0))}
    text = table({"image_size": 448, "prompts": 2, "group": 4, "new_tokens": 8, **sides,
                  "ratios": ratios(sides["pruned"], sides["plain"])})
    assert "mb_per_s" in text and "150.000" in text and "124.000" in text


def test_random_init_is_a_stage1_folder_grpo_starts_from(tmp_path):
    from glimpseprune.io import load_modules
    from pipeline.bench_grpo import random_init
    from pipeline.grpo import starting_point

    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}"])
    folder = random_init(cfg, tmp_path / "random_init")
    run_cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}",
                                                f"trainer.init_from={folder}"])
    base, modules = starting_point(run_cfg)
    assert (base / "config.json").is_file() and base == (tmp_path / "tiny_base").resolve()
    assert load_modules(modules) is not None
