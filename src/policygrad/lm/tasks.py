"""Text tasks, and every way to name one: a task is prompt rows in train / validation / test splits
plus rewards (lm/data.py reads the rows), or a text Gymnasium env whose seeded resets are the
prompts and whose steps give the rewards (lm/episodes.py plays them).

A name resolves here, and only here (`load`): a built-in task (`BUILTINS`: data tasks below,
multi-turn envs in lm/text_envs.py), a task YAML file (data + rewards, `extends:` a built-in, or
`env:`), a text env as `module:Class`, or a task built in Python and registered under
`<base>@<fingerprint>`.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import os
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import gymnasium as gym
import yaml
from gymnasium import spaces

from ..config import field_names
from ..errors import RewardError, TaskError
from . import arena, reasoning_tasks, text_envs
from .data import SPLITS, arithmetic_rows, cut_splits, packaged, prompt_text, read_rows, rows_of, splits_of
from .episodes import reset
from .rewards import RewardSet, WeightedReward, build


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
    info: dict = field(default_factory=dict)
    """JSON: what a generated task's rows derive from (generators, options, split seeds), written
    beside each checkpoint as task.json; empty for rows read from files."""

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
        return load(name, set(field_names()))

    @classmethod
    def reasoning_gym(cls, generators: Any, answer_format: str = "tag", sizes: Optional[dict] = None,
                      seed: int = 0, partial_credit: bool = True) -> "Task":
        """reasoning-gym generators as a task: a name, a list of names, or {name: options} (a
        `weight` option weighs a composite); see lm/reasoning_tasks.py."""
        spec = {"generators": generators, "answer_format": answer_format, "seed": seed,
                "partial_credit": partial_credit,
                **({"sizes": sizes} if sizes is not None else {})}
        return reasoning_gym_task(reasoning_tasks.parse(spec, "reasoning_gym"))

    @classmethod
    def textarena(cls, game: str, opponent: Any = None, **game_kwargs: Any) -> "Task":
        """A TextArena game as a multi-turn task (lm/arena.py), game_kwargs its own arguments; a game
        for two needs the opponent: a function observation -> action, module:function, or
        model:NAME (a frozen language model)."""
        return textarena_task(game, {**game_kwargs, **({"opponent": opponent} if opponent is not None else {})})

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
        return env_task(make, type(made).__name__, first=made)


# --- built-in tasks ---------------------------------------------------------------------------
DATA_TASKS = {
    "positive-review": "write a short movie review; reward = VADER compound sentiment",
    "arithmetic": "answer generated +, -, x problems; reward = 1 if the last number is right",
    "translation": "translate English to French; reward = chrF against the reference",
}
"""The built-in tasks of prompt rows, by name (`builtin` makes them)."""
BUILTINS = {**DATA_TASKS, **{name: env.description for name, env in text_envs.ENVS.items()}}
"""Every built-in task's name and what it is (`policygrad tasks` lists them)."""


