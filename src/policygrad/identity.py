"""Stable names of Python callables across processes and runs; imports nothing of policygrad."""
from __future__ import annotations

import hashlib
from typing import Callable


def callable_identity(fn: Callable) -> str:
    """What names a Python function (a reward, an env factory) across processes: its module,
    qualified name and code. An edited body is another function; a closure's captured values are
    not part of it."""
    target = fn if hasattr(fn, "__code__") else type(fn).__call__
    code = getattr(target, "__code__", None)
    parts = [getattr(target, "__module__", ""), getattr(target, "__qualname__", type(fn).__qualname__)]
    if code is not None:
        parts += [code.co_code.hex(), repr(code.co_consts), repr(code.co_names)]
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:12]
