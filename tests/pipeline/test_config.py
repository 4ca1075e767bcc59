"""The structured config: every shipped file loads, precedence holds, bad input names its key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, ConfigError, flatten, load_config, to_yaml

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_configs_folder_is_not_empty():
    assert Path("configs/tiny.yaml") in CONFIGS


def test_precedence_defaults_then_yaml_then_overrides(tmp_path):
    file = tmp_path / "x.yaml"
    file.write_text("trainer:\n  total_steps: 7\n  eval_every: 3\n")
    cfg = load_config(file, ["trainer.total_steps=9", "glimpse.max_keep_ratio=0.25"])
    assert cfg.trainer.total_steps == 9  # the override beats the YAML
    assert cfg.trainer.eval_every == 3  # the YAML beats the default (10)
    assert cfg.trainer.prompts_per_step == 8  # untouched default
    assert cfg.glimpse.max_keep_ratio == 0.25


def test_unknown_override_names_the_key_and_suggests():
    with pytest.raises(ConfigError, match=r"no_such\.key"):
        load_config("configs/tiny.yaml", ["no_such.key=1"])
    suggestion = r"trainer\.totl_steps.*did you mean 'trainer\.total_steps'"
    with pytest.raises(ConfigError, match=suggestion):
        load_config("configs/tiny.yaml", ["trainer.totl_steps=3"])


def test_unknown_yaml_key_names_full_path_and_file(tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("rollout:\n  n: 4\n  temprature: 0.7\n")
    with pytest.raises(ConfigError, match=r"'rollout\.temprature' in .*bad\.yaml"):
        load_config(file)


@pytest.mark.parametrize("override,key", [
    ("trainer.total_steps=abc", "trainer.total_steps"),
    ("rollout.temperature=hot", "rollout.temperature"),
    ("glimpse.threshold=1.5", "glimpse.threshold"),
    ("data.source=s3", "data.source"),
    ("glimpse=3", "glimpse"),
    ("trainer.total_steps", "trainer.total_steps"),
    # numbers no run can use (issue F9: these were accepted without complaint)
    ("rollout.temperature=-1", "rollout.temperature"),
    ("rollout.mask_temperature=0", "rollout.mask_temperature"),
    ("reward.prune_bonus.weight=-1", "reward.prune_bonus.weight"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("policy.lr=0", "policy.lr"),
    ("algo.clip_low=1", "algo.clip_low"),
    ("reward.judge.timeout_s=0", "reward.judge.timeout_s"),
    ("rollout.cpu_kv_cache_gib=-1", "rollout.cpu_kv_cache_gib"),
    ("rollout.weight_sync=nccl", "rollout.weight_sync"),
    ("rollout.weight_sync_timeout_s=0", "rollout.weight_sync_timeout_s"),
    ("rollout.block_size=-32", "rollout.block_size"),
    ("rollout.max_restarts=-1", "rollout.max_restarts"),
    ("trainer.max_restarts=-1", "trainer.max_restarts"),
    ("reward.worker_timeout_s=0", "reward.worker_timeout_s"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("configs/tiny.yaml", [override])


def test_user_data_needs_a_path():
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config("configs/tiny.yaml", ["data.source=jsonl"])


def test_flatten_and_yaml_round_trip():
    cfg = load_config("configs/tiny.yaml")
    flat = flatten(cfg)
    assert flat["reward.prune_bonus.weight"] == cfg.reward.prune_bonus.weight
    assert flat["model.tiny.text_heads"] == 2
    again = load_config(None, [f"{k}={v}" for k, v in flat.items()
                               if not isinstance(v, list) and v is not None and v != ""])
    assert flatten(again) == flat
    assert yaml.safe_load(to_yaml(cfg))["glimpse"]["prune_layer"] == cfg.glimpse.prune_layer


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "pipeline.config", *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_prints_resolved_config():
    out = _cli("--config", "configs/tiny.yaml", "trainer.total_steps=3")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)
    assert printed["trainer"]["total_steps"] == 3
    assert set(printed) >= {"model", "glimpse", "data", "rollout", "policy", "reference",
                            "reward", "algo", "trainer", "checkpoint", "tracking", "cluster",
                            "output_dir"}


def test_cli_rejects_unknown_key_with_its_name():
    out = _cli("--config", "configs/tiny.yaml", "no_such.key=1")
    assert out.returncode != 0
    assert "no_such.key" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_missing_file_is_clear():
    out = _cli("--config", "configs/nope.yaml")
    assert out.returncode != 0 and "config file not found" in out.stderr


def test_sft_recipe_checks_only_bind_pipeline_sft(tmp_path):
    from pipeline.config import check_sft

    # tiny.yaml's dense SFT recipe does not stop other stages from using other data ...
    cfg = load_config("configs/tiny.yaml", ["data.source=jsonl", f"data.path={tmp_path}/x.jsonl"])
    # ... but pipeline.sft says what to change
    with pytest.raises(ConfigError, match=r"data\.source=synthetic"):
        check_sft(cfg)
    with pytest.raises(ConfigError, match=r"sft\.train_vision=true"):
        check_sft(load_config("configs/tiny.yaml", ["sft.train_vision=false"]))
    check_sft(load_config("configs/tiny.yaml"))  # the shipped recipe is consistent


def test_grpo_refuses_reused_vision_with_a_trained_tower():
    from pipeline.config import check_grpo

    with pytest.raises(ConfigError, match=r"rollout\.reuse_vision=false"):
        check_grpo(load_config("configs/tiny.yaml", ["policy.freeze_vision=false"]))
    # either half alone is fine; plain GRPO (mask_mode=full) has no pre-pass to reuse
    check_grpo(load_config("configs/tiny.yaml", ["policy.freeze_vision=false",
                                                 "rollout.reuse_vision=false"]))
    check_grpo(load_config("configs/tiny.yaml", ["policy.freeze_vision=false",
                                                 "rollout.mask_mode=full",
                                                 "algo.train_vip=false"]))
    check_grpo(load_config("configs/tiny.yaml"))


@pytest.mark.parametrize("m", [-1, 3])
def test_masks_per_prompt_must_divide_the_group(m):
    with pytest.raises(ConfigError, match=r"rollout\.masks_per_prompt"):
        load_config("configs/tiny.yaml", ["rollout.n=4", f"rollout.masks_per_prompt={m}"])
    assert load_config("configs/tiny.yaml", ["rollout.n=4",
                                             "rollout.masks_per_prompt=2"]).rollout.n == 4


def test_equal_masks_in_a_row_become_one_request():
    import torch

    from actors.rollout import _runs

    a, b = torch.tensor([True, False]), torch.tensor([False, True])
    runs = _runs([a, a.clone(), b, a])
    assert [(m.tolist(), k) for m, k in runs] == [([True, False], 2), ([False, True], 1),
                                                  ([True, False], 1)]
