"""Rewards: each maps (prompts, completions, the rows' other columns) to one float per completion.

Built-in names: vader, exact-match, last-number, contains, length, chrf, bleu; and
`python:path/to/file.py:function`, called with keyword lists `prompts`, `completions` and one list
per extra column. A task combines one or more rewards with weights.
"""
from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np


class RewardError(ValueError):
    """A reward that cannot be built or that misbehaves; shown to the user as one line."""


RewardFn = Callable[[list[str], list[str], dict[str, list]], list[float]]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _vader(params: dict) -> RewardFn:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda prompts, completions, extras: [analyzer.polarity_scores(c)["compound"] for c in completions]


def _column(extras: dict, name: str, reward: str) -> list:
    if name not in extras:
        raise RewardError(f"reward '{reward}' needs a column '{name}' in the data; columns: "
                          f"{', '.join(sorted(extras)) or 'none besides prompt'}")
    return extras[name]


def _normalise(text: str) -> str:
    return " ".join(str(text).strip().lower().split()).rstrip(".!")


def _exact_match(params: dict) -> RewardFn:
    def fn(prompts, completions, extras):
        answers = _column(extras, "answer", "exact-match")
        return [float(_normalise(c) == _normalise(a)) for c, a in zip(completions, answers)]
    return fn


def last_number(text: str) -> Optional[float]:
    found = NUMBER.findall(text.replace(",", ""))
    return float(found[-1]) if found else None


def _last_number(params: dict) -> RewardFn:
    """1 when the last number in the completion equals `answer`; `format_bonus` for any number."""
    bonus = float(params.get("format_bonus", 0.0))

    def fn(prompts, completions, extras):
        answers = _column(extras, "answer", "last-number")
        out = []
        for c, a in zip(completions, answers):
            got = last_number(c)
            out.append(1.0 if got is not None and abs(got - float(a)) < 1e-9 else (bonus if got is not None else 0.0))
        return out
    return fn


def _contains(params: dict) -> RewardFn:
    words = [w.lower() for w in params.get("words", [])]
    if not words:
        raise RewardError("reward 'contains' needs a non-empty list: {reward: contains, words: [...]}")
    return lambda prompts, completions, extras: [float(any(w in c.lower() for w in words)) for c in completions]


def _length(params: dict) -> RewardFn:
    """1 within `tolerance` words of `target` words, falling linearly to 0 at 0 or 2x target."""
    target, tolerance = float(params.get("target", 20)), float(params.get("tolerance", 2))

    def score(text: str) -> float:
        off = max(0.0, abs(len(text.split()) - target) - tolerance)
        return max(0.0, 1.0 - off / target)
    return lambda prompts, completions, extras: [score(c) for c in completions]


def _sacrebleu(metric: str) -> Callable[[dict], RewardFn]:
    def build(params: dict) -> RewardFn:
        import sacrebleu

        scorer = sacrebleu.sentence_chrf if metric == "chrf" else sacrebleu.sentence_bleu

        def fn(prompts, completions, extras):
            refs = _column(extras, "reference", metric)
            return [scorer(c, [str(r)]).score / 100.0 for c, r in zip(completions, refs)]
        return fn
    return build


BUILTIN: dict[str, Callable[[dict], RewardFn]] = {
    "vader": _vader, "exact-match": _exact_match, "last-number": _last_number, "contains": _contains,
    "length": _length, "chrf": _sacrebleu("chrf"), "bleu": _sacrebleu("bleu"),
}


def _python(spec: str, base: Path) -> RewardFn:
    _, _, rest = spec.partition(":")
    path_text, sep, name = rest.rpartition(":")
    if not sep or not path_text or not name:
        raise RewardError(f"reward '{spec}' must read python:path/to/file.py:function")
    path = (base / path_text).resolve() if not Path(path_text).is_absolute() else Path(path_text)
    if not path.is_file():
        raise RewardError(f"reward file '{path_text}' not found (looked at {path})")
    module_spec = importlib.util.spec_from_file_location(f"policygrad_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # the user's file: any error is theirs to fix
        raise RewardError(f"reward file '{path_text}' failed to import: {e.__class__.__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RewardError(f"reward function '{name}' not found in {path_text}")
    return lambda prompts, completions, extras: fn(prompts=prompts, completions=completions, **extras)


@dataclass
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def build(spec: Any, base: Path = Path(".")) -> WeightedReward:
    """One reward from a task's `rewards:` entry: a bare name or {reward: name, weight: w, ...}."""
    params: dict = {}
    if isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("reward", None)
        weight = params.pop("weight", 1.0)
    else:
        name, weight = spec, 1.0
    if not isinstance(name, str):
        raise RewardError(f"reward entry {spec!r} needs a name: a string or {{reward: name, weight: w}}")
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise RewardError(f"reward '{name}' has a non-numeric weight {weight!r}")
    if name.startswith("python:"):
        return WeightedReward(name, _python(name, base), float(weight))
    if name.startswith(("http://", "https://")):
        raise RewardError(f"remote reward '{name}': remote rewards are not supported yet")
    if name not in BUILTIN:
        raise RewardError(f"unknown reward '{name}'; built-in rewards: {', '.join(BUILTIN)}, "
                          "or python:path/to/file.py:function")
    return WeightedReward(name, BUILTIN[name](params), float(weight))


@dataclass
class RewardSet:
    rewards: list[WeightedReward] = field(default_factory=list)

    def __call__(self, prompts: list[str], completions: list[str], extras: dict[str, list]) -> np.ndarray:
        """(B,) weighted sum of every reward; RewardError names a misbehaving one."""
        total = np.zeros(len(completions))
        for r in self.rewards:
            try:
                values = r.fn(list(prompts), list(completions), extras)
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward '{r.name}' raised {e.__class__.__name__}: {e} "
                                  f"(first completion: {completions[0][:60]!r})") from None
            values = list(values) if not isinstance(values, np.ndarray) else values.tolist()
            if len(values) != len(completions):
                raise RewardError(f"reward '{r.name}' returned {len(values)} values for "
                                  f"{len(completions)} completions")
            for value, completion in zip(values, completions):
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise RewardError(f"reward '{r.name}' returned {value!r} for completion {completion[:60]!r}")
            total += r.weight * np.asarray(values, dtype=np.float64)
        return total

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]
