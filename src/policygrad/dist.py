"""Training over several processes: the one module that touches torch.distributed.

A run launched by `torchrun --nproc-per-node N -m policygrad train ...` (or `policygrad train
--nproc N`, which starts the same processes on this machine) joins torchrun's process group here:
gloo on the CPU, gloo and NCCL together on CUDA (NCCL sums the gradients, gloo the small CPU
statistics). A plain process is rank 0 of 1 and every function below is then the identity or a
no-op, so the single-process arithmetic is untouched.

Data parallelism is exact, not approximate: each rank holds an equal block of the global batch;
a loss is the mean over the *global* batch's valid steps, so the ranks' gradients of their sums
over valid steps are added and divided by the global count, never averaged as per-rank means (two
ranks whose completions differ in length would otherwise weigh tokens differently). Every data-dependent
decision (PPO's early stop, a non-finite skip, stopping at a return, the best checkpoint) is taken
on numbers all ranks share, or through `agree`: a rank that decides alone leaves the others waiting
in a collective for ever.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as tdist

from .errors import RankExit


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    """This process's index on its machine (picks its GPU)."""
    local_world: int = 1
    """Processes on this machine (they share its cores)."""


_ranks = Ranks()


def launched() -> Ranks:
    """The ranks torchrun's environment variables describe (rank 0 of 1 without them)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    return Ranks(rank=int(env.get("RANK", "0")), world=world, local_rank=int(env.get("LOCAL_RANK", "0")),
                 local_world=int(env.get("LOCAL_WORLD_SIZE", str(world))))


def init(device_type: str = "cpu", timeout_s: float = 1800.0) -> Ranks:
    """Join the process group torchrun's environment describes; in a plain process, nothing.
    Idempotent: the CLI calls it before it touches the run folder, train() again."""
    global _ranks
    ranks = launched()
    if ranks.world > 1 and not tdist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(ranks.local_rank)
        tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    _ranks = ranks
    return ranks


def group_exists() -> bool:
    """A process group is up (ours, or one the caller's own script started)."""
    return tdist.is_available() and tdist.is_initialized()


def shutdown(together: bool = True) -> None:
    """Leave the process group. `together` waits for every rank first: a rank that tears gloo down
    while a peer still talks to it can abort that peer at exit ("terminate called without an active
    exception"); after an error the peers may never come, so it is skipped."""
    global _ranks
    if tdist.is_available() and tdist.is_initialized():
        if together:
            tdist.barrier()
        tdist.destroy_process_group()
    _ranks = Ranks()


def rank() -> int:
    return _ranks.rank


def world() -> int:
    return _ranks.world


def is_main() -> bool:
    return _ranks.rank == 0


def _active() -> bool:
    return _ranks.world > 1 and tdist.is_initialized()


def rank_seed(seed: int, rank_index: int) -> int:
    """Each rank's own seed stream (sampling, environments); rank 0's is the run's seed."""
    return seed + 10_007 * rank_index


def threads_per_rank(requested: Optional[int], one_thread: bool) -> int:
    """Torch threads for this process: `requested` if the config names it; else one for a control
    run (small MLPs run fastest on one), and for a language model this machine's cores shared out
    among its ranks: two processes with two threads each on two cores ran ~10x slower a step."""
    if requested is not None:
        return requested
    if one_thread:
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, _ranks.local_world))


# --- sums over ranks -----------------------------------------------------------------------------
_collective_s = 0.0


class PeerLost(RuntimeError):
    """A collective failed because another rank stopped (its own error says why)."""


PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out")
"""How gloo words a peer that is gone (as a plain RuntimeError)."""


def peer_lost(e: BaseException) -> bool:
    """Whether an error is another rank's absence (ours, or torch's own from inside a collective
    such as FSDP's gathers), not this rank's own fault."""
    return isinstance(e, (PeerLost, tdist.DistError)) or (
        isinstance(e, RuntimeError) and any(sign in str(e) for sign in PEER_SIGNS))


