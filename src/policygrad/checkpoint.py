"""Checkpoints: safetensors for tensors, JSON for everything else; no pickle anywhere.

Layout: OUT/checkpoints/update-000042/{model.safetensors, optimizer.safetensors, state.json} and
OUT/checkpoints/latest naming the newest whole one. Each checkpoint is written into a temporary
folder and renamed into place, and `latest` is replaced atomically after it, so a kill at any instant
leaves the previous checkpoint whole. A pruned checkpoint is kept as OUT/checkpoints/.spare and the
next one is written over it, in place. Tensor files are written by tensorfile.write_safetensors,
straight from the live tensors.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import dist
from .errors import CheckpointError
from .tensorfile import write_safetensors


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest. The tensors
    are the live state, not copies (see CheckpointWriter); of state sharded over ranks (FSDP), this
    rank's shard."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = dist.local(value).detach()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    # cloned: load_file maps the file copy-on-write, and load_state_dict keeps such tensors as the
    # state, so pages not yet written by a step would follow the file when a later checkpoint
    # overwrites it in place (a pruned checkpoint becomes the spare)
    tensors = {k: v.clone() for k, v in tensors.items()}
    params = [p for group in opt.param_groups for p in group["params"]]  # state_dict's numbering
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        idx, name = key.split(".", 1)
        if torch.is_tensor(value):  # a rank's shard becomes the sharded tensor its parameter is
            value = dist.shaped_like(value, params[int(idx)])
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


SPARE = ".spare"


def _recycle_into(root: Path, tmp: Path) -> None:
    """Make `tmp` the folder to write a checkpoint into: the spare (a pruned checkpoint) or a
    folder a killed run left half-written, renamed, so big files are overwritten in place; else
    a new folder. Nothing `latest` points at is touched."""
    leftovers = [p for p in [root / SPARE, *sorted(root.glob(".tmp-*"))] if p.is_dir()]
    for extra in leftovers[1:]:
        shutil.rmtree(extra, ignore_errors=True)
    if leftovers and leftovers[0] != tmp:
        os.rename(leftovers[0], tmp)
    tmp.mkdir(exist_ok=True)


def on_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors on an accelerator are copied to the CPU now (the write reads host memory; the copy
    also frees the caller to change them); CPU tensors pass by reference."""
    return {k: t if t.device.type == "cpu" else t.detach().to("cpu") for k, t in tensors.items()}


class CheckpointWriter:
    """Writes checkpoints on a background thread, so the disk work overlaps the next rollout.

    Large tensors (weights, optimiser moments) are handed over by reference, not copied: the caller
    must not change them until wait() returns. The trainer waits before each update, the only phase
    that changes weights and optimiser state; tensors that change while collecting (control
    normalisers) come cloned from the workload. background=False writes before save() returns."""

    def __init__(self, background: bool = True):
        self.background = background
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._written: Optional[Path] = None
        self._waited_s = 0.0

    def save(self, out_dir: Path, name: str, files: dict[str, dict[str, torch.Tensor]], state: dict,
             write_small: Optional[Callable[[Path], None]] = None, keep: int = 2,
             protect: Optional[str] = None) -> None:
        """Checkpoint `name`: `files` maps relative paths to the tensors each safetensors file holds;
        state.json gets `state`; write_small(folder) adds small files now (configs, tokenizer). Then
        the folder is renamed into place, `latest` points at it and all but the newest `keep` and
        `protect` (the best) go."""
        self.wait()
        files = {rel: on_cpu(tensors) for rel, tensors in files.items()}
        root = out_dir / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{name}"
        _recycle_into(root, tmp)
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if write_small is not None:
            write_small(tmp)
        job = lambda: self._finish(root, tmp, name, files, keep, protect)
        if not self.background:
            job()
            return
        self._thread = threading.Thread(target=self._guarded, args=(job,), name="checkpoint-writer")
        self._thread.start()

    def _guarded(self, job: Callable[[], None]) -> None:
        try:
            # what CPU the write needs (bounce-buffer copies, or the kernel's copy into the page
            # cache where direct I/O is refused) runs in this thread: let training go first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (AttributeError, OSError):  # not Linux, or not allowed
            pass
        try:
            job()
        except BaseException as e:  # handed to the training thread at its next wait()
            self._error = e

    def _finish(self, root: Path, tmp: Path, name: str, files: dict[str, dict[str, torch.Tensor]],
                keep: int, protect: Optional[str]) -> None:
        for rel, tensors in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(tmp / rel, tensors, {"format": "pt"})
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        write_text_atomic(root / "latest", name)
        # names sort by update (zero-padded); only after `latest` moved on may an old one go:
        # the first becomes the spare the next checkpoint is written over, the rest are deleted
        for old in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:-keep]:
            if old.name == protect:
                continue
            if (root / SPARE).exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(old, root / SPARE)
        self._written = final

    def take_waited_s(self) -> float:
        """Seconds training was blocked on writes since the last call (a metric)."""
        waited, self._waited_s = self._waited_s, 0.0
        return waited

    def wait(self) -> Optional[Path]:
        """Block until the pending checkpoint is whole; the folder it was written to."""
        if self._thread is not None:
            start = time.perf_counter()
            self._thread.join()
            self._waited_s += time.perf_counter() - start
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointError(f"writing a checkpoint failed: {error.__class__.__name__}: {error}") from error
        return self._written


