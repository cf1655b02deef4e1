"""REINFORCE, TRPO and PPO: each turns a batch with advantages into an update, built from the core.

Registered by name; each entry says which optimisers it needs and how it updates. The policy is
anything with the Policy protocol (evaluate, log_prob, values, rows, snapshot_actor, kl,
log_prob_and_kl, actor_parameters, critic_parameters, optimizer_groups), so the same code steps an
MLP (control/policy.py) and a language model (lm/policy.py).
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import dist
from .batch import Batch, DataTerm
from .core.losses import JointLoss, aggregation, joint_loss, sampler_mismatch, trpo_loss, value_loss
from .core.trpo import FISHER_PRODUCTS, Shards, trpo_step
from .flat import FlatParameters, clip_grad_norm_, keep_adam_moments_adjacent


@dataclass
class Optimizers:
    main: Optional[torch.optim.Optimizer]
    """Gradient optimiser of the policy (and of the critic where the losses are joint)."""
    main_params: list[FlatParameters] = field(default_factory=list)
    """The parameters `main` steps, one flat buffer per parameter group."""
    value: Optional[torch.optim.Optimizer] = None
    """TRPO's separate critic optimiser."""
    value_params: list[FlatParameters] = field(default_factory=list)
    scaler: Optional[torch.amp.GradScaler] = None
    """float16 runs' loss scale against gradient underflow (placement.py); None otherwise."""

    def named(self) -> dict[str, torch.optim.Optimizer]:
        return {k: v for k, v in (("main", self.main), ("value", self.value)) if v is not None}

    @property
    def sharded(self) -> bool:
        """Some of the state is split over the ranks (FSDP): each rank saves its own shard."""
        return any(isinstance(f, dist.ShardedParameters) for f in [*self.main_params, *self.value_params])


@dataclass
class Progress:
    """Where the run stands; schedules read `remaining` (1 at the start, 0 at the end)."""
    remaining: float
    generator: torch.Generator
    before_step: Callable[[], None] = lambda: None
    """Called before the parameters or optimiser state first change: the trainer waits there for
    a checkpoint still being written from them, so the write overlaps rollout and backward pass."""
    data: Optional[DataTerm] = None
    """The update's data loss (ptx_coef > 0), or None."""


class WeightedMetrics:
    """A weighted sum of metric dicts: each micro-batch's metrics weighted by its share of the
    global batch's valid steps, so that summed over ranks they are the whole batch's means."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, metrics: dict, weight: float) -> None:
        for k, v in metrics.items():
            self.sums[k] += weight * float(v)


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


def _set_lr(opt: Optional[torch.optim.Optimizer], progress: Progress, cfg, base: Optional[float] = None) -> None:
    """Anneal every parameter group's learning rate from its initial value (cfg.lr_schedule)."""
    if opt is None:
        return
    for group in opt.param_groups:
        initial = group.setdefault("initial_lr", group["lr"] if base is None else base)
        group["lr"] = _scheduled(initial, cfg.lr_schedule, progress)


def _scheduled(value: float, schedule: str, progress: Progress) -> float:
    return value * progress.remaining if schedule == "linear" else value


def _global_valid(batch: Batch) -> torch.Tensor:
    """() valid steps of the global batch: this rank's part and every other rank's (a stand-in
    part, all mask 0, counts nothing)."""
    return dist.total(batch.mask.sum()).clamp(min=1.0)