def _timed(fn):
    """Counts the seconds spent in a collective (waiting for the slowest rank included): the
    trainer logs them as time/collective_s. A rank that died mid-collective becomes PeerLost."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _collective_s
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except RuntimeError as e:
            if not _active() or isinstance(e, PeerLost) or not peer_lost(e):
                raise
            raise PeerLost(f"another process stopped or stalled while this one waited for it in "
                           f"{fn.__name__} ({e.__class__.__name__}); its own error is above") from None
        finally:
            _collective_s += time.perf_counter() - start
    return wrapper


def take_collective_s() -> float:
    """Seconds spent in collectives since the last call."""
    global _collective_s
    spent, _collective_s = _collective_s, 0.0
    return spent


@_timed
def total(x: torch.Tensor) -> torch.Tensor:
    """x summed over ranks (a new tensor; x itself in one process)."""
    if not _active():
        return x
    out = x.detach().clone()
    tdist.all_reduce(out)
    return out


@_timed
def sum_gradients(tensors: Sequence[torch.Tensor]) -> None:
    """Sum each tensor (a flat gradient buffer) over ranks, in place."""
    if _active():
        for t in tensors:
            tdist.all_reduce(t)


@_timed
def sum_floats(values: dict[str, float]) -> dict[str, float]:
    """Each value summed over ranks, in one collective (every rank must pass the same keys)."""
    if not _active() or not values:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    tdist.all_reduce(packed)
    return dict(zip(keys, packed.tolist()))


SMALL_GRADIENT = 1 << 20
"""Gradients of at most this many elements travel in one buffer with the step's statistics: a
collective's latency, not its bytes, is what a small network's step pays for (a control MLP)."""


@_timed
def sum_gradient_and_floats(grad: torch.Tensor, values: dict[str, float]) -> dict[str, float]:
    """sum_gradients([grad]) and sum_floats(values) in one collective where the gradient is small
    and on the CPU (copied into one float64 buffer: a sum of two float32 values rounds the same),
    in two otherwise."""
    if not _active():
        return dict(values)
    if grad.numel() > SMALL_GRADIENT or grad.device.type != "cpu":
        tdist.all_reduce(grad)
        return sum_floats.__wrapped__(values)  # timed once, here
    keys = sorted(values)
    packed = torch.cat([grad.reshape(-1).double(), torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)])
    tdist.all_reduce(packed)
    grad.copy_(packed[:grad.numel()].view_as(grad))
    return dict(zip(keys, packed[grad.numel():].tolist()))


@_timed
def agree(flag: bool) -> bool:
    """True on every rank when any rank's flag is True: how ranks take one decision together."""
    if not _active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


@_timed
def gather_rows(x: np.ndarray) -> np.ndarray:
    """Every rank's rows (N_r, ...) concatenated in rank order, on every rank: statistics then
    come out exactly as one process computes them from the whole batch."""
    if not _active():
        return x
    parts: list[Any] = [None] * _ranks.world
    tdist.all_gather_object(parts, np.asarray(x))
    return np.concatenate(parts)


@_timed
def gather_objects(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank (JSON-sized things: states, samples)."""
    if not _active():
        return [obj]
    parts: list[Any] = [None] * _ranks.world
    tdist.all_gather_object(parts, obj)
    return parts


@_timed
def gather_to_main(obj: Any) -> Optional[list[Any]]:
    """Every rank's obj, in rank order, on rank 0 alone (None on the others): what rank 0 writes.
    Tensors in obj must be on the CPU (they arrive as they were sent)."""
    if not _active():
        return [obj]
    parts: Optional[list[Any]] = [None] * _ranks.world if is_main() else None
    tdist.gather_object(obj, parts, dst=0)
    return parts


def on_main(fn):
    """fn() run by rank 0 alone (it touches the run folder), its result handed to every rank. An
    exception there is rank 0's to report: it raises it, the other ranks raise RankExit."""
    if not _active():
        return fn()
    outcome, error = ("ok", None), None
    if is_main():
        try:
            outcome = ("ok", fn())
        except Exception as e:  # handed on below, after the other ranks know
            outcome, error = ("error", None), e
    outcome = from_main(outcome)
    if outcome[0] == "error":
        if error is not None:
            raise error
        raise RankExit()
    return outcome[1]


    def __init__(self, message: str = "rank 0 stopped with an error, which it reports"):
        super().__init__(message)


@_timed
def from_main(obj: Any) -> Any:
    """Rank 0's obj on every rank."""
    if not _active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def share(total_count: int) -> tuple[int, int]:
    """This rank's block [start, stop) of `total_count` items split evenly (config checks that N
    divides it)."""
    size = total_count // _ranks.world
    return _ranks.rank * size, (_ranks.rank + 1) * size


# --- FSDP2: a language model's weights, gradients and optimiser state split over the ranks ------
class HiddenPasses(torch.nn.Module):
    """The root FSDP unit around a causal LM: it holds every weight, and its forward is the base
    model's (hidden states; the policy takes log-probabilities from the LM head in chunks)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **kwargs):
        return self.model.base_model(**kwargs)


def fsdp_shard(model: torch.nn.Module) -> HiddenPasses:
    """torch's fully_shard on each transformer block (the classes transformers names in
    `_no_split_modules`), then on the rest (embeddings, final norm, LM head) as the root unit;
    forward passes go through the returned root. Gradients are summed over ranks, not averaged
    (see the module docstring). The root stays gathered after a forward until the backward: the
    policy reads the LM head's weight after the forward."""
    from torch.distributed.fsdp import FSDPModule, fully_shard  # FSDP's modules: only sharded runs load them

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise RuntimeError(f"shard=fsdp: {type(model).__name__} names no transformer block class "
                           "(_no_split_modules) to shard")
    for block in blocks:
        fully_shard(block, reshard_after_forward=True)
        block._pg_reshard_after_forward = True
    root = HiddenPasses(model)
    fully_shard(root, reshard_after_forward=False)
    root._pg_reshard_after_forward = False
    for module in root.modules():
        if isinstance(module, FSDPModule):
            # gloo has no pre-multiplied sum: force a plain sum, divided by 1
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # FSDP makes the first unit that runs a forward the root; sampling calls the blocks through the
    # model's own forward, so one token goes through the root first (every rank: a collective)
    device = next(model.parameters()).device
    with torch.no_grad():
        root(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device), use_cache=False)
    root.reshard()  # the model's parameters are the sharded ones again (what an optimiser must hold)
    return root


