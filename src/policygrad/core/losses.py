"""Policy losses, registered by name with one signature: fn(log_prob, batch, cfg) -> (loss, metrics);
plus the value loss, the KL estimators and KL term they share, and the losses the algorithms step on:
REINFORCE's and PPO's joint loss (one assembly, their differences as JointLoss options) and TRPO's
surrogate with its KL term. All (B, T) tensors are averaged over batch.mask, as cfg.loss_agg says
(LOSS_AGGREGATIONS: per token by default, or per sequence).
"""
from __future__ import annotations

from dataclasses import dataclass
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


# --- loss aggregation --------------------------------------------------------------------------
# How a (B, T) per-token loss becomes one number; the names are veRL's loss_agg_mode. Each is a mean
# over units of the batch (tokens, or sequences: rows with a valid token) of a per-unit loss, so that
# the accumulation over micro-batches and ranks (algos._accumulate) weighs each micro-batch's mean by
# its count of units and divides by the global count: one update is the same for any split.
def sequence_count(batch: Batch) -> torch.Tensor:
    """() rows with a valid token (a stand-in row, all mask 0, counts nothing)."""
    return (batch.mask.sum(1) > 0).sum().to(batch.mask.dtype)


def _token_mean(x: torch.Tensor, batch: Batch, cfg) -> torch.Tensor:
    return batch_mean(x, batch)                                         # () DAPO: every token alike


def _seq_mean_token_mean(x: torch.Tensor, batch: Batch, cfg) -> torch.Tensor:
    per_row = (x * batch.mask).sum(1) / batch.mask.sum(1).clamp(min=1.0)  # (B,) each row's token mean
    return per_row.sum() / sequence_count(batch).clamp(min=1.0)         # () GRPO: every sequence alike


def _seq_mean_token_sum_norm(x: torch.Tensor, batch: Batch, cfg) -> torch.Tensor:
    # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): a sequence's token sum over
    # a constant, the longest completion, so that no length bias enters through the normaliser (TRL's
    # dr_grpo; veRL's seq-mean-token-sum-norm with loss_scale_factor = max_new_tokens)
    total = (x * batch.mask).sum()                                      # ()
    return total / (sequence_count(batch).clamp(min=1.0) * cfg.max_new_tokens)


def _seq_mean_token_sum(x: torch.Tensor, batch: Batch, cfg) -> torch.Tensor:
    return (x * batch.mask).sum() / sequence_count(batch).clamp(min=1.0)  # () a sequence's summed loss


@dataclass(frozen=True)
class Aggregation:
    mean: Callable[[torch.Tensor, Batch, object], torch.Tensor]
    """() the mean of a (B, T) per-token loss over a batch's units: fn(x, batch, cfg)."""
    count: Callable[[Batch], torch.Tensor]
    """() the batch's units: its weight among the micro-batches of an update."""


LOSS_AGGREGATIONS: dict[str, Aggregation] = {
    "token-mean": Aggregation(_token_mean, lambda batch: batch.mask.sum()),
    "seq-mean-token-mean": Aggregation(_seq_mean_token_mean, sequence_count),
    "seq-mean-token-sum-norm": Aggregation(_seq_mean_token_sum_norm, sequence_count),
    "seq-mean-token-sum": Aggregation(_seq_mean_token_sum, sequence_count),
}
"""cfg.loss_agg: how every term of a joint loss (policy, KL, entropy, value) and its metrics are
averaged over a batch."""


def aggregation(cfg) -> Aggregation:
    return LOSS_AGGREGATIONS[getattr(cfg, "loss_agg", "token-mean")]


def aggregate(x: torch.Tensor, batch: Batch, cfg) -> torch.Tensor:
    """() the mean of a (B, T) per-token loss under cfg.loss_agg (token-mean: batch_mean)."""
    return aggregation(cfg).mean(x, batch, cfg)