def _accumulate(flats: list[FlatParameters], batch: Batch, loss_fn: Callable[[Batch], tuple[torch.Tensor, dict]],
                cfg, scaler: Optional[torch.amp.GradScaler], data: Optional[DataTerm] = None
                ) -> tuple[dict, bool, float]:
    """Backward passes over micro-batches of cfg.micro_batch_size rows, gradients summed over
    ranks: the global batch's mean metrics, whether every rank's loss was finite, and the global
    batch's count of units (valid steps, or sequences).

    Each loss is a mean over the units cfg.loss_agg averages over (valid steps, or sequences). In
    one process each micro-batch's mean is weighted by its share of the batch's units. Over ranks,
    by its count of units (a sum over them), and the summed gradients and metrics are divided by the
    global count, which travels with the metrics."""
    micro_batches, weighted = batch.split_rows(cfg.micro_batch_size), WeightedMetrics()
    units = aggregation(cfg).count
    if any(flat.lockstep for flat in flats):  # sharded weights: every rank runs as many passes
        micro_batches += [batch.stand_in()] * (dist.most(len(micro_batches)) - len(micro_batches))
    alone = dist.world() == 1
    finite = True
    for micro in micro_batches:
        loss, metrics = loss_fn(micro)
        weight = units(micro) / units(batch).clamp(min=1.0) if alone else units(micro)
        if len(micro_batches) > 1 or not alone:
            loss = loss * weight
        finite = finite and bool(torch.isfinite(loss))
        (loss if scaler is None else scaler.scale(loss)).backward()
        weighted.add(metrics, float(weight))
    if data is not None:
        scale = 1.0 if alone else float(dist.total(units(batch)).clamp(min=1.0))
        finite = _data_backward(data, weighted, scale, scaler) and finite
    local = {**weighted.sums, "update/nonfinite": 0.0 if finite else 1.0}
    if alone:
        return local, finite, float(units(batch))
    # the gradients, and with the last one the metrics, the valid count and whether any rank's loss
    # was not finite (a control MLP's step: one collective in all)
    for flat in flats[:-1]:
        flat.sum_over_ranks()
    sums = flats[-1].sum_over_ranks({**local, "update/valid": float(units(batch))})
    counted, nonfinite = sums.pop("update/valid"), sums.pop("update/nonfinite")
    valid = max(counted, 1.0)
    for flat in flats:
        flat.scale_grads(1.0 / valid)
    return {**{k: v / valid for k, v in sums.items()}, "update/nonfinite": nonfinite}, nonfinite == 0.0, counted


def _data_backward(data: DataTerm, weighted: WeightedMetrics, scale: float,
                   scaler: Optional[torch.amp.GradScaler]) -> bool:
    """Backward passes of the data loss over its micro-batches; whether it was finite. Over ranks
    `scale` is the global count of units (valid steps, or sequences), which _accumulate divides
    every summed gradient and metric by."""
    finite = True
    for micro in data.micro_batches:
        nll = data.share(micro)                                           # ()
        finite = finite and bool(torch.isfinite(nll))
        loss = data.coef * scale * nll
        (loss if scaler is None else scaler.scale(loss)).backward()
        weighted.add({"ptx/loss": float(nll.detach())}, scale)
    return finite


def _gradient_step(opt: torch.optim.Optimizer, flats: list[FlatParameters], batch: Batch,
                   loss_fn: Callable[[Batch], tuple[torch.Tensor, dict]], cfg,
                   before_step: Callable[[], None], scaler: Optional[torch.amp.GradScaler] = None,
                   data: Optional[DataTerm] = None, allow_step: Callable[[dict], bool] = lambda m: True) -> dict:
    """One optimiser step on loss_fn over `batch` (this rank's part of the global batch): the step
    equals that of one pass over the whole global batch in one process (see _accumulate). With a
    (float16) scaler the backward passes run on the scaled loss and the gradients are unscaled
    before clipping.

    allow_step reads the batch's metrics at the parameters before the step (global ones over
    ranks, so every rank decides alike); False leaves parameters and optimiser state as they were
    and returns the metrics without a gradient norm. A batch without a valid unit (padding alone:
    lm/dynamic.py) and without a data loss takes no step and reports nothing: Adam would still move
    every weight on its momentum."""
    for flat in flats:
        flat.zero_grad()
    metrics, finite, counted = _accumulate(flats, batch, loss_fn, cfg, scaler, data)
    if counted == 0 and data is None:
        return {"update/nonfinite": 0.0}
    if not allow_step(metrics):
        return {**metrics, "update/nonfinite": 0.0 if finite else 1.0}
    if scaler is not None:
        scaler.unscale_(opt)
    metrics["policy/grad_norm"] = clip_grad_norm_(flats, cfg.max_grad_norm)
    if scaler is not None:
        # An overflowing float16 gradient is the scaler's to handle: it skips the step and lowers
        # the scale. Only a non-finite loss counts as a bad update.
        if finite:
            before_step()
            scaler.step(opt)
        scaler.update()
        metrics["update/loss_scale"] = scaler.get_scale()
        metrics["update/nonfinite"] = 0.0 if finite else 1.0
        return metrics
    # A non-finite loss or gradient would poison the weights and Adam's moments for good: skip the
    # step (the trainer counts it and stops after cfg.max_bad_updates in a row).
    finite = finite and math.isfinite(metrics["policy/grad_norm"])
    if finite:
        before_step()
        opt.step()
    metrics["update/nonfinite"] = 0.0 if finite else 1.0
    return metrics


