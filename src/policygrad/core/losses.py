"""Policy losses, registered by name with one signature: fn(log_prob, batch, cfg) -> (loss, metrics);
plus the value loss and KL estimators they share. All (B, T) tensors are averaged over batch.mask.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..batch import Batch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, n_valid: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """Mean of x over mask = 1; pass n_valid (= mask.sum()) when it is known, to save the sum."""
    return (x * mask).sum() / (mask.sum().clamp(min=1.0) if n_valid is None else n_valid)


def batch_mean(x: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean of a (B, T) tensor over the batch's valid steps (a plain mean when none is padding:
    two fewer ops forward and backward, on the hot path of every minibatch)."""
    return x.mean() if batch.all_valid else masked_mean(x, batch.mask, batch.n_valid)


def reinforce_loss(log_prob: torch.Tensor, batch: Batch, cfg) -> tuple[torch.Tensor, dict]:
    """Score-function estimator: -E[log pi(a|s) * A] (Williams 1992)."""
    loss = -batch_mean(log_prob * batch.advantages, batch)               # ()
    return loss, {"policy/loss": loss.item()}


def ppo_clip_loss(log_prob: torch.Tensor, batch: Batch, cfg) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate of Schulman et al. 2017, eq. 7, with its usual diagnostics."""
    log_ratio = log_prob - batch.log_prob                               # (B, T)
    ratio = log_ratio.exp()                                             # (B, T)
    unclipped = ratio * batch.advantages                                # (B, T)
    clipped = ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps) * batch.advantages  # (B, T)
    loss = -batch_mean(torch.min(unclipped, clipped), batch)            # ()
    with torch.no_grad():
        approx_kl = batch_mean((ratio - 1.0) - log_ratio, batch)         # () KL(old || new), k3
        clip_fraction = batch_mean(((ratio - 1.0).abs() > cfg.clip_eps).float(), batch)
    return loss, {"policy/loss": loss.item(), "policy/approx_kl": approx_kl.item(),
                  "policy/clip_fraction": clip_fraction.item()}


POLICY_LOSSES: dict[str, Callable[[torch.Tensor, Batch, object], tuple[torch.Tensor, dict]]] = {
    "reinforce": reinforce_loss,
    "ppo": ppo_clip_loss,
}


def value_loss(values: torch.Tensor, batch: Batch, clip_value_eps: Optional[float] = None
               ) -> torch.Tensor:
    """Mean squared error to the returns; with clip_value_eps, PPO's pessimistic clipped variant."""
    error = (values - batch.returns) ** 2                               # (B, T)
    if clip_value_eps is not None:
        clipped = batch.values + (values - batch.values).clamp(-clip_value_eps, clip_value_eps)
        error = torch.max(error, (clipped - batch.returns) ** 2)        # (B, T)
    return batch_mean(error, batch)


# KL(p || q) estimators from samples x ~ p, given log_ratio = log q(x) - log p(x)
# (Schulman 2020, "Approximating KL divergence"): k1 unbiased, k2 low variance, k3 unbiased and >= 0.
def kl_k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return -log_ratio


def kl_k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio ** 2


def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio.exp() - 1.0 - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1, "k2": kl_k2, "k3": kl_k3,
}


# KL(policy || reference) as a loss term. Differentiating an estimator of the sampled tokens directly
# is wrong for two of the three: on-policy E[grad k1] = E[grad log pi] = 0 (pure noise) and
# E[grad k3] = grad KL(ref || pi), the reverse KL; only grad k2 = (log pi - log ref) grad log pi has
# grad KL(pi || ref) as its expectation (Tang & Munos 2025, "On a few pitfalls in KL divergence
# gradient estimation for RL"). The tokens come from the collecting policy pi_old, so each form is
# importance-weighted by ratio = pi / pi_old (1 on-policy, where the value is the plain estimate):
# - k1, k3 are unbiased (E_pi[k] = KL), so ratio * k, differentiated through the ratio too, is an
#   unbiased estimate of E_pi[k] whose gradient E_old[ratio (grad k + k grad log pi)] is grad KL;
# - k2 is biased in value but exact in gradient: ratio.detach() * k2.
def _kl_through_ratio(k: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return ratio * k                                                    # (B, T)


def _kl_detached_ratio(k: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return ratio.detach() * k                                           # (B, T)


KL_LOSS_FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": _kl_through_ratio, "k2": _kl_detached_ratio, "k3": _kl_through_ratio,
}

KL_REWARD_EXACT = ("k1",)
"""Estimators whose per-token penalty as a reward gives grad KL(pi || ref): the score-function
gradient E[k grad log pi] drops E[grad k], which is 0 only for k1 (tests/test_kl.py enumerates it)."""


def kl_loss_per_token(log_prob: torch.Tensor, old_log_prob: torch.Tensor, ref_log_prob: torch.Tensor,
                      estimator: str) -> torch.Tensor:
    """(B, T) per-token term whose gradient, in expectation over tokens sampled from the collecting
    policy (old_log_prob), is the gradient of KL(pi || ref) at each token's context."""
    k = KL_ESTIMATORS[estimator](ref_log_prob - log_prob)               # (B, T)
    ratio = torch.exp(log_prob - old_log_prob)                          # (B, T) pi / pi_old
    return KL_LOSS_FORMS[estimator](k, ratio)                           # (B, T)


def categorical_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) between categoricals given by logits (..., K) -> (...)."""
    log_p = torch.log_softmax(logits_p, dim=-1)                         # (..., K)
    log_q = torch.log_softmax(logits_q, dim=-1)                         # (..., K)
    return (log_p.exp() * (log_p - log_q)).sum(-1)                      # (...)


def gaussian_kl(mean_p: torch.Tensor, log_std_p: torch.Tensor, mean_q: torch.Tensor,
                log_std_q: torch.Tensor) -> torch.Tensor:
    """Exact KL(p || q) between diagonal Gaussians (..., D) -> (...)."""
    var_ratio = torch.exp(2.0 * (log_std_p - log_std_q))                # (..., D)
    mean_term = ((mean_p - mean_q) * torch.exp(-log_std_q)) ** 2        # (..., D)
    return 0.5 * (var_ratio + mean_term - 1.0 - torch.log(var_ratio)).sum(-1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, dict]:
    """A reward model's loss on preference pairs: -log sigmoid(r_chosen - r_rejected - margin), the
    Bradley-Terry likelihood of the preferred answer (Ouyang et al. 2022, eq. 1; the margin as in
    Llama 2, Touvron et al. 2023). All (P,)."""
    gap = chosen - rejected                                                  # (P,)
    shifted = gap - margin if margin is not None else gap                    # (P,)
    loss = -torch.nn.functional.logsigmoid(shifted).mean()
    return loss, {"rm/loss": loss.item(), "rm/accuracy": (gap > 0).float().mean().item(),
                  "rm/gap_mean": gap.mean().item()}
