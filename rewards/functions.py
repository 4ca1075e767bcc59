"""Pure reward functions of one sample: answer correctness, format, and the pruning bonus.

Owns the scoring rules GRPO's reward service (F6) combines: normalised exact match, numeric
match with a relative tolerance, multiple-choice letter match, ANLS for free text, a format
reward, and the pruning-ratio bonus paid only for a correct answer. Each function takes plain
strings / numbers and returns a float in [0, 1] (the bonus: [0, weight]). Must not do I/O; the
LLM judge (HTTP) and the batching actor live elsewhere.
"""

from __future__ import annotations

import re

from pipeline.prompts import normalise_answer

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_CHOICE = re.compile(r"^\(?([A-Za-z])\)?(?:[.):\s]|$)")


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal ('The Red.' == 'red')."""
    return float(normalise_answer(prediction) == normalise_answer(reference))


def _first_number(text: str) -> float | None:
    match = _NUMBER.search(text)
    return None if match is None else float(match.group().replace(",", ""))


def numeric_match(prediction: str, reference: str, rel_tol: float = 1e-2) -> float:
    """1.0 when the first number in each agrees within `rel_tol` (relative; exact at zero)."""
    pred, ref = _first_number(prediction), _first_number(reference)
    if pred is None or ref is None:
        return 0.0
    if ref == 0:
        return float(pred == 0)
    return float(abs(pred - ref) <= rel_tol * abs(ref))


def choice_match(prediction: str, reference: str) -> float:
    """1.0 when the chosen option letter matches: 'B', '(b)', 'B. a cat' all choose B."""
    pred, ref = _CHOICE.match(prediction.strip()), _CHOICE.match(reference.strip())
    return float(pred is not None and ref is not None
                 and pred.group(1).upper() == ref.group(1).upper())


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, 1):
        current = [i]
        for j, char_b in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: str | list[str], threshold: float = 0.5) -> float:
    """Average normalised Levenshtein similarity (DocVQA's metric), best over references:
    1 - distance / max length, set to 0 below `threshold`."""
    refs = [references] if isinstance(references, str) else references
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for ref in refs:
        ref = " ".join(ref.strip().lower().split())
        longest = max(len(pred), len(ref))
        similarity = 1.0 if longest == 0 else 1.0 - _levenshtein(pred, ref) / longest
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


def format_reward(response: str, finished: bool, max_words: int = 8) -> float:
    """1.0 for a short, finished answer (stopped at end-of-turn, non-empty, <= max_words)."""
    words = response.split()
    return float(finished and 0 < len(words) <= max_words)


def prune_bonus(correct: float, keep_ratio: float, weight: float, form: str = "linear") -> float:
    """The pruning-ratio bonus: weight x (1 - keep_ratio), times correctness (0 when wrong).

    Paid only for a correct answer, so dropping the tokens the answer needs never pays.
    """
    if form != "linear":
        raise ValueError(f"unknown prune bonus form {form!r}; known: linear")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio {keep_ratio} is outside [0, 1]")
    return weight * (1.0 - keep_ratio) * correct
