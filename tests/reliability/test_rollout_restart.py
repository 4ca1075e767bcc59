"""A rollout engine killed in the middle of a GRPO run: the driver starts it again in its
placement bundle with the policy's current weights, retries its share of the step, and the run
finishes with `faults/rollout_restarts` logged.

Runs `python -m pipeline.grpo` on configs/tiny.yaml (224 px, 3 steps, one engine); once step 1
is reported, the test SIGKILLs the engine's process (`ray::RolloutActor...`), so step 2's rollout
finds it dead.
"""

from __future__ import annotations

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
         "rollout.max_restarts=1"]


def _rollout_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "^ray::RolloutActor"], capture_output=True,
                           text=True)
    return [int(pid) for pid in found.stdout.split()]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    from glimpseprune.io import save_modules
    from glimpseprune.model import GlimpsePruneModel
    from glimpseprune.tiny import resolve_base_model
    from pipeline.config import load_config

    out = tmp_path_factory.mktemp("restart")
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
    deadline = time.monotonic() + 600
    for line in child.stdout:  # the driver's own lines and its actors' logs
        lines.append(line)
        if not killed and "grpo step 1/3" in line:
            killed = _rollout_pids()
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            child.kill()
            break
    child.wait(timeout=60)
    return out, child.returncode, "".join(lines), killed


def test_the_run_survives_a_killed_engine(killed_run):
    from mlflow.tracking import MlflowClient

    out, returncode, log, killed = killed_run
    assert killed, "no rollout actor process was found to kill"
    assert returncode == 0, log[-4000:]
    assert "rollout engine 0 died" in log and "grpo step 3/3" in log
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("glimpseprune-plus").experiment_id])[0]
    assert run.info.status == "FINISHED"

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    restarts = history("faults/rollout_restarts")
    assert restarts == {1: 0.0, 2: 1.0, 3: 1.0}, restarts
    assert set(history("policy/loss")) == {1, 2, 3}  # every step trained, each once
    assert all(v == 0.0 for v in history("policy/skipped_step").values())
    # The new engine generates with the weights the policy has after step 1, not the files it
    # was started from: vLLM's log-probs match the policy's replay of them.
    dlogp = history("policy/logprob_abs_diff")
    assert dlogp[2] <= 1e-5 and dlogp[3] <= 1e-5, dlogp  # without the push: 2.3e-4 at step 2


def test_a_second_death_past_the_limit_stops_with_a_clear_error(tmp_path):
    """rollout.max_restarts bounds the restarts: past it, the engine's death ends the run
    (here checked on Roles' own rule, without a run)."""
    from pipeline.grpo import Roles

    roles = Roles.__new__(Roles)  # only the restart bookkeeping, no actors
    roles.rollout_restarts, roles.max_restarts = 1, 1
    with pytest.raises(RuntimeError, match=r"rollout.max_restarts=1"):
        roles._restart_rollout(0, RuntimeError("engine gone"))
