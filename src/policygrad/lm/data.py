"""Rows of a text task and their train / validation / test splits: read from JSONL, CSV or Parquet
files (a `prompt` column, or chat `messages`; the other columns, `answer`, `reference`, ..., go to
the rewards), from Python collections, or generated; splits given as three, or cut
deterministically from one. Nothing here knows tasks, rewards or models."""
from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import random
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import TaskError

SPLITS = ("train", "validation", "test")


def _check_prompt_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected an object with a 'prompt' field")
    if "prompt" not in row and "messages" not in row:
        raise TaskError(f"{where}: no 'prompt' column (nor chat 'messages'); columns: {', '.join(row) or 'none'}")
    prompt = row.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise TaskError(f"{where}: 'prompt' must be a non-empty string")
    messages = row.get("messages")
    if prompt is None and (not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
        raise TaskError(f"{where}: 'messages' must be a list of {{role, content}} objects")
    return row


def read_rows(path: Path, check: Optional[Callable[[Any, str], dict]] = None) -> list[dict]:
    """The rows of a JSONL, CSV or Parquet file, each passed through `check` (a task's prompt rows
    by default)."""
    _check_row = check or _check_prompt_row
    if not path.is_file():
        raise TaskError(f"data file '{path}' not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(_check_row(json.loads(line), f"{path}:{n}"))
                except json.JSONDecodeError as e:
                    raise TaskError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    elif suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = [_check_row(dict(r), f"{path}:{n}") for n, r in enumerate(csv.DictReader(f), 2)]
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # optional: only Parquet data needs it
        except ImportError:
            raise TaskError("reading Parquet needs pyarrow: pip install pyarrow") from None
        try:
            table = pq.read_table(path)
        except Exception as e:
            raise TaskError(f"data file '{path}' is not valid Parquet ({e.__class__.__name__})") from None
        rows = [_check_row(r, f"{path}: row {n}") for n, r in enumerate(table.to_pylist(), 1)]
    else:
        raise TaskError(f"data file '{path}' must be .jsonl, .csv or .parquet")
    if not rows:
        raise TaskError(f"data file '{path}' holds no rows")
    return rows


def cut_splits(rows: list[dict], held_out: tuple[str, ...] = ("validation", "test"),
               whole_prompts_only: bool = False) -> dict[str, list[dict]]:
    """About 10% of the rows for each held-out split, the rest train, cut by a hash of each row's
    prompt: deterministic, stable when rows are added, and all rows of one prompt (its preference
    pairs, say) in one split, so no held-out prompt is trained on (#23). Rows of fewer prompts than
    splits (one prompt asked many times, as an RL prompt set may be) are cut one by one, their
    held-out splits sampling training prompts anew, unless whole_prompts_only (preference pairs,
    whose held-out accuracy would then be measured on trained prompts) refuses them."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        text = row.get("prompt") or json.dumps(row.get("messages") or row.get("text"), sort_keys=True)
        groups.setdefault(hashlib.sha256(text.encode()).hexdigest(), []).append(row)
    ordered = [groups[k] for k in sorted(groups)]
    if len(ordered) < len(held_out) + 1 and not whole_prompts_only:
        ordered = [[row] for group in ordered for row in group]
    if len(ordered) < len(held_out) + 1:
        unit = "prompts" if whole_prompts_only else "rows"
        raise TaskError(f"cutting {', '.join(held_out)} and train from one data set needs at least "
                        f"{len(held_out) + 1} {unit}; got {len(ordered)}")
    size = max(1, len(rows) // 10)
    ends = list(itertools.accumulate(len(g) for g in ordered))  # rows in groups [0, i]
    out, start = {}, 0
    for i, split in enumerate(held_out):
        # the prompt boundary nearest (i + 1) x size rows, leaving a prompt for each later split;
        # one row per prompt cuts exactly (i + 1) x size
        last = len(ordered) - (len(held_out) - i)
        stop = min(range(start + 1, last + 1), key=lambda b: abs(ends[b - 1] - (i + 1) * size))
        out[split], start = [r for g in ordered[start:stop] for r in g], stop
    return {**out, "train": [r for g in ordered[start:] for r in g]}


def prompt_text(row: dict) -> str:
    """A row's prompt as the rewards see it: its `prompt`, or its chat's last message."""
    return row.get("prompt") or row["messages"][-1]["content"]


def rows_of(data: Any, where: str, check: Optional[Callable[[Any, str], dict]] = None) -> list[dict]:
    """Rows from a list of dicts, a `datasets.Dataset` or a pandas DataFrame (neither imported
    here: `datasets` stays optional), or a data file's path; each passed through `check`."""
    _check_row = check or _check_prompt_row
    if isinstance(data, (str, os.PathLike)):
        return read_rows(Path(data), _check_row)
    if callable(getattr(data, "to_list", None)):  # datasets.Dataset
        data = data.to_list()
    elif callable(getattr(data, "to_dict", None)) and hasattr(data, "columns"):  # pandas
        data = data.to_dict("records")
    if not isinstance(data, (list, tuple)):
        raise TaskError(f"{where} must be a list of dicts, a datasets.Dataset or a data file's path; "
                        f"got {type(data).__name__}")
    if not data:
        raise TaskError(f"{where} holds no rows")
    return [_check_row(row, f"{where}, row {n}") for n, row in enumerate(data, 1)]


def splits_of(data: Any, check: Optional[Callable[[Any, str], dict]] = None,
              whole_prompts_only: bool = False) -> dict[str, list[dict]]:
    """Train/validation/test rows from a mapping of splits (a datasets.DatasetDict, or a dict of
    lists or files), a missing validation or test split cut from train; or from one collection,
    cut 80/10/10 as a single data file is (cut_splits)."""
    if not isinstance(data, Mapping):
        return cut_splits(rows_of(data, "data", check), whole_prompts_only=whole_prompts_only)
    unknown = sorted(set(data) - set(SPLITS))
    if unknown or "train" not in data:
        raise TaskError(f"data splits must be train (required), validation and test; got "
                        f"{', '.join(map(str, data)) or 'none'}")
    given = {s: rows_of(data[s], f"data['{s}']", check) for s in SPLITS if s in data}
    missing = tuple(s for s in ("validation", "test") if s not in given)
    return {**given, **cut_splits(given["train"], missing, whole_prompts_only)} if missing else given


# --- built-in data ----------------------------------------------------------------------------
def packaged(name: str) -> Path:
    return Path(str(resources.files("policygrad.lm").joinpath("data", name)))


def arithmetic_rows(split: str, n: int, difficulty: str = "easy") -> list[dict]:
    """Addition/subtraction (and multiplication above easy) with a fixed seed per split."""
    seed = {"train": 11, "validation": 22, "test": 33}[split]
    rng = random.Random(f"{difficulty}-{seed}")
    top = {"easy": 9, "medium": 99, "hard": 999}[difficulty]
    ops = "+-" if difficulty == "easy" else "+-*"
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(0, top), rng.randint(0, top), rng.choice(ops)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        rows.append({"prompt": f"What is {a} {op} {b}? Answer with just the number.", "answer": answer})
    return rows