def builtin(name: str) -> Task:
    if name in text_envs.ENVS:
        return builtin_env_task(name)
    if name == "positive-review":
        # lr and kl_coef from benchmarks/lm.py: lr 1e-5 learnt too slowly in 40 steps, 4e-5 with
        # kl_coef 0.05 passed 5 nats of KL per completion by step 15
        return Task(name, cut_splits(read_rows(packaged("positive_review.jsonl"))),
                    RewardSet([build("vader")]),
                    {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 32, "temperature": 1.0,
                     "kl_coef": 0.1})
    if name == "arithmetic":
        splits = {s: arithmetic_rows(s, n) for s, n in (("train", 2000), ("validation", 100), ("test", 200))}
        return Task(name, splits, RewardSet([build({"reward": "last-number", "format_bonus": 0.0})]),
                    {"max_new_tokens": 16, "temperature": 1.0})
    if name == "translation":
        return Task(name, cut_splits(read_rows(packaged("translation_en_fr.jsonl"))),
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
    if "reasoning_gym" in spec:
        return from_yaml_reasoning_gym(path, spec.pop("reasoning_gym"), data, reward_specs, spec, config_keys)
    if env is not None:
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
    if parent not in DATA_TASKS:
        raise TaskError(f"task file '{path}': extends '{parent}' is not a built-in task "
                        f"({', '.join(DATA_TASKS)})")
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


# --- tasks from the ecosystem's libraries ------------------------------------------------------
def reasoning_gym_task(spec: reasoning_tasks.ReasoningGymSpec, name: Optional[str] = None,
                       defaults: Optional[dict] = None) -> Task:
    """Rows from reasoning-gym's generators, scored by their own score_answer."""
    described = spec.describe()
    reward = WeightedReward(spec.name, reasoning_tasks.Score(spec), 1.0, json.dumps(described, sort_keys=True))
    # max_new_tokens: room for a few words of working before a short tagged answer
    return Task(name or spec.name, reasoning_tasks.rows(spec), RewardSet([reward]),
                {"max_new_tokens": 48, "temperature": 1.0, **(defaults or {})}, info=described)


def from_yaml_reasoning_gym(path: Path, generators: Any, data: Any, reward_specs: Any, spec: dict,
                            config_keys: set[str]) -> Task:
    """`reasoning_gym:` (generators and their options) with config keys."""
    if data is not None or reward_specs is not None:
        raise TaskError(f"task file '{path}': a reasoning-gym task's rows and reward come from its generators; "
                        "drop 'data' and 'rewards'")
    unknown = sorted(set(spec) - config_keys)
    if unknown:
        raise TaskError(f"task file '{path}': unknown key '{unknown[0]}' (reasoning_gym, or any config key)")
    return reasoning_gym_task(reasoning_tasks.parse(generators, f"task file '{path}'"), path.stem, spec)


def textarena_task(game: str, env_kwargs: Optional[dict] = None, overrides: Optional[dict] = None,
                   name: Optional[str] = None) -> Task:
    """A TextArena game (lm/arena.py) as a multi-turn task; env_kwargs: the game's own arguments and
    `opponent` (module:function) for a game of two."""
    opponent, kwargs = arena.task_kwargs(env_kwargs or {}, f"textarena:{game}")
    first = arena.ArenaEnv(game, opponent, kwargs)  # a missing package, game or corpus: one line, now
    task = env_task(lambda: arena.ArenaEnv(game, opponent, kwargs), f"{TEXTARENA}{game}",
                    defaults={**arena.RUN_DEFAULTS, **(overrides or {})}, first=first)
    return dataclasses.replace(task, name=name or task.name)


# --- tasks and Gymnasium environments --------------------------------------------------------
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


# --- text envs as tasks (module:Class, a task YAML's env:, the built-in ones) ------------------------
ENV_SEEDS = {"train": (0, 2000), "validation": (1_000_000, 50), "test": (2_000_000, 100)}


def env_class(spec: str) -> Callable[..., gym.Env]:
    """A user's text env class from `module:Class` (the module found beside the user, as `python -m`
    finds it)."""
    module_name, _, class_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise TaskError(f"text env '{spec}' not found ({e.__class__.__name__}: {e})") from None


def from_env(spec: str, env_kwargs: Optional[dict] = None, defaults: Optional[dict] = None) -> Task:
    """A task from a user's text env `module:Class`, made with env_kwargs (see env_task)."""
    cls, kwargs = env_class(spec), dict(env_kwargs or {})

    def make() -> gym.Env:
        try:
            return cls(**kwargs)
        except Exception as e:  # the user's code
            raise TaskError(f"text env '{spec}' could not be made: {e.__class__.__name__}: {e}") from None
    return env_task(make, spec, defaults=defaults)


def env_task(make: Callable[[], gym.Env], spec: str, defaults: Optional[dict] = None,
             first: Optional[gym.Env] = None) -> Task:
    """A multi-turn task from a text env's maker: each split's rows are env seeds from its own
    range, with the first message of that seed's reset (shown in samples); episodes are played by
    lm/episodes.py, each in an env of a pool made with make and reset per episode."""
    env = first if first is not None else make()

    def row_at(seed: int) -> dict:
        messages = reset(env, seed, spec)
        return {"prompt": messages[-1]["content"], "env_seed": seed} if len(messages) == 1 \
            else {"messages": messages, "env_seed": seed}

    splits = {s: [row_at(start + i) for i in range(n)] for s, (start, n) in ENV_SEEDS.items()}
    return Task(spec, splits, RewardSet(), dict(defaults or {}), env=make)


def from_yaml_env(path: Path, env: Any, env_kwargs: Any, data: Any, reward_specs: Any, spec: dict,
              config_keys: set[str]) -> Task:
    """`env: module:Class` (or a built-in multi-turn task's name) with `env_kwargs` and config keys."""
    if data is not None or reward_specs is not None:
        raise TaskError(f"task file '{path}': a text env's prompts come from its resets and its rewards from "
                        "its steps; drop 'data' and 'rewards' (give the env its own in env_kwargs)")
    if env_kwargs is not None and not isinstance(env_kwargs, dict):
        raise TaskError(f"task file '{path}': env_kwargs must be a mapping of the env's arguments")
    unknown = sorted(set(spec) - config_keys)
    if unknown:
        raise TaskError(f"task file '{path}': unknown key '{unknown[0]}' (env, env_kwargs, or any config key)")
    if env in text_envs.ENVS:
        return builtin_env_task(str(env), env_kwargs or {}, spec, name=path.stem)
    if isinstance(env, str) and env.startswith(TEXTARENA):
        return textarena_task(env[len(TEXTARENA):], env_kwargs, spec, name=path.stem)
    if not isinstance(env, str) or ":" not in env:
        raise TaskError(f"task file '{path}': env must be module:Class (a text gymnasium.Env), textarena:GAME or "
                        f"one of {', '.join(text_envs.ENVS)}; got {env!r}")
    task = from_env(env, env_kwargs, spec)
    return dataclasses.replace(task, name=path.stem)




def builtin_env_task(kind: str, env_kwargs: Optional[dict] = None, overrides: Optional[dict] = None,
                 name: Optional[str] = None) -> Task:
    """A built-in multi-turn task, its env made with env_kwargs (a task YAML's `env: dialogue` with
    `env_kwargs: {reward: ...}`), its defaults under the YAML's own keys."""
    cls, kwargs = text_envs.ENVS[kind], dict(env_kwargs or {})
    try:
        first = cls(**kwargs)  # a bad argument fails here, in one line, before any run starts
    except (TypeError, ValueError) as e:  # an unknown name; a cost that is not a number
        raise TaskError(f"{kind}: bad env_kwargs ({e})") from None
    task = env_task(lambda: cls(**kwargs), kind, defaults={**cls.run_defaults, **(overrides or {})}, first=first)
    return task if name is None else Task(name, task.splits, task.rewards, task.defaults, env=task.env)


TEXTARENA = "textarena:"
"""A task name's prefix for TextArena games: textarena:GuessTheNumber-v0."""
REASONING_GYM = "reasoning-gym:"
"""A task name's prefix for reasoning-gym generators: reasoning-gym:chain_sum, reasoning-gym:a+b."""


# --- tasks from Python objects (policygrad.train(data=..., rewards=..., task=...)) ---------------
REGISTERED: dict[str, Task] = {}
"""Tasks built in Python, by the name a run's config records (`<base>@<fingerprint>`)."""


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
                         env=base.env, info=base.info if data is None else {}))


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
    if name in BUILTINS:
        return builtin(name)
    if name.startswith(TEXTARENA):
        return textarena_task(name[len(TEXTARENA):])
    if name.startswith(REASONING_GYM):
        return reasoning_gym_task(reasoning_tasks.parse(name[len(REASONING_GYM):], f"task '{name}'"))
    if ":" in name and not name.endswith((".yaml", ".yml")):
        return from_env(name)
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise TaskError(f"task file '{name}' not found")
        return from_yaml(path, config_keys)
    raise TaskError(f"unknown task '{name}'; built-in tasks: {', '.join(BUILTINS)}, "
                    "reasoning-gym:GENERATOR, textarena:GAME, a task .yaml file, or a text env as module:Class")


__all__ = ["Task", "TaskError", "RewardError", "load", "builtin", "read_rows", "cut_splits", "splits_of",
           "rows_of", "prompt_text", "SPLITS"]