# --- the sampler and the trainer ---------------------------------------------------------------
# The tokens come from a sampler (a generation engine) whose log-probs may differ from the
# trainer's at the same weights (bfloat16 sampling, other kernels, another engine). The update's
# ratio pi_theta / pi_sampler splits into pi_theta / pi_old x w, w = pi_old / pi_sampler: the first
# is what PPO clips and TRPO bounds, w a fixed weight per token or sequence (Yao et al. 2025, "Your
# efficient RL framework secretly brings you off-policy RL training"; Liu et al. 2025, masked IS).
def _token_level(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return log_w                                                        # (B, T)


def _sequence_level(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return log_w.sum(1, keepdim=True).expand_as(mask)                   # (B, T) product over tokens


def _geometric_level(log_w: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = log_w.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)  # (B, 1)
    return mean.expand_as(mask)                                         # (B, T)


BEHAVIOUR_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": _token_level, "sequence": _sequence_level, "geometric": _geometric_level,
}
"""log w per token (B, T) from each token's log w and the mask: fn(log_w, mask)."""

BEHAVIOUR_CORRECTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "tis": lambda w, cap: w.clamp(max=cap),                             # truncated: E biased down
    "mis": lambda w, cap: torch.where((w >= 1.0 / cap) & (w <= cap), w, torch.zeros_like(w)),  # masked
}
"""w after the correction's bound (B, T): fn(w, cap). `none` is no entry: no weight at all."""


def behaviour_weights(old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, mask: torch.Tensor,
                      correction: str, level: str, cap: float) -> torch.Tensor:
    """(B, T) w = pi_old / pi_sampler at `level`, bounded by `correction` at `cap`; 0 on padding."""
    log_w = (old_log_prob - behaviour_log_prob) * mask                  # (B, T)
    w = BEHAVIOUR_LEVELS[level](log_w, mask).exp()                      # (B, T)
    return BEHAVIOUR_CORRECTIONS[correction](w, cap) * mask             # (B, T)


def behaviour_weight(batch: Batch, cfg) -> tuple[Optional[torch.Tensor], dict]:
    """The batch's (B, T) w under cfg.behaviour_correction, or None (no correction, or the policy
    itself sampled), with its metrics: mean w and the share of tokens it bounded."""
    correction = getattr(cfg, "behaviour_correction", "none")
    if correction == "none" or batch.behaviour_log_prob is None:
        return None, {}
    raw = behaviour_weights(batch.log_prob, batch.behaviour_log_prob, batch.mask, "tis", cfg.behaviour_level,
                            float("inf"))                               # (B, T) unbounded
    weight = BEHAVIOUR_CORRECTIONS[correction](raw, cfg.behaviour_cap) * batch.mask  # (B, T)
    with torch.no_grad():
        bounded = aggregate((weight != raw).float(), batch, cfg)
        return weight, {"policy/behaviour_weight": aggregate(weight, batch, cfg).item(),
                        "policy/behaviour_bounded": bounded.item()}


SAMPLER_BAND = (0.8, 1.25)
"""A token whose trainer / sampler ratio leaves this band counts in train/sampler_ratio_outside."""


@torch.no_grad()
def sampler_mismatch(log_prob: torch.Tensor, batch: Batch) -> dict:
    """How far the trainer's log-probs (log_prob, at the parameters that sampled) are from the
    sampler's: train/sampler_kl, the k3 estimate of KL(sampler || trainer) per token (the tokens
    are the sampler's), and train/sampler_ratio_outside, the share of tokens whose trainer /
    sampler ratio leaves SAMPLER_BAND. {} where the policy itself sampled."""
    if batch.behaviour_log_prob is None:
        return {}
    log_ratio = log_prob.detach() - batch.behaviour_log_prob            # (B, T) log trainer / sampler
    ratio = log_ratio.exp()                                             # (B, T)
    outside = (ratio < SAMPLER_BAND[0]) | (ratio > SAMPLER_BAND[1])     # (B, T)
    return {"train/sampler_kl": batch_mean(kl_k3(log_ratio), batch).item(),
            "train/sampler_ratio_outside": batch_mean(outside.float(), batch).item()}


