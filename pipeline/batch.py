"""The only types that cross actor boundaries: PromptBatch (N prompts) and RolloutBatch (B rows).

Owns their fields and how they split per data-parallel rank. Plain Python containers, PIL
images and CPU tensors (all pickle through Ray's object store); nothing on an accelerator. Must
not tokenize or run models.

Shape letters: N prompts, B rows (= N * G in GRPO), G group size, V visual tokens, T response
tokens. A row's `keep_mask_V` covers all visual tokens of its prompt's images, row-major per
image; None means keep every visual token.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for the annotation: the reward workers need not import transformers
    from glimpseprune.layout import PromptVision


def _chunks(count: int, parts: int) -> list[range]:
    """`parts` contiguous ranges covering 0..count-1, sizes differing by at most one."""
    base, extra = divmod(count, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


@dataclass
class PromptBatch:
    """N prompts in the common data schema."""

    ids: list[str]
    images: list[Any]  # PIL images, one per prompt
    questions: list[str]
    answers: list[str]
    boxes: list[list[list[float]]] = field(default_factory=list)  # per prompt, xyxy pixels
    question_types: list[str] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)  # synthetic only: JSON of every object
    vision: list[PromptVision] = field(default_factory=list)  # set by the pruned rollout only

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_rows(cls, rows: list[dict]) -> PromptBatch:
        return cls(ids=[r["id"] for r in rows], images=[r["image"] for r in rows],
                   questions=[r["question"] for r in rows], answers=[r["answer"] for r in rows],
                   boxes=[r.get("boxes") or [] for r in rows],
                   question_types=[r.get("question_type") or "" for r in rows],
                   objects=[r.get("objects") or "" for r in rows])

    def take(self, indices: list[int] | range) -> PromptBatch:
        def pick(values: list) -> list:
            return [values[i] for i in indices] if values else []

        return PromptBatch(ids=pick(self.ids), images=pick(self.images),
                           questions=pick(self.questions), answers=pick(self.answers),
                           boxes=pick(self.boxes), question_types=pick(self.question_types),
                           objects=pick(self.objects), vision=pick(self.vision))

    def split(self, parts: int) -> list[PromptBatch]:
        return [self.take(r) for r in _chunks(len(self), parts)]

    @classmethod
    def concat(cls, batches: list[PromptBatch]) -> PromptBatch:
        def join(name: str) -> list:
            return [v for b in batches for v in getattr(b, name)]

        # vision only when every part has it: a partial list would point at the wrong prompts
        vision = join("vision") if all(b.vision for b in batches) else []
        return cls(ids=join("ids"), images=join("images"), questions=join("questions"),
                   answers=join("answers"), boxes=join("boxes"),
                   question_types=join("question_types"), objects=join("objects"),
                   vision=vision)


@dataclass
class RolloutBatch:
    """B response rows, each pointing at one of the batch's prompts.

    In SFT the responses are the reference answers; in GRPO they are vLLM samples with their
    keep masks, log-probs and (after scoring) advantages.
    """

    prompts: PromptBatch
    prompt_index_B: list[int]
    response_ids: list[list[int]]  # each ends with the end-of-turn token when finished
    keep_mask_BV: list[list[bool] | None] | None = None
    rollout_logprobs: list[list[float]] | None = None
    advantages_B: list[float] | None = None
    extras: dict[str, list] = field(default_factory=dict)  # per-row values, split with rows

    def __len__(self) -> int:
        return len(self.prompt_index_B)

    def take(self, rows: list[int]) -> RolloutBatch:
        """Only the listed rows (same prompts, same prompt indices)."""
        def pick(values: list | None) -> list | None:
            return None if values is None else [values[i] for i in rows]

        return replace(self, prompt_index_B=pick(self.prompt_index_B),
                       response_ids=pick(self.response_ids), keep_mask_BV=pick(self.keep_mask_BV),
                       rollout_logprobs=pick(self.rollout_logprobs),
                       advantages_B=pick(self.advantages_B),
                       extras={k: pick(v) for k, v in self.extras.items()})

    @classmethod
    def concat(cls, batches: list[RolloutBatch]) -> RolloutBatch:
        """Rows of several batches after one another (prompt indices shifted to match)."""
        offsets = [0]
        for b in batches[:-1]:
            offsets.append(offsets[-1] + len(b.prompts))

        def join(name: str) -> list | None:
            values = [getattr(b, name) for b in batches]
            return None if any(v is None for v in values) else [x for v in values for x in v]

        keys = set.intersection(*(set(b.extras) for b in batches)) if batches else set()
        return cls(prompts=PromptBatch.concat([b.prompts for b in batches]),
                   prompt_index_B=[p + off for b, off in zip(batches, offsets, strict=True)
                                   for p in b.prompt_index_B],
                   response_ids=join("response_ids"), keep_mask_BV=join("keep_mask_BV"),
                   rollout_logprobs=join("rollout_logprobs"), advantages_B=join("advantages_B"),
                   extras={k: [x for b in batches for x in b.extras[k]] for k in sorted(keys)})

    def split(self, parts: int) -> list[RolloutBatch]:
        """Contiguous row shards; each carries only the prompts its rows use (re-indexed)."""
        if len(self) < parts:
            raise ValueError(f"{len(self)} rows cannot feed {parts} ranks: every rank needs "
                             "at least one row")
        shards = []
        for rows in _chunks(len(self), parts):
            used = sorted({self.prompt_index_B[i] for i in rows})
            remap = {old: new for new, old in enumerate(used)}

            def pick(values: list | None, rows: range = rows) -> list | None:
                return None if values is None else [values[i] for i in rows]

            shards.append(replace(
                self, prompts=self.prompts.take(used),
                prompt_index_B=[remap[self.prompt_index_B[i]] for i in rows],
                response_ids=pick(self.response_ids), keep_mask_BV=pick(self.keep_mask_BV),
                rollout_logprobs=pick(self.rollout_logprobs),
                advantages_B=pick(self.advantages_B),
                extras={k: pick(v) for k, v in self.extras.items()}))
        return shards
