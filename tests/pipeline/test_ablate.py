"""The ablation's arms are config overrides that load, and mean what their names say."""

from __future__ import annotations

import pytest

from pipeline.ablate import ARMS, _stats, arm_overrides
from pipeline.config import ConfigError, load_config


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_loads_on_the_hard_config(arm, tmp_path):
    cfg = load_config("configs/tiny_hard.yaml",
                      arm_overrides(arm, "glimpseprune/embedded/tiny", 2, tmp_path, 300))
    assert cfg.output_dir == str(tmp_path / f"{arm}-s2") and cfg.trainer.seed == 2
    if arm == "full":  # plain GRPO: nothing pruned, nothing paid for pruning
        assert cfg.rollout.mask_mode == "full" and cfg.reward.prune_bonus.weight == 0
        assert not cfg.algo.train_vip
    elif arm == "no_bonus":
        assert cfg.reward.prune_bonus.weight == 0 and cfg.rollout.mask_mode == "sampled"
    elif arm == "bonus":
        assert cfg.reward.prune_bonus.weight > 0 and cfg.rollout.mask_mode == "sampled"
    else:  # more answer training from the same base, no second dense pretraining
        assert cfg.model.path == "glimpseprune/embedded/tiny" and cfg.sft.total_steps == 300
        assert cfg.sft.vision_pretrain_steps == 0
    if arm != "sft_more":
        assert cfg.trainer.init_from == "glimpseprune/embedded/tiny"


def test_full_masks_and_vip_training_conflict():
    with pytest.raises(ConfigError, match="mask_mode=full"):
        load_config("configs/tiny.yaml", ["rollout.mask_mode=full", "algo.train_vip=true"])


def test_stats_by_hand():
    # mean of 0.5, 0.7, 0.9 = 0.7; sample std = sqrt((0.04 + 0 + 0.04) / 2) = 0.2
    stats = _stats([0.5, 0.7, 0.9])
    assert stats["mean"] == pytest.approx(0.7) and stats["std"] == pytest.approx(0.2)
    assert _stats([0.3]) == {"mean": 0.3, "std": 0.0, "n": 1}

