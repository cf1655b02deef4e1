"""What the Python API returns: typed evaluations, samples and a training run's result."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from . import checkpoint
from .config import Config
from .trainer import load_workload


@dataclass
class LMEvaluation:
    """A language model on a held-out split: one sampled completion per prompt."""
    split: str
    mean_reward: float
    std_reward: float
    kl_to_reference: float
    """Mean over completions of the summed per-token log-ratio to the reference (nats)."""
    n: int
    rewards: dict[str, float] = field(default_factory=dict)
    """With several rewards, each one's own mean (unweighted; a weight-0 reward is watched here)."""
    samples: list[dict] = field(default_factory=list, repr=False)
    """prompt, completion and reward of each held-out prompt (a multi-turn task's: the whole
    conversation, its per-turn rewards and return)."""
    episode: dict[str, float] = field(default_factory=dict)
    """Multi-turn tasks: return_mean, turns_mean and (where the env reports success) success_rate;
    mean_reward is then the mean reward per turn."""

    @classmethod
    def from_metrics(cls, metrics: dict, split: str, samples: Optional[list] = None) -> "LMEvaluation":
        prefix = "eval" if split == "validation" else split
        grouped = {group: {k[len(prefix) + len(group) + 2:]: v for k, v in metrics.items()
                           if k.startswith(f"{prefix}/{group}/")} for group in ("reward", "episode")}
        return cls(split, metrics[f"{prefix}/reward_mean"], metrics[f"{prefix}/reward_std"],
                   metrics[f"{prefix}/kl_to_reference"], metrics[f"{prefix}/n"], grouped["reward"],
                   samples if samples is not None else metrics.get("samples", []), grouped["episode"])

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if k != "samples" and (k not in ("rewards", "episode") or v)}


@dataclass
class ControlEvaluation:
    """A control policy's deterministic episodes."""
    env: str
    episodes: int
    mean_return: float
    std_return: float
    returns: list[float] = field(default_factory=list, repr=False)
    """Each episode's return (a training run's closing evaluation keeps only the mean and std)."""

    def as_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "returns"}
        if self.returns:
            out.update(min_return=min(self.returns), max_return=max(self.returns))
        return out


Evaluation = Union[LMEvaluation, ControlEvaluation]


@dataclass
class Sample:
    prompt: str
    completion: str
    """A multi-turn run's: the conversation after the first message, a `[role] text` line each."""
    conversation: Optional[list[dict]] = None
    """A multi-turn run's whole conversation ({role, content} messages)."""
    rewards: Optional[list[float]] = None
    """A multi-turn run's reward of each turn."""


@dataclass
class TrainResult:
    config: Config
    final: Optional[Evaluation]
    """The closing evaluation: the test split, or control's evaluation episodes."""
    history: list[dict]
    """Every update's metrics (a resumed run's earlier updates too), as in metrics.jsonl."""
    out: Optional[Path]
    """The run folder (None when trained with out=None)."""
    summary: dict
    """The closing numbers the CLI prints."""
    was_complete: bool = False
    """The run in `out` had already finished: nothing was trained, its results were read back."""
    workload: Any = field(default=None, repr=False)
    """The trained workload; for a run found complete, loaded from `out` when first needed."""

    @property
    def policy(self) -> Any:
        """The trained policy: the transformers model (a PeftModel with LoRA), or the control policy."""
        return self.work().policy.model if self.config.is_lm else self.work().policy

    @property
    def tokenizer(self) -> Any:
        """The language model's tokenizer (None for control)."""
        return self.work().policy.tokenizer if self.config.is_lm else None

    def work(self) -> Any:
        if self.workload is None:
            self.workload, _ = load_workload(checkpoint.latest(self.out))
        return self.workload
