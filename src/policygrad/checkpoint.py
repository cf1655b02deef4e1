"""Checkpoints: safetensors for tensors, JSON for everything else; no pickle anywhere.

Layout: OUT/checkpoints/update-000042/{model.safetensors, optimizer.safetensors, state.json} and
OUT/checkpoints/latest naming the newest whole one. Each checkpoint is written into a temporary
folder and renamed into place, and `latest` is replaced atomically after it, so a kill at any instant
leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

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
         write_extra: Optional[Callable[[Path], None]] = None, keep: int = 2) -> Path:
    """Write checkpoint `name` atomically, point `latest` at it, keep the newest `keep`.

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
    for old in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(out_dir: Path) -> Optional[Path]:
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    return out_dir / "checkpoints" / pointer.read_text().strip()


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
    if not isinstance(state, dict) or "config" not in state:
        raise CheckpointError(f"checkpoint '{path}' has a state.json without a config")
    return model, opt, state


def split_optimizer_tensors(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    prefix = f"{key}."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
