"""Rewards: each maps (prompts, completions, the rows' other columns) to one float per completion.

Built-in names: vader, exact-match, last-number, contains, length, chrf, bleu, math (math-verify);
`python:path/to/file.py:function`, called with keyword lists `prompts`, `completions` and one list
per extra column; and `http://host:port/path` (or https), a reward server that answers a JSON POST
(see `RemoteReward`; `reward_server.py` serves any RewardSet that way); and `rm:PATH[#LABEL]`, a
learned reward model (reward_model.py). A task combines one or more rewards with weights.
"""
from __future__ import annotations

import http.client
import importlib.util
import json
import logging
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from ..errors import RewardError
from ..identity import callable_identity
from . import timed
from .reward_model import RewardModel


RewardFn = Callable[[list[str], list[str], dict[str, list]], list[float]]
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _vader(params: dict) -> RewardFn:
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer  # loaded by the one reward that uses it

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
        import sacrebleu  # loaded by the one reward that uses it

        scorer = sacrebleu.sentence_chrf if metric == "chrf" else sacrebleu.sentence_bleu

        def fn(prompts, completions, extras):
            refs = _column(extras, "reference", metric)
            return [scorer(c, [str(r)]).score / 100.0 for c, r in zip(completions, refs)]
        return fn
    return build


def _math(params: dict) -> RewardFn:
    """1 when math-verify finds the completion's final answer (a \\boxed{} one first, else its last
    expression, LaTeX or plain) equal to the row's `answer` (LaTeX or plain: fractions, sets,
    intervals, ... compared as mathematics); 0 otherwise."""
    if params:
        raise RewardError(f"reward 'math' takes only a weight, not {', '.join(sorted(params))}")
    try:
        from math_verify import parse, verify  # an optional extra: only this reward needs it
    except ImportError:
        raise RewardError("reward 'math' needs the math-verify package: pip install -e '.[tasks]' "
                          "(make install does)") from None
    # math-verify's own timeouts are SIGALRM, which only the main thread may set; the reward runs in
    # a thread under reward_timeout (_in_thread), which bounds it instead; hence its warning, muted
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    def gold_of(answer: Any) -> list:
        text = str(answer).strip()
        return parse(text, parsing_timeout=None) or parse(f"${text}$", parsing_timeout=None)

    def fn(prompts, completions, extras):
        answers = _column(extras, "answer", "math")
        return [float(verify(gold_of(a), parse(c, parsing_timeout=None), timeout_seconds=None))
                for c, a in zip(completions, answers)]
    return fn


