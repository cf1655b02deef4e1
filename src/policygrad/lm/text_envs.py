"""Text Gymnasium envs as tasks (`module:Class`, a task YAML's `env:`, Python objects), and the
built-in multi-turn tasks, deterministic by seed:

- `guess-number`: the env holds a number in 1..n and answers "Higher." or "Lower."; reward 1 when
  guessed, minus turn_cost every turn (a reply without a number is a wasted turn).
- `dialogue`: a scripted user asks for something, then asks two follow-ups built from the model's
  own words; every reply is scored by a reward spec (VADER positivity by default).
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import re
import string
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import gymnasium as gym
from gymnasium import spaces

from .episodes import reset
from .rewards import RewardSet, build
from .tasks import BUILTIN_ENVS, Task, TaskError


def _text_space() -> spaces.Text:
    return spaces.Text(max_length=100_000, charset=string.printable)


class GuessNumber(gym.Env):
    """Find the hidden number from "Higher."/"Lower." answers."""
    metadata: dict = {}

    def __init__(self, n: int = 32, turn_cost: float = 0.05, invalid_cost: float = 0.0):
        """invalid_cost: what a reply without a number costs on top of turn_cost (a format reward,
        dense where success is rare; 0 by default: such a reply is only a wasted turn)."""
        if not isinstance(n, int) or n < 2:
            raise TaskError(f"guess-number: n must be a whole number >= 2; got {n!r}")
        self.n, self.turn_cost, self.invalid_cost = n, float(turn_cost), float(invalid_cost)
        self.observation_space, self.action_space = _text_space(), _text_space()
        self.target = 1

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.target = int(self.np_random.integers(1, self.n + 1))
        return (f"I am thinking of a whole number from 1 to {self.n}. Guess it: reply with one number, and I "
                "will tell you if mine is higher or lower."), {}

    def step(self, action: str):
        found = re.search(r"-?\d+", action)
        if found is None:
            # short on purpose: the rules are in the first message, and every token of the env's
            # answers is carried through every forward pass of the episode's training step
            return "Not a number.", -self.turn_cost - self.invalid_cost, False, False, {"success": False}
        guess = int(found.group())
        if guess == self.target:
            return "Correct!", 1.0 - self.turn_cost, True, False, {"success": True}
        answer = "Higher." if self.target > guess else "Lower."
        return answer, -self.turn_cost, False, False, {"success": False}


TOPICS = ["the ocean", "a summer garden", "your favourite city", "a good breakfast", "learning to cook",
          "a rainy afternoon", "an old bookshop", "a mountain walk", "a new puppy", "a birthday party",
          "a long train ride", "the night sky", "a small village", "a friendly neighbour", "a jazz concert",
          "a winter morning", "a picnic by the lake", "your first bicycle", "a quiet library", "a market square"]
OPENERS = ["Tell me about {topic}.", "What do you think of {topic}?", "Describe {topic} for me.",
           "Write a few sentences about {topic}."]
FOLLOW_UPS = ["You mentioned '{word}'. Can you say more about it?", "Why '{word}'? Tell me more.",
              "What comes to mind with '{word}'?"]


class Dialogue(gym.Env):
    """A scripted user: a request about a topic, then follow-ups on a word of the model's reply."""
    metadata: dict = {}

    def __init__(self, reward: Any = "vader", turns: int = 3):
        if not isinstance(turns, int) or turns < 1:
            raise TaskError(f"dialogue: turns must be a whole number >= 1; got {turns!r}")
        self.rewards = RewardSet([build(reward)])
        self.turns = turns
        self.observation_space, self.action_space = _text_space(), _text_space()
        self.asked, self.turn = "", 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        topic = TOPICS[int(self.np_random.integers(len(TOPICS)))]
        self.asked = OPENERS[int(self.np_random.integers(len(OPENERS)))].format(topic=topic)
        self.turn = 0
        return self.asked, {}

    def step(self, action: str):
        reward = float(self.rewards([self.asked], [action], {})[0])
        self.turn += 1
        if self.turn >= self.turns:
            return "", reward, True, False, {}
        words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}", action)})
        if words:  # a word of the reply, picked by the env's seeded stream: the next question depends on it
            word = words[int(self.np_random.integers(len(words)))]
            self.asked = FOLLOW_UPS[int(self.np_random.integers(len(FOLLOW_UPS)))].format(word=word)
        else:
            self.asked = "I did not follow. Can you say that again in other words?"
        return self.asked, reward, False, False, {}


# --- text envs as tasks -----------------------------------------------------------------------
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
    if env in BUILTIN_ENVS:
        return builtin_task(str(env), env_kwargs or {}, spec, name=path.stem)
    if not isinstance(env, str) or ":" not in env:
        raise TaskError(f"task file '{path}': env must be module:Class (a text gymnasium.Env) or one of "
                        f"{', '.join(BUILTIN_ENVS)}; got {env!r}")
    task = from_env(env, env_kwargs, spec)
    return dataclasses.replace(task, name=path.stem)



# --- built-in multi-turn tasks ----------------------------------------------------------------
ENV_CLASSES = {"guess-number": GuessNumber, "dialogue": Dialogue}
# Run settings each task starts from (below the user's own).
ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    # kl_in=loss: most steps have no success, so every episode's return is the same but for its KL
    # penalty; in the reward, whitening blew that noise up to a full-size step (KL 5.2 nats in 26
    # steps without learning, README); as a loss term it only pulls towards the reference.
    "guess-number": {"max_turns": 6, "max_new_tokens": 8, "max_episode_tokens": 256, "prompts_per_step": 4,
                     "samples_per_prompt": 4, "kl_in": "loss", "kl_estimator": "k2", "kl_coef": 0.05},
    # An episode has three replies' tokens, so its KL grows ~3x as fast as a single reply's: at
    # positive-review's kl_coef 0.1 (in the reward) it passed 6 nats by step 9. Per-turn rewards
    # make the return-to-go (`discounted`) the credit of a reply, and the KL a per-token loss
    # (k2: its gradient is the per-token KL's, without the whole episode's KL as noise in every
    # reply's score); README, "Multi-turn episodes", has the runs behind each choice.
    "dialogue": {"max_turns": 3, "max_new_tokens": 32, "max_episode_tokens": 512, "prompts_per_step": 4,
                 "samples_per_prompt": 4, "turn_advantage": "discounted", "kl_in": "loss", "kl_estimator": "k2",
                 "kl_coef": 0.4},
}


def builtin_task(kind: str, env_kwargs: Optional[dict] = None, overrides: Optional[dict] = None,
                 name: Optional[str] = None) -> Task:
    """A built-in multi-turn task, its env made with env_kwargs (a task YAML's `env: dialogue` with
    `env_kwargs: {reward: ...}`), its defaults under the YAML's own keys."""
    assert kind in BUILTIN_ENVS
    cls, kwargs = ENV_CLASSES[kind], dict(env_kwargs or {})
    try:
        first = cls(**kwargs)  # a bad argument fails here, in one line, before any run starts
    except (TypeError, ValueError) as e:  # an unknown name; a cost that is not a number
        raise TaskError(f"{kind}: bad env_kwargs ({e})") from None
    task = env_task(lambda: cls(**kwargs), kind, defaults={**ENV_DEFAULTS[kind], **(overrides or {})}, first=first)
    return task if name is None else Task(name, task.splits, task.rewards, task.defaults, env=task.env)
