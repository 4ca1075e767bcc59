"""A policy rank killed in the middle of a GRPO run: the driver stops every role, starts them
again from the run's last checkpoint and goes on; no step is trained twice or skipped, the
data record and the MLflow run stay one.

Runs `python -m pipeline.grpo` on configs/tiny.yaml (224 px, 3 steps, 2 policy ranks, a
checkpoint every step); once step 1 is reported, the test SIGKILLs one policy rank's process
(`ray::PolicyActor...`), so step 2 finds it dead.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow

SMALL = ["model.max_pixels=50176", "data.synthetic.image_size=224", "data.synthetic.num_train=8",
         "data.synthetic.num_validation=4", "data.synthetic.num_test=2",
         "trainer.prompts_per_step=2", "rollout.n=2", "trainer.eval_samples=2",
         "trainer.eval_every=3", "algo.train_vip=false", "trainer.total_steps=3",
         "checkpoint.every_steps=1", "trainer.max_restarts=1"]


def _policy_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "^ray::PolicyActor"], capture_output=True,
                           text=True)
    return sorted(int(pid) for pid in found.stdout.split())


@pytest.fixture(scope="module")
def killed_rank_run(tmp_path_factory):
    from glimpseprune.io import save_modules
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.tiny import resolve_base_model
    from pipeline.config import load_config

    out = tmp_path_factory.mktemp("rank_restart")
    cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", *SMALL])
    base = resolve_base_model(cfg.model, out)
    save_modules(GlimpsePruneModel.from_pretrained(base, cfg.glimpse, seed=0).glimpse_modules,
                 out / "mods")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [sys.executable, "-m", "pipeline.grpo", "--config", "configs/tiny.yaml",
           f"output_dir={out}", *SMALL, f"glimpse.modules_path={out}/mods"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=env)
    lines, killed = [], []
    deadline = time.monotonic() + 900
    for line in child.stdout:
        lines.append(line)
        if not killed and "grpo step 1/3" in line:
            ranks = _policy_pids()
            killed = ranks[-1:]  # one rank of the two: the other is left waiting on it
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            child.kill()
            break
    child.wait(timeout=60)
    return out, child.returncode, "".join(lines), killed


def test_the_run_survives_a_killed_policy_rank(killed_rank_run):
    from mlflow.tracking import MlflowClient

    out, returncode, log, killed = killed_rank_run
    assert killed, "no policy rank process was found to kill"
    assert returncode == 0, log[-4000:]
    assert "starting every role again from" in log and "step000001" in log
    assert "grpo: resumed from" in log and "grpo step 3/3" in log
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("glimpseprune-plus").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, continued

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)]

    assert sorted(history("faults/group_restarts")) == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert sorted(step for step, _ in history("policy/loss")) == [1, 2, 3]  # each step once
    lines = (out / "grpo" / "consumed.jsonl").read_text().splitlines()
    record = [json.loads(line) for line in lines]
    assert [r["step"] for r in record] == [1, 2, 3]
    ids = [i for r in record for i in r["ids"]]
    assert len(ids) == len(set(ids))  # no prompt twice, none skipped (6 of 8 rows)
    # the new engines got the checkpoint's weights: vLLM matches the policy's replay
    assert all(v <= 1e-5 for _, v in history("policy/logprob_abs_diff")), \
        history("policy/logprob_abs_diff")
