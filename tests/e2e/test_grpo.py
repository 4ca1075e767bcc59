"""`pipeline.grpo` (stage 2) end to end: the MLflow record of two GRPO steps, the registered
export (loadable, inspectable with `glimpseprune.look`), resume from the last checkpoint, and a
start without any stage-1 model.

Runs `python -m pipeline.grpo` on configs/tiny.yaml (2 policy ranks, a reference, one vLLM
engine) with 224-px images and seeded untrained glimpse modules written by a fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SMALL = ["model.max_pixels=50176", "data.synthetic.image_size=224", "data.synthetic.num_train=8",
         "data.synthetic.num_validation=4", "data.synthetic.num_test=2"]
RUN = ["trainer.prompts_per_step=2", "rollout.n=2", "trainer.eval_samples=4",
       "trainer.eval_every=1", "algo.train_vip=false"]
# design.md's metric keys that one GRPO step logs.
STEP_KEYS = [
    "reward/total", "reward/accuracy", "reward/prune_bonus", "reward/format",
    "rollout/keep_ratio", "rollout/visual_tokens", "rollout/kept_tokens",
    "rollout/response_length", "rollout/tokens_per_s",
    "policy/loss", "policy/kl", "policy/clip_frac", "policy/grad_norm", "policy/lr",
    "policy/logprob_abs_diff", "policy/entropy",
    "timing_s/rollout", "timing_s/reward", "timing_s/reference", "timing_s/train",
    "timing_s/weight_sync", "timing_s/step",
    "eval/accuracy", "eval/keep_ratio"]


def _env():
    # A hermetic child: its own private Ray and the output folder's MLflow database.
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}


def _grpo(out, *extra):
    cmd = [sys.executable, "-m", "pipeline.grpo", "--config", "configs/tiny.yaml",
           f"output_dir={out}", *SMALL, *RUN, f"glimpse.modules_path={out}/mods", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _client(out):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{out}/mlflow.db")


def _runs(out):
    client = _client(out)
    experiment = client.get_experiment_by_name("glimpseprune-plus")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _history(out, run_id, key):
    return {m.step: m.value for m in _client(out).get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Fresh glimpse modules on the tiny base (as stage 1 would leave them), then 2 steps."""
    from glimpseprune.io import save_modules
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.tiny import resolve_base_model
    from pipeline.config import load_config

    out = tmp_path_factory.mktemp("grpo")
    cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", *SMALL])
    base = resolve_base_model(cfg.model, out)  # the run finds and reuses it
    save_modules(GlimpsePruneModel.from_pretrained(base, cfg.glimpse, seed=0).glimpse_modules,
                 out / "mods")
    done = _grpo(out, "trainer.total_steps=2")
    return out, done.stdout


