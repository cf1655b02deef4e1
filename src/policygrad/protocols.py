"""The two interfaces the shared core is written against, on paper: what the algorithms ask of a
policy, and what the trainer asks of a workload. Control (control/policy.py, control/rollout.py)
and language models (lm/policy.py, lm/rollout.py) implement both; tests/test_layers.py checks
that every member exists with these parameters.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn

from .batch import Batch, DataTerm


class Policy(Protocol):
    """A stochastic policy with an optional critic, as REINFORCE, PPO and TRPO (algos.py) use it.
    Every tensor is (B, T) over a batch's steps (control: environments x steps; a language model:
    completions x generated tokens)."""

    def evaluate(self, batch: Batch, entropy_grad: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(log_prob, entropy, values) of batch.actions, each (B, T), with gradients (values: None
        without a critic); entropy_grad=False: the entropy is only reported."""

    def log_prob(self, batch: Batch) -> torch.Tensor:
        """(B, T) log-probability of batch.actions under the current policy, with gradients."""

    def values(self, batch: Batch) -> torch.Tensor:
        """(B, T) the critic's values; gradients reach the critic only (TRPO's value regression)."""

    def rows(self, batch: Batch) -> Batch:
        """The view minibatches are cut from: a control batch's transitions, a language model's
        whole completions."""

    def snapshot_actor(self, batch: Batch) -> Any:
        """The policy's distribution on `batch` before a step, detached: the 'old' side of TRPO's
        exact KL."""

    def kl(self, batch: Batch, old: Any) -> torch.Tensor:
        """() mean KL(old || current) over the batch's valid steps, with gradients (the
        Fisher-vector product differentiates it twice)."""

    def log_prob_and_kl(self, batch: Batch, old: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """log_prob (B, T) and kl () from one forward pass (TRPO's line search)."""

    def fisher_outputs(self, batch: Batch, tangents: list[torch.Tensor]
                       ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """The distribution's parameters on `batch` (with gradients) and H J v beside each: J v
        their derivative along tangents (one per actor parameter), H the Fisher that kl's Hessian
        is at new = old (fvp=gauss_newton; core.trpo.Linearised)."""

    def actor_parameters(self) -> list[nn.Parameter]:
        """The parameters TRPO's natural-gradient step moves."""

    def critic_parameters(self) -> list[nn.Parameter]:
        """The critic's parameters (empty without one)."""

    def optimizer_groups(self, cfg: Any) -> list[tuple[list[nn.Parameter], float]]:
        """(parameters, learning rate) groups of REINFORCE's and PPO's joint optimiser."""


class Workload(Protocol):
    """What the trainer's loop (trainer.run_update) asks of a run: experience to learn from, held-out
    evaluation, and what a checkpoint saves and restores. Over several ranks each works on its part
    of the global batch and reports the global batch's numbers."""

    headline: str
    """The training metric the progress bar shows (train/reward_mean, train/episode_return_mean)."""
    eval_headline: str
    """The validation metric whose best value marks the best checkpoint."""
    one_thread: bool
    """Whether the run's torch ops are so small that one thread per process is fastest (control's
    MLPs), else the machine's cores are shared among the ranks; read before the workload is built."""
    policy: Any
    """The Policy the algorithms update (protocols.Policy)."""
    write_model_config: Optional[Callable[[Path], None]]
    """Writes a checkpoint's small model files (a language model's config and tokenizer), or None."""

    def __init__(self, cfg: Any, seed: int, model_path: Optional[Path] = None) -> None:
        """seed: of the weights, the same on every rank; model_path: a checkpoint's model folder to
        start from (a language model's; a control policy's weights come with load_tensors)."""

    @property
    def per_update(self) -> int:
        """The steps one update counts for total_steps, eval_every and the progress bar: one (a
        language model's training step) or rollout_size (control's environment steps)."""

    @property
    def trained_on(self) -> dict[str, str]:
        """What the run trains on, for its summary: {"task": ...} or {"env": ...}."""

    def collect(self) -> tuple[Batch, dict]:
        """This rank's part of a fresh batch from the current policy, and the global batch's metrics;
        a batch of no rows, on every rank alike, when the step found nothing to learn from (the
        trainer then takes no update)."""

    def data_term(self) -> Optional[DataTerm]:
        """The update's data loss (a language model with ptx_coef > 0), or None."""

    def after_update(self, batch: Batch, metrics: dict) -> dict:
        """Bookkeeping after the update (KL controller, moving baseline); metrics to log with it."""

    def take_warnings(self) -> list[str]:
        """Warnings for the user raised since the last call, each printed as one line."""

    def stop_early(self) -> bool:
        """Whether the run has reached its goal (decided on numbers every rank shares)."""

    def evaluate(self, split: str, out_dir: Optional[Path] = None) -> dict:
        """Held-out metrics on `split` (validation or test), the same on every rank; samples are
        written into out_dir."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """What model.safetensors of a checkpoint holds (copies: the next rollout may run while it
        is written)."""

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's model.safetensors into the policy."""

    def model_files(self) -> dict[str, dict[str, torch.Tensor]]:
        """Further safetensors files of a checkpoint (a language model's weights or adapter), by name."""

    def state(self) -> dict:
        """JSON: the data cursor, RNG and counters a resumed run continues from."""

    def load_state(self, state: dict, update: int) -> None:
        """Continue from `state` (this rank's, saved at update `update`)."""
