"""Stages around RL, each a small module reusing the trainer's run folder, checkpoints, logging and
resume: supervised fine-tuning (and best-of-N), reward models from preference pairs, and the pairs
themselves."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

import numpy as np

from ..errors import ConfigError


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of n training rows in an epoch: from (seed, epoch) alone, so a resumed run takes
    the rows the uninterrupted one would."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def stage_config(cls: type, values: dict[str, Any], stage: str) -> Any:
    """A stage's config dataclass from key=value pairs (strings from the command line, or Python
    values): unknown keys and values of the wrong type are ConfigErrors naming the key."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {stage} key '{unknown[0]}'; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    cast = {}
    for key, value in values.items():
        hint = hints[key]
        optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), str) if optional else hint
        if value is None and optional:
            cast[key] = None
            continue
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false; got {value!r}")
            cast[key] = value
            continue
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key} must be {kind.__name__}; got {value!r}")
        try:
            cast[key] = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key} must be {kind.__name__}; got {value!r}") from None
    return cls(**cast).check()
