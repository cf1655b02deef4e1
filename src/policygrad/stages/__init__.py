"""Stages around RL, each a small module reusing the trainer's run folder, checkpoints, logging and
resume: supervised fine-tuning (and best-of-N), reward models from preference pairs, and the pairs
themselves."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..config import check_choices, check_ranges, coerce, setting
from ..errors import ConfigError


@dataclass
class StageConfig:
    """What every training stage (sft, rm) reads: a model, its data, epochs of AdamW steps over it,
    checkpoints and a device. Each stage's own dataclass adds its keys (and may restate one with
    its own default and docstring); the fields' tags (config.setting) give the range rules."""
    model: str = "smollm2-135m"
    """Model to start from: a local Hugging Face folder or an alias."""
    data: str = ""
    """Training data: a JSONL, CSV or Parquet file (data given from Python: its fingerprint)."""
    epochs: int = setting(2, rule="positive")
    """Passes over the training rows."""
    batch_size: int = setting(8, rule="positive")
    """Rows per optimiser step."""
    lr: float = setting(1e-5, rule="positive")
    """AdamW learning rate."""
    max_grad_norm: float = setting(1.0, rule="non_negative")
    """Gradient-norm clip (0: none)."""
    max_length: int = setting(512, rule="positive")
    """Tokens kept of each row."""
    seed: int = setting(1, rule="non_negative")
    """Seed of the row order and of the weights a run draws (a new adapter, a reward model's head)."""
    checkpoint_every: int = setting(50, rule="positive")
    """Steps between checkpoints (one is also written after every epoch)."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N | mps."""

    def check(self) -> "StageConfig":
        """Each key on its own: choices and ranges (a stage adds its cross-key rules)."""
        check_choices(self)
        check_ranges(self)
        return self


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of n training rows in an epoch: from (seed, epoch) alone, so a resumed run takes
    the rows the uninterrupted one would."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def epoch_steps(rows: list, cfg: StageConfig, run: dict, writer) -> Iterator[tuple[int, list]]:
    """The training steps from where `run` stands (epoch, position): each step's epoch and batch of
    rows, shuffled per epoch (epoch_order), once a checkpoint being written is done (it reads the
    weights the step changes). After each step the caller moves `run` on with `advance`."""
    while run["epoch"] < cfg.epochs:
        epoch = run["epoch"]
        shuffled = epoch_order(len(rows), cfg.seed, epoch)
        while run["epoch"] == epoch:  # the epoch's last step moves run["epoch"] on
            batch = [rows[i] for i in shuffled[run["position"]:run["position"] + cfg.batch_size]]
            writer.wait()
            yield epoch, batch


def advance(run: dict, batch: list, rows: list, cfg: StageConfig) -> tuple[bool, bool]:
    """Moves `run` past a step on `batch`: (whether the step ended its epoch, whether a checkpoint
    is due: at each epoch's end and every cfg.checkpoint_every steps)."""
    run["update"] += 1
    run["position"] += len(batch)
    ended = run["position"] >= len(rows)
    if ended:
        run["epoch"], run["position"] = run["epoch"] + 1, 0
    return ended, ended or run["update"] % cfg.checkpoint_every == 0


def stage_config(cls: type, values: dict[str, Any], stage: str) -> Any:
    """A stage's config dataclass from key=value pairs (strings from the command line, or Python
    values): unknown keys and values of the wrong type are ConfigErrors naming the key."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"unknown {stage} key '{unknown[0]}'; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{key: coerce(key, value, hints[key], named=key) for key, value in values.items()}).check()
