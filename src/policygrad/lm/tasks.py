"""Text tasks: a prompt data set with train/validation/test splits plus a reward.

Data comes from JSONL, CSV or Parquet files with a `prompt` column (or chat `messages`); the other
columns (`answer`, `reference`, ...) are handed to the rewards. Splits are three files, or cut
deterministically 80/10/10 from one. Built-in tasks ship their data as package data.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import random
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Optional

import gymnasium as gym
import yaml
from gymnasium import spaces

from ..errors import PolicygradError
from .rewards import RewardError, RewardSet, build

SPLITS = ("train", "validation", "test")


class TaskError(PolicygradError, ValueError):
    """A task or data file that cannot be used; shown to the user as one line."""


@dataclass
class Task:
    name: str
    splits: dict[str, list[dict]]
    rewards: RewardSet
    defaults: dict[str, Any] = field(default_factory=dict)
    """Config values the task sets (generation length, learning rate, ...), below the user's own."""
    env: Optional[Callable[[], gym.Env]] = None
    """A text env's maker, for a multi-turn task (lm/episodes.py): a row is then an env seed, and
    rewards come from the env's steps."""

    def rows(self, split: str) -> list[dict]:
        return self.splits[split]

    # Python's ways to make one (policygrad.Task); train() also takes task=, data= and rewards=.
    @classmethod
    def from_data(cls, data: Any, rewards: Any, name: str = "custom", defaults: Optional[dict] = None) -> "Task":
        """Rows (a list of dicts, a datasets.Dataset or DatasetDict, a dict of splits, a file's path)
        scored by rewards (functions, names, specs; see rewards.build)."""
        return cls(name, splits_of(data), reward_set(rewards), dict(defaults or {}))

    @classmethod
    def load(cls, name: str) -> "Task":
        """A built-in task, a task YAML file or a text env module:Class, as the CLI's --task."""
        from ..config import field_names
        return load(name, set(field_names()))

    @classmethod
    def from_env(cls, env: Any) -> "Task":
        """A text Gymnasium env (an instance, a class or a factory): prompts are its seeded resets."""
        name = getattr(env, "__name__", type(env).__name__)
        try:
            made = env if isinstance(env, gym.Env) else env()
        except Exception as e:  # the user's code (or a function that is not an env factory at all)
            raise TaskError(f"task '{name}' is not a text env: calling it raised {e.__class__.__name__}: {e}") from None
        if not isinstance(made, gym.Env):
            raise TaskError(f"task '{name}' made a {type(made).__name__}, not a gymnasium.Env")
        # every episode of a batch needs its own env: copies of an instance, or the factory's new ones
        make = (lambda: copy.deepcopy(env)) if isinstance(env, gym.Env) else env
        from .text_envs import env_task  # it builds on this module
        return env_task(make, type(made).__name__, first=made)


# --- reading data -----------------------------------------------------------------------------
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
            import pyarrow.parquet as pq
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


# --- built-in tasks ---------------------------------------------------------------------------
def _packaged(name: str) -> Path:
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


BUILTIN_DESCRIPTIONS = {
    "positive-review": "write a short movie review; reward = VADER compound sentiment",
    "arithmetic": "answer generated +, -, x problems; reward = 1 if the last number is right",
    "translation": "translate English to French; reward = chrF against the reference",
}

BUILTIN_ENVS = {
    "guess-number": "multi-turn: find a number in 1..32 from 'higher'/'lower' answers; reward 1 when "
                    "guessed, minus 0.05 a turn",
    "dialogue": "multi-turn: a scripted user asks for something, then two follow-ups on the reply; "
                "reward per turn = VADER of the reply",
}
"""Built-in multi-turn tasks (text envs, lm/text_envs.py)."""


def builtin(name: str) -> Task:
    if name == "positive-review":
        # lr and kl_coef from benchmarks/lm.py: lr 1e-5 learnt too slowly in 40 steps, 4e-5 with
        # kl_coef 0.05 passed 5 nats of KL per completion by step 15
        return Task(name, cut_splits(read_rows(_packaged("positive_review.jsonl"))),
                    RewardSet([build("vader")]),
                    {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 32, "temperature": 1.0,
                     "kl_coef": 0.1})
    if name == "arithmetic":
        splits = {s: arithmetic_rows(s, n) for s, n in (("train", 2000), ("validation", 100), ("test", 200))}
        return Task(name, splits, RewardSet([build({"reward": "last-number", "format_bonus": 0.0})]),
                    {"max_new_tokens": 16, "temperature": 1.0})
    if name == "translation":
        return Task(name, cut_splits(read_rows(_packaged("translation_en_fr.jsonl"))),
                    RewardSet([build("chrf")]), {"max_new_tokens": 32})
    raise KeyError(name)