def test_two_steps_log_every_metric_and_register_the_export(first_run):
    out, stdout = first_run
    run = _runs(out)[0]
    assert run.data.tags["stage"] == "grpo" and run.info.status == "FINISHED"
    assert run.data.params["trainer.total_steps"] == "2"
    missing = {key: steps for key in STEP_KEYS
               if not {1, 2} <= set(steps := _history(out, run.info.run_id, key))}
    assert not missing, missing
    dlogp = _history(out, run.info.run_id, "policy/logprob_abs_diff")
    assert sum(dlogp.values()) / len(dlogp) <= 1e-4, dlogp  # vLLM and the trainer agree
    kl = _history(out, run.info.run_id, "policy/kl")
    assert kl[1] <= 1e-6, kl  # the reference is the policy before the first update
    assert 0 in _history(out, run.info.run_id, "eval/accuracy")  # the starting point's score
    keep = _history(out, run.info.run_id, "rollout/keep_ratio")
    assert all(0.0 < v <= 1.0 for v in keep.values())
    spread = _history(out, run.info.run_id, "rollout/keep_ratio_group_std")
    assert {1, 2} <= set(spread) and all(0.0 <= v <= 0.5 for v in spread.values())
    assert "grpo step 2/2" in stdout

    versions = _client(out).search_model_versions("name='glimpseprune-plus-grpo'")
    assert len(versions) == 1
    tags = versions[0].tags
    assert versions[0].run_id == run.info.run_id
    assert tags["stage"] == "grpo" and tags["step"] == "2"
    evaluation = {k: _history(out, run.info.run_id, f"eval/{k}")[2]
                  for k in ("accuracy", "keep_ratio")}
    assert float(tags["accuracy"]) == pytest.approx(evaluation["accuracy"])
    assert float(tags["keep_ratio"]) == pytest.approx(evaluation["keep_ratio"])
    summary = json.loads((out / "grpo" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["mlflow_run_id"] == run.info.run_id


def test_export_is_hf_plus_modules_and_look_inspects_it(first_run, tmp_path):
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from pipeline.config import SyntheticConfig, load_config
    from pipeline.grpo import starting_point
    from pipeline.synthetic import generate_split

    out, _ = first_run
    export = out / "grpo" / "final"
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert (export / "glimpse_modules" / "glimpse_modules.safetensors").is_file()
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(out / "tiny_base")
    exported = dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(export)
                    .named_parameters())
    assert exported.keys() == dict(base.named_parameters()).keys()  # a complete HF checkpoint
    # (whether the weights moved depends on the untrained model ever answering right: with
    # every reward 0 all advantages are 0; the frozen parts must not move in any case)
    assert all(p.equal(exported[n]) for n, p in base.named_parameters()
               if n.startswith("model.visual."))  # policy.freeze_vision
    # algo.train_vip is off: the exported glimpse modules are the ones the run started from.
    started = load_file(out / "mods" / "glimpse_modules.safetensors")
    ended = load_file(export / "glimpse_modules" / "glimpse_modules.safetensors")
    assert started.keys() == ended.keys() and all(ended[k].equal(v) for k, v in started.items())
    # A stage-2 export is itself a starting point (its own base + modules).
    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}",
                                            f"trainer.init_from={export}"])
    assert starting_point(cfg) == (export, export / "glimpse_modules")

    row = next(iter(generate_split(SyntheticConfig(num_train=1, image_size=224), "train")))
    row["image"].save(tmp_path / "shapes.png")
    cmd = [sys.executable, "-m", "glimpseprune.look", "--model", str(export),
           "--modules", str(export / "glimpse_modules"), "--image", str(tmp_path / "shapes.png"),
           "--question", row["question"], "--out", str(tmp_path / "look"),
           "--max-new-tokens", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["visual_tokens"] == 64  # 224 px / 14 px = 16 x 16 patches, merged 2 x 2
    assert 1 <= record["kept_tokens"] <= 64
    assert record["modules"] == str(export / "glimpse_modules")
    png = Path(record["png"])
    assert png == tmp_path / "look" / "look_shapes.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_resume_from_latest_runs_only_the_missing_step(first_run):
    out, _ = first_run
    assert (out / "checkpoints" / "grpo" / "latest").read_text().strip() == "step000002"
    done = _grpo(out, "checkpoint.resume=latest", "trainer.total_steps=3")
    assert "resumed from" in done.stdout and "at step 2" in done.stdout, done.stdout[-2000:]
    assert "grpo step 3/3" in done.stdout
    assert "grpo step 1/" not in done.stdout and "grpo step 2/" not in done.stdout
    runs = _runs(out)
    assert len(runs) == 1  # the resumed run continues the one that wrote the checkpoint
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_with/trainer.total_steps"] == "3"
    assert run.data.params["trainer.total_steps"] == "2"  # as first logged
    for key in ("policy/loss", "reward/total", "timing_s/step"):
        assert set(_history(out, run.info.run_id, key)) == {1, 2, 3}, key  # each step once
    assert set(_history(out, run.info.run_id, "eval/accuracy")) == {0, 1, 2, 3}
    versions = _client(out).search_model_versions("name='glimpseprune-plus-grpo'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert {v.tags["step"] for v in versions} == {"2", "3"}
    assert (out / "checkpoints" / "grpo" / "latest").read_text().strip() == "step000003"
    # which prompts each step used: steps 1-2, then 3 on the next rows of the same order
    consumed = (out / "grpo" / "consumed.jsonl").read_text().splitlines()
    lines = [json.loads(line) for line in consumed]
    assert [line["step"] for line in lines] == [1, 2, 3]
    assert all(len(line["ids"]) == 2 for line in lines)
    assert not set(lines[2]["ids"]) & (set(lines[0]["ids"]) | set(lines[1]["ids"]))


def test_no_stage1_model_fails_before_starting_anything(tmp_path):
    from pipeline.config import load_config
    from pipeline.grpo import run

    cfg = load_config("configs/tiny.yaml", [f"output_dir={tmp_path}", *SMALL])
    with pytest.raises(FileNotFoundError, match=r"python -m pipeline\.glimpse") as info:
        run(cfg)
    assert str(tmp_path / "glimpse" / "final") in str(info.value)
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run, no Ray: it failed first
