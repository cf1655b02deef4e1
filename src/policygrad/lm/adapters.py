"""LoRA adapters through PEFT: attach one, use the model with the adapter off (or with the starting
adapter) as the KL reference, save it as a folder PEFT loads, merge it into plain weights.

The adapter's layers are injected into the transformers model in place; `Adapted.model` is that
model (the policy runs it as it runs a full fine-tune) and `Adapted.peft` the PeftModel wrapper,
kept for switching adapters, saving and merging. The reference needs no second copy of the
weights: the same model with the adapter switched off, or with a frozen copy of the starting
adapter (`adapter=PATH`, `lora_reference=initial`) switched in instead of the trained one.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import AdapterError


TRAINED = "default"
"""PEFT's name of the adapter being trained."""
REFERENCE = "reference"
"""Name of the frozen copy of the starting adapter (lora_reference=initial)."""
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""How PEFT's saved keys start, before the module path inside the transformers model."""


@dataclass
class Adapted:
    peft: nn.Module
    """The PeftModel wrapper."""
    model: nn.Module
    """The transformers model, LoRA layers injected."""
    reference_is_initial: bool
    """The KL reference is the starting adapter (else the base model, adapter off)."""

    def reference(self) -> Callable[[], contextlib.AbstractContextManager]:
        """A context factory: inside it, `model` computes the reference policy."""
        return self._initial_adapter if self.reference_is_initial else self.peft.disable_adapter

    @contextlib.contextmanager
    def _initial_adapter(self):
        # inference_mode: no adapter takes gradients inside; switching back makes the trained
        # adapter (and only it) trainable again, as it was
        self.peft.set_adapter(REFERENCE, inference_mode=True)
        try:
            yield
        finally:
            self.peft.set_adapter(TRAINED)

    def trainable_tensors(self) -> dict[str, torch.Tensor]:
        """The trained adapter's weights under the names PEFT saves and loads (live tensors)."""
        from peft import get_peft_model_state_dict  # peft: only LoRA runs load it
        return {k: v.detach() for k, v in get_peft_model_state_dict(self.peft, adapter_name=TRAINED).items()}

    def write_config(self, folder: Path, base: str) -> None:
        """adapter_config.json beside the weights, so PeftModel.from_pretrained(base, folder) loads them."""
        config = self.peft.peft_config[TRAINED]
        config.base_model_name_or_path = base
        config.inference_mode = True  # how a loader should take it by default; train resumes it trainable
        config.save_pretrained(str(folder))
        config.inference_mode = False


def lora_config(cfg):
    from peft import LoraConfig  # peft: only LoRA runs load it
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules) if cfg.lora_target_modules else "all-linear",
                      bias="none", task_type="CAUSAL_LM")


def attach(model: nn.Module, cfg, trained: Optional[Path] = None) -> Adapted:
    """LoRA on `model`: a trained adapter folder (a checkpoint's), else cfg.adapter, else a new one
    from cfg's lora_* keys. The trainable adapter is float32 whatever the base's dtype."""
    from peft import PeftModel, get_peft_model  # peft: only LoRA runs load it

    start = trained if trained is not None else (Path(cfg.adapter) if cfg.adapter else None)
    initial = cfg.adapter is not None and cfg.lora_reference == "initial"
    with quiet_peft():
        try:
            if start is not None:
                peft = PeftModel.from_pretrained(model, str(start), adapter_name=TRAINED, is_trainable=True)
            else:
                peft = get_peft_model(model, lora_config(cfg))
        except ValueError as e:  # e.g. target modules not found
            raise AdapterError(f"LoRA cannot be attached to model '{cfg.model}': {str(e).splitlines()[0]}") from None
        if initial:
            peft.load_adapter(cfg.adapter, adapter_name=REFERENCE, is_trainable=False)
            peft.set_adapter(TRAINED)
    for p in peft.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return Adapted(peft=peft, model=peft.get_base_model(), reference_is_initial=initial)


def set_dropout(model: nn.Module, training: bool) -> None:
    """LoRA dropout acts in training passes only (the policy runs in eval mode otherwise)."""
    for name, module in model.named_modules():
        if name.endswith("lora_dropout"):
            module.train(training)


def merged(base: nn.Module, folder: Path) -> nn.Module:
    """`base` with the adapter in `folder` added into its weights (B @ A * alpha / r), PEFT's
    layers removed: a plain transformers model."""
    from peft import PeftModel  # peft: only LoRA runs load it
    with quiet_peft():
        return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


@contextlib.contextmanager
def quiet_peft():
    """PEFT asks transformers 5.x a deprecated question whenever it wraps a model; not the user's
    concern, so its FutureWarning is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


# --- checks before a run starts (nothing loaded but a config) ---
def meta_model(model_folder: Path) -> nn.Module:
    """The model's module tree without weights (meta device): names and shapes only, in milliseconds."""
    from transformers import AutoConfig, AutoModelForCausalLM  # transformers: not for control runs

    config = AutoConfig.from_pretrained(model_folder)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _targets_found(model: nn.Module, targets: list[str]) -> list[str]:
    """The targets that name (or end the name of) at least one linear or embedding layer."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    return [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]


def check(cfg, model_folder: Path) -> None:
    """Before anything is loaded or written: lora_target_modules name modules of this model, and an
    adapter= folder is a LoRA adapter whose weights fit this model's layers."""
    model = meta_model(model_folder)
    if cfg.lora_target_modules:
        missing = [t for t in cfg.lora_target_modules if t not in _targets_found(model, cfg.lora_target_modules)]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise AdapterError(f"lora_target_modules {missing} name no linear layer of model '{cfg.model}'; "
                               f"its linear layers are: {', '.join(linear)}")
    if cfg.adapter is not None:
        check_adapter_folder(Path(cfg.adapter), model, cfg.model)


def check_adapter_folder(folder: Path, model: nn.Module, model_name: str) -> None:
    if not folder.is_dir():
        raise AdapterError(f"adapter folder '{folder}' does not exist")
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterError(f"'{folder}' is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AdapterError(f"'{config_file}' is not valid JSON") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"'{folder}' holds a {kind or 'non-PEFT'} adapter; policygrad trains LoRA adapters")
    modules = dict(model.named_modules())
    try:
        with safe_open(str(weights_file), "pt") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"'{weights_file}' cannot be read ({e.__class__.__name__})") from None
    for key, shape in shapes.items():
        if ".lora_" not in key:
            continue  # e.g. modules_to_save copies: whole layers, loaded as they are
        path, _, kind = key.removeprefix(PREFIX).rpartition(".lora_")
        layer = modules.get(path)
        expected = None
        if isinstance(layer, nn.Linear) and kind.startswith("A."):
            expected = ("in", layer.in_features, shape[1] if len(shape) == 2 else None)
        elif isinstance(layer, nn.Linear) and kind.startswith("B."):
            expected = ("out", layer.out_features, shape[0] if len(shape) == 2 else None)
        if layer is None or (expected is not None and expected[1] != expected[2]):
            raise AdapterError(f"adapter '{folder}' was made for another base model than '{model_name}': its "
                               f"weight {key} {list(shape)} fits no layer of this model")
