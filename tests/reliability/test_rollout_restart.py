"""A rollout engine killed in the middle of a GRPO run: the driver starts it again in its
placement bundle with the policy's current weights, retries its share of the step, and the run
finishes with `faults/rollout_restarts` logged.

Runs `python -m pipeline.grpo` on configs/tiny.yaml (224 px, 3 steps, one engine in its own
process, rollout.engine_process=separate, as on a GPU). Once step 1 is reported, the test
SIGKILLs vLLM's engine core (`VLLM::EngineCore`): the actor lives on and reports vLLM's
EngineDeadError as `EngineDied`. Once step 2 is reported, it SIGKILLs the restarted rollout
actor's own process (`ray::RolloutActor...`), so step 3's rollout finds the actor dead.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dead_engine_core_run(run_with_a_kill):
    return run_with_a_kill("engine_core", ["rollout.max_restarts=2",
                                           "rollout.engine_process=separate"],
                           after="grpo step 1/3", process_title="VLLM::EngineCore",
                           then=(("grpo step 2/3", "ray::RolloutActor"),))


def test_the_run_survives_a_dead_engine_core_then_a_dead_actor(dead_engine_core_run):
    """The engine in its own process: after step 1 only vLLM's engine core is killed (the
    actor lives on and reports EngineDied), after step 2 the restarted actor's own process."""
    from mlflow.tracking import MlflowClient

    out, returncode, log, killed = dead_engine_core_run
    assert len(killed) == 2, f"killed {killed}: an engine core, then a rollout actor"
    assert returncode == 0, log[-4000:]
    assert "rollout engine 0 died (RayTaskError(EngineDied))" in log, log[-4000:]
    assert log.count("rollout engine 0 died") == 2 and "grpo step 3/3" in log
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("glimpseprune-plus").experiment_id])[0]
    restarts = {m.step: m.value for m in
                client.get_metric_history(run.info.run_id, "faults/rollout_restarts")}
    assert run.info.status == "FINISHED" and restarts == {1: 0.0, 2: 1.0, 3: 2.0}, restarts

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    assert set(history("policy/loss")) == {1, 2, 3}  # every step trained, each once
    assert all(v == 0.0 for v in history("policy/skipped_step").values())
    # Each new engine generates with the weights the policy has now, not the files it was
    # started from: vLLM's log-probs match the policy's replay of them (without the push the
    # step after a restart showed 2.3e-4).
    dlogp = history("policy/logprob_abs_diff")
    assert dlogp[2] <= 1e-5 and dlogp[3] <= 1e-5, dlogp


def test_a_second_death_past_the_limit_stops_with_a_clear_error(tmp_path):
    """rollout.max_restarts bounds the restarts: past it, the engine's death ends the run
    (here checked on Roles' own rule, without a run)."""
    from pipeline.grpo import Roles

    roles = Roles.__new__(Roles)  # only the restart bookkeeping, no actors
    roles.rollout_restarts, roles.max_restarts = 1, 1
    with pytest.raises(RuntimeError, match=r"rollout.max_restarts=1"):
        roles._restart_rollout(0, RuntimeError("engine gone"))
