"""The TRPO solver (Schulman et al. 2015, appendix C), on any list of parameters.

It sees only closures: `loss_fn()` -> the surrogate loss to minimise and `kl_fn()` -> the mean
KL(old || new), both evaluated at the parameters' current values (or, for the Gauss-Newton
Fisher-vector product, `Linearised` pieces: the policy's outputs and their Fisher). So the same
solver steps an MLP policy and a language model, replicated or sharded over workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TypeVar

import torch
from torch.autograd import forward_ad
from torch.nn.utils import parameters_to_vector


def conjugate_gradient(matvec: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iters: int = 10, tol: float = 1e-10, dot: Callable = torch.dot
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve A x = b for symmetric positive-definite A given only x -> A x; returns x and A x.

    A x comes free as b - r (the residual CG keeps), which saves TRPO one Fisher-vector product:
    on a language model each costs as much as a backward pass. dot: the inner product (over
    workers that each hold a shard of the vectors, the sum of theirs)."""
    x = torch.zeros_like(b)                                             # (P,)
    r = b.clone()                                                       # (P,) residual b - A x
    p = b.clone()                                                       # (P,) search direction
    r_dot = dot(r, r)
    for _ in range(iters):
        if r_dot <= tol:
            break
        Ap = matvec(p)                                                  # (P,)
        alpha = r_dot / dot(p, Ap)
        x += alpha * p
        r -= alpha * Ap
        new_r_dot = dot(r, r)
        p = r + (new_r_dot / r_dot) * p
        r_dot = new_r_dot
    return x, b - r


def flat_grad(output: torch.Tensor, params: Sequence[torch.Tensor], **kwargs) -> torch.Tensor:
    grads = torch.autograd.grad(output, params, allow_unused=True, **kwargs)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params)])                  # (P,)


def fisher_vector_product(kl_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor],
                          damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (H + damping I) v, H the Hessian of the mean KL at new = old, which is the Fisher
    information matrix. One graph of the KL gradient is built and reused for every product."""
    kl_grad = flat_grad(kl_fn(), params, create_graph=True)             # (P,)

    def product(v: torch.Tensor) -> torch.Tensor:
        hv = flat_grad(kl_grad @ v, params, retain_graph=True)          # (P,)
        return hv + damping * v

    return product


T = TypeVar("T")

WeightedFn = tuple[float, Callable[[], torch.Tensor]]
"""A piece of a loss or KL (one micro-batch) and its weight, its share of the batch's valid steps."""

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over data-parallel workers that each hold part of the batch (the identity in one
process): every sum the solver takes over the batch goes through it, so all workers compute the
same direction, step and line-search decision."""


def _alone(x: torch.Tensor) -> torch.Tensor:
    return x


def accumulated_fisher_vector_product(kl_pieces: Sequence[WeightedFn], params: Sequence[torch.Tensor],
                                      damping: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """As fisher_vector_product for a KL that is the weighted sum of pieces (micro-batches), with only
    one piece's graph alive at a time: each product rebuilds each piece's KL gradient, so memory is
    one micro-batch's while every product costs a forward and a double backward more. One piece
    takes the plain path (its graph built once)."""
    if len(kl_pieces) == 1:
        weight, kl_fn = kl_pieces[0]
        return fisher_vector_product(lambda: weight * kl_fn(), params, damping)

    def product(v: torch.Tensor) -> torch.Tensor:
        out = damping * v                                               # (P,)
        for weight, kl_fn in kl_pieces:
            kl_grad = flat_grad(weight * kl_fn(), params, create_graph=True)  # (P,)
            out = out + flat_grad(kl_grad @ v, params)                  # (P,)
        return out

    return product


# --- the Gauss-Newton product: no double backward ------------------------------------------------
# At new = old the KL's gradient in the distribution's parameters z (logits; a Gaussian's mean and
# log-std) is 0, so its Hessian in theta is exactly J^T H J: J the Jacobian dz/dtheta, H the KL's
# Hessian in z, the Fisher of the output distribution (Martens 2020, "New insights and perspectives
# on the natural gradient method", sec. 9). J v is one forward-mode pass, J^T (H J v) one ordinary
# backward: first derivatives only, which is what FSDP's gradient hooks and fused kernels support.
Linearised = Callable[[list[torch.Tensor]], tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]
"""tangents (one per parameter, v cut to their shapes) -> the outputs z with autograd's graph, and
H J v beside each (detached): a policy's `fisher_outputs` on one micro-batch."""


