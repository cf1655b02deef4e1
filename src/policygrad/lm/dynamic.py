"""DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, "Dynamic Sampling"; veRL's
`filter_groups` with `max_num_gen_batches`). A prompt group whose completions all got the same task
reward has a group baseline's advantage 0 on every row: it adds nothing to the policy gradient and
only dilutes the batch's mean. Such groups are dropped and prompts_per_step more prompts drawn,
round after round, until prompts_per_step groups are kept or max_draws rounds were drawn; the first
prompts_per_step kept groups, in draw order, are the step's batch (a surplus is cut).

The flatness test (scoring.flat_groups) reads the task reward alone, before any KL penalty: DAPO
filters on the spread of the accuracy reward, and a KL-shaped score is never exactly flat.

Every round is drawn as a plain step's prompts are: the cursor gives every rank the same prompt
ids, each samples its block with its own seed (round_seed), and every rank sees every row's reward,
so all ranks choose the same groups, the ones one process would choose from the same samples. The
kept groups are then laid out as one process's batch is, in equal blocks: rank r holds the r-th
block of them in draw order, receiving each group it did not sample from the rank that did. Equal
blocks keep everything downstream exactly one process's: the minibatches' global order, TRPO's
Fisher sub-sample and the global loss denominators. (Ranks holding their own kept groups would hold
unequal rows, and PPO's minibatches, drawn over equal blocks, would no longer be one process's.)

A step still short after max_draws rounds is padded to prompts_per_step groups, so that the layout
holds, with copies of its first kept group whose mask is 0: like a stand-in row they weigh nothing
in any loss, metric or count, and a minibatch of padding alone takes no optimiser step (algos.py).
A step that kept no group is a batch of no rows: the trainer takes no update and counts it skipped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .. import dist
from ..batch import PER_ROW_OR_SCALAR, Batch
from .scoring import flat_groups, no_signal

Sampler = Callable[[int], tuple[Batch, np.ndarray, dict[str, np.ndarray]]]
"""Round i -> this rank's block of the round's fresh prompts, sampled: the batch (no reference
log-probs), each row's task reward, and each reward's own values (several rewards)."""


def round_seed(step_seed: int, round_index: int) -> int:
    """The sampling seed of a step's round. Round 0 takes the step's own seed, so a step whose first
    round fills the batch samples and trains exactly what a plain step does; each later round a
    seed of its own, a hash of the two numbers (a resumed run draws the same)."""
    if round_index == 0:
        return step_seed
    return int(np.random.SeedSequence([step_seed, round_index]).generate_state(1, np.uint64)[0] >> 1)


def kept_groups(flat: np.ndarray, want: int) -> np.ndarray:
    """(K,) the indices of the first `want` groups that are not flat, in draw order (K <= want)."""
    return np.flatnonzero(~np.asarray(flat, dtype=bool))[:want]


def draws_done(flat: np.ndarray, want: int, rounds: int, max_draws: int) -> bool:
    """Whether a step draws no further round: `want` groups are kept, or the bound is reached."""
    return int(np.count_nonzero(~np.asarray(flat, dtype=bool))) >= want or rounds >= max_draws


@dataclass
class Drawn:
    """A step's rounds: this rank's rows of each, and every rank's per-row numbers in draw order
    (round after round; within one, rank after rank, which is the prompts' cursor order)."""
    samples_per_prompt: int
    batches: list[Batch] = field(default_factory=list)
    """This rank's block of each round's rows, as sampled."""
    tables: list[np.ndarray] = field(default_factory=list)
    """Each round's (B_global, 3 + n_parts) columns of every rank's rows: task reward, prompt tokens,
    completion tokens, then each reward's own value."""
    part_names: list[str] = field(default_factory=list)

    @property
    def table(self) -> np.ndarray:
        return np.concatenate(self.tables)                                        # (R * B_global, C)

    def flat(self) -> np.ndarray:
        return flat_groups(self.table[:, 0], self.samples_per_prompt)            # (R * G,)

    @property
    def groups_per_round(self) -> int:
        return len(self.tables[0]) // self.samples_per_prompt

    def sampled_by(self, group: int) -> int:
        """The rank that sampled a group (ranks sample equal blocks of each round)."""
        return (group % self.groups_per_round) // (self.groups_per_round // dist.world())

    def group_rows(self, group: int) -> Batch:
        """The rows of a group this rank sampled."""
        k, per_rank = self.samples_per_prompt, self.groups_per_round // dist.world()
        first = (group % self.groups_per_round - dist.rank() * per_rank) * k
        batch = self.batches[group // self.groups_per_round]
        return batch.select_rows(torch.arange(first, first + k, device=batch.mask.device))

    def rows_of(self, groups: np.ndarray) -> np.ndarray:
        """(len(groups) * k,) the rows of groups, in the table's numbering."""
        k = self.samples_per_prompt
        return (np.asarray(groups, dtype=np.int64)[:, None] * k + np.arange(k)).reshape(-1)


def draw(sample_round: Sampler, samples_per_prompt: int, want: int, max_draws: int) -> Drawn:
    """Rounds of sample_round until `want` groups are not flat or max_draws rounds were drawn; one
    collective per round, after which every rank decides alike."""
    drawn = Drawn(samples_per_prompt)
    while True:
        batch, task_reward, parts = sample_round(len(drawn.batches))
        P = batch.obs.shape[1] - batch.actions.shape[1]
        columns = np.column_stack([np.asarray(task_reward, dtype=np.float64),
                                   batch.obs_mask[:, :P].sum(1).cpu().numpy(), batch.mask.sum(1).cpu().numpy(),
                                   *[np.asarray(v, dtype=np.float64) for v in parts.values()]])  # (B, C)
        drawn.batches.append(batch)
        drawn.tables.append(dist.gather_rows(columns.astype(np.float64)))         # (B_global, C)
        drawn.part_names = list(parts)
        if draws_done(drawn.flat(), want, len(drawn.batches), max_draws):
            return drawn


@dataclass
class Kept:
    """What a step trains on, from its rounds (assemble)."""
    batch: Batch
    """This rank's block of the step's batch (B_local rows, padding included; no rows if none kept)."""
    task_reward: np.ndarray
    """(B_local,) each row's task reward; 0 on padding."""
    real: np.ndarray
    """(B_local,) bool: the row is a kept completion, not padding."""
    all_reward: np.ndarray
    """(K * k,) every kept row's task reward (every rank's), in draw order."""
    parts: dict[str, np.ndarray]
    """(K * k,) each reward's own values on the kept rows."""
    metrics: dict[str, float]
    """train/draws (rounds), train/kept_groups, train/dropped_groups (flat ones, of every round) and
    train/sampled_reward_mean (over every completion sampled, dropped and cut ones included)."""
    flat_share: tuple[float, float]
    """scoring.no_signal of everything sampled: the share of flat groups, and whether all was flat."""


def assemble(drawn: Drawn, want: int, pad_id: int) -> Kept:
    """This rank's block of the step's batch: the first `want` kept groups in draw order, padded to
    `want` groups with weightless copies of the first, in equal blocks over the ranks (module
    docstring)."""
    k, table = drawn.samples_per_prompt, drawn.table
    flat = drawn.flat()
    kept = kept_groups(flat, want)
    kept_rows = drawn.rows_of(kept)
    numbers = {"train/draws": len(drawn.batches), "train/kept_groups": len(kept),
               "train/dropped_groups": int(flat.sum()), "train/sampled_reward_mean": float(table[:, 0].mean())}
    common = dict(all_reward=table[kept_rows, 0],
                  parts={name: table[kept_rows, 3 + i] for i, name in enumerate(drawn.part_names)},
                  metrics=numbers, flat_share=no_signal(table[:, 0], k))
    if len(kept) == 0:
        first = drawn.batches[0]
        none = torch.zeros(0, dtype=torch.long, device=first.mask.device)
        return Kept(first.select_rows(none), np.zeros(0), np.zeros(0, dtype=bool), **common)
    slots = np.concatenate([kept, np.full(want - len(kept), kept[0])])           # (want,) group of each slot
    lo, hi = dist.share(want)
    received = exchange(drawn, slots, hi - lo)
    groups = [drawn.group_rows(g) if drawn.sampled_by(g) == dist.rank() else received[g] for g in slots[lo:hi]]
    # the widths one process's batch of these groups has: every rank's rows line up as its would
    widths = int(table[kept_rows, 1].max()), int(table[kept_rows, 2].max())
    batch = join([fit(g, *widths, pad_id) for g in groups])
    real = np.repeat(np.arange(lo, hi) < len(kept), k)                            # (B_local,)
    weight = torch.as_tensor(real, dtype=batch.mask.dtype, device=batch.mask.device)[:, None]  # (B_local, 1)
    # padding rows: mask 0, and 0 wherever the mask is (as every sampled row's padding is)
    batch = batch.replace(mask=batch.mask * weight, log_prob=batch.log_prob * weight,
                          behaviour_log_prob=None if batch.behaviour_log_prob is None
                          else batch.behaviour_log_prob * weight)
    return Kept(batch, table[drawn.rows_of(slots[lo:hi]), 0] * real, real, **common)


def exchange(drawn: Drawn, slots: np.ndarray, per_rank: int) -> dict[int, Batch]:
    """The groups each rank holds but another sampled, from the ranks that sampled them: one
    collective over several ranks (every rank receives every group sent, on the CPU; token ids and
    log-probs, small next to a model); nothing in one process."""
    if dist.world() == 1:
        return {}
    device = drawn.batches[0].mask.device
    sent = {int(g): drawn.group_rows(int(g)).to("cpu") for s, g in enumerate(slots)
            if s // per_rank != dist.rank() and drawn.sampled_by(int(g)) == dist.rank()}
    return {g: rows.to(device) for part in dist.gather_objects(sent) for g, rows in part.items()}


def _resized(x: torch.Tensor, width: int, fill: float, left: bool = False) -> torch.Tensor:
    """x (B, n, ...) with columns cut or `fill` columns added to `width`, on the left or the right."""
    n = x.shape[1]
    if n >= width:
        return x[:, n - width:] if left else x[:, :width]
    pad = torch.full((x.shape[0], width - n, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], 1)


def fit(batch: Batch, prompt_width: int, completion_width: int, pad_id: int) -> Batch:
    """A freshly sampled batch's rows with prompt_width prompt columns (left-padded) and
    completion_width completion columns (right-padded), each at least as wide as the rows' real
    tokens: only columns of padding are cut or added, and positions count real tokens (the
    attention mask), so every forward pass sees what it saw."""
    T = batch.actions.shape[1]
    P = batch.obs.shape[1] - T

    def both(x: torch.Tensor, fill: float) -> torch.Tensor:  # (B, P+T) -> (B, prompt_width + completion_width)
        return torch.cat([_resized(x[:, :P], prompt_width, fill, left=True),
                          _resized(x[:, P:], completion_width, fill)], 1)
    fills = {"actions": pad_id, "turn": -1}
    steps = {f.name: _resized(getattr(batch, f.name), completion_width, fills.get(f.name, 0.0))
             for f in dataclasses.fields(batch) if f.name not in (*PER_ROW_OR_SCALAR, "obs", "obs_mask")
             and getattr(batch, f.name) is not None}                               # (B, completion_width) each
    return batch.replace(obs=both(batch.obs, pad_id), obs_mask=both(batch.obs_mask, 0.0), **steps)


def join(batches: list[Batch]) -> Batch:
    """Batches of the same widths as one, their rows in order."""
    first = batches[0]
    return first.replace(**{f.name: torch.cat([getattr(b, f.name) for b in batches])
                            for f in dataclasses.fields(first) if torch.is_tensor(getattr(first, f.name))})
