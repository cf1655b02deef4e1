"""`Batch`: the one contract between collecting experience and learning from it.

Every per-step tensor is (B, T) with a `mask` of valid steps. For control, B = environments and
T = steps; for a language model, B = completions and T = generated tokens. `DataTerm` is the other
thing a workload hands an update: a data loss (InstructGPT's PTX) to add to every gradient step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterator, Optional

import torch


PER_ROW = ("group", "baseline", "length_truncated")
"""Batch fields of one value per row, (B,)."""
PER_ROW_OR_SCALAR = (*PER_ROW, "kl_coef")
"""Batch fields that are not (B, T, ...) per-step tensors."""


@dataclass(frozen=True)
class Batch:
    obs: torch.Tensor
    """(B, T, *obs_shape) observations the actions were taken in (normalised, if normalising)."""
    actions: torch.Tensor
    """(B, T) discrete actions or (B, T, act_dim) continuous ones."""
    log_prob: torch.Tensor
    """(B, T) log-probability of each action under the policy that collected it (old_log_prob)."""
    rewards: torch.Tensor
    """(B, T) reward received after each action."""
    terminated: torch.Tensor
    """(B, T) 1.0 where the episode truly ended after this step: no bootstrap."""
    truncated: torch.Tensor
    """(B, T) 1.0 where the episode was cut (time limit): bootstrap from next_values."""
    mask: torch.Tensor
    """(B, T) 1.0 on valid steps, 0.0 on padding."""
    obs_mask: Optional[torch.Tensor] = None
    """(B, P+T) attention mask of obs (language models: left-padded prompt, then completion)."""
    behaviour_log_prob: Optional[torch.Tensor] = None
    """(B, T) log-probability of each action under the sampler that drew it (a generation engine's
    own numbers, in its precision); None where the policy itself sampled (control). log_prob is
    pi_old, the trainer's; the update may weigh the gap w = pi_old / pi_sampler
    (cfg.behaviour_correction)."""
    ref_log_prob: Optional[torch.Tensor] = None
    """(B, T) log-probability of each action under the frozen reference policy."""
    values: Optional[torch.Tensor] = None
    """(B, T) critic's value of obs, None for critic-free policies."""
    next_values: Optional[torch.Tensor] = None
    """(B, T) critic's value of the observation after each step (the final observation of a
    truncated episode, the next rollout's first at the rollout's end)."""
    group: Optional[torch.Tensor] = None
    """(B,) index of the prompt a completion answers (language models)."""
    baseline: Optional[torch.Tensor] = None
    """(B,) a running baseline of the sequence score (the moving-average baseline)."""
    length_truncated: Optional[torch.Tensor] = None
    """(B,) 1.0 where the length limit cut a completion: max_new_tokens tokens without an EOS
    (language models; None elsewhere). Not `truncated`, the per-step flag a critic bootstraps at:
    a cut completion ends without bootstrapping like any other (lm/rollout.py); overlong_filter
    reads this one."""
    advantages: Optional[torch.Tensor] = None
    """(B, T) filled by an advantage estimator."""
    returns: Optional[torch.Tensor] = None
    """(B, T) value targets, filled by an advantage estimator."""
    value_weight: Optional[torch.Tensor] = None
    """(B, T) weight of each step in the value loss (a multi-turn batch: each turn's start, where
    V(s_k) is read, weighted by the turn's tokens; filled by core.advantages.compute); None: every
    valid step alike."""
    turn: Optional[torch.Tensor] = None
    """(B, T) long: a multi-turn episode's turn index of each token (the model's tokens of turn k
    and the environment's answer after them), -1 on padding; None for single-turn batches."""
    kl_coef: float = 0.0
    """Weight of KL(policy || reference) in force for this batch (the adaptive controller's value
    when it adapts); the loss uses it when cfg.kl_in == 'loss'."""

    @cached_property
    def n_valid(self) -> torch.Tensor:
        """() number of valid steps, the denominator of every masked mean (computed once)."""
        return self.mask.sum().clamp(min=1.0)

    @cached_property
    def all_valid(self) -> bool:
        """True when no step is padding (control rollouts), so means need no mask."""
        return bool(self.n_valid == self.mask.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.mask.shape)  # type: ignore[return-value]

    def replace(self, **changes) -> "Batch":
        return dataclasses.replace(self, **changes)

    def _map(self, fn) -> "Batch":
        """Apply fn to every per-step tensor (those with leading dims (B, T))."""
        changes = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and f.name not in PER_ROW_OR_SCALAR:
                changes[f.name] = fn(value)
        return self.replace(**changes)

    def to(self, device) -> "Batch":
        """The batch with every tensor on `device` (one sent to another rank travels on the CPU)."""
        return self.replace(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                               if torch.is_tensor(getattr(self, f.name))})

    def flatten_steps(self) -> "Batch":
        """View every step as its own row: (B, T, ...) -> (B*T, 1, ...), for per-step minibatches."""
        B, T = self.shape
        return self._map(lambda x: x.reshape(B * T, 1, *x.shape[2:])).replace(**dict.fromkeys(PER_ROW))

    def select_rows(self, rows: torch.Tensor) -> "Batch":
        """The sub-batch of rows (B',) of this batch."""
        out = self._map(lambda x: x[rows])
        return out.replace(**{name: None if getattr(self, name) is None else getattr(self, name)[rows]
                              for name in PER_ROW})

    def split_rows(self, size: int) -> list["Batch"]:
        """Consecutive row chunks of at most `size` (micro-batches for gradient accumulation)."""
        if size <= 0 or size >= self.shape[0]:
            return [self]
        return [self.select_rows(torch.arange(s, min(s + size, self.shape[0])))
                for s in range(0, self.shape[0], size)]

    def _group_order(self, size: int, generator: torch.Generator, world: int = 1) -> Optional[torch.Tensor]:
        """A row order of the global batch (this batch repeated over `world` ranks) that shuffles
        whole groups (a language model's completions of one prompt, stored in runs of k), when
        minibatches of `size` hold whole groups: then a minibatch keeps a prompt's completions
        together and they share its forward pass. None otherwise."""
        if self.group is None:
            return None
        n_groups = int(self.group.max()) + 1
        k = self.shape[0] // n_groups
        if k * n_groups != self.shape[0] or size % k or not torch.equal(
                self.group, torch.arange(n_groups, device=self.group.device).repeat_interleave(k)):
            return None
        groups = torch.randperm(n_groups * world, generator=generator)         # (G,)
        return (groups[:, None] * k + torch.arange(k)).reshape(-1)             # (B,)

    def local_part(self, global_rows: torch.Tensor, rank: int = 0) -> "Batch":
        """This rank's rows of a set of global row indices, when each rank holds an equal block of
        the global batch in rank order. A rank holding none of them gets one stand-in row with an
        all-zero mask: it weighs nothing, yet the rank still runs the passes every rank must run
        together (gradient sums, FSDP's gathers)."""
        n = self.shape[0]
        mine = global_rows[(global_rows >= rank * n) & (global_rows < (rank + 1) * n)] - rank * n
        return self.select_rows(mine) if len(mine) else self.stand_in()

    def stand_in(self) -> "Batch":
        """One row of this batch with an all-zero mask: a pass over it weighs nothing."""
        row = self.select_rows(torch.zeros(1, dtype=torch.long))
        return row.replace(mask=torch.zeros_like(row.mask))

    def minibatches(self, size: int, generator: torch.Generator, rank: int = 0, world: int = 1
                    ) -> Iterator["Batch"]:
        """Shuffled minibatches of at most `size` rows covering the batch once (whole groups where
        the rows come in groups that fit). Over `world` ranks, each holding an equal block of the
        global batch, every rank draws the same global order (the same generator state) and yields
        its own rows of each global minibatch, so the ranks' parts together are exactly the
        minibatch one process would draw."""
        total = self.shape[0] * world
        if size >= total:  # one minibatch of everything: order does not change the gradient
            yield self
            return
        order = self._group_order(size, generator, world)
        if order is None:
            order = torch.randperm(total, generator=generator)
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            yield self.select_rows(chunk) if world == 1 else self.local_part(chunk, rank)


@dataclass
class DataTerm:
    """J_data, InstructGPT's "PTX" mix: coef x the mean token NLL of a batch of real data, added to
    the loss of every gradient step of an update (TRPO: to the surrogate whose natural-gradient
    step it takes). `micro_batches` are this rank's part of the update's data batch (as many on
    every rank); the mean is over all ranks' `tokens`."""
    coef: float
    micro_batches: list[Batch]
    tokens: float
    """Loss tokens of the global data batch."""
    nll_sum: Callable[[Batch], torch.Tensor]
    """() summed NLL of a micro-batch's loss tokens under the policy (lm/supervised.py)."""

    def share(self, micro: Batch) -> torch.Tensor:
        """() the micro-batch's part of the global mean NLL (summed over micro-batches and ranks,
        the mean)."""
        return self.nll_sum(micro) / self.tokens
