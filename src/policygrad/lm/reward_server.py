"""Serve a RewardSet over HTTP, the other end of a remote (`http://host:port/path`) reward.

POST any path with {"prompts": [...], "completions": [...], <extra column>: [...], ...}; the answer
is {"rewards": [float, ...]}, one per completion. A malformed request gets 400 and a reward that
misbehaves 500, both as {"error": "one line"}.
"""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from ..errors import RewardError
from .rewards import RewardSet


class BadRequest(ValueError):
    """The client's mistake: answered with 400 and this message."""


def parse(body: bytes) -> tuple[list[str], list[str], dict[str, list]]:
    """(prompts, completions, extras) from a request body, checked so a reward never sees a bad one."""
    try:
        data = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, not {type(data).__name__}")
    columns = {}
    for name in ("prompts", "completions"):
        value = data.pop(name, None)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"'{name}' must be a list of strings")
        columns[name] = value
    n = len(columns["completions"])
    # a short column would be cut silently by the rewards' zip(), so every column must match
    for name, value in [("prompts", columns["prompts"]), *data.items()]:
        if not isinstance(value, list) or len(value) != n:
            raise BadRequest(f"'{name}' must be a list of {n} values, one per completion")
    return columns["prompts"], columns["completions"], data


class RewardHandler(BaseHTTPRequestHandler):
    server: "RewardHTTPServer"

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():  # without it, reading the body would wait for the client to hang up
            return self._answer(400, {"error": "the request needs a Content-Length header"})
        try:
            prompts, completions, extras = parse(self.rfile.read(int(length)))
            rewards = self.server.rewards(prompts, completions, extras).tolist()
        except BadRequest as e:
            return self._answer(400, {"error": str(e)})
        except RewardError as e:
            print(f"reward server: {e}", file=sys.stderr)
            return self._answer(500, {"error": str(e)})
        self._answer(200, {"rewards": rewards})

    def _answer(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        """Quiet: one line per request would drown a training run's output; errors print above."""


class RewardHTTPServer(ThreadingHTTPServer):
    def __init__(self, rewards: RewardSet, host: str, port: int):
        super().__init__((host, port), RewardHandler)
        self.rewards = rewards


def make_server(rewards: RewardSet, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A bound server, not yet serving; port 0 picks a free one (read it from server_address)."""
    try:
        return RewardHTTPServer(rewards, host, port)
    except OSError as e:  # port taken, host not ours: the user's to fix
        raise RewardError(f"cannot serve rewards on {host}:{port}: {e.strerror or e}") from None


def serve(rewards: RewardSet, host: str = "127.0.0.1", port: int = 8000,
          ready: Optional[threading.Event] = None) -> None:
    """Answer reward requests until interrupted; `ready` is set once the port is bound."""
    server = make_server(rewards, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving rewards {', '.join(rewards.names)} on http://{bound_host}:{bound_port}/",
          file=sys.stderr)
    if ready is not None:
        ready.set()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
