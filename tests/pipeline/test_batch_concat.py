"""RolloutBatch.take / concat and PromptBatch.concat: rows keep their prompts when batches from
several rollout engines are joined (and when failed rows are left out)."""

from __future__ import annotations

from pipeline.batch import PromptBatch, RolloutBatch


def _prompts(tag, n):
    return PromptBatch(ids=[f"{tag}{i}" for i in range(n)],
                       images=[f"img-{tag}{i}" for i in range(n)],
                       questions=[f"q-{tag}{i}" for i in range(n)],
                       answers=[f"a-{tag}{i}" for i in range(n)],
                       boxes=[[[float(i), 0.0, 1.0, 1.0]] for i in range(n)],
                       question_types=["color"] * n, objects=[f"o-{tag}{i}" for i in range(n)])


def _rollout(tag, prompts, g, *, logprobs=True, extras=("error",)):
    """`prompts` prompts x g rows, row r of prompt r // g; every value names its batch and row."""
    rows = prompts * g
    return RolloutBatch(
        prompts=_prompts(tag, prompts), prompt_index_B=[r // g for r in range(rows)],
        response_ids=[[ord(tag), r] for r in range(rows)],
        keep_mask_BV=[[r % 2 == 0, True] for r in range(rows)],
        rollout_logprobs=[[-0.1 * r] for r in range(rows)] if logprobs else None,
        extras={k: [f"{k}-{tag}{r}" for r in range(rows)] for k in extras})


def test_prompt_concat_joins_every_field_in_order():
    joined = PromptBatch.concat([_prompts("a", 2), _prompts("b", 1)])
    assert joined.ids == ["a0", "a1", "b0"]
    assert joined.images == ["img-a0", "img-a1", "img-b0"]
    assert joined.questions == ["q-a0", "q-a1", "q-b0"]
    assert joined.answers == ["a-a0", "a-a1", "a-b0"]
    assert joined.boxes == [[[0.0, 0.0, 1.0, 1.0]], [[1.0, 0.0, 1.0, 1.0]],
                            [[0.0, 0.0, 1.0, 1.0]]]
    assert joined.question_types == ["color"] * 3
    assert joined.objects == ["o-a0", "o-a1", "o-b0"]


def test_take_keeps_prompts_and_indices_and_picks_every_per_row_field():
    batch = _rollout("a", 3, 2)  # rows 0..5 -> prompts 0,0,1,1,2,2
    batch.advantages_B = [float(r) for r in range(6)]
    part = batch.take([5, 1, 2])
    assert part.prompts is batch.prompts  # same prompts: indices still point into them
    assert part.prompt_index_B == [2, 0, 1]
    assert part.response_ids == [[97, 5], [97, 1], [97, 2]]  # ord("a") = 97
    assert part.keep_mask_BV == [[False, True], [False, True], [True, True]]
    assert part.rollout_logprobs == [[-0.1 * 5], [-0.1 * 1], [-0.1 * 2]]
    assert part.advantages_B == [5.0, 1.0, 2.0]
    assert part.extras == {"error": ["error-a5", "error-a1", "error-a2"]}
    assert len(batch) == 6 and batch.prompt_index_B == [0, 0, 1, 1, 2, 2]  # original untouched


def test_take_leaves_none_fields_none_and_takes_nothing():
    batch = _rollout("a", 2, 2, logprobs=False)
    part = batch.take([3])
    assert part.rollout_logprobs is None and part.advantages_B is None
    assert part.prompt_index_B == [1] and part.response_ids == [[97, 3]]
    assert len(batch.take([])) == 0


def test_concat_shifts_prompt_indices_by_earlier_prompt_counts():
    # Three engines' outputs: 2 prompts x G=2, 1 prompt x 2, 3 prompts x 2.
    parts = [_rollout("a", 2, 2), _rollout("b", 1, 2), _rollout("c", 3, 2)]
    joined = RolloutBatch.concat(parts)
    assert len(joined) == 4 + 2 + 6 and len(joined.prompts) == 2 + 1 + 3
    # offsets: a 0, b 0 + 2 = 2, c 2 + 1 = 3
    assert joined.prompt_index_B == [0, 0, 1, 1] + [2, 2] + [3, 3, 4, 4, 5, 5]
    # every row still points at its own prompt: row r of a part belongs to its prompt r // 2
    for (tag, r), p in zip(joined.response_ids, joined.prompt_index_B, strict=True):
        assert joined.prompts.ids[p] == f"{chr(tag)}{r // 2}"
    assert joined.keep_mask_BV == [m for b in parts for m in b.keep_mask_BV]
    assert joined.rollout_logprobs == [lp for b in parts for lp in b.rollout_logprobs]
    assert joined.extras["error"] == ["error-a0", "error-a1", "error-a2", "error-a3",
                                      "error-b0", "error-b1"] + [f"error-c{r}" for r in range(6)]
    assert joined.advantages_B is None  # None in every part stays None


def test_concat_of_taken_rows_and_none_in_any_part():
    a, b = _rollout("a", 2, 2), _rollout("b", 2, 2, logprobs=False)
    joined = RolloutBatch.concat([a.take([3]), b.take([0, 2])])
    # take keeps a's 2 prompts, so b's indices shift by 2: b rows 0, 2 -> prompts 0, 1 -> 2, 3
    assert joined.prompt_index_B == [1, 2, 3]
    assert [joined.prompts.ids[p] for p in joined.prompt_index_B] == ["a1", "b0", "b1"]
    assert joined.response_ids == [[97, 3], [98, 0], [98, 2]]
    assert joined.rollout_logprobs is None  # one part without log-probs: none for the join


def test_concat_joins_extras_every_part_has():
    a = _rollout("a", 1, 2, extras=("error", "kept_tokens"))
    b = _rollout("b", 1, 1, extras=("error",))
    joined = RolloutBatch.concat([a, b])
    assert joined.extras == {"error": ["error-a0", "error-a1", "error-b0"]}


def test_concat_of_one_batch_is_that_batch():
    a = _rollout("a", 2, 3)
    joined = RolloutBatch.concat([a])
    assert joined.prompt_index_B == a.prompt_index_B and joined.prompts.ids == a.prompts.ids
    assert joined.response_ids == a.response_ids and joined.extras == a.extras