def reinforce_loss(log_prob: torch.Tensor, batch: Batch, cfg) -> tuple[torch.Tensor, dict]:
    """Score-function estimator: -E[log pi(a|s) * A] (Williams 1992), each token weighed by w when
    cfg.behaviour_correction corrects for the sampler."""
    weight, metrics = behaviour_weight(batch, cfg)
    per_token = log_prob * batch.advantages                             # (B, T)
    loss = -aggregate(per_token if weight is None else per_token * weight, batch, cfg)  # ()
    return loss, {"policy/loss": loss.item(), **metrics}


# --- PPO's surrogates --------------------------------------------------------------------------
def _sequence_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # GSPO (Zheng et al. 2025): s_i = (pi_theta(y_i) / pi_old(y_i)) ^ (1 / |y_i|), the
    # geometric mean of the sequence's token ratios, one ratio (and one clip) per completion; its
    # gradient reaches every token through the mean (TRL's importance_sampling_level=sequence)
    return BEHAVIOUR_LEVELS["geometric"](log_ratio * mask, mask)        # (B, T)


RATIO_LEVELS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "token": lambda log_ratio, mask: log_ratio,                         # (B, T) each token's own
    "sequence": _sequence_ratio,
}
"""cfg.ratio_level: log pi_theta / pi_old per token (B, T) from each token's and the mask."""


def clip_range(cfg) -> tuple[float, float]:
    """(low, high): the ratio is clipped to [1 - low, 1 + high]; each is cfg.clip_eps unless set
    (DAPO's clip-higher: Yu et al. 2025, a higher upper bound keeps unlikely tokens rising)."""
    low, high = getattr(cfg, "clip_low", None), getattr(cfg, "clip_high", None)
    return (cfg.clip_eps if low is None else low), (cfg.clip_eps if high is None else high)


def _ratio_metrics(token_log_ratio: torch.Tensor, ratio: torch.Tensor, batch: Batch, cfg) -> dict:
    """The KL(old || new) estimate of the token ratios (target_kl reads it) and the share of
    ratios (B, T) outside the clip range, each averaged as the loss."""
    low, high = clip_range(cfg)
    with torch.no_grad():
        approx_kl = aggregate((token_log_ratio.exp() - 1.0) - token_log_ratio, batch, cfg)  # () k3
        outside = ((ratio - 1.0) > high) | ((1.0 - ratio) > low)        # (B, T)
        clip_fraction = aggregate(outside.float(), batch, cfg)
    return {"policy/approx_kl": approx_kl.item(), "policy/clip_fraction": clip_fraction.item()}


