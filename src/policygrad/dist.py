"""Training over several processes: the one module that touches torch.distributed.

A run launched by `torchrun --nproc-per-node N -m policygrad train ...` (or `policygrad train
--nproc N`, which starts the same processes on this machine) joins torchrun's process group here:
gloo on the CPU, gloo and NCCL together on CUDA (NCCL sums the gradients, gloo the small CPU
statistics). A plain process is rank 0 of 1 and every function below is then the identity or a
no-op, so the single-process arithmetic is untouched.

Data parallelism is exact, not approximate: each rank holds an equal block of the global batch;
a loss is the mean over the *global* batch's valid steps, so each rank weights its rows by
(its valid steps / the global count) and the gradients are summed, never averaged (two ranks whose
completions differ in length would otherwise weigh tokens differently). Every data-dependent
decision (PPO's early stop, a non-finite skip, stopping at a return, the best checkpoint) is taken
on numbers all ranks share, or through `agree`: a rank that decides alone leaves the others waiting
in a collective for ever.
"""
from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as tdist


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


def shutdown() -> None:
    global _ranks
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _ranks = Ranks()


def ranks() -> Ranks:
    return _ranks


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


def threads_per_rank(requested: Optional[int], control: bool) -> int:
    """Torch threads for this process: `requested` if the config names it; else one for a control
    run (small MLPs run fastest on one), and for a language model this machine's cores shared out
    among its ranks: two processes with two threads each on two cores ran ~10x slower a step."""
    if requested is not None:
        return requested
    if control:
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
            if not _active() or isinstance(e, PeerLost):
                raise
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
            raise PeerLost(f"another process stopped during {fn.__name__} ({first}); its own error "
                           "is above") from None
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


# --- launching N processes on this machine ------------------------------------------------------
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a spawned rank (Linux): a SIGKILL of the launcher ends the rank too, as torchrun's do."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def spawn(argv: list[str], nproc: int) -> int:
    """Run `python -m policygrad ARGV` as N ranks on this machine with the environment torchrun
    gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), so a
    worker cannot tell the two launches apart. If one rank fails, the others are stopped and its
    exit code is returned; errors reach the user as the ranks wrote them (rank 0's one line)."""
    port = free_port()
    procs = []
    for r in range(nproc):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
               "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GROUP_RANK": "0", "ROLE_RANK": str(r)}
        procs.append(subprocess.Popen([sys.executable, "-m", "policygrad", *argv], env=env,
                                      preexec_fn=_die_with_parent))
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                break
            time.sleep(0.05)
    except KeyboardInterrupt:
        code = 130
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if code != 130 else signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code or next((p.returncode for p in procs if p.returncode), 0)