def from_yaml(path: Path, config_keys: set[str]) -> Task:
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise TaskError(f"task file '{path}' is not valid YAML") from None
    if not isinstance(spec, dict):
        raise TaskError(f"task file '{path}' must be a mapping with 'data' and 'rewards'")
    base = path.parent
    data, reward_specs, parent = spec.pop("data", None), spec.pop("rewards", None), spec.pop("extends", None)
    env, env_kwargs = spec.pop("env", None), spec.pop("env_kwargs", None)
    if env is not None:
        from .text_envs import from_yaml_env  # it builds on this module
        return from_yaml_env(path, env, env_kwargs, data, reward_specs, spec, config_keys)
    if env_kwargs is not None:
        raise TaskError(f"task file '{path}': env_kwargs are the arguments of a text env; add env: module:Class")
    if parent is not None:
        return _extended(path, parent, data, reward_specs, spec, config_keys)
    if data is None:
        raise TaskError(f"task file '{path}' has no 'data' (a file, or train/validation/test files)")
    if isinstance(data, str):
        splits = cut_splits(read_rows(base / data))
    elif isinstance(data, dict) and set(data) == set(SPLITS):
        splits = {s: read_rows(base / str(data[s])) for s in SPLITS}
    else:
        raise TaskError(f"task file '{path}': 'data' must be one file or the keys train, validation, test")
    if not reward_specs or not isinstance(reward_specs, list):
        raise TaskError(f"task file '{path}' needs 'rewards': a list of reward names or {{reward, weight}}")
    rewards = RewardSet([build(r, base) for r in reward_specs])
    unknown = sorted(set(spec) - config_keys)
    if unknown:
        raise TaskError(f"task file '{path}': unknown key '{unknown[0]}' (data, rewards, or any config key)")
    return Task(path.stem, splits, rewards, spec)


def _extended(path: Path, parent: Any, data: Any, reward_specs: Any, spec: dict, config_keys: set[str]) -> Task:
    """`extends: NAME`: a built-in task's prompts and defaults with this file's own rewards (a
    learned reward model on positive-review's prompts, say) and keys."""
    if parent not in BUILTIN_DESCRIPTIONS:
        raise TaskError(f"task file '{path}': extends '{parent}' is not a built-in task "
                        f"({', '.join(BUILTIN_DESCRIPTIONS)})")
    if data is not None:
        raise TaskError(f"task file '{path}': a task that extends '{parent}' takes its data; drop 'data'")
    if not reward_specs or not isinstance(reward_specs, list):
        raise TaskError(f"task file '{path}' needs 'rewards': a list of reward names or {{reward, weight}}")
    unknown = sorted(set(spec) - config_keys)
    if unknown:
        raise TaskError(f"task file '{path}': unknown key '{unknown[0]}' (extends, rewards, or any config key)")
    inherited = builtin(parent)
    return Task(path.stem, inherited.splits, RewardSet([build(r, path.parent) for r in reward_specs]),
                {**inherited.defaults, **spec})


# --- tasks and Gymnasium environments --------------------------------------------------------
def prompt_text(row: dict) -> str:
    """A row's prompt as the rewards see it: its `prompt`, or its chat's last message."""
    return row.get("prompt") or row["messages"][-1]["content"]


class TaskEnv(gym.Env):
    """A text task as a Gymnasium env: reset() gives a prompt, step(completion) its reward; each
    episode is one step. Seeded resets pick rows reproducibly."""
    metadata: dict = {}

    def __init__(self, task: Task, split: str = "train"):
        self.task, self.rows_ = task, task.rows(split)
        self.observation_space = spaces.Text(max_length=100_000, charset=string.printable)
        self.action_space = spaces.Text(max_length=100_000, charset=string.printable)
        self.row: dict = {}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.row = self.rows_[int(self.np_random.integers(len(self.rows_)))]
        return prompt_text(self.row), {"row": self.row}

    def step(self, action: str):
        extras = {k: [v] for k, v in self.row.items() if k not in ("prompt", "messages")}
        reward = float(self.task.rewards([prompt_text(self.row)], [action], extras)[0])
        return "", reward, True, False, {}