def save(out_dir: Path, name: str, tensors: dict[str, torch.Tensor],
         optimizers: dict[str, torch.optim.Optimizer], state: dict,
         extra_files: Optional[dict[str, dict[str, torch.Tensor]]] = None,
         write_small: Optional[Callable[[Path], None]] = None, keep: int = 2, protect: Optional[str] = None,
         writer: Optional[CheckpointWriter] = None, rank_shards: Optional[list[dict[str, torch.Tensor]]] = None
         ) -> None:
    """Checkpoint `name` of a run: model.safetensors (the policy's own tensors), optimizer.safetensors,
    state.json (state plus the optimisers' JSON-able parts) and extra_files (e.g. a language model's
    `policy/model.safetensors`). With a background `writer`, call writer.wait() before changing any
    of the tensors; without one, the checkpoint is whole when save returns. rank_shards: optimiser
    state sharded over ranks (FSDP): ranks 1.. 's shards, stored beside rank 0's as rank{r}/KEY."""
    opt_tensors, opt_rest = {}, {}
    for key, opt in optimizers.items():
        flat, rest = optimizer_to_flat(opt)
        opt_tensors.update({f"{key}.{k}": v for k, v in flat.items()})
        opt_rest[key] = rest
    for r, shard in enumerate(rank_shards or [], start=1):
        opt_tensors.update({f"rank{r}/{k}": v for k, v in shard.items()})
    files = {"model.safetensors": tensors, "optimizer.safetensors": opt_tensors, **(extra_files or {})}
    writer = writer or CheckpointWriter(background=False)
    writer.save(out_dir, name, files, {**state, "optimizers": opt_rest}, write_small, keep, protect)


def latest(out_dir: Path) -> Optional[Path]:
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(errors="replace").strip()
    if not name or "/" in name or name.startswith("."):
        raise CheckpointError(f"'{pointer}' does not name a checkpoint (it reads {name[:40]!r})")
    return out_dir / "checkpoints" / name


def named(out_dir: Path, which: str) -> Path:
    """A run's checkpoint by name: 'latest', 'best' (by validation result) or e.g. 'update-000040'."""
    if which == "latest":
        path = latest(out_dir)
    elif which == "best":
        path = None
        if latest(out_dir) is not None:
            best = load(latest(out_dir))[2].get("run", {}).get("best_checkpoint")
            path = out_dir / "checkpoints" / best if isinstance(best, str) else None
    else:
        path = out_dir / "checkpoints" / which
    if path is None or not path.is_dir():
        names = sorted(p.name for p in (out_dir / "checkpoints").glob("update-*")) if out_dir.is_dir() else []
        raise CheckpointError(f"run '{out_dir}' has no checkpoint '{which}'; it has: "
                              f"{', '.join(['latest', 'best', *names]) if names else 'none (train it first)'}")
    return path


def load_state(path: Path) -> dict:
    """A checkpoint's state.json alone (its config, counters and RNG states), without its tensors."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint '{path}' has no readable state.json ({e.__class__.__name__})") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint '{path}' has a state.json without a config")
    return state


def load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """(model tensors, optimizer tensors, state) of a checkpoint folder; CheckpointError if unreadable."""
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        if not (path / name).is_file():
            raise CheckpointError(f"checkpoint '{path}' is incomplete: {name} is missing")
    try:
        model = load_file(str(path / "model.safetensors"))
        opt = load_file(str(path / "optimizer.safetensors"))
        state = json.loads((path / "state.json").read_text())
    except (SafetensorError, json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint '{path}' is corrupt ({e.__class__.__name__}); "
                              "re-train or point at an earlier checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"checkpoint '{path}' has a state.json without a config")
    return model, opt, state


def cut_metrics(metrics_file: Path, last_update: int) -> int:
    """Keep the lines of metrics.jsonl up to update `last_update` (what the checkpoint saw), drop the
    rest and any half-written line, so that no update is counted twice after a resume. Returns the
    number of lines kept."""
    if not metrics_file.exists():
        return 0
    kept = []
    for line in metrics_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break  # a line cut by the kill: everything after it is newer anyway
        if not isinstance(row, dict) or not isinstance(row.get("update"), int) or row["update"] > last_update:
            break
        kept.append(line + "\n")
    write_text_atomic(metrics_file, "".join(kept))
    return len(kept)


def split_optimizer_tensors(tensors: dict[str, torch.Tensor], key: str, rank: int = 0) -> dict[str, torch.Tensor]:
    """Optimiser `key`'s tensors (rank: a rank's shard where the state is sharded over ranks)."""
    prefix = f"{key}." if rank == 0 or not any(k.startswith(f"rank{rank}/") for k in tensors) else f"rank{rank}/{key}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def rng_state(generators: dict[str, torch.Generator]) -> dict:
    """Python's, numpy's and torch's global RNG states and the run's own generators, as JSON."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state().tolist(),
            "generators": {k: g.get_state().tolist() for k, g in generators.items()}}


def set_rng_state(state: dict, generators: dict[str, torch.Generator]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    for key, g in generators.items():
        g.set_state(torch.tensor(state["generators"][key], dtype=torch.uint8))
