"""REINFORCE, TRPO and PPO: each turns a batch with advantages into an update, built from the core.

Registered by name; each entry says which optimisers it needs and how it updates. The policy is
anything with the Policy protocol (evaluate, log_prob, value, rows, kl, snapshot_actor,
actor_parameters, critic_parameters), so the same code steps an MLP and a language model.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .batch import Batch
from .core.losses import POLICY_LOSSES, batch_mean, value_loss
from .core.trpo import trpo_step
from .flat import FlatParameters


@dataclass
class Optimizers:
    main: Optional[torch.optim.Optimizer]
    """Gradient optimiser of the policy (and of the critic where the losses are joint)."""
    main_params: Optional[FlatParameters] = None
    """The parameters `main` steps, in one flat buffer."""
    value: Optional[torch.optim.Optimizer] = None
    """TRPO's separate critic optimiser."""
    value_params: Optional[FlatParameters] = None

    def named(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in (("main", self.main), ("value", self.value)) if v is not None}


@dataclass
class Progress:
    """Where the run stands; schedules read `remaining` (1 at the start, 0 at the end)."""
    remaining: float
    generator: torch.Generator


class MetricMean:
    """Averages metric dicts over an update's minibatches."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.sums[k] += float(v)
            self.counts[k] += 1

    def result(self) -> dict[str, float]:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _set_lr(opt: Optional[torch.optim.Optimizer], lr: float) -> None:
    if opt is not None:
        for group in opt.param_groups:
            group["lr"] = lr


def _scheduled(value: float, schedule: str, progress: Progress) -> float:
    return value * progress.remaining if schedule == "linear" else value


def sync_gradients(params) -> None:
    """Average gradients over ranks when running under torchrun; a no-op in one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def _gradient_step(opt: torch.optim.Optimizer, flat: FlatParameters, loss: torch.Tensor,
                   max_grad_norm: float) -> float:
    flat.zero_grad()
    loss.backward()
    sync_gradients([flat.param])
    norm = flat.clip_grad_norm_(max_grad_norm)
    opt.step()
    return norm


# --- REINFORCE ---------------------------------------------------------------------------------
def reinforce_update(policy, opts: Optimizers, batch: Batch, cfg, progress: Progress) -> dict:
    """One gradient step on the score-function loss (plus the baseline's regression)."""
    _set_lr(opts.main, _scheduled(cfg.lr, cfg.lr_schedule, progress))
    log_prob, entropy, values = policy.evaluate(batch, entropy_grad=cfg.ent_coef != 0)
    loss, metrics = POLICY_LOSSES["reinforce"](log_prob, batch, cfg)
    entropy_mean = batch_mean(entropy, batch)
    total = loss - cfg.ent_coef * entropy_mean
    if cfg.value_baseline and values is not None:
        v_loss = value_loss(values, batch)
        total = total + cfg.vf_coef * v_loss
        metrics["value/loss"] = v_loss.item()
    metrics["policy/grad_norm"] = _gradient_step(opts.main, opts.main_params, total, cfg.max_grad_norm)
    metrics["policy/entropy"] = entropy_mean.item()
    return metrics


# --- PPO ---------------------------------------------------------------------------------------
def ppo_update(policy, opts: Optimizers, batch: Batch, cfg, progress: Progress) -> dict:
    """Epochs x shuffled minibatches of the clipped surrogate, value loss and entropy bonus."""
    _set_lr(opts.main, _scheduled(cfg.lr, cfg.lr_schedule, progress))
    step_cfg = dataclasses.replace(cfg, clip_eps=_scheduled(cfg.clip_eps, cfg.clip_schedule, progress))
    rows, mean = policy.rows(batch), MetricMean()
    stopped_early = 0.0
    for _ in range(cfg.n_epochs):
        for mb in rows.minibatches(cfg.batch_size, progress.generator):
            log_prob, entropy, values = policy.evaluate(mb, entropy_grad=cfg.ent_coef != 0)
            loss, metrics = POLICY_LOSSES["ppo"](log_prob, mb, step_cfg)
            entropy_mean = batch_mean(entropy, mb)
            v_loss = value_loss(values, mb, cfg.clip_value_eps)
            total = loss + cfg.vf_coef * v_loss
            if cfg.ent_coef:
                total = total - cfg.ent_coef * entropy_mean
            metrics.update({"value/loss": v_loss.item(), "policy/entropy": entropy_mean.item()})
            metrics["policy/grad_norm"] = _gradient_step(opts.main, opts.main_params, total,
                                                         cfg.max_grad_norm)
            mean.add(metrics)
            if cfg.target_kl is not None and metrics["policy/approx_kl"] > 1.5 * cfg.target_kl:
                stopped_early = 1.0
                break
        if stopped_early:
            break
    return {**mean.result(), "policy/early_stop": stopped_early, "policy/clip_eps": step_cfg.clip_eps}


# --- TRPO --------------------------------------------------------------------------------------
def trpo_update(policy, opts: Optimizers, batch: Batch, cfg, progress: Progress) -> dict:
    """A natural-gradient policy step in the trust region, then value regression with Adam."""
    old = policy.snapshot_actor(batch)

    def surrogate() -> torch.Tensor:
        ratio = torch.exp(policy.log_prob(batch) - batch.log_prob)      # (B, T)
        return -batch_mean(ratio * batch.advantages, batch)

    metrics = trpo_step(policy.actor_parameters(), surrogate, lambda: policy.kl(batch, old),
                        max_kl=cfg.max_kl, damping=cfg.cg_damping, cg_iters=cfg.cg_iters,
                        line_search_steps=cfg.line_search_steps, shrink=cfg.line_search_shrink)
    _set_lr(opts.value, _scheduled(cfg.value_lr, cfg.lr_schedule, progress))
    rows, mean = policy.rows(batch), MetricMean()
    for _ in range(cfg.value_epochs):
        for mb in rows.minibatches(cfg.batch_size, progress.generator):
            v_loss = value_loss(policy.value(mb.obs), mb)
            grad_norm = _gradient_step(opts.value, opts.value_params, v_loss, cfg.max_grad_norm)
            mean.add({"value/loss": v_loss.item(), "value/grad_norm": grad_norm})
    return {**metrics, **mean.result()}


@dataclass(frozen=True)
class Algo:
    make_optimizers: Callable[[object, object], Optimizers]
    update: Callable[[object, Optimizers, Batch, object, Progress], dict]


def _joint_adam(policy, cfg) -> Optimizers:
    flat = FlatParameters(policy.parameters())
    return Optimizers(main=torch.optim.Adam([flat.param], lr=cfg.lr, eps=1e-5, fused=True), main_params=flat)


def _critic_adam(policy, cfg) -> Optimizers:
    flat = FlatParameters(policy.critic_parameters())
    return Optimizers(main=None, value=torch.optim.Adam([flat.param], lr=cfg.value_lr, fused=True),
                      value_params=flat)


ALGOS: dict[str, Algo] = {
    "reinforce": Algo(_joint_adam, reinforce_update),
    "ppo": Algo(_joint_adam, ppo_update),
    "trpo": Algo(_critic_adam, trpo_update),
}
