"""TextArena games as multi-turn text envs: `textarena:GuessTheNumber-v0` is played through the same
episode path as our own text envs (lm/episodes.py), the model as player 0.

- Observations: the game's raw messages (no observation wrapper: TextArena's wrappers repeat the
  whole history every turn, which the conversation already holds); the first ones are the first
  user message, each later batch of them the environment's answer. The game's own action wrappers
  (e.g. ActionFormattingWrapper, which brackets a bare "5" as "[5]") stay.
- Rewards: TextArena scores a game when it ends (`close()`), so every turn but the last earns 0 and
  the last the game's reward for player 0; `success` is a reward of 1 or more (a win).
- Invalid moves: the game's own handling (a warning and a retry, then the end of the game) stays;
  each turn reports `invalid_move` (logged as episode/invalid_move_rate).
- Two-player games: the other player is a fixed opponent, a Python function
  `opponent(observation: str) -> str` named as `module:function`, or a frozen language model
  named as `model:NAME` (`model:smollm2-135m`, the run's own --model, is the reference: the
  policy's frozen starting point), which plays greedily.
- Randomness: TextArena games draw from Python's global `random` (seeded at reset); each env here
  keeps its own copy of that state and swaps it in around every call, so envs of one batch do not
  share a stream and nothing else's `random` is disturbed.
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import io
import os
import random
import re
import string
import sys
from typing import Any, Callable, Optional

import gymnasium as gym
import torch
from gymnasium import spaces

from ..errors import TaskError
from . import models

EXTRA = "pip install -e '.[tasks]' (make install does)"
PLAYER = 0
"""The model's seat."""
RUN_DEFAULTS = {"max_turns": 10, "max_new_tokens": 12, "max_episode_tokens": 448, "prompts_per_step": 4,
                "samples_per_prompt": 4, "kl_in": "loss", "kl_estimator": "k2", "kl_coef": 0.05}
"""Where a TextArena task's run settings start (the user's keys above them): as guess-number's,
with room for a game's longer rules and its ten turns."""


def _library():
    try:
        import textarena  # an optional extra: only these tasks need it
    except ImportError:
        raise TaskError(f"TextArena tasks need the textarena package: {EXTRA}") from None
    return textarena


OPPONENT_TOKENS = 32
"""A model opponent's longest move, in tokens (TextArena moves are short: '[rock]', '[e2e4]')."""


class ModelOpponent:
    """The other player as a frozen language model (`opponent: model:NAME`, NAME a model folder or
    alias): its greedy reply, at most OPPONENT_TOKENS tokens, to the game's messages as one user
    message under its chat template. Greedy, so a game replays the same against the same moves
    and a resumed run needs no opponent state; loaded once per process, shared by every env, on
    the CPU (a move is a few short generations; the accelerator stays the policy's)."""
    loaded: dict[str, tuple] = {}

    def __init__(self, name: str):
        if name not in ModelOpponent.loaded:
            try:
                model, tokenizer = models.load(name)
            except Exception as e:  # ModelError's line, or the library's own
                raise TaskError(f"opponent 'model:{name}': {e}") from None
            ModelOpponent.loaded[name] = (model.eval().requires_grad_(False), tokenizer)
        self.model, self.tokenizer = ModelOpponent.loaded[name]

    def __call__(self, observation: str) -> str:
        tokenizer = self.tokenizer
        text = (tokenizer.apply_chat_template([{"role": "user", "content": observation}], tokenize=False,
                                              add_generation_prompt=True)
                if tokenizer.chat_template else observation + "\n")
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=OPPONENT_TOKENS, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def opponent_fn(spec: Any) -> Optional[Callable[[str], str]]:
    """The other player of a two-player game: `module:function`, found beside the user, or
    `model:NAME`, a frozen language model (ModelOpponent)."""
    if spec is None or callable(spec):  # Python's Task.textarena(..., opponent=fn) passes the function
        return spec
    if spec == "reference":
        raise TaskError("opponent 'reference': name the frozen model as model:NAME, e.g. model:smollm2-135m "
                        "(the run's --model is the reference: the policy's frozen starting point)")
    if str(spec).startswith("model:"):
        return ModelOpponent(str(spec)[len("model:"):])
    module_name, sep, name = str(spec).partition(":")
    if not sep:
        raise TaskError(f"opponent '{spec}' must be module:function, a function (observation: str) -> str, or "
                        "model:NAME, a frozen language model")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as e:
        raise TaskError(f"opponent '{spec}' not found ({e.__class__.__name__}: {e})") from None
    if not callable(fn):
        raise TaskError(f"opponent '{spec}' is not a function")
    return fn


