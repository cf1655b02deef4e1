"""Advantage estimators, registered by name with one signature: fn(batch, cfg) -> (advantages, returns).

Termination is not truncation: a terminated episode has no future, a truncated one bootstraps from
the value of its final observation (Pardo et al. 2018, "Time Limits in Reinforcement Learning").
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..batch import Batch


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor,
        terminated: torch.Tensor, truncated: torch.Tensor, gamma: float, gae_lambda: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) on (B, T) tensors.

    next_values[:, t] is the value of the observation that followed step t: for a truncated step the
    final observation of the episode, for the last column the first observation of the next rollout.
    """
    not_terminated = 1.0 - terminated                                   # (B, T)
    carry = (gamma * gae_lambda) * not_terminated * (1.0 - truncated)   # (B, T) 0 at episode ends
    deltas = rewards + gamma * next_values * not_terminated - values    # (B, T)
    advantages = torch.empty_like(deltas)                               # (B, T)
    running = torch.zeros_like(deltas[:, 0])                            # (B,)
    for t in reversed(range(deltas.shape[1])):
        running = torch.addcmul(deltas[:, t], carry[:, t], running)     # (B,)
        advantages[:, t] = running
    return advantages, advantages + values


def discounted_returns(rewards: torch.Tensor, terminated: torch.Tensor, truncated: torch.Tensor,
                       gamma: float, next_values: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Monte-Carlo discounted returns on (B, T) tensors.

    Where an episode is cut (truncation, or the rollout's end) the return bootstraps from
    next_values, or from 0 when there is no critic.
    """
    if next_values is None:
        next_values = torch.zeros_like(rewards)                         # (B, T)
    not_terminated = 1.0 - terminated                                   # (B, T)
    returns = torch.zeros_like(rewards)                                 # (B, T)
    future = next_values[:, -1]                                         # (B,) bootstrap at rollout end
    for t in reversed(range(rewards.shape[1])):
        cut = truncated[:, t]                                           # (B,)
        future = cut * next_values[:, t] + (1.0 - cut) * future         # (B,)
        returns[:, t] = rewards[:, t] + gamma * not_terminated[:, t] * future
        future = returns[:, t]
    return returns


def _alone(x: torch.Tensor) -> torch.Tensor:
    return x


Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over data-parallel workers that each hold part of the batch (the identity in one
process), so that batch statistics are the global batch's."""


def normalize(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8, reduce: Reduce = _alone) -> torch.Tensor:
    """Whiten x over its valid (mask = 1) entries (over every worker's part, with reduce);
    padding stays 0."""
    n = reduce(mask.sum())
    mean = reduce((x * mask).sum()) / n                                  # ()
    var = reduce((((x - mean) * mask) ** 2).sum()) / (n - 1).clamp(min=1)  # () unbiased
    return (x - mean) / (var.sqrt() + eps) * mask                        # (B, T)


def _gae(batch: Batch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    if batch.values is None or batch.next_values is None:
        raise ValueError("the gae advantage needs a critic (values and next_values in the batch)")
    return gae(batch.rewards, batch.values, batch.next_values, batch.terminated, batch.truncated,
               cfg.gamma, cfg.gae_lambda)


def _monte_carlo(batch: Batch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    # Without a learned baseline there is no critic to bootstrap from either.
    critic = batch.values is not None and getattr(cfg, "value_baseline", True)
    returns = discounted_returns(batch.rewards, batch.terminated, batch.truncated, cfg.gamma,
                                 batch.next_values if critic else None)
    baseline = batch.values if critic else torch.zeros_like(returns)
    return returns - baseline, returns


def sequence_scores(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) undiscounted sum of a sequence's rewards: its return from the first step."""
    return (rewards * mask).sum(1)


def group_stats(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion: its group's size, mean and (unbiased) std of scores, each (B,)."""
    n_groups = int(group.max()) + 1
    zeros = scores.new_zeros(n_groups)                                             # scores' device, dtype
    count = zeros.index_add(0, group, torch.ones_like(scores))                     # (G,)
    total = zeros.index_add(0, group, scores)                                      # (G,)
    mean = total / count                                                           # (G,)
    sq = zeros.index_add(0, group, (scores - mean[group]) ** 2)                    # (G,)
    std = (sq / (count - 1).clamp(min=1)).sqrt()                                   # (G,)
    return count[group], mean[group], std[group]


def rloo_baseline(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B,) mean score of the other completions of the same prompt (Kool et al. 2019, leave-one-out);
    a completion alone in its group gets baseline 0."""
    count, mean, _ = group_stats(scores, group)
    others = (count - 1).clamp(min=1)
    return torch.where(count > 1, (mean * count - scores) / others, torch.zeros_like(scores))


def _group_whitened(scores: torch.Tensor, batch: Batch) -> torch.Tensor:
    _, mean, std = group_stats(scores, batch.group)
    return (scores - mean) / (std + 1e-6)


def _group_centred(scores: torch.Tensor, batch: Batch) -> torch.Tensor:
    # Dr. GRPO (Liu et al. 2025, sec. 3.1): dividing by the group's std weighs the prompts whose
    # answers all score alike (too easy, too hard) up; the group's mean alone is the baseline
    _, mean, _ = group_stats(scores, batch.group)
    return scores - mean


# Critic-free baselines of a sequence score, by name: fn(scores (B,), batch) -> advantages (B,).
SEQUENCE_BASELINES: dict[str, Callable[[torch.Tensor, Batch], torch.Tensor]] = {
    "none": lambda scores, batch: scores,
    "moving-average": lambda scores, batch: scores - batch.baseline,
    "rloo": lambda scores, batch: scores - rloo_baseline(scores, batch.group),
    "group": _group_whitened,
    "group-mean": _group_centred,
}


def _sequence(batch: Batch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Critic-free: every token of a completion gets its sequence's score minus a baseline."""
    scores = sequence_scores(batch.rewards, batch.mask)                            # (B,)
    advantages = SEQUENCE_BASELINES[cfg.baseline](scores, batch)                   # (B,)
    returns = scores[:, None].expand_as(batch.rewards)                             # (B, T)
    return advantages[:, None] * batch.mask, returns


ADVANTAGES: dict[str, Callable[[Batch, object], tuple[torch.Tensor, torch.Tensor]]] = {
    "gae": _gae,
    "mc": _monte_carlo,
    "sequence": _sequence,
}


# --- multi-turn episodes: turns are the steps ---------------------------------------------------
def turn_view(batch: Batch) -> dict[str, torch.Tensor]:
    """A multi-turn batch's tokens gathered into turns, each (B, K) with K = the most turns:
    `rewards` (the turn's token rewards summed: the environment's reward on the turn's last model
    token, and with kl_in=reward each token's KL penalty), `values` (V(s_k): the value head read at
    the turn's first model token, whose value is that of the context before it, the prompt or the
    environment's previous answer; read later, it would have seen the reply it judges and a fitted
    critic would learn Q(s_k, a_k), not V(s_k)), `next_values` (the next turn's value; after the
    final turn the token-level next_values at its last token, the bootstrap of a truncated episode),
    `terminated` and `truncated` (set on an episode's final turn only), `valid` (1 on turns the
    episode has), `first` and `last` (long: the positions of each turn's first and last model
    token; -1 on turns the episode does not have) and `tokens` (the turn's model tokens)."""
    B, T = batch.mask.shape
    K = int(batch.turn.max()) + 1
    model = batch.mask > 0                                                       # (B, T)
    turn = torch.where(model, batch.turn, torch.full_like(batch.turn, K))       # (B, T) env/pad -> K
    positions = torch.arange(T, device=batch.mask.device).expand(B, T)          # (B, T)
    last = torch.full((B, K + 1), -1, dtype=torch.long, device=batch.mask.device)
    last = last.scatter_reduce(1, turn, positions, "amax")[:, :K]               # (B, K)
    first = torch.full((B, K + 1), T, dtype=torch.long, device=batch.mask.device)
    first = first.scatter_reduce(1, turn, positions, "amin")[:, :K]             # (B, K) T where absent
    valid = (last >= 0).float()                                                 # (B, K)
    first = torch.where(valid > 0, first, torch.full_like(first, -1))           # (B, K)
    rewards = torch.zeros(B, K + 1, device=batch.mask.device).scatter_add(
        1, turn, batch.rewards * batch.mask)[:, :K]                             # (B, K)
    tokens = torch.zeros(B, K + 1, device=batch.mask.device).scatter_add(1, turn, batch.mask)[:, :K]  # (B, K)
    pick = lambda x, at: x.gather(1, at.clamp(min=0)) * valid                   # noqa: E731 (B, K)
    values = pick(batch.values, first) if batch.values is not None else torch.zeros_like(rewards)
    final = (valid.cumsum(1) == valid.sum(1, keepdim=True)) * valid             # (B, K) 1 on the last turn
    following = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)  # (B, K)
    boot = pick(batch.next_values, last) if batch.next_values is not None else torch.zeros_like(rewards)
    next_values = torch.where(final > 0, boot, following)                       # (B, K)
    return {"rewards": rewards, "values": values, "next_values": next_values,
            "terminated": pick(batch.terminated, last) * final, "truncated": pick(batch.truncated, last) * final,
            "valid": valid, "first": first, "last": last, "tokens": tokens}


def turn_value_weight(turns: dict, shape: tuple[int, int]) -> torch.Tensor:
    """(B, T) where the value head is regressed in a multi-turn batch: at each turn's first model
    token, where V(s_k) is read (turn_view), weighted by the turn's model tokens, so that a turn
    weighs in the value loss, a per-token mean, what its tokens weigh in the policy loss."""
    weight = torch.zeros(shape, device=turns["valid"].device)                   # (B, T)
    return weight.scatter_add(1, turns["first"].clamp(min=0), turns["tokens"] * turns["valid"])


def _baselined(returns: torch.Tensor, first: torch.Tensor, batch: Batch, cfg) -> torch.Tensor:
    """(B, K) each turn's return minus the critic-free baseline of the episode's return `first`
    (B,) (rloo and group compare the episodes that start from the same seed); group also divides
    by the group's std."""
    if cfg.baseline == "group":
        _, mean, std = group_stats(first, batch.group)
        return (returns - mean[:, None]) / (std[:, None] + 1e-6)
    offset = first - SEQUENCE_BASELINES[cfg.baseline](first, batch)                # (B,)
    return returns - offset[:, None]


def _outcome(turns: dict, batch: Batch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Every turn gets the episode's undiscounted return minus the baseline: with one turn, exactly
    the single-turn `sequence` advantage."""
    score = turns["rewards"].sum(1)                                                # (B,)
    returns = score[:, None].expand_as(turns["rewards"])                           # (B, K)
    return _baselined(returns, score, batch, cfg), returns


def _per_turn_baselined(returns: torch.Tensor, batch: Batch, valid: torch.Tensor, cfg) -> torch.Tensor:
    """(B, K) each turn's return-to-go against the same turn's of the other episodes from the same
    seed (rloo: their mean; group: whitened with their moments; group-mean: minus their mean), over
    the episodes that reached that turn. A later turn's return-to-go holds fewer rewards than the
    whole return: compared with the whole return's baseline it would carry a large offset and the
    earlier turns' noise.
    none and moving-average baselines are of the whole return (_baselined)."""
    if cfg.baseline not in ("rloo", "group", "group-mean"):
        return _baselined(returns, returns[:, 0], batch, cfg)
    b, k = valid.nonzero(as_tuple=True)                                            # the turns played
    _, cell = torch.unique(batch.group[b] * returns.shape[1] + k, return_inverse=True)  # (seed, turn)
    scores = returns[b, k]                                                         # (N,)
    if cfg.baseline == "rloo":
        compared = scores - rloo_baseline(scores, cell)
    else:
        _, mean, std = group_stats(scores, cell)
        compared = scores - mean if cfg.baseline == "group-mean" else (scores - mean) / (std + 1e-6)
    advantages = torch.zeros_like(returns)
    advantages[b, k] = compared
    return advantages


def _discounted(turns: dict, batch: Batch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Each turn's discounted return-to-go (gamma over turns; no critic, so a truncated episode
    bootstraps from 0) minus the same turn's baseline (_per_turn_baselined)."""
    returns = discounted_returns(turns["rewards"], turns["terminated"], turns["truncated"], cfg.gamma)  # (B, K)
    return _per_turn_baselined(returns, batch, turns["valid"] > 0, cfg), returns


def _turn_gae(turns: dict, batch: Batch, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The core's GAE with turns as steps: a truncated episode bootstraps from next_values, a
    terminated one does not."""
    if batch.values is None:
        raise ValueError("turn_advantage=gae needs a critic (use_value_head=true)")
    return gae(turns["rewards"], turns["values"], turns["next_values"], turns["terminated"], turns["truncated"],
               cfg.gamma, cfg.gae_lambda)


# Credit assignment over the turns of an episode, by name: fn(turns, batch, cfg) -> (advantages,
# returns), each (B, K).
TURN_ADVANTAGES: dict[str, Callable[[dict, Batch, object], tuple[torch.Tensor, torch.Tensor]]] = {
    "outcome": _outcome,
    "discounted": _discounted,
    "gae": _turn_gae,
}


def _turns(batch: Batch, cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turn-level advantages and returns, broadcast to every model token of the turn, and the
    value loss's weights (turn_value_weight: the returns are V(s_k)'s targets at turn starts)."""
    turns = turn_view(batch)
    advantages, returns = TURN_ADVANTAGES[cfg.turn_advantage](turns, batch, cfg)    # (B, K) each
    index = batch.turn.clamp(min=0)                                                # (B, T)
    return (advantages.gather(1, index) * batch.mask, returns.gather(1, index) * batch.mask,
            turn_value_weight(turns, batch.mask.shape))


def without_length_truncated(batch: Batch) -> Batch:
    """The batch with its length-truncated completions (batch.length_truncated) out of the loss:
    their mask is 0, so no term (policy, KL, entropy, value) reads them and no loss_agg counts
    them, whatever the micro-batches and ranks (each counts its kept units). DAPO's overlong
    filtering (Yu et al. 2025, sec. 3.4): a completion cut mid-thought would be punished for
    reasoning that may have been sound. Called after the advantages, which saw every completion."""
    if batch.length_truncated is None:
        return batch
    kept = (1.0 - batch.length_truncated)[:, None]                               # (B, 1)
    return batch.replace(mask=batch.mask * kept, advantages=batch.advantages * kept)


def compute(batch: Batch, cfg, reduce: Reduce = _alone) -> Batch:
    """The batch with advantages (whitened if cfg.normalize_advantages, with the moments of every
    worker's part when reduce sums over them) and returns filled in. The estimators themselves
    need no other worker's rows: a worker holds whole episodes and whole prompt groups. With
    cfg.overlong_filter the length-truncated completions then leave the loss: their rewards
    counted in the baselines and moments, as in DAPO (without_length_truncated)."""
    # a batch of multi-turn episodes carries its turn index: its credit is assigned over turns
    if batch.turn is None:
        advantages, returns = ADVANTAGES[cfg.advantage](batch, cfg)
        value_weight = None
    else:
        advantages, returns, value_weight = _turns(batch, cfg)
    advantages = advantages * batch.mask
    if cfg.normalize_advantages:
        advantages = normalize(advantages, batch.mask, reduce=reduce)
    batch = batch.replace(advantages=advantages, returns=returns, value_weight=value_weight)
    return without_length_truncated(batch) if getattr(cfg, "overlong_filter", False) else batch