def _joint_loss_fn(policy, cfg, options: JointLoss, measure_sampler: Callable[[], bool]
                   ) -> Callable[[Batch], tuple[torch.Tensor, dict]]:
    """A minibatch's joint loss (core.losses.joint_loss) at the policy's current parameters."""
    def loss_fn(mb: Batch) -> tuple[torch.Tensor, dict]:
        log_prob, entropy, values = policy.evaluate(mb, entropy_grad=cfg.ent_coef != 0)
        return joint_loss(log_prob, entropy, values, mb, cfg, options, measure_sampler())
    return loss_fn


# --- REINFORCE ---------------------------------------------------------------------------------
REINFORCE_LOSS = JointLoss("reinforce", clip_value=False, baseline_switch=True, entropy_always=True)


def reinforce_update(policy, opts: Optimizers, batch: Batch, cfg, progress: Progress) -> dict:
    """One gradient step on the score-function loss (plus the baseline's regression)."""
    _set_lr(opts.main, progress, cfg)
    # one step: every pass is at the sampling weights, so each measures the sampler mismatch
    loss_fn = _joint_loss_fn(policy, cfg, REINFORCE_LOSS, lambda: True)
    return _gradient_step(opts.main, opts.main_params, batch, loss_fn, cfg, progress.before_step, opts.scaler,
                          progress.data)


# --- PPO ---------------------------------------------------------------------------------------
PPO_LOSS = JointLoss("ppo", clip_value=True, baseline_switch=False, entropy_always=False)


def ppo_update(policy, opts: Optimizers, batch: Batch, cfg, progress: Progress) -> dict:
    """Epochs x shuffled minibatches of the clipped surrogate, value loss and entropy bonus."""
    _set_lr(opts.main, progress, cfg)
    # the clip range anneals as a whole: clip_eps, and clip_low / clip_high where they are set
    step_cfg = dataclasses.replace(cfg, **{key: _scheduled(getattr(cfg, key), cfg.clip_schedule, progress)
                                           for key in ("clip_eps", "clip_low", "clip_high")
                                           if getattr(cfg, key) is not None})
    stepped = [False]  # the sampler mismatch is measured before the first step, at the sampling weights
    loss_fn = _joint_loss_fn(policy, step_cfg, PPO_LOSS, lambda: not stepped[0])

    def within_kl(metrics: dict) -> bool:
        # SB3's order: the minibatch whose KL (at the parameters before its step) crosses the limit
        # takes no step; its losses are still the update's metrics
        return cfg.target_kl is None or not metrics.get("policy/approx_kl", 0.0) > 1.5 * cfg.target_kl

    rows, mean = policy.rows(batch), MetricMean()
    stopped_early, nonfinite = 0.0, 0.0
    for _ in range(cfg.n_epochs):
        for mb in rows.minibatches(cfg.batch_size, progress.generator, dist.rank(), dist.world()):
            metrics = _gradient_step(opts.main, opts.main_params, mb, loss_fn, cfg, progress.before_step,
                                     opts.scaler, progress.data, allow_step=within_kl)
            stepped[0] = True
            nonfinite += metrics.pop("update/nonfinite")
            mean.add(metrics)
            if not within_kl(metrics):
                stopped_early = 1.0
                break
        if stopped_early:
            break
    # skipped steps are counted, not averaged: one in many minibatches still makes a bad update
    return {**mean.result(), "update/nonfinite": nonfinite, "policy/early_stop": stopped_early,
            "policy/clip_eps": step_cfg.clip_eps}


# --- TRPO ---------------------------------------------------------------------------------------
def _weighted(batch: Batch, size: int, lockstep: bool = False) -> list[tuple[float, Batch]]:
    """Micro-batches of `size` rows, each with its share of the global batch's valid steps as its
    weight: the weighted sum of a mean over each micro-batch's valid steps, summed over ranks, is
    the whole batch's mean. lockstep (sharded weights, whose every pass gathers them from all
    ranks): as many on every rank, stand-ins that weigh nothing making up a short rank's count."""
    global_valid = _global_valid(batch) if dist.world() > 1 else batch.n_valid
    micros = [(float(m.mask.sum() / global_valid), m) for m in batch.split_rows(size)]
    if lockstep:
        micros += [(0.0, batch.stand_in())] * (dist.most(len(micros)) - len(micros))
    return micros