def _made(game: str, kwargs: dict):
    """The raw game with its own action wrappers (see the module docstring)."""
    ta = _library()
    from textarena.envs.registration import ENV_REGISTRY  # the optional extra, found by _library() above

    if game not in ENV_REGISTRY:
        close = difflib.get_close_matches(game, [g for g in ENV_REGISTRY if not g.endswith("-raw")], n=3)
        raise TaskError(f"TextArena has no game '{game}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    spec = ENV_REGISTRY[game]
    raw = f"{game}-raw" if f"{game}-raw" in ENV_REGISTRY else game
    try:
        with quiet_nltk_downloads():
            env = ta.make(raw, **kwargs)
    except LookupError as e:
        raise TaskError(missing_data(game, e)) from None
    except (TypeError, ValueError, AssertionError) as e:
        raise TaskError(f"textarena:{game}: bad env_kwargs {kwargs} ({e.__class__.__name__}: {e})") from None
    while isinstance(env, ta.Wrapper):  # a game registered without a -raw version: drop its wrappers
        env = env.env
    for wrapper in spec.default_wrappers or []:
        if issubclass(wrapper, ta.ActionWrapper):
            env = wrapper(env)
    return env


@contextlib.contextmanager
def quiet_nltk_downloads():
    """A game that needs NLTK data downloads it as its module is imported (nltk.download), which,
    without a network, prints its failure over many lines to the stderr nltk saw when it was first
    imported; the LookupError that follows is told in one line (missing_data). Downloads still run
    where there is a network, their messages kept from the user's terminal."""
    import nltk  # textarena's own dependency, loaded only for its games

    download = nltk.download
    nltk.download = functools.partial(download, print_error_to=io.StringIO())
    try:
        yield
    finally:
        nltk.download = download


def missing_data(game: str, error: BaseException) -> str:
    """One line naming the NLTK data (or other resource) a game needs and this machine lacks."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(error)).split())
    found = re.search(r"nltk\.download\('([^']+)'\)", text) or re.search(r"Resource (\w+) not found", text)
    resource = found.group(1) if found else None
    if "nltk" in text.lower() or "Resource" in text:
        fix = f"python -m nltk.downloader {resource}" if resource else "python -m nltk.downloader <its data>"
        return (f"textarena:{game} needs NLTK data{' ' + repr(resource) if resource else ''}, which this machine "
                f"lacks and could not download; install it with `{fix}`")
    return f"textarena:{game} needs data this machine lacks ({text[:160]})"


class ArenaEnv(gym.Env):
    """A TextArena game as a Gymnasium text env (reset -> first message, step(reply) -> answer)."""
    metadata: dict = {}

    def __init__(self, game: str, opponent: Any = None, env_kwargs: Optional[dict] = None):
        self.game, self.kwargs = game, dict(env_kwargs or {})
        self.env = _made(game, self.kwargs)
        self.opponent = opponent_fn(opponent)
        self.observation_space = spaces.Text(max_length=100_000, charset=string.printable)
        self.action_space = spaces.Text(max_length=100_000, charset=string.printable)
        self.players = 1
        self.rng_state = random.getstate()

    def _call(self, fn: Callable, *args, **kwargs) -> Any:
        """fn with this env's own global-random state swapped in (see the module docstring)."""
        outer = random.getstate()
        random.setstate(self.rng_state)
        try:
            return fn(*args, **kwargs)
        finally:
            self.rng_state = random.getstate()
            random.setstate(outer)

    def _reset_game(self, seed: Optional[int]) -> None:
        """reset with the game's own player count: one, else two (then an opponent is needed)."""
        try:
            self._call(self.env.reset, num_players=self.players, seed=seed)
        except AssertionError:
            if self.players != 1:
                raise
            self.players = 2
            if self.opponent is None:
                raise TaskError(f"textarena:{self.game} is a game for two: give its other player as opponent: "
                                "module:function (a function observation -> action) or model:NAME (a frozen language "
                                "model)") from None
            self._call(self.env.reset, num_players=self.players, seed=seed)
        except LookupError as e:
            raise TaskError(missing_data(self.game, e)) from None

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self._reset_game(seed)
        done, _ = self._opponents_turns()
        if done:
            raise TaskError(f"textarena:{self.game} ended before player 0's first move")
        return self._observation(), {}

    def _observation(self) -> str:
        """The messages player 0 has not seen yet, as text (its own moves' echoes left out)."""
        _, messages = self._call(self.env.get_observation)
        lines = []
        for sender, message, kind in messages or []:
            if sender == PLAYER and getattr(kind, "name", "") == "PLAYER_ACTION":
                continue
            lines.append(message if sender < 0 else f"[Player {sender}] {message}")
        return "\n".join(line.strip() for line in lines if str(line).strip())

    def _opponents_turns(self) -> tuple[bool, dict]:
        """Let the opponent move until it is player 0's turn or the game ends."""
        done, info = False, {}
        while not done and self.env.state.current_player_id != PLAYER:
            _, observation = self._call(self.env.get_observation)
            text = "\n".join(str(m[1]) for m in observation or [])
            try:
                action = str(self.opponent(text))
            except Exception as e:  # the user's opponent
                raise TaskError(f"textarena:{self.game}: the opponent raised {e.__class__.__name__}: {e}") from None
            done, info = self._call(self.env.step, action)
        return done, info

    def step(self, action: str):
        state = self.env.state
        done, info = self._call(self.env.step, action)
        # the state clears made_invalid_move inside step(); its error count stays up until a valid move
        invalid = getattr(state, "error_count", 0) > 0 or bool(done and state.game_info.get(PLAYER, {}).get("invalid_move"))
        if not done:
            done, info = self._opponents_turns()
        if done:
            rewards, _ = self._call(self.env.close)
            reward = float((rewards or {}).get(PLAYER, 0.0))
            # what the game says at its end: a closing answer the model is not trained on
            return self._observation(), reward, True, False, {"success": reward >= 1.0, "invalid_move": invalid}
        return self._observation(), 0.0, False, False, {"invalid_move": invalid}


def task_kwargs(spec: dict, where: str) -> tuple[Optional[str], dict]:
    """(opponent, the game's own keyword arguments) from a task YAML's env_kwargs."""
    kwargs = dict(spec or {})
    opponent = kwargs.pop("opponent", None)
    if opponent is not None and not isinstance(opponent, str) and not callable(opponent):
        raise TaskError(f"{where}: opponent must be module:function, model:NAME or (from Python) a function; "
                        f"got {opponent!r}")
    return opponent, kwargs