BUILTIN: dict[str, Callable[[dict], RewardFn]] = {
    "vader": _vader, "exact-match": _exact_match, "last-number": _last_number, "contains": _contains,
    "length": _length, "chrf": _sacrebleu("chrf"), "bleu": _sacrebleu("bleu"), "math": _math,
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


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays from a data column, which json cannot encode by itself."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"a {type(value).__name__} cannot be sent as JSON")


def _http_failure(e: urllib.error.HTTPError) -> str:
    """'HTTP 503 Service Unavailable: <the server's error>', the body cut to one short line."""
    try:
        body = e.read().decode("utf-8", "replace").strip()
    except (OSError, http.client.HTTPException):  # the status alone still says what went wrong
        body = ""
    try:
        body = json.loads(body).get("error", body)
    except (ValueError, AttributeError):
        pass
    body = " ".join(str(body).split())[:200]
    return f"HTTP {e.code} {e.reason}" + (f": {body}" if body else "")


def _transport_failure(e: Exception, timeout: float) -> str:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    return f"{reason.__class__.__name__}: {reason}"


class RemoteReward:
    """POSTs {"prompts", "completions", <extra columns>} as JSON; expects {"rewards": [float, ...]}.

    Connection failures, timeouts and 5xx answers are retried `retries` times, sleeping
    `backoff`, 2x, 4x ... seconds in between; a 4xx answer is our request's fault, so it is not.
    408 and 429 are the exception: they ask to be tried again. A malformed 200 answer is a bug in
    the server, which a retry would only repeat.
    """

    def __init__(self, url: str, backoff: float = 0.5):
        self.url, self.backoff = url, backoff

    def __call__(self, prompts: list[str], completions: list[str], extras: dict[str, list],
                 timeout: float = 30.0, retries: int = 3) -> list[float]:
        clash = {"prompts", "completions"} & set(extras)
        if clash:
            raise RewardError(f"remote reward '{self.url}': a data column may not be called "
                              f"{' or '.join(sorted(clash))}")
        body = json.dumps({**extras, "prompts": prompts, "completions": completions}, default=_jsonable)
        failure = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            answer, failure, retry = self._post(body.encode(), timeout)
            if answer is not None:
                return self._rewards(answer, len(completions))
            if not retry:
                break
        raise RewardError(f"remote reward '{self.url}' failed after {attempt + 1} "
                          f"attempt{'s' * (attempt > 0)}: {failure}")

    def _post(self, body: bytes, timeout: float) -> tuple[Optional[bytes], str, bool]:
        """(answer, failure, worth retrying): one request, every failure turned into words."""
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json"})
        try:
            # the timeout bounds each connect and read, not the whole answer; enough against a
            # server that is down or stuck, which is what it is for
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read(), "", False
        except urllib.error.HTTPError as e:
            return None, _http_failure(e), e.code >= 500 or e.code in (408, 429)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, timed out, cut short
            return None, _transport_failure(e, timeout), True

    def _rewards(self, answer: bytes, n: int) -> list[float]:
        try:
            rewards = json.loads(answer).get("rewards")
        except (ValueError, AttributeError):
            raise RewardError(f"remote reward '{self.url}' answered something that is not a JSON "
                              f"object: {answer[:80]!r}") from None
        if not isinstance(rewards, list):
            raise RewardError(f"remote reward '{self.url}' answered without a \"rewards\" list: "
                              f"{answer[:80]!r}")
        if len(rewards) != n:
            raise RewardError(f"remote reward '{self.url}' answered {len(rewards)} rewards for "
                              f"{n} completions")
        return rewards


def _remote(url: str, params: dict) -> RemoteReward:
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises on a port that is not a number
    except ValueError as e:
        raise RewardError(f"remote reward '{url}' is not a valid URL: {e}") from None
    if not parts.hostname:
        raise RewardError(f"remote reward '{url}' needs a host: http://host:port/path")
    backoff = params.pop("backoff", 0.5)
    if params:
        raise RewardError(f"remote reward '{url}' takes only weight and backoff, not "
                          f"{', '.join(sorted(params))}; its timeout and retries come from the config")
    if not isinstance(backoff, (int, float)) or isinstance(backoff, bool) or backoff < 0:
        raise RewardError(f"remote reward '{url}' needs a backoff of zero or more seconds, not {backoff!r}")
    return RemoteReward(url, float(backoff))


@dataclass
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float = 1.0
    identity: str = ""
    """A Python function's code (see callable_identity): two functions of one name differ by it."""
    model: Any = None
    """A reward model behind fn (reward_model.RewardModel), moved to the run's device."""


def _callable(fn: Callable) -> RewardFn:
    """A Python function of the API's rewards=, called as a python: file's function is."""
    return lambda prompts, completions, extras: fn(prompts=prompts, completions=completions, **extras)


def callable_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


def build(spec: Any, base: Path = Path(".")) -> WeightedReward:
    """One reward from a task's `rewards:` entry: a bare name or {reward: name, weight: w, ...}.
    From Python also a function `(prompts, completions, **columns) -> list[float]`, alone, as
    (function or name, weight) or as {reward: function, weight: w}."""
    params: dict = {}
    if isinstance(spec, WeightedReward):
        return spec
    if isinstance(spec, dict):
        params = dict(spec)
        name = params.pop("reward", None)
        weight = params.pop("weight", 1.0)
    elif isinstance(spec, tuple) and len(spec) == 2:
        name, weight = spec
    else:
        name, weight = spec, 1.0
    if not isinstance(weight, (int, float)) or isinstance(weight, bool):
        raise RewardError(f"reward '{name}' has a non-numeric weight {weight!r}")
    if isinstance(name, RewardModel):
        return WeightedReward(name.name, _callable(name), float(weight), name.name, model=name)
    if isinstance(name, torch.nn.Module):
        raise RewardError(f"reward {type(name).__name__} is a model, not a reward function: wrap a "
                          "sequence-classification model as policygrad.RewardModel(model, tokenizer)")
    if callable(name):
        if params:
            raise RewardError(f"reward '{callable_name(name)}' is a Python function: it takes only a "
                              f"weight, not {', '.join(sorted(params))}")
        return WeightedReward(callable_name(name), _callable(name), float(weight), callable_identity(name))
    if not isinstance(name, str):
        raise RewardError(f"reward entry {spec!r} needs a name: a string, a function, or "
                          "{reward: name, weight: w}")
    if name.startswith("python:"):
        return WeightedReward(name, _python(name, base), float(weight))
    if name.startswith(("http://", "https://")):
        return WeightedReward(name, _remote(name, params), float(weight))
    if name.startswith("rm:"):
        if params:
            raise RewardError(f"reward '{name}' takes only a weight, not {', '.join(sorted(params))}")
        model = RewardModel.load(name, base)
        return WeightedReward(name, _callable(model), float(weight), name, model=model)
    if name not in BUILTIN:
        raise RewardError(f"unknown reward '{name}'; built-in rewards: {', '.join(BUILTIN)}, "
                          "python:path/to/file.py:function, http://host:port/path or rm:MODEL_FOLDER")
    return WeightedReward(name, BUILTIN[name](params), float(weight))


def _in_thread(r: WeightedReward, prompts: list[str], completions: list[str], extras: dict,
               timeout: float) -> list[float]:
    """r.fn's answer, or its exception, within `timeout` seconds (timed.in_thread); a hung reward
    is an error that ends the run."""
    finished, values, error = timed.in_thread(lambda: r.fn(prompts, completions, extras), timeout, f"reward {r.name}")
    if not finished:
        raise RewardError(f"reward '{r.name}' did not answer within {timeout:g} s for "
                          f"{len(completions)} completions; raise reward_timeout if it is only slow")
    if error is not None:
        raise error
    return values


@dataclass
class RewardSet:
    rewards: list[WeightedReward] = field(default_factory=list)
    timeout: float = 30.0
    """Seconds one reward call may take; for a remote reward, each attempt of it."""
    retries: int = 3
    """Extra attempts a remote reward makes after a failed request (not after a 4xx answer)."""
    parts: dict[str, np.ndarray] = field(default_factory=dict)
    """The last call's values of each reward, by part_names (only with several rewards)."""

    def configure(self, timeout: float, retries: int, device: Any = "cpu", normalize: bool = False) -> None:
        """device: where reward models score (the run's); normalize: learned rewards standardised
        with their saved statistics (reward_normalize)."""
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise RewardError(f"reward timeout must be a positive number of seconds, not {timeout!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise RewardError(f"reward retries must be a whole number >= 0, not {retries!r}")
        self.timeout, self.retries = float(timeout), retries
        if normalize and not any(r.model is not None for r in self.rewards):
            raise RewardError(f"reward_normalize=true standardises learned rewards (rm:PATH), and this task's "
                              f"rewards ({', '.join(self.names)}) include none: drop reward_normalize")
        for r in self.rewards:
            if r.model is not None:
                r.model.place(device)
                r.model.normalize(normalize)

    def _values(self, r: WeightedReward, prompts: list[str], completions: list[str], extras: dict) -> list:
        if isinstance(r.fn, RemoteReward):
            # it bounds each request itself; one deadline around all its attempts would cut retries short
            return r.fn(prompts, completions, extras, timeout=self.timeout, retries=self.retries)
        return _in_thread(r, prompts, completions, extras, self.timeout)

    def __call__(self, prompts: list[str], completions: list[str], extras: dict[str, list]) -> np.ndarray:
        """(B,) weighted sum of every reward; RewardError names a misbehaving one. With several
        rewards, each one's own (unweighted) values are kept in `parts` for the metrics: a reward
        of weight 0 is watched, not trained on (a gold rule beside a learned proxy)."""
        total = np.zeros(len(completions))
        self.parts = {}
        for r in self.rewards:
            try:
                values = self._values(r, list(prompts), list(completions), extras)
            except RewardError:
                raise
            except Exception as e:
                raise RewardError(f"reward '{r.name}' raised {e.__class__.__name__}: {e} "
                                  f"(first completion: {completions[0][:60]!r})") from None
            if not isinstance(values, (list, tuple, np.ndarray)):
                raise RewardError(f"reward '{r.name}' returned a {type(values).__name__}; it must return a list "
                                  f"of {len(completions)} floats, one per completion")
            values = list(values) if not isinstance(values, np.ndarray) else values.tolist()
            if len(values) != len(completions):
                raise RewardError(f"reward '{r.name}' returned {len(values)} values for "
                                  f"{len(completions)} completions")
            for value, completion in zip(values, completions):
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise RewardError(f"reward '{r.name}' returned {value!r} for completion {completion[:60]!r}")
            total += r.weight * np.asarray(values, dtype=np.float64)
            if len(self.rewards) > 1:
                self.parts[self.part_names[len(self.parts)]] = np.asarray(values, dtype=np.float64)
        return total

    @property
    def part_names(self) -> list[str]:
        """Each reward's metric name: its name, numbered when two share one."""
        names = self.names
        return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names, 1)]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]