def _fvp_rows(policy, batch: Batch, cfg, generator: torch.Generator) -> Batch:
    """The rows the Fisher-vector products see: a random cfg.fvp_fraction of the policy's rows
    (completions of a language model, transitions of a control rollout), or the whole batch. The
    draw is over the global batch (every rank draws the same), each rank keeping its own rows."""
    if cfg.fvp_fraction >= 1.0:
        return batch
    rows = policy.rows(batch)
    n_rows = rows.shape[0] * dist.world()
    n_sub = max(1, round(cfg.fvp_fraction * n_rows))
    chosen = torch.randperm(n_rows, generator=generator)[:n_sub]
    return rows.select_rows(chosen) if dist.world() == 1 else rows.local_part(chosen, dist.rank())


def _fisher_pieces(policy, cfg, micros: list[tuple[float, Batch]], olds: list) -> list:
    """What the Fisher-vector products are built from, per weighted micro-batch: the KL to the
    snapshot (fvp=exact: its Hessian, by double backward) or the policy's outputs and their Fisher
    (fvp=gauss_newton, core.trpo.Linearised: the snapshot is not needed, the KL's Hessian at
    new = old being the Fisher at the current parameters)."""
    if cfg.fvp == "gauss_newton":
        return [(w, lambda tangents, m=m: policy.fisher_outputs(m, tangents)) for w, m in micros]
    return [(w, lambda m=m, old=old: policy.kl(m, old)) for (w, m), old in zip(micros, olds)]


def trpo_update(policy, opts: Optimizers, batch: Batch, cfg, progress: Progress) -> dict:
    """A natural-gradient policy step in the trust region, then value regression with Adam.

    The gradient and the Fisher-vector products accumulate over micro-batches of
    cfg.micro_batch_size rows; the products (cfg.fvp: exact or Gauss-Newton) use cfg.fvp_fraction
    of the rows; the line search checks the KL bound on the whole batch. With sharded weights
    (FSDP, Gauss-Newton only) every rank makes as many passes, and the solver works on shards."""
    params = policy.actor_parameters()
    sharded = getattr(policy, "sharded", False)
    micros = _weighted(batch, cfg.micro_batch_size, sharded)
    olds = [policy.snapshot_actor(m) for _, m in micros]
    fvp_batch = _fvp_rows(policy, batch, cfg, progress.generator)
    if fvp_batch is batch:  # the products see the whole batch: its snapshots serve them too
        fvp_micros, fvp_olds = micros, olds
    else:
        fvp_micros = _weighted(fvp_batch, cfg.micro_batch_size, sharded)
        fvp_olds = [policy.snapshot_actor(m) for _, m in fvp_micros] if cfg.fvp == "exact" else []

    kl_metrics = WeightedMetrics()  # of the gradient's pass, at the parameters before the step

    def surrogate_of(log_prob: torch.Tensor, b: Batch, weight: Optional[float] = None) -> torch.Tensor:
        loss, metrics = trpo_loss(log_prob, b, cfg)
        if weight is not None:  # the gradient's pass, at the sampling weights
            kl_metrics.add({**metrics, **sampler_mismatch(log_prob, b)}, weight)
        return loss

    loss_pieces = [(w, lambda m=m, w=w: surrogate_of(policy.log_prob(m), m, weight=w)) for w, m in micros]
    kl_pieces = _fisher_pieces(policy, cfg, fvp_micros, fvp_olds)
    data = progress.data
    data_micros = [] if data is None else data.micro_batches
    if data is not None:  # J_data joins the surrogate: weight 1, each piece already a share of the mean

        def data_piece(m: Batch) -> torch.Tensor:
            nll = data.share(m)
            kl_metrics.add({"ptx/loss": float(nll.detach())}, 1.0)
            return data.coef * nll
        loss_pieces += [(1.0, lambda m=m: data_piece(m)) for m in data_micros]

    @torch.no_grad()
    def loss_and_kl() -> tuple[torch.Tensor, torch.Tensor]:
        loss, kl = torch.zeros(()), torch.zeros(())
        for (w, m), old in zip(micros, olds):
            log_prob, kl_m = policy.log_prob_and_kl(m, old)              # one forward pass
            loss, kl = loss + w * surrogate_of(log_prob, m), kl + w * kl_m
        for m in data_micros:
            loss = loss + data.coef * data.share(m)
        return loss, kl

    progress.before_step()  # the line search below moves the parameters
    # sharded weights (FSDP): the solver holds each rank's shards, gradients come from backward
    shards = Shards(dist.shard_gradient, [dist.local(p).detach() for p in params]) if sharded else None
    metrics = trpo_step(params, loss_pieces, kl_pieces, loss_and_kl, max_kl=cfg.max_kl,
                        damping=cfg.cg_damping, cg_iters=cfg.cg_iters, line_search_steps=cfg.line_search_steps,
                        shrink=cfg.line_search_shrink, fisher_product=FISHER_PRODUCTS[cfg.fvp], shards=shards,
                        **({"reduce": dist.total} if dist.world() > 1 else {}))
    metrics.update(dist.sum_floats(kl_metrics.sums))
    if opts.value is None:  # critic-free (a sequence baseline)
        return metrics
    _set_lr(opts.value, progress, cfg, base=cfg.value_lr)
    rows, mean = policy.rows(batch), MetricMean()
    value_fn = lambda mb: (lambda v: (v, {"value/loss": v.item()}))(value_loss(policy.values(mb), mb))
    nonfinite = metrics.pop("update/nonfinite", 0.0)  # the policy step's, then each value step's
    for _ in range(cfg.value_epochs):
        for mb in rows.minibatches(cfg.batch_size, progress.generator, dist.rank(), dist.world()):
            step_metrics = _gradient_step(opts.value, opts.value_params, mb, value_fn, cfg, progress.before_step)
            nonfinite += step_metrics.pop("update/nonfinite")
            mean.add(step_metrics)
    value_metrics = {k.replace("policy/grad_norm", "value/grad_norm"): v for k, v in mean.result().items()}
    return {**metrics, **value_metrics, "update/nonfinite": nonfinite}


