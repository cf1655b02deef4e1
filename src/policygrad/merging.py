"""`policygrad merge RUN --out DIR`: a trained language model as a plain transformers folder.

A LoRA run's checkpoint holds only the adapter (policy/ loads with PeftModel.from_pretrained);
merging adds B @ A * alpha / r into the base weights, in float32, and saves the result in the base
model's own dtype, so that AutoModelForCausalLM.from_pretrained(DIR) needs no PEFT. A full
fine-tune's policy/ folder is already plain: it is written as it is.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .errors import PolicygradError
from . import checkpoint
from .checkpoint import CheckpointError


class MergeError(PolicygradError, ValueError):
    """The run or --out does not fit a merge; shown to the user as one line."""


def merged_model(path: Path, cfg):
    """(model, tokenizer) of checkpoint `path`, the adapter (if any) merged into float32 weights."""
    from .lm import adapters, models

    folder = path / "policy"
    if not cfg.uses_lora:
        return models.load(str(folder))
    base, tokenizer = models.load(cfg.model, torch.float32, "cpu")
    if not (folder / adapters.ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"checkpoint '{path}' of a LoRA run has no adapter in {folder}")
    return adapters.merged(base, folder), tokenizer


def base_dtype(cfg) -> torch.dtype:
    """The dtype the base model's own config names (float32 if none)."""
    from transformers import AutoConfig

    from .lm import models
    config = AutoConfig.from_pretrained(models.resolve(cfg.model))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def merge_run(run: Path, out: Path, which: str = "latest") -> Path:
    """Write checkpoint `which` of `run` merged into `out` (atomically: a folder renamed into place)."""
    from .trainer import load_config

    if out.exists():
        raise MergeError(f"--out '{out}' already exists; choose a new folder (nothing was written)")
    path = checkpoint.named(run, which)
    _, _, state = checkpoint.load(path)
    cfg = load_config(state, path)
    if not cfg.is_lm:
        raise MergeError(f"run '{run}' trained a control policy; merge writes language models")
    model, tokenizer = merged_model(path, cfg)
    model = model.to(base_dtype(cfg) if cfg.uses_lora else model.dtype)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, out)
    return out
