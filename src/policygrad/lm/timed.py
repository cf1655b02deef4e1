"""A call under a time limit, for the user's code that may hang (a reward, a tool)."""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional


def in_thread(fn: Callable[[], Any], timeout: float, name: str) -> tuple[bool, Any, Optional[BaseException]]:
    """(finished, its value, its exception) of fn() run in a daemon thread given `timeout` seconds.

    A daemon thread, not concurrent.futures: that module joins its workers at interpreter exit, so
    a hung call would hang the exit too. Python cannot stop a thread, so a hung one runs on in the
    background; the caller decides what that means (an error that ends the run, a failed tool call)."""
    box: dict[str, Any] = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # carried back to the caller, which reports it in its own words
            box["error"] = e

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return False, None, None
    return True, box.get("value"), box.get("error")
