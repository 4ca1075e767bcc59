"""The LLM judge against a real HTTP server speaking the OpenAI chat-completions shape.

The server runs on 127.0.0.1 in a thread; each test gives it a `respond(body, n)` function that
picks (status, content, delay_s) from the request body and the request's 1-based number.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.batch import PromptBatch, RolloutBatch
from pipeline.config import ConfigError, JudgeConfig, PruneBonusConfig, RewardConfig, load_config
from rewards.judge import LlmJudge
from rewards.service import RewardService


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        server: _ChatServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append({"path": self.path, "body": body,
                                    "auth": self.headers.get("Authorization")})
            n = len(server.requests)
        status, content, delay_s = server.respond(body, n)
        time.sleep(delay_s)
        if isinstance(content, bytes):  # a raw body, e.g. not JSON at all
            payload = content
        else:
            payload = json.dumps({"object": "chat.completion", "choices": [{
                "index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if server.trickle_s:  # a byte at a time: no single read ever waits long
                for k in range(len(payload)):
                    self.wfile.write(payload[k:k + 1])
                    self.wfile.flush()
                    time.sleep(server.trickle_s)
            else:
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


class _ChatServer(ThreadingHTTPServer):
    def __init__(self, respond):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.respond, self.requests, self.lock = respond, [], threading.Lock()
        self.trickle_s = 0.0
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"


@pytest.fixture
def serve():
    """Starts a chat server with the given `respond(body, n)`; stops it after the test."""
    servers = []

    def start(respond):
        server = _ChatServer(respond)
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _always(content, status=200, delay_s=0.0):
    return lambda body, n: (status, content, delay_s)


def _user(body):
    return body["messages"][-1]["content"]


def test_yes_scores_one_from_the_judge_and_the_request_is_a_chat_completion(serve):
    server = serve(_always("yes"))
    judge = LlmJudge(JudgeConfig(url=server.url + "/", model="grader"))
    # exact match would say 0 here: the judge's verdict is what counts
    assert judge.score("What colour is the circle?", "crimson", "red") == (1.0, "judge")
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"  # trailing slash of the url dropped
    body = request["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("grader", 0, 3)
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    for part in ("What colour is the circle?", "crimson", "red", '"yes" or "no"'):
        assert part in _user(body)


def test_no_scores_zero_from_the_judge(serve):
    server = serve(_always("No."))  # case and a final full stop are tolerated
    judge = LlmJudge(JudgeConfig(url=server.url))
    assert judge.score("What colour?", "red", "red") == (0.0, "judge")


def test_server_errors_are_retried_then_the_judge_answers(serve):
    server = serve(lambda body, n: (500, "", 0.0) if n <= 2 else (200, "yes", 0.0))
    judge = LlmJudge(JudgeConfig(url=server.url, retries=2))
    assert judge.score("q", "crimson", "red") == (1.0, "judge")
    assert len(server.requests) == 3  # 2 failures + the answer


def test_retries_run_out_and_the_fallback_says_why(serve):
    server = serve(lambda body, n: (429, "", 0.0) if n == 1 else (503, "", 0.0))
    judge = LlmJudge(JudgeConfig(url=server.url, retries=1, fallback="exact"))
    assert judge.score("q", "Red.", "red") == (1.0, "fallback:http 503 after 2 tries")
    assert len(server.requests) == 2


@pytest.mark.parametrize("prediction,expected", [("Red", 1.0), ("blue", 0.0)])
def test_a_slow_server_times_out_to_the_exact_fallback(serve, prediction, expected):
    server = serve(_always("yes", delay_s=1.0))
    judge = LlmJudge(JudgeConfig(url=server.url, timeout_s=0.2, retries=0, fallback="exact"))
    started = time.monotonic()
    # the server would have said yes; exact match decides instead: Red == red, blue != red
    assert judge.score("q", prediction, "red") == (expected, "fallback:timeout after 1 try")
    assert time.monotonic() - started < 0.9  # gave up at the timeout, not at the reply


def test_a_server_trickling_its_reply_times_out_at_the_deadline(serve):
    server = serve(_always("yes"))
    server.trickle_s = 0.05  # ~150 bytes: 7 s in all, no read waits more than 0.05 s
    judge = LlmJudge(JudgeConfig(url=server.url, timeout_s=0.5, retries=0, fallback="exact"))
    started = time.monotonic()
    assert judge.score("q", "blue", "red") == (0.0, "fallback:timeout after 1 try")
    assert time.monotonic() - started < 1.5  # the try's deadline, not the reply's end


@pytest.mark.parametrize("content,fallback,expected,reason", [
    ("maybe", "exact", 1.0, "reply 'maybe' is neither yes nor no"),
    ("yes it matches", "zero", 0.0, "reply 'yes it matches' is neither yes nor no"),
    (b"<html>bad gateway</html>", "exact", 1.0, "reply is not JSON"),
    (b'{"error": "no choices"}', "anls", 1.0, "reply is not a chat completion"),
])
def test_a_garbage_reply_falls_back_without_retrying(serve, content, fallback, expected, reason):
    server = serve(_always(content))
    judge = LlmJudge(JudgeConfig(url=server.url, retries=2, fallback=fallback))
    # "red" vs "red": exact and anls give 1, zero gives 0
    assert judge.score("q", "red", "red") == (expected, f"fallback:{reason}")
    assert len(server.requests) == 1  # temperature 0 would repeat the same garbage


def test_an_unreachable_server_falls_back():
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    judge = LlmJudge(JudgeConfig(url=f"http://127.0.0.1:{port}/v1", retries=1))
    score, source = judge.score("q", "red", "red")
    assert (score, source) == (1.0, "fallback:network error (ConnectionRefusedError) "
                                    "after 2 tries")


def test_the_key_comes_from_the_named_environment_variable(serve, monkeypatch):
    server = serve(_always("yes"))
    cfg = JudgeConfig(url=server.url, api_key_env="GLIMPSE_TEST_JUDGE_KEY")
    monkeypatch.setenv("GLIMPSE_TEST_JUDGE_KEY", "sk-test-123")
    LlmJudge(cfg).score("q", "red", "red")
    monkeypatch.delenv("GLIMPSE_TEST_JUDGE_KEY")
    LlmJudge(cfg).score("q", "red", "red")
    assert [r["auth"] for r in server.requests] == ["Bearer sk-test-123", None]


def test_score_many_sends_requests_concurrently_and_keeps_order(serve):
    # the server answers only once 4 requests wait at once; a serial client would break the
    # barrier (2 s) and get "no" for its first row
    barrier = threading.Barrier(4)

    def respond(body, n):
        try:
            barrier.wait(timeout=2)
        except threading.BrokenBarrierError:
            return 200, "no", 0.0
        return 200, "yes" if "Predicted answer: good" in _user(body) else "no", 0.0

    server = serve(respond)
    judge = LlmJudge(JudgeConfig(url=server.url, max_workers=4))
    items = [("q", pred, "ref") for pred in ("good", "bad", "good", "bad")]
    assert judge.score_many(items) == [(1.0, "judge"), (0.0, "judge"),
                                       (1.0, "judge"), (0.0, "judge")]


def test_reward_service_takes_correctness_from_the_judge_and_counts_fallbacks(serve):
    def respond(body, n):
        prediction = _user(body).split("Predicted answer: ")[1].split("\n")[0]
        return {"crimson": (200, "yes", 0.0), "7": (500, "", 0.0)}.get(
            prediction, (200, "no", 0.0))

    server = serve(respond)
    prompts = PromptBatch(ids=["p0", "p1"], images=[None, None],
                          questions=["What colour is the circle?", "How many squares?"],
                          answers=["red", "7"])
    batch = RolloutBatch(prompts=prompts, prompt_index_B=[0, 0, 1, 1],
                         response_ids=[[1]] * 4,
                         extras={"visual_tokens": [256] * 4, "kept_tokens": [64] * 4,
                                 "finish_reason": ["stop"] * 4,
                                 "error": [None, None, None, "engine died"]})
    service = RewardService(RewardConfig(
        correctness="judge", prune_bonus=PruneBonusConfig(weight=0.5),
        judge=JudgeConfig(url=server.url, retries=0, fallback="exact")))
    scores = service.score(batch, ["crimson", "red", "7", "7"])
    # row 0: judge yes -> 1.  row 1: judge no -> 0 (exact would say 1).  row 2: HTTP 500, no
    # retries -> exact fallback "7" == "7" -> 1.  row 3: rollout failed -> 0, never sent.
    assert scores["accuracy"] == [1.0, 0.0, 1.0, 0.0]
    # bonus for correct rows: 0.5 * (1 - 64/256) = 0.375; format weight 0
    assert scores["total"] == pytest.approx([1.375, 0.0, 1.375, 0.0])
    assert (scores["judge_fallbacks"], scores["errors"]) == (1, 1)
    questions = sorted(_user(r["body"]).split("\n")[0] for r in server.requests)
    assert questions == ["Question: How many squares?", "Question: What colour is the circle?",
                         "Question: What colour is the circle?"]


def test_reward_service_without_a_judge_reports_zero_fallbacks():
    prompts = PromptBatch(ids=["p0"], images=[None], questions=["q"], answers=["red"])
    batch = RolloutBatch(prompts=prompts, prompt_index_B=[0], response_ids=[[1]], extras={})
    scores = RewardService(RewardConfig()).score(batch, ["red"])
    assert (scores["accuracy"], scores["judge_fallbacks"]) == ([1.0], 0)


def test_a_judge_needs_a_url():
    with pytest.raises(ValueError, match="reward.judge.url"):
        RewardService(RewardConfig(correctness="judge"))


@pytest.mark.parametrize("overrides,key", [
    (["reward.correctness=judge"], "reward.judge.url"),
    (["reward.judge.fallback=ask_again"], "reward.judge.fallback"),
    (["reward.judge.retries=-1"], "reward.judge.retries"),
    (["reward.judge.timeout_s=0"], "reward.judge.timeout_s"),
    (["reward.judge.max_workers=0"], "reward.judge.max_workers"),
])
def test_config_rejects_a_bad_judge_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_config_accepts_a_judge_with_a_url():
    cfg = load_config(None, ["reward.correctness=judge",
                             "reward.judge.url=http://127.0.0.1:8000/v1",
                             "reward.judge.fallback=anls"])
    assert (cfg.reward.judge.url, cfg.reward.judge.fallback) == ("http://127.0.0.1:8000/v1",
                                                                 "anls")
    assert cfg.reward.judge.api_key_env == "OPENAI_API_KEY"


def test_the_judge_key_is_used_but_never_logged(serve, monkeypatch, tmp_path, caplog, capsys):
    """Issue F9 item 7: the key travels only in the request header. The run's MLflow store
    (params = the whole config, metrics, tags), its folder and its log lines never hold it,
    even when a hostile judge echoes it back or refuses it."""
    from pipeline.tracking import Tracker

    key = "sk-never-log-5f2c9e"
    monkeypatch.setenv("GLIMPSE_TEST_JUDGE_KEY", key)
    server = serve(lambda body, n: [(200, f"Bearer {key}", 0.0), (401, "", 0.0),
                                    (200, "yes", 0.0)][(n - 1) % 3])
    cfg = load_config(None, [f"output_dir={tmp_path}", "reward.correctness=judge",
                             f"reward.judge.url={server.url}", "reward.judge.retries=0",
                             "reward.judge.api_key_env=GLIMPSE_TEST_JUDGE_KEY"])
    tracker = Tracker(cfg, "grpo")
    prompts = PromptBatch(ids=["p0"], images=[None], questions=["What colour?"],
                          answers=["red"])
    batch = RolloutBatch(prompts=prompts, prompt_index_B=[0, 0, 0], response_ids=[[1]] * 3,
                         extras={})
    with caplog.at_level("DEBUG"):
        scores = RewardService(cfg.reward).score(batch, ["red", "red", "red"])
    tracker.log({f"reward/{k}": sum(v) / len(v) if isinstance(v, list) else v
                 for k, v in scores.items()}, 1)
    tracker.finish()
    assert sorted(r["auth"] for r in server.requests) == [f"Bearer {key}"] * 3  # it was used
    assert scores["judge_fallbacks"] == 2  # the echo and the refusal fell back to exact match
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert b"GLIMPSE_TEST_JUDGE_KEY" in stored  # the variable's NAME is a logged param ...
    assert key.encode() not in stored  # ... its value is nowhere in the run's files
    printed = capsys.readouterr()
    assert key not in caplog.text + printed.out + printed.err