# --- tasks from Python objects (policygrad.train(data=..., rewards=..., task=...)) ---------------
REGISTERED: dict[str, Task] = {}
"""Tasks built in Python, by the name a run's config records (`<base>@<fingerprint>`)."""


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


def fingerprint(task: Task) -> str:
    """8 hex digits over a task's rows and its rewards' names and weights: a run's config names an
    in-memory task by it, so a resume with other data is a different run (its defaults are in
    the config already)."""
    content = json.dumps([task.splits, [(r.name, r.weight, r.identity) for r in task.rewards.rewards]],
                         sort_keys=True, default=repr)
    return hashlib.sha256(content.encode()).hexdigest()[:8]


def reward_set(rewards: Any) -> RewardSet:
    """Rewards given in Python: one spec or a list of them (functions, names, {reward, weight})."""
    weighted_pair = isinstance(rewards, tuple) and len(rewards) == 2 and isinstance(rewards[1], (int, float))
    specs = list(rewards) if isinstance(rewards, (list, tuple)) and not weighted_pair else [rewards]
    if not specs:
        raise RewardError("rewards is empty: give at least one reward (a function, a built-in name or a spec)")
    return RewardSet([build(spec) for spec in specs])


def from_python(task: Any = None, data: Any = None, rewards: Any = None, config_keys: set[str] = frozenset()) -> str:
    """The config name of the task given to the Python API: a task's name as it is; a Task object,
    a text env, or any task whose data or rewards are replaced, built and registered."""
    if task is None and (data is None or rewards is None):
        raise TaskError("a language-model run needs task= (a name, a Task or a text env), or data= and rewards=")
    if isinstance(task, (str, os.PathLike)):
        if data is None and rewards is None:
            return str(task)
        base = _rebuilt(str(task), config_keys) if "@" in str(task) else load(str(task), config_keys)
    elif isinstance(task, Task):
        base = task
    elif isinstance(task, gym.Env) or callable(task):
        base = Task.from_env(task)
    elif task is None:
        base = Task("custom", {}, RewardSet(), {})
    else:
        raise TaskError(f"task must be a name, a task YAML, a policygrad.Task or a text gymnasium.Env; "
                        f"got {type(task).__name__}")
    if base.env is not None and (data is not None or rewards is not None):
        raise TaskError(f"task '{base.name}' is a text env: its prompts come from its resets and its rewards "
                        "from its steps; drop data= and rewards=")
    return register(Task(base.name, splits_of(data) if data is not None else base.splits,
                         reward_set(rewards) if rewards is not None else base.rewards, dict(base.defaults),
                         env=base.env))


def _rebuilt(name: str, config_keys: set[str]) -> Task:
    """The base of a task a run built in Python (`<base>@<fingerprint>`), in a new process: the
    named task if it is one (its rows stay unless data is given again), else an empty one."""
    base = name.partition("@")[0]
    try:
        return load(base, config_keys)
    except TaskError:
        return Task(base, {}, RewardSet(), {})


def register(task: Task) -> str:
    """Register an in-memory task; the name a config's `task` key then gives it."""
    name = f"{task.name.partition('@')[0]}@{fingerprint(task)}"
    REGISTERED[name] = dataclasses.replace(task, name=name)
    return name


def load(name: str, config_keys: set[str]) -> Task:
    """A built-in task by name, a task YAML file, or a text Gymnasium env as module:Class."""
    if name in REGISTERED:
        return REGISTERED[name]
    if "@" in name and not name.endswith((".yaml", ".yml")):
        raise TaskError(f"task '{name}' was built in Python from in-memory data or rewards; pass the same "
                        "task, data and rewards to policygrad.train or policygrad.evaluate to use it again")
    if name in BUILTIN_DESCRIPTIONS:
        return builtin(name)
    if name in BUILTIN_ENVS:
        from . import text_envs  # it builds on this module
        return text_envs.builtin_task(name)
    if ":" in name and not name.endswith((".yaml", ".yml")):
        from .text_envs import from_env  # it builds on this module
        return from_env(name)
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskError(f"task file '{name}' not found")
        return from_yaml(path, config_keys)
    raise TaskError(f"unknown task '{name}'; built-in tasks: {', '.join({**BUILTIN_DESCRIPTIONS, **BUILTIN_ENVS})}, "
                    "a task .yaml file, or a text env as module:Class")


__all__ = ["Task", "TaskError", "RewardError", "load", "builtin", "read_rows", "cut_splits"]