def _fsdp_modules(models: Sequence[torch.nn.Module]) -> list:
    from torch.distributed.fsdp import FSDPModule  # FSDP's modules: only sharded runs load them
    return [m for model in models for m in model.modules() if isinstance(m, FSDPModule)]


class gathered:
    """Within it, sharded models hold their whole weights and forward passes run no collectives:
    each rank may then generate as many tokens (as many forward passes) as its own sequences need.
    Entering and leaving are collectives (every rank, in the same order); outside FSDP a no-op."""

    def __init__(self, *models: Optional[torch.nn.Module]):
        self.modules = _fsdp_modules([m for m in models if m is not None])

    def __enter__(self):
        for m in self.modules:
            m.set_reshard_after_forward(False, recurse=False)
        for m in self.modules:
            m.unshard()
        return self

    def __exit__(self, *exc):
        for m in self.modules:
            m.reshard()
        for m in self.modules:
            m.set_reshard_after_forward(m._pg_reshard_after_forward, recurse=False)
        return False


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor  # FSDP's modules: only sharded runs load them
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (a DTensor), or t itself."""
    return t.to_local() if is_sharded(t) else t


def whole(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A tensor shaped as this rank's shard of a sharded parameter, gathered whole from every
    rank's shard (a collective); t itself for a parameter that is not sharded."""
    return shaped_like(t, param).full_tensor() if is_sharded(param) else t


def shard_gradient(outputs, params: Sequence[torch.Tensor], grad_outputs=None) -> torch.Tensor:
    """(P_local,) this rank's shards of the gradient of outputs in the parameters, summed over the
    ranks: by backward, whose reduce-scatter fully_shard hooks in (autograd.grad cannot reach a
    sharded parameter: the forward ran on gathered copies). The parameters' .grad is left empty."""
    for p in params:
        p.grad = None
    torch.autograd.backward(outputs, grad_tensors=grad_outputs)
    flat = torch.cat([(torch.zeros_like(local(p).detach()) if p.grad is None else local(p.grad)).reshape(-1)
                      for p in params])
    for p in params:
        p.grad = None
    return flat


def shaped_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A rank's shard of an optimiser moment, made the sharded tensor its parameter is again."""
    if not is_sharded(param) or t.dim() == 0:
        return t
    from torch.distributed.tensor import DTensor  # FSDP's modules: only sharded runs load them
    return DTensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded weights on rank 0's CPU ({} on the others); a collective."""
    # FSDP's modules: only sharded runs load them
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class ShardedParameters:
    """Parameters fully_shard splits over the ranks, as algos.py steps them (the twin of
    flat.FlatParameters): FSDP's reduce-scatter has already summed each gradient shard over the
    ranks, so the norm for clipping sums the shards' squares over the ranks."""
    lockstep = True
    """Every rank must run the same number of forward and backward passes (each gathers weights)."""

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad]
        plain = [tuple(p.shape) for p in self.params if not is_sharded(p)]
        if plain:  # taken while a unit was gathered: those tensors are replaced at the next reshard
            raise RuntimeError(f"parameters of shapes {plain[:3]} are not sharded; build the optimiser while "
                               "the model is sharded (outside dist.gathered, after a backward)")

    @property
    def optimizer_params(self) -> list:
        return self.params

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def sum_over_ranks(self, values: Optional[dict[str, float]] = None) -> Optional[dict[str, float]]:
        """The reduce-scatter has summed the gradients; values (statistics), if given, are summed."""
        return None if values is None else sum_floats(values)

    def norm(self) -> torch.Tensor:
        """The whole gradient's norm: each shard's squared norm (float64), summed over ranks."""
        squares = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is not None:
                squares = squares + torch.linalg.vector_norm(local(p.grad), dtype=torch.float64) ** 2
        return total(squares).sqrt().float()

    def scale_grads(self, factor: torch.Tensor) -> None:
        for p in self.params:
            if p.grad is not None:
                local(p.grad).mul_(factor)


@_timed
def most(n: int) -> int:
    """The largest n over ranks."""
    if not _active():
        return n
    t = torch.tensor([n], dtype=torch.int64)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return int(t.item())
