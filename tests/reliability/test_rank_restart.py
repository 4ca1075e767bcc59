"""A policy rank killed in the middle of a GRPO run (or of an SFT run, the training loop sft
and glimpse share): the driver stops every role, starts them again from the run's last
checkpoint and goes on; no step is trained twice or skipped, the data record and the MLflow
run stay one.

Runs `python -m pipeline.grpo` (`pipeline.sft`) on configs/tiny.yaml (224 px, 3 steps, 2 policy
ranks, a checkpoint every step); once step 1 is reported, the test SIGKILLs one policy rank's
process (`ray::PolicyActor...`), so step 2 finds it dead.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

OVERRIDES = ["checkpoint.every_steps=1", "trainer.max_restarts=1"]


def _restarted_once(result, stage: str, what: str):
    """Checks what every restarted run must show - it finished after one restart of every
    `what` (rank / role) from step 1's checkpoint, in one FINISHED MLflow run, each step
    trained and recorded once, no row twice - and returns (metric history, consumed row ids)."""
    from mlflow.tracking import MlflowClient

    out, returncode, log, killed = result
    assert killed, "no policy rank process was found to kill"
    assert returncode == 0, log[-4000:]
    assert f"starting every {what} again from" in log and "step000001" in log
    assert f"{stage}: resumed from" in log and f"{stage} step 3/3" in log
    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("glimpseprune-plus").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # one run, continued

    def history(key):
        return sorted((m.step, m.value)
                      for m in client.get_metric_history(runs[0].info.run_id, key))

    assert history("faults/group_restarts") == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert [step for step, _ in history("policy/loss")] == [1, 2, 3]  # each step once
    record = [json.loads(line) for line in
              (out / stage / "consumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in record] == [1, 2, 3]
    ids = [i for r in record for i in r["ids"]]
    assert len(ids) == len(set(ids))  # no row twice
    return history, ids


def test_the_restart_rule_reraises_counts_and_stops_at_the_limit(capsys):
    """Both drivers' rule (actors.group.count_restart), without a run."""
    from actors.group import count_restart

    error = ConnectionError("connection closed by peer")
    with pytest.raises(ConnectionError) as raised:  # nobody died: not a death, no restart
        count_restart("sft", [], 0, 2, error, "step000001", "ranks")
    assert raised.value is error
    assert count_restart("sft", ["rank 1"], 0, 2, error, "step000001", "ranks") == 1
    assert "sft: rank 1 died (ConnectionError); starting every rank again from step000001 " \
           "(restart 1 of at most 2)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match=r"rank 1 died again after 2 restart\(s\) of the "
                                           r"ranks \(trainer.max_restarts=2\)"):
        count_restart("sft", ["rank 1"], 2, 2, error, "step000001", "ranks")


@pytest.fixture(scope="module")
def killed_rank_run(run_with_a_kill):
    return run_with_a_kill("rank_restart", OVERRIDES, after="grpo step 1/3",
                            process_title="ray::PolicyActor",
                            # one rank of the two: the other is left waiting on it
                            pick=lambda pids: pids[-1:])


def test_the_run_survives_a_killed_policy_rank(killed_rank_run):
    history, ids = _restarted_once(killed_rank_run, "grpo", "role")
    assert len(ids) == 6  # none skipped: 3 steps x 2 prompts of 8
    # the new engines got the checkpoint's weights: vLLM matches the policy's replay
    assert all(v <= 1e-5 for _, v in history("policy/logprob_abs_diff")), \
        history("policy/logprob_abs_diff")


SMALL_SFT = ["model.max_pixels=50176", "data.synthetic.image_size=224",
             "data.synthetic.num_train=16", "data.synthetic.num_validation=4",
             "data.synthetic.num_test=2", "sft.total_steps=3", "sft.prompts_per_step=4",
             "sft.eval_every=3", "trainer.eval_samples=4", "sft.checkpoint_every=1",
             "sft.vision_pretrain_steps=0", "trainer.max_restarts=1"]


@pytest.fixture(scope="module")
def killed_sft_rank_run(run_with_a_kill):
    return run_with_a_kill("sft_rank_restart", SMALL_SFT, after="sft step 1/3",
                           process_title="ray::PolicyActor", pick=lambda pids: pids[-1:],
                           module="pipeline.sft")


def test_sft_survives_a_killed_rank(killed_sft_rank_run):
    """The one training loop (pipeline/trainer.py, also pipeline.glimpse's) restarts its ranks
    from the last checkpoint: each step trained once, each row once, one MLflow run."""
    _, ids = _restarted_once(killed_sft_rank_run, "sft", "rank")
    assert len(ids) == 12  # none skipped: 3 steps x 4 rows of 16
