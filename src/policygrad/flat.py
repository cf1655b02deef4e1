"""Parameters and gradients kept in one contiguous buffer each.

The optimiser, the gradient clip (and, once multi-process training exists, the all-reduce) then
touch one tensor instead of one per layer. With a 64x64 MLP actor-critic the per-tensor overhead
of zero_grad, clipping and fused Adam was about a fifth of a PPO minibatch step (938 -> 815 us,
profiled on CPU). It is the "contiguous gradient buffer" of Megatron and DeepSpeed;
tests/test_control.py checks it against torch.nn.utils.clip_grad_norm_ and separate parameters.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from . import dist


class FlatParameters:
    """Re-homes each parameter's data and .grad as views into one flat buffer.

    Autograd accumulates into an existing .grad in place, so after backward() the flat gradient
    holds every parameter's gradient; an optimiser stepping `self.param` updates every parameter.
    """

    def __init__(self, params: Iterable[nn.Parameter]):
        self.params = [p for p in params if p.requires_grad]
        ref = self.params[0]
        total = sum(p.numel() for p in self.params)
        self.param = nn.Parameter(torch.empty(total, dtype=ref.dtype, device=ref.device))
        self.param.grad = torch.zeros_like(self.param)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                self.param[offset:offset + n].copy_(p.reshape(-1))
                p.data = self.param.data[offset:offset + n].view_as(p)
                p.grad = self.param.grad[offset:offset + n].view_as(p)
                offset += n

    lockstep = False
    """Ranks may run different numbers of passes (nothing gathers weights inside a pass)."""

    @property
    def optimizer_params(self) -> list[nn.Parameter]:
        return [self.param]

    def zero_grad(self) -> None:
        self.param.grad.zero_()

    def sum_over_ranks(self, values: Optional[dict[str, float]] = None) -> Optional[dict[str, float]]:
        """Sum the gradient over ranks, and values (the step's statistics), if given, with it."""
        if values is None:
            dist.sum_gradients([self.param.grad])
            return None
        return dist.sum_gradient_and_floats(self.param.grad, values)

    def norm(self) -> torch.Tensor:
        return torch.linalg.vector_norm(self.param.grad)

    def scale_grads(self, factor: torch.Tensor) -> None:
        self.param.grad.mul_(factor)



def clip_grad_norm_(flats: list, max_norm: float) -> float:
    """Scale all gradients so that their joint norm is <= max_norm (no-op for max_norm <= 0), as
    torch.nn.utils.clip_grad_norm_ does; returns the norm before clipping. flats: FlatParameters,
    or dist.ShardedParameters (the same methods over a model fully_shard splits)."""
    norms = [f.norm() for f in flats]
    norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if max_norm > 0:
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for f in flats:
            f.scale_grads(scale)
    return norm.item()


def _adjacent(first: torch.Tensor, second: torch.Tensor) -> bool:
    return (first.is_contiguous() and second.is_contiguous()
            and first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
            and second.storage_offset() == first.storage_offset() + first.numel())


def keep_adam_moments_adjacent(opt: torch.optim.Optimizer) -> None:
    """Keep each parameter's two Adam moments side by side in one buffer.

    A checkpoint writes tensors adjacent in memory as one run straight from memory by direct I/O
    (tensorfile.py); two separate moments are two runs, of which only one can be aligned, and the
    other (half a gigabyte for the default model) is copied through a bounce buffer. Checked after
    every step, since Adam creates its state in its first step and a resume replaces it."""
    def rehome(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        for state in optimizer.state.values():
            avg, avg_sq = state.get("exp_avg"), state.get("exp_avg_sq")
            if avg is None or avg_sq is None or type(avg) is not torch.Tensor or _adjacent(avg, avg_sq):
                continue
            both = torch.stack([avg, avg_sq])  # (2, *param shape), a fresh contiguous buffer
            state["exp_avg"], state["exp_avg_sq"] = both[0], both[1]

    opt.register_step_post_hook(rehome)
