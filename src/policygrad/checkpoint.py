"""Checkpoints: safetensors for tensors, JSON for everything else; no pickle anywhere.

Layout: OUT/checkpoints/update-000042/{model.safetensors, optimizer.safetensors, state.json} and
OUT/checkpoints/latest naming the newest whole one. Each checkpoint is written into a temporary
folder and renamed into place, and `latest` is replaced atomically after it, so a kill at any instant
leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be read; shown to the user as one line."""


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    state = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().clone()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


def save(out_dir: Path, name: str, tensors: dict[str, torch.Tensor],
         optimizers: dict[str, torch.optim.Optimizer], state: dict,
         write_extra: Optional[Callable[[Path], None]] = None, keep: int = 2,
         protect: Optional[str] = None) -> Path:
    """Write checkpoint `name` atomically, point `latest` at it, keep the newest `keep` and the one
    named `protect` (the best so far).

    write_extra(folder) may add files (a language model's transformers folder) before the rename."""
    root = out_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # clone: parameters may be views of one flat buffer, which safetensors would see as shared
    save_file({k: v.detach().clone() for k, v in tensors.items()}, str(tmp / "model.safetensors"))
    opt_tensors, opt_rest = {}, {}
    for key, opt in optimizers.items():
        tensors, rest = optimizer_to_flat(opt)
        opt_tensors.update({f"{key}.{k}": v for k, v in tensors.items()})
        opt_rest[key] = rest
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizers": opt_rest}, indent=1))
    if write_extra is not None:
        write_extra(tmp)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    write_text_atomic(root / "latest", name)
    # names sort by update (zero-padded); only after `latest` moved on may an old one go
    for old in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
    return final


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


def split_optimizer_tensors(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    prefix = f"{key}."
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
