"""`policygrad merge RUN --out DIR`: a trained language model as a plain transformers folder.

A LoRA run's checkpoint holds only the adapter (policy/ loads with PeftModel.from_pretrained);
merging adds B @ A * alpha / r into the base weights, in float32, so that
AutoModelForCausalLM.from_pretrained(DIR) needs no PEFT. A full fine-tune's policy/ folder is
already plain. Either is saved in float32 by default: a bfloat16 weight keeps 8 bits of mantissa,
so a small update added to it rounds away (std 1e-4 on a bf16 base came out 55% wrong, #23).
`dtype` picks a narrower one, with a warning when its rounding loses more than 1% of the update.
"""
from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint
from .errors import CheckpointError, MergeError
from .lm import adapters, models
from .trainer import load_config


class MergeWarning(UserWarning):
    """The dtype asked for rounds away a share of the update (shown by the CLI as one line)."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "base": None}
"""The dtypes a merge can save in; base: the base model's own (the smallest files)."""
WARN_ABOVE = 0.01
"""The share of the update's norm lost to rounding past which a merge warns."""


@dataclass(frozen=True)
class Merged:
    out: Path
    """The folder written."""
    dtype: torch.dtype
    """The dtype its weights were saved in."""
    rounding_loss: float
    """||cast(merged) - base - update|| / ||update||, update = merged - base in float32: the share
    of the trained change that saving in `dtype` lost (0 in float32)."""

    def warning(self) -> str | None:
        if self.rounding_loss <= WARN_ABOVE:
            return None
        return (f"saving in {str(self.dtype).removeprefix('torch.')} rounds away "
                f"{100 * self.rounding_loss:.0f}% of the update's norm (merged minus base weights); "
                "--dtype float32 keeps it")


def rounding_loss(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], dtype: torch.dtype) -> float:
    """The share of the update's norm that saving `merged` in `dtype` rounds away, over the
    weights both hold: ||cast(merged) - base - update|| / ||update||, update = merged - base in
    float32 (merged is float32; 0 when nothing moved)."""
    lost = kept = 0.0
    for name, weight in merged.items():
        if name not in base or base[name].shape != weight.shape:
            continue
        start = base[name].float()
        update = weight.float() - start
        error = (weight.to(dtype).float() - start) - update
        lost += error.double().pow(2).sum().item()
        kept += update.double().pow(2).sum().item()
    return math.sqrt(lost / kept) if kept > 0 else 0.0


def merged_model(path: Path, cfg):
    """(model, tokenizer) of checkpoint `path`, the adapter (if any) merged into float32 weights."""

    folder = path / "policy"
    if not cfg.uses_lora:
        return models.load(str(folder))
    base, tokenizer = models.load(cfg.model, torch.float32, "cpu")
    if not (folder / adapters.ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"checkpoint '{path}' of a LoRA run has no adapter in {folder}")
    return adapters.merged(base, folder), tokenizer


def base_dtype(cfg) -> torch.dtype:
    """The dtype the base model's own config names (float32 if none)."""
    from transformers import AutoConfig  # transformers: not for control runs

    config = AutoConfig.from_pretrained(models.resolve(cfg.model))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def merge_run(run: Path, out: Path, which: str = "latest", dtype: str = "float32") -> Merged:
    """Write checkpoint `which` of `run` merged into `out` (atomically: a folder renamed into place),
    its weights in `dtype` (a name of DTYPES)."""

    if dtype not in DTYPES:
        raise MergeError(f"dtype '{dtype}' is not one of: {', '.join(DTYPES)}")
    if out.exists():
        raise MergeError(f"--out '{out}' already exists; choose a new folder (nothing was written)")
    path = checkpoint.named(run, which)
    _, _, state = checkpoint.load(path)
    cfg = load_config(state, path)
    if not cfg.is_lm:
        raise MergeError(f"run '{run}' trained a control policy; merge writes language models")
    model, tokenizer = merged_model(path, cfg)
    target = DTYPES[dtype] or base_dtype(cfg)
    lost = 0.0
    if target != torch.float32:  # measured against the base, read again: merging changed it in place
        base = dict(models.load(cfg.model, torch.float32, "cpu")[0].named_parameters())
        lost = rounding_loss(base, dict(model.named_parameters()), target)
    model = model.to(target)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    return Merged(out, target, lost)