def categorical_fisher_product(logits: torch.Tensor, tangent: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """H t for the weighted sum of KL(old || softmax(logits)) over rows, at logits = old: per row
    (diag(p) - p p^T) t, times the row's weight. logits, tangent (..., K); weights (...)."""
    p = torch.softmax(logits, dim=-1)                                   # (..., K)
    pt = p * tangent                                                    # (..., K)
    return weights.unsqueeze(-1) * (pt - p * pt.sum(-1, keepdim=True))  # (..., K)


def gaussian_fisher_product(log_std: torch.Tensor, mean_tangent: torch.Tensor, log_std_tangent: torch.Tensor,
                            weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """H t for the weighted sum of KL(old || N(mean, exp(log_std)^2)) over rows, at new = old: the
    mean's Fisher is 1/sigma^2 and a (state-independent) log-std's 2 per dimension and row; the
    cross terms vanish. log_std (D,); mean_tangent (..., D); log_std_tangent (D,); weights (...)."""
    h_mean = weights.unsqueeze(-1) * mean_tangent * torch.exp(-2.0 * log_std)  # (..., D)
    return h_mean, 2.0 * weights.sum() * log_std_tangent               # (..., D), (D,)


def linearised(module: torch.nn.Module, params: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
               fn: Callable[[], T]) -> tuple[T, T]:
    """fn() (a tensor or tuple of tensors computed by `module`) and its derivative along `tangents`
    (one per parameter in params, all of them module's): one forward pass with each parameter a
    forward-mode dual number. The values keep autograd's graph for the backward that follows."""
    names = {id(p): name for name, p in module.named_parameters()}
    with forward_ad.dual_level():
        duals = {names[id(p)]: forward_ad.make_dual(p, t) for p, t in zip(params, tangents)}
        out = torch.func.functional_call(_Calls(module), {f"root.{k}": v for k, v in duals.items()}, (fn,))
        unpacked = [forward_ad.unpack_dual(o) for o in (out if isinstance(out, tuple) else (out,))]
    values, derivatives = tuple(u.primal for u in unpacked), tuple(u.tangent for u in unpacked)
    return (values, derivatives) if isinstance(out, tuple) else (values[0], derivatives[0])


class _Calls(torch.nn.Module):
    """A module whose forward calls fn(): functional_call swaps the root's parameters for the
    while of any computation, not only of the root's own forward."""

    def __init__(self, root: torch.nn.Module):
        super().__init__()
        self.root = root

    def forward(self, fn):
        return fn()


def split_like(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A flat vector (P,) cut into tensors of the parameters' shapes (views)."""
    sizes = [p.numel() for p in params]
    return [t.view_as(p) for t, p in zip(torch.split(flat, sizes), params)]


def gauss_newton_vector_product(pieces: Sequence[tuple[float, Linearised]], params: Sequence[torch.Tensor],
                                damping: float, grad: Callable = flat_grad, shapes: Optional[Sequence] = None
                                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """v -> (J^T H J + damping I) v, summed over weighted pieces (micro-batches): equal to
    accumulated_fisher_vector_product's Hessian of the KL at new = old (its naive twin,
    tests/test_gauss_newton.py), from one forward-mode pass and one backward per piece and product.
    grad and shapes: as Shards' (sharded parameters), else flat_grad and the parameters."""
    def product(v: torch.Tensor) -> torch.Tensor:
        tangents = split_like(v, params if shapes is None else shapes)
        out = damping * v                                               # (P,)
        for weight, piece in pieces:
            outputs, h_jv = piece(tangents)
            out = out + grad(outputs, params, grad_outputs=[weight * h for h in h_jv])  # (P,)
        return out

    return product


def accumulated_gradient(loss_pieces: Sequence[WeightedFn], params: Sequence[torch.Tensor],
                         reduce: Reduce = _alone, grad_of: Callable = flat_grad) -> tuple[torch.Tensor, torch.Tensor]:
    """The weighted sum of the pieces' losses (detached) and its flat gradient, one piece's graph
    at a time, summed over workers (one collective for both)."""
    total, grad = torch.zeros(()), torch.zeros(())
    for weight, loss_fn in loss_pieces:
        loss = weight * loss_fn()
        grad = grad + grad_of(loss, params)                             # (P,)
        total = total + loss.detach()
    if reduce is _alone:
        return total, grad
    both = reduce(torch.cat([grad.reshape(-1), total.reshape(1).to(grad)]))  # (P + 1,)
    return both[-1], both[:-1]


@torch.no_grad()
def set_flat(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy a flat vector into the parameters in place (their storage, and any views of it, stay)."""
    offset = 0
    for p in params:
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def line_search(params: Sequence[torch.Tensor], old_flat: torch.Tensor, full_step: torch.Tensor,
                loss_and_kl_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                old_loss: float, max_kl: float, steps: int, shrink: float, reduce: Reduce = _alone) -> dict:
    """Backtrack along full_step; accept the first step that lowers the loss and keeps
    KL <= max_kl. If none does, the parameters are restored to old_flat."""
    fraction = 1.0
    for i in range(steps):
        set_flat(params, old_flat + fraction * full_step)
        with torch.no_grad():
            loss, kl = reduce(torch.stack([x.reshape(()) for x in loss_and_kl_fn()])).tolist()
        if kl <= max_kl and loss < old_loss:
            return {"trpo/accepted": 1.0, "trpo/backtracks": float(i), "trpo/step_fraction": fraction,
                    "trpo/kl": kl, "trpo/improvement": old_loss - loss}
        fraction *= shrink
    set_flat(params, old_flat)
    return {"trpo/accepted": 0.0, "trpo/backtracks": float(steps), "trpo/step_fraction": 0.0,
            "trpo/kl": 0.0, "trpo/improvement": 0.0}


@dataclass(frozen=True)
class Shards:
    """Parameters split over data-parallel workers (FSDP): every vector the solver holds is this
    worker's shard of each parameter, and gradients arrive summed over workers (the sharding's own
    reduce-scatter in backward). So inner products and the loss and KL sum over workers (reduce),
    gradients and products do not."""
    grad: Callable
    """(outputs, params, grad_outputs=None) -> (P_local,): this worker's shard of the gradient."""
    local: list[torch.Tensor]
    """Each parameter's local shard, a view the line search writes into."""


def trpo_step(params: Sequence[torch.Tensor], loss_pieces: Sequence[WeightedFn],
              fvp_kl_pieces: Sequence[WeightedFn], loss_and_kl_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
              max_kl: float, damping: float = 0.1, cg_iters: int = 10, line_search_steps: int = 10,
              shrink: float = 0.8, reduce: Reduce = _alone,
              fisher_product: Callable = accumulated_fisher_vector_product, shards: Optional[Shards] = None) -> dict:
    """One natural-gradient step of params inside the trust region KL(old || new) <= max_kl.

    loss_pieces: the surrogate loss to minimise as weighted pieces (micro-batches; one piece for the
    whole batch). fvp_kl_pieces: the mean KL(old || new) whose Hessian gives the Fisher-vector
    products, likewise (e.g. on a sub-sample of the batch, which is cheaper and, per the TRPO paper,
    nearly as good). loss_and_kl_fn: the loss and KL on the whole batch for the line search, no
    gradient needed. reduce: the sum over data-parallel workers (see Reduce), where each holds
    part of the batch and the pieces' weights are shares of the global batch. fisher_product:
    FISHER_PRODUCTS' entry that turns fvp_kl_pieces into products (the exact one takes KL closures,
    the Gauss-Newton one Linearised pieces). shards: the parameters are split over the workers
    (see Shards; the Gauss-Newton product only).
    """
    params = list(params)
    dot = torch.dot if shards is None else (lambda a, b: reduce(a @ b))
    if shards is None:
        loss, grad = accumulated_gradient(loss_pieces, params, reduce)  # (), (P,)
    else:
        loss, grad = accumulated_gradient(loss_pieces, params, grad_of=shards.grad)  # (), (P_local,)
        loss = reduce(loss)
    # over shards, the global norm: every worker takes the same decisions
    grad_norm = grad.norm().item() if shards is None else math.sqrt(dot(grad, grad).item())
    finite = torch.isfinite(grad).all() if shards is None else math.isfinite(grad_norm)
    if not (torch.isfinite(loss) and finite):
        return {"trpo/accepted": 0.0, "trpo/backtracks": 0.0, "trpo/step_fraction": 0.0, "trpo/kl": 0.0,
                "trpo/improvement": 0.0, "trpo/grad_norm": float("nan"), "update/nonfinite": 1.0}
    if shards is not None:  # the products arrive summed over workers, each its shard
        fvp = fisher_product(fvp_kl_pieces, params, damping, grad=shards.grad, shapes=shards.local)
    elif reduce is _alone:
        fvp = fisher_product(fvp_kl_pieces, params, damping)
    else:  # each worker's product of its own pieces, summed over workers; damping once
        local = fisher_product(fvp_kl_pieces, params, 0.0)
        fvp = lambda v: reduce(local(v)) + damping * v                  # (P,)
    direction, f_direction = conjugate_gradient(fvp, -grad, iters=cg_iters, dot=dot)  # (P,) ~ -F^-1 g, F of it
    # Scale so that the quadratic model of the KL, 0.5 s^T F s, equals max_kl.
    quad = 0.5 * dot(direction, f_direction)
    if not torch.isfinite(quad) or quad <= 0:
        return {"trpo/accepted": 0.0, "trpo/backtracks": 0.0, "trpo/step_fraction": 0.0,
                "trpo/kl": 0.0, "trpo/improvement": 0.0, "trpo/grad_norm": grad_norm}
    full_step = direction * torch.sqrt(max_kl / quad)                   # (P,)
    moved = params if shards is None else shards.local
    old_flat = parameters_to_vector(moved).detach()                     # (P,)
    metrics = line_search(moved, old_flat, full_step, loss_and_kl_fn, loss.item(), max_kl,
                          line_search_steps, shrink, reduce)
    metrics["trpo/grad_norm"] = grad_norm
    return metrics


FISHER_PRODUCTS: dict[str, Callable] = {"exact": accumulated_fisher_vector_product,
                                        "gauss_newton": gauss_newton_vector_product}
"""cfg.fvp -> (pieces, params, damping) -> v -> (F + damping I) v."""
