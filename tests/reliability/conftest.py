"""The fault-injection helper of the run fault tests: a tiny `python -m pipeline.grpo` (or
another stage's) run whose Ray actor processes of one kind the test SIGKILLs once a given line
is printed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# 224 px, 3 steps of 2 prompts x 2 samples, evaluation at the end only
SMALL_GRPO = ["model.max_pixels=50176", "data.synthetic.image_size=224",
              "data.synthetic.num_train=8", "data.synthetic.num_validation=4",
              "data.synthetic.num_test=2", "trainer.prompts_per_step=2", "rollout.n=2",
              "trainer.eval_samples=2", "trainer.eval_every=3", "algo.train_vip=false",
              "trainer.total_steps=3"]


def _pids(process_title: str) -> list[int]:
    """Processes whose title starts with `process_title` (Ray names actors ray::<Class>)."""
    found = subprocess.run(["pgrep", "-f", f"^{process_title}"], capture_output=True, text=True)
    return sorted(int(pid) for pid in found.stdout.split())


@pytest.fixture(scope="module")
def run_with_a_kill(tmp_path_factory):
    """Runs `module` with `overrides` (GRPO: after SMALL_GRPO); when a printed line holds
    `after`, SIGKILLs the processes `pick` chooses from those titled `process_title`; each
    `then` entry (after, process_title) is a further kill, at its own line, of every process
    so titled. Returns (output folder, return code, everything printed, the pids killed)."""

    def run(name: str, overrides: list[str], after: str, process_title: str, pick=lambda p: p,
            timeout_s: float = 900, module: str = "pipeline.grpo",
            then: tuple[tuple[str, str], ...] = ()):
        from glimpseprune.io import save_modules
        from glimpseprune.model import GlimpsePruneModel
        from glimpseprune.tiny import resolve_base_model
        from pipeline.config import load_config

        grpo = module == "pipeline.grpo"
        overrides = [*SMALL_GRPO, *overrides] if grpo else overrides
        out = tmp_path_factory.mktemp(name)
        cfg = load_config("configs/tiny.yaml", [f"output_dir={out}", *overrides])
        base = resolve_base_model(cfg.model, out)  # the run finds and reuses it
        if grpo:
            save_modules(GlimpsePruneModel.from_pretrained(base, cfg.glimpse, seed=0)
                         .glimpse_modules, out / "mods")
            overrides = [*overrides, f"glimpse.modules_path={out}/mods"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}  # a private Ray and store
        cmd = [sys.executable, "-m", module, "--config", "configs/tiny.yaml",
               f"output_dir={out}", *overrides]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=env)
        lines, killed = [], []
        kills = [(after, process_title, pick), *((a, t, lambda p: p) for a, t in then)]
        deadline = time.monotonic() + timeout_s
        for line in child.stdout:  # the driver's own lines and its actors' logs
            lines.append(line)
            if kills and kills[0][0] in line:
                _, title, choose = kills.pop(0)
                pids = choose(_pids(title))
                killed += pids
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                child.kill()
                break
        child.wait(timeout=60)
        return out, child.returncode, "".join(lines), killed

    return run