def ppo_clip_loss(log_prob: torch.Tensor, batch: Batch, cfg) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate of Schulman et al. 2017, eq. 7, with its usual diagnostics; the clip range
    may be asymmetric (clip_range), the ratio a sequence's (RATIO_LEVELS), and with clip_ratio_c the
    loss of a negative advantage is bounded (dual clip)."""
    token_log_ratio = log_prob - batch.log_prob                         # (B, T)
    ratio = RATIO_LEVELS[getattr(cfg, "ratio_level", "token")](token_log_ratio, batch.mask).exp()  # (B, T)
    low, high = clip_range(cfg)
    unclipped = ratio * batch.advantages                                # (B, T)
    clipped = ratio.clamp(1.0 - low, 1.0 + high) * batch.advantages     # (B, T)
    surrogate = torch.min(unclipped, clipped)                           # (B, T)
    dual = getattr(cfg, "clip_ratio_c", None)
    if dual is not None:
        # dual clip (Ye et al. 2020, "Mastering complex control in MOBA games"): with A < 0 a
        # huge ratio makes -ratio x A unbounded; the loss stops at -c x A
        bounded = torch.max(surrogate, dual * batch.advantages)         # (B, T)
        surrogate = torch.where(batch.advantages < 0, bounded, surrogate)  # (B, T)
    # pi_theta / pi_sampler = (pi_theta / pi_old) x w: the clip bounds the step from pi_old, w
    # (fixed, detached) reweighs the sampler's tokens (Yao et al. 2025, truncated IS)
    weight, behaviour = behaviour_weight(batch, cfg)
    loss = -aggregate(surrogate if weight is None else surrogate * weight, batch, cfg)  # ()
    return loss, {"policy/loss": loss.item(), **_ratio_metrics(token_log_ratio, ratio, batch, cfg), **behaviour}


def cispo_loss(log_prob: torch.Tensor, batch: Batch, cfg) -> tuple[torch.Tensor, dict]:
    """CISPO (MiniMax 2025, "MiniMax-M1", eq. 4): -E[sg(clip(ratio, 1 - low, 1 + high)) x A x
    log pi]. The importance weight is clipped and detached, not the update: a token whose ratio left
    the range still moves (PPO's clip zeroes its gradient), at a bounded weight."""
    token_log_ratio = log_prob - batch.log_prob                         # (B, T)
    ratio = RATIO_LEVELS[getattr(cfg, "ratio_level", "token")](token_log_ratio, batch.mask).exp()  # (B, T)
    low, high = clip_range(cfg)
    clipped = ratio.clamp(1.0 - low, 1.0 + high).detach()               # (B, T) sg(clip(ratio))
    per_token = clipped * batch.advantages * log_prob                   # (B, T)
    weight, behaviour = behaviour_weight(batch, cfg)
    loss = -aggregate(per_token if weight is None else per_token * weight, batch, cfg)  # ()
    return loss, {"policy/loss": loss.item(), **_ratio_metrics(token_log_ratio, ratio, batch, cfg), **behaviour}


PPO_SURROGATES: dict[str, Callable[[torch.Tensor, Batch, object], tuple[torch.Tensor, dict]]] = {
    "clip": ppo_clip_loss,
    "cispo": cispo_loss,
}
"""cfg.surrogate: what PPO's epochs of minibatches step on."""


def ppo_loss(log_prob: torch.Tensor, batch: Batch, cfg) -> tuple[torch.Tensor, dict]:
    """PPO's policy loss: the surrogate cfg.surrogate names."""
    return PPO_SURROGATES[getattr(cfg, "surrogate", "clip")](log_prob, batch, cfg)


def trpo_surrogate(log_prob: torch.Tensor, batch: Batch, cfg) -> torch.Tensor:
    """() TRPO's loss: -E[pi_theta / pi_old x w x A] (Schulman et al. 2015, eq. 14), w as in
    behaviour_weight."""
    ratio = torch.exp(log_prob - batch.log_prob)                        # (B, T)
    weight, _ = behaviour_weight(batch, cfg)
    per_token = ratio * batch.advantages                                # (B, T)
    return -batch_mean(per_token if weight is None else per_token * weight, batch)


POLICY_LOSSES: dict[str, Callable[[torch.Tensor, Batch, object], tuple[torch.Tensor, dict]]] = {
    "reinforce": reinforce_loss,
    "ppo": ppo_loss,
}


def value_loss(values: torch.Tensor, batch: Batch, clip_value_eps: Optional[float] = None, cfg=None
               ) -> torch.Tensor:
    """Mean squared error to the returns; with clip_value_eps, PPO's pessimistic clipped variant.
    Steps weigh batch.value_weight where the batch has one (multi-turn: the turn starts). Averaged
    per token, or with cfg as cfg.loss_agg says (a joint loss averages all its terms alike)."""
    error = (values - batch.returns) ** 2                               # (B, T)
    if clip_value_eps is not None:
        clipped = batch.values + (values - batch.values).clamp(-clip_value_eps, clip_value_eps)
        error = torch.max(error, (clipped - batch.returns) ** 2)        # (B, T)
    if batch.value_weight is not None:
        error = error * batch.value_weight                              # (B, T)
    return batch_mean(error, batch) if cfg is None else aggregate(error, batch, cfg)


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


def kl_loss(log_prob: torch.Tensor, batch: Batch, cfg) -> tuple[torch.Tensor, dict]:
    """batch.kl_coef * KL(policy || reference) as a loss term, when cfg.kl_in == 'loss'; 0 otherwise.

    Averaged per token like the policy loss beside it, so one nat of KL per completion weighs what
    it weighs as a reward penalty (kl_in=reward subtracts kl_coef * the completion's summed KL from
    its score, which the per-token policy loss spreads over its tokens): kl_coef is the price of a
    nat per completion in both modes. The gradient is that of the per-token KL (kl_loss_per_token);
    docs/language-models.md says how it differs from the sequence-level one. Another cfg.loss_agg averages it as
    it averages the policy loss (veRL aggregates its KL loss alike; TRL adds it per token before
    aggregating)."""
    if cfg.kl_in != "loss" or batch.ref_log_prob is None or batch.kl_coef == 0:
        return torch.zeros(()), {}
    per_token = kl_loss_per_token(log_prob, batch.log_prob, batch.ref_log_prob, cfg.kl_estimator)  # (B, T)
    kl = aggregate(per_token, batch, cfg)                               # ()
    return batch.kl_coef * kl, {"kl/loss_term": kl.item()}


def trpo_loss(log_prob: torch.Tensor, batch: Batch, cfg) -> tuple[torch.Tensor, dict]:
    """() the loss TRPO takes its natural-gradient step on: the surrogate plus the KL term (kl_in=
    loss), with the KL term's metrics. The KL term is built first: the order in which autograd
    meets the uses of log_prob is the order its gradients are summed in."""
    kl_term, metrics = kl_loss(log_prob, batch, cfg)                    # ()
    return trpo_surrogate(log_prob, batch, cfg) + kl_term, metrics


# --- REINFORCE's and PPO's joint loss ------------------------------------------------------------
@dataclass(frozen=True)
class JointLoss:
    """Where REINFORCE's and PPO's joint losses differ; joint_loss is the rest, shared:
    policy loss + KL term (kl_in=loss) - ent_coef x entropy + vf_coef x value loss."""
    policy: str
    """The policy loss, a key of POLICY_LOSSES."""
    clip_value: bool
    """PPO: the value loss is clipped at cfg.clip_value_eps around the batch's values (the
    pessimistic max of value_loss); REINFORCE regresses its baseline unclipped."""
    baseline_switch: bool
    """REINFORCE: the value loss joins only with cfg.value_baseline (its critic is a baseline the
    user may switch off); PPO trains its critic whenever the policy has one."""
    entropy_always: bool
    """REINFORCE: -ent_coef x entropy is in the sum even at ent_coef = 0 (a non-finite entropy then
    makes the loss non-finite), before the value loss; PPO adds it only when ent_coef != 0, after
    the value loss. The order of a float sum sets its last bits: each keeps its own."""


def joint_loss(log_prob: torch.Tensor, entropy: torch.Tensor, values: Optional[torch.Tensor], batch: Batch,
               cfg, options: JointLoss, measure_sampler: bool) -> tuple[torch.Tensor, dict]:
    """() one minibatch's loss from the policy's (B, T) log_prob, entropy and values (None without
    a critic), with its metrics. measure_sampler: the parameters are still those that sampled
    (sampler_mismatch is only meaningful there)."""
    loss, metrics = POLICY_LOSSES[options.policy](log_prob, batch, cfg)  # ()
    if measure_sampler:
        metrics.update(sampler_mismatch(log_prob, batch))
    kl_term, kl_metrics = kl_loss(log_prob, batch, cfg)                 # ()
    entropy_mean = aggregate(entropy, batch, cfg)                       # ()
    total = loss + kl_term                                              # ()
    if options.entropy_always:
        total = total - cfg.ent_coef * entropy_mean
    if values is not None and cfg.advantage != "sequence" and (cfg.value_baseline or not options.baseline_switch):
        v_loss = value_loss(values, batch, cfg.clip_value_eps if options.clip_value else None, cfg)  # ()
        total = total + cfg.vf_coef * v_loss
        metrics["value/loss"] = v_loss.item()
    if not options.entropy_always and cfg.ent_coef:
        total = total - cfg.ent_coef * entropy_mean
    return total, {**metrics, **kl_metrics, "policy/entropy": entropy_mean.item()}


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
