"""Batches split per rank without losing or mixing rows; data order is seeded and resumable."""

from __future__ import annotations

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.data import epoch_order
from pipeline.tracking import sanitise_key


def _prompts(n):
    return PromptBatch(ids=[f"p{i}" for i in range(n)], images=[None] * n,
                       questions=[f"q{i}" for i in range(n)], answers=[f"a{i}" for i in range(n)])


def test_prompt_split_sizes_differ_by_at_most_one():
    parts = _prompts(7).split(3)
    assert [len(p) for p in parts] == [3, 2, 2]
    assert [i for p in parts for i in p.ids] == [f"p{i}" for i in range(7)]


def test_rollout_split_keeps_rows_with_their_prompts():
    # 3 prompts x G=2 rows; row r belongs to prompt r // 2.
    batch = RolloutBatch(prompts=_prompts(3), prompt_index_B=[0, 0, 1, 1, 2, 2],
                         response_ids=[[r] for r in range(6)],
                         keep_mask_BV=[[True, r % 2 == 0] for r in range(6)],
                         advantages_B=[float(r) for r in range(6)],
                         extras={"reward": [r * 10 for r in range(6)]})
    shards = batch.split(4)  # 6 rows -> 2, 2, 1, 1
    assert [len(s) for s in shards] == [2, 2, 1, 1]
    rows = [(s.prompts.questions[p], s.response_ids[j][0], s.advantages_B[j],
             s.extras["reward"][j], s.keep_mask_BV[j])
            for s in shards for j, p in enumerate(s.prompt_index_B)]
    assert rows == [(f"q{r // 2}", r, float(r), r * 10, [True, r % 2 == 0]) for r in range(6)]
    assert [len(s.prompts) for s in shards] == [1, 1, 1, 1]  # only the prompts a shard uses


def test_epoch_order_is_seeded_resumable_and_covers_each_epoch():
    whole = epoch_order(10, seed=1, position=0, count=25)
    assert sorted(whole[:10]) == list(range(10)) and sorted(whole[10:20]) == list(range(10))
    assert whole[:10] != whole[10:20]  # a new permutation per epoch
    assert epoch_order(10, seed=1, position=7, count=18) == whole[7:]
    assert epoch_order(10, seed=2, position=0, count=10) != whole[:10]


def test_metric_keys_are_sanitised():
    assert sanitise_key("reward/accuracy") == "reward/accuracy"
    assert sanitise_key("eval/acc(top@1)") == "eval/acc_top_1_"