@dataclass(frozen=True)
class Algo:
    make_optimizers: Callable[[object, object], Optimizers]
    update: Callable[[object, Optimizers, Batch, object, Progress], dict]
    double_backward: bool = False
    """Differentiates through a gradient (TRPO's Fisher-vector products; or forward mode, with
    fvp=gauss_newton): the policy must use ops that support it."""


def _adam(groups: list[tuple[list, float]]) -> tuple[torch.optim.Optimizer, list[FlatParameters]]:
    """Adam over parameter groups, each in one flat buffer, or (weights fully_shard splits over the
    ranks) as FSDP's sharded parameters in a group of their own."""
    flats = [dist.ShardedParameters(params) if any(dist.is_sharded(p) for p in params) else FlatParameters(params)
             for params, _ in groups]
    opt = torch.optim.Adam([{"params": f.optimizer_params, "lr": lr} for f, (_, lr) in zip(flats, groups)],
                           eps=1e-5, fused=True)
    keep_adam_moments_adjacent(opt)
    return opt, flats


def _loss_scaler(policy) -> Optional[torch.amp.GradScaler]:
    placement = getattr(policy, "placement", None)
    if placement is None or not placement.needs_loss_scale:
        return None
    return torch.amp.GradScaler(placement.device.type)


def _joint_adam(policy, cfg) -> Optimizers:
    opt, flats = _adam(policy.optimizer_groups(cfg))
    return Optimizers(main=opt, main_params=flats, scaler=_loss_scaler(policy))


def _critic_adam(policy, cfg) -> Optimizers:
    critic = policy.critic_parameters()
    if not critic or cfg.advantage == "sequence":
        return Optimizers(main=None)
    opt, flats = _adam([(critic, cfg.value_lr)])
    return Optimizers(main=None, value=opt, value_params=flats)


ALGOS: dict[str, Algo] = {
    "reinforce": Algo(_joint_adam, reinforce_update),
    "ppo": Algo(_joint_adam, ppo_update),
    "trpo": Algo(_critic_adam, trpo_update, double_backward=True),
}
