"""Remote rewards over HTTP, the reward server, and the timeout every reward call runs under."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from policygrad.lm import rewards
from policygrad.lm.reward_server import make_server

PROMPTS = ["p1", "p2", "p3"]
COMPLETIONS = ["le chat dort ici", "un chien", "le chat est noir ce soir"]
LOCAL = [{"reward": "length", "target": 4, "tolerance": 0}, {"reward": "contains", "words": ["chat"], "weight": 2}]


@contextmanager
def running(server):
    """The server's URL while it answers in a background thread; shut down afterwards."""
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/score"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def scripted(*answers):
    """A fake reward server: the i-th POST gets answers[i] = (status, body bytes); records requests."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append({"content_type": self.headers["Content-Type"], "body": json.loads(body)})
            status, answer = answers[min(len(seen), len(answers)) - 1]
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    with running(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url, seen


def remote(url, timeout=5.0, retries=3, backoff=0.01):
    reward_set = rewards.RewardSet([rewards.build({"reward": url, "backoff": backoff})])
    reward_set.configure(timeout=timeout, retries=retries)
    return reward_set


def ok(values):
    return 200, json.dumps({"rewards": values}).encode()


# --- round trips through the reward server -----------------------------------------------------
def test_round_trip_through_the_server_equals_the_local_reward():
    local = rewards.RewardSet([rewards.build(spec) for spec in LOCAL])
    with running(make_server(local, port=0)) as url:
        got = remote(url)(PROMPTS, COMPLETIONS, {})
    np.testing.assert_allclose(got, local(PROMPTS, COMPLETIONS, {}))
    assert got.tolist() == [3.0, 0.5, 2.5]


def test_extra_columns_reach_the_server_and_its_rewards():
    local = rewards.RewardSet([rewards.build("exact-match")])
    with running(make_server(local, port=0)) as url:
        got = remote(url)(["p", "p"], ["7", "8"], {"answer": [7, np.int64(7)]})
    assert got.tolist() == [1.0, 0.0]
    with scripted(ok([0.5, 0.5])) as (url, seen):
        remote(url)(["p", "q"], ["a", "b"], {"answer": ["1", "2"], "topic": ["x", "y"]})
    assert seen == [{"content_type": "application/json", "body": {
        "prompts": ["p", "q"], "completions": ["a", "b"], "answer": ["1", "2"], "topic": ["x", "y"]}}]


def test_server_answers_a_malformed_request_with_400_and_a_failing_reward_with_500(tmp_path):
    (tmp_path / "r.py").write_text("def f(prompts, completions, **kw):\n    raise KeyError('boom')\n")
    failing = rewards.RewardSet([rewards.build("python:r.py:f", tmp_path)])
    with running(make_server(failing, port=0)) as url:
        def post(payload):
            request = urllib.request.Request(url, data=payload, headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(request, timeout=5)
            return e.value.code, json.loads(e.value.read())["error"]
        assert post(b"not json")[0] == 400
        assert post(json.dumps({"prompts": ["p"], "completions": "c"}).encode()) == (
            400, "'completions' must be a list of strings")
        assert post(json.dumps({"prompts": ["p"], "completions": ["c"], "answer": [1, 2]}).encode()) == (
            400, "'answer' must be a list of 1 values, one per completion")
        status, error = post(json.dumps({"prompts": ["p"], "completions": ["c"]}).encode())
    assert status == 500 and "raised KeyError" in error and "\n" not in error


# --- retries, back-off and failures ------------------------------------------------------------
def test_a_server_that_fails_twice_then_answers_succeeds_after_backing_off():
    fail = (503, b'{"error": "warming up"}')
    with scripted(fail, fail, ok([1.0, 2.0])) as (url, seen):
        start = time.monotonic()
        got = remote(url, retries=3, backoff=0.05)(["p", "p"], ["a", "b"], {})
        elapsed = time.monotonic() - start
    assert got.tolist() == [1.0, 2.0] and len(seen) == 3
    assert elapsed >= 0.05 + 0.1  # slept 0.05 s, then 0.1 s


def test_too_many_failures_end_in_one_error_with_the_last_one():
    with scripted((503, b'{"error": "overloaded"}')) as (url, seen):
        with pytest.raises(rewards.RewardError, match="failed after 3 attempts: HTTP 503 .*: overloaded"):
            remote(url, retries=2)(["p"], ["a"], {})
    assert len(seen) == 3


def test_connection_refused_ends_in_one_error_naming_the_url():
    with socket.socket() as s:  # a port that was free a moment ago, and that nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(rewards.RewardError) as e:
        remote(url, retries=2)(["p"], ["a"], {})
    assert str(e.value) == f"remote reward '{url}' failed after 3 attempts: connection refused"


def test_a_400_answer_is_not_retried():
    with scripted((400, b'{"error": "missing column answer"}')) as (url, seen):
        with pytest.raises(rewards.RewardError, match="after 1 attempt: HTTP 400 .*missing column answer"):
            remote(url)(["p"], ["a"], {})
    assert len(seen) == 1


@pytest.mark.parametrize("answer, message", [
    (ok([1.0]), "answered 1 rewards for 2 completions"),
    ((200, b"<html>hello</html>"), "not a JSON object"),
    ((200, b'{"scores": [1, 2]}'), 'without a "rewards" list'),
    (ok([1.0, None]), "returned None for completion 'b'"),
])
def test_a_malformed_answer_is_an_error_naming_the_url(answer, message):
    with scripted(answer) as (url, seen):
        with pytest.raises(rewards.RewardError, match=message) as e:
            remote(url)(["p", "p"], ["a", "b"], {})
    assert f"'{url}'" in str(e.value) and len(seen) == 1


def test_a_server_slower_than_the_timeout_is_a_timeout():
    class Slow(BaseHTTPRequestHandler):
        def do_POST(self):
            time.sleep(1.0)

        def log_message(self, *args):
            pass

    with running(ThreadingHTTPServer(("127.0.0.1", 0), Slow)) as url:
        with pytest.raises(rewards.RewardError, match="failed after 2 attempts: no answer within 0.2 s"):
            remote(url, timeout=0.2, retries=1)(["p"], ["a"], {})


def test_remote_reward_spec_errors():
    with pytest.raises(rewards.RewardError, match="takes only weight and backoff, not timeout"):
        rewards.build({"reward": "http://localhost:8000/", "timeout": 5})
    with pytest.raises(rewards.RewardError, match="not a valid URL"):
        rewards.build("http://localhost:port/")
    with pytest.raises(rewards.RewardError, match="needs a host"):
        rewards.build("https:///score")
    with pytest.raises(rewards.RewardError, match="timeout must be a positive number"):
        rewards.RewardSet().configure(timeout=0, retries=3)
    with pytest.raises(rewards.RewardError, match="retries must be a whole number"):
        rewards.RewardSet().configure(timeout=1, retries=-1)


# --- the timeout around every reward ---------------------------------------------------------------
def test_a_hung_python_reward_times_out_without_waiting_for_it(tmp_path):
    (tmp_path / "r.py").write_text("import time\n\ndef f(prompts, completions, **kw):\n"
                                   "    time.sleep(30)\n    return [1.0] * len(completions)\n")
    reward_set = rewards.RewardSet([rewards.build("python:r.py:f", tmp_path)])
    reward_set.configure(timeout=0.5, retries=0)
    start = time.monotonic()
    with pytest.raises(rewards.RewardError, match=r"reward 'python:r.py:f' did not answer within 0.5 s"):
        reward_set(["p"], ["a"], {})
    assert time.monotonic() - start < 3


def test_a_raising_reward_in_its_thread_is_still_named(tmp_path):
    (tmp_path / "r.py").write_text("def f(prompts, completions, **kw):\n    raise ZeroDivisionError('x')\n")
    reward_set = rewards.RewardSet([rewards.build("python:r.py:f", tmp_path)])
    with pytest.raises(rewards.RewardError, match=r"reward 'python:r.py:f' raised ZeroDivisionError: x"):
        reward_set(["p"], ["a"], {})
