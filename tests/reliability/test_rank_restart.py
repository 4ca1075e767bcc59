"""A policy rank killed in the middle of a GRPO run: the driver stops every role, starts them
again from the run's last checkpoint and goes on; no step is trained twice or skipped, the
data record and the MLflow run stay one.

Runs `python -m pipeline.grpo` on configs/tiny.yaml (224 px, 3 steps, 2 policy ranks, a
checkpoint every step); once step 1 is reported, the test SIGKILLs one policy rank's process
(`ray::PolicyActor...`), so step 2 finds it dead.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

OVERRIDES = ["checkpoint.every_steps=1", "trainer.max_restarts=1"]


def _one_finished_run(out):
    """The run's MLflow client and its one run (a restart continues it), checked FINISHED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("glimpseprune-plus").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    return client, runs


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
    out, returncode, log, killed = killed_rank_run
    assert killed, "no policy rank process was found to kill"
    assert returncode == 0, log[-4000:]
    assert "starting every role again from" in log and "step000001" in log
    assert "grpo: resumed from" in log and "grpo step 3/3" in log
    client, runs = _one_finished_run(out)

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
    out, returncode, log, killed = killed_sft_rank_run
    assert killed, "no policy rank process was found to kill"
    assert returncode == 0, log[-4000:]
    assert "starting every rank again from" in log and "step000001" in log
    assert "sft: resumed from" in log and "sft step 3/3" in log
    client, runs = _one_finished_run(out)

    def history(key):
        return [(m.step, m.value) for m in client.get_metric_history(runs[0].info.run_id, key)]

    assert sorted(history("faults/group_restarts")) == [(1, 0.0), (2, 1.0), (3, 1.0)]
    assert sorted(step for step, _ in history("policy/loss")) == [1, 2, 3]
    record = [json.loads(line) for line in
              (out / "sft" / "consumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in record] == [1, 2, 3]
    ids = [i for r in record for i in r["ids"]]
    assert len(ids) == len(set(ids)) == 12  # no row twice, none skipped (12 of 16)
