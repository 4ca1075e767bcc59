"""The optional LLM judge of answer correctness (reward.correctness=judge).

Owns asking an OpenAI-compatible chat-completions server whether a predicted answer matches the
reference answer to a question: one POST per row with a timeout, retries with short exponential
backoff on network errors, HTTP 5xx and 429 (a try ends at `timeout_s` even when the server
trickles its reply), and a stated fallback rule (`reward.judge.fallback`,
from rewards/functions.py) for any row the judge cannot answer. Standard library only, so a
reward worker needs no client package. Must not raise for one bad row, must not log or store the
API key (config holds only the NAME of its environment variable), and must not combine rewards
(rewards/service.py does).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException

from pipeline.config import JudgeConfig
from rewards import functions

log = logging.getLogger(__name__)

_FALLBACKS = {
    "exact": functions.exact_match,
    "anls": functions.anls,
    "zero": lambda prediction, reference: 0.0,
}
_SYSTEM = ("You grade answers to questions about images. Reply with exactly one word: "
           "yes or no.")
_USER = ("Question: {question}\nReference answer: {reference}\nPredicted answer: {prediction}\n"
         "Does the predicted answer match the reference answer to the question? "
         "Answer exactly \"yes\" or \"no\".")
_BACKOFF_S = 0.1  # first wait between tries; doubles per try (0.1, 0.2, 0.4, ...)
_RETRY_HTTP = {429}  # plus every 5xx: the server is busy or broken, not the request
_MAX_REPLY_BYTES = 1 << 20  # a yes/no completion is a few hundred bytes


class JudgeFailed(Exception):
    """The judge gave no usable verdict; the message is the short reason the source names."""


class _Retry(JudgeFailed):
    """A failure the server may recover from: worth another try after a pause."""


def _read_by(response, deadline: float) -> bytes:
    """The reply body, taken as it arrives. `timeout_s` alone bounds each read, so a server
    trickling a byte at a time would hold a try for as long as it likes: past `deadline` it
    is a timeout (retried like one); a body over 1 MiB is refused."""
    chunks, size = [], 0
    while chunk := response.read1(65536):
        chunks.append(chunk)
        size += len(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError("the reply was still arriving at reward.judge.timeout_s")
        if size > _MAX_REPLY_BYTES:
            raise JudgeFailed(f"reply over {_MAX_REPLY_BYTES} bytes")
    return b"".join(chunks)


class LlmJudge:
    """Scores correctness with an LLM over HTTP, falling back to a rule per failed row.

    Args:
        judge_cfg: the `reward.judge` config section.

    Raises:
        ValueError: no `url`, or an unknown `fallback`.
    """

    def __init__(self, judge_cfg: JudgeConfig):
        if not judge_cfg.url:
            raise ValueError("reward.judge.url is required when reward.correctness is 'judge'")
        if judge_cfg.fallback not in _FALLBACKS:
            raise ValueError(f"reward.judge.fallback={judge_cfg.fallback!r}; choose one of "
                             f"{sorted(_FALLBACKS)}")
        self.cfg = judge_cfg
        self.endpoint = judge_cfg.url.rstrip("/") + "/chat/completions"
        self.fallback = _FALLBACKS[judge_cfg.fallback]

    def _ask_once(self, request: urllib.request.Request) -> float:
        """One try: 1.0 for "yes", 0.0 for "no".

        Raises:
            _Retry: network trouble, a timeout, HTTP 5xx or 429 (the server may recover).
            JudgeFailed: the reply is not yes/no, or the server refused the request (not worth
                retrying: temperature 0 repeats the same reply, a 4xx the same refusal).
        """
        deadline = time.monotonic() + self.cfg.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                reply = json.loads(_read_by(response, deadline))
        except urllib.error.HTTPError as exc:
            if exc.code in _RETRY_HTTP or exc.code >= 500:
                raise _Retry(f"http {exc.code}") from exc
            raise JudgeFailed(f"http {exc.code}") from exc
        except (OSError, HTTPException) as exc:  # URLError, refused connection, timeouts
            cause = getattr(exc, "reason", exc)  # URLError wraps the socket's error
            timeout = isinstance(cause, TimeoutError)
            raise _Retry("timeout" if timeout else f"network error ({type(cause).__name__})"
                         ) from exc
        except ValueError as exc:
            raise JudgeFailed("reply is not JSON") from exc
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeFailed("reply is not a chat completion") from exc
        verdict = str(content).strip().lower().rstrip(".!")
        if verdict not in ("yes", "no"):
            raise JudgeFailed(f"reply {str(content)[:20]!r} is neither yes nor no")
        return float(verdict == "yes")

    def _ask(self, question: str, prediction: str, reference: str) -> float:
        body = {"model": self.cfg.model, "temperature": 0, "max_tokens": 3, "messages": [
            {"role": "system", "content": _SYSTEM},
            {"role": "user", "content": _USER.format(question=question, reference=reference,
                                                     prediction=prediction)}]}
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.cfg.api_key_env)
        if key:  # a local server needs none; send it only when the named variable is set
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        attempt = 0
        while True:
            try:
                return self._ask_once(request)
            except _Retry as exc:
                if attempt == self.cfg.retries:
                    tries = f"{attempt + 1} tr{'ies' if attempt else 'y'}"
                    raise JudgeFailed(f"{exc} after {tries}") from exc
                time.sleep(_BACKOFF_S * 2 ** attempt)
                attempt += 1

    def score(self, question: str, prediction: str, reference: str) -> tuple[float, str]:
        """Correctness of one answer; never raises.

        Args:
            question: the prompt's question.
            prediction: the model's decoded answer.
            reference: the data set's answer.

        Returns:
            (1.0 or 0.0, "judge") when the judge answered; otherwise (the fallback rule's
            score, "fallback:<reason>"), e.g. "fallback:timeout after 3 tries".
        """
        try:
            return self._ask(question, prediction, reference), "judge"
        except JudgeFailed as exc:
            reason = str(exc)
        except Exception as exc:  # one odd row (e.g. a non-string answer) must not stop a run
            reason = f"{type(exc).__name__}: {exc}"
        log.warning("judge: falling back to %s: %s", self.cfg.fallback, reason)
        try:
            return float(self.fallback(prediction, reference)), f"fallback:{reason}"
        except Exception as exc:
            return 0.0, f"fallback:{reason}; {self.cfg.fallback} failed: {exc}"

    def score_many(self, items: list[tuple[str, str, str]]) -> list[tuple[float, str]]:
        """`score` over (question, prediction, reference) items, `max_workers` at a time.

        Returns:
            One (score, source) per item, in the items' order.
        """
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.cfg.max_workers, len(items))) as pool:
            return list(pool.map(lambda item: self.score(*item), items))

