"""Where a run computes and in which precision: built once from the config's `device` and `dtype`.

Modules ask a Placement; nobody else calls .cuda() or picks a dtype. The mixed-precision scheme
(docs/devices.md):
- trainable weights and the optimiser state stay float32 (Adam's small updates would vanish in
  bfloat16 weights); forward and backward passes run under autocast in `dtype`;
- frozen weights (a full fine-tune's reference copy, the base model under a LoRA adapter) are
  stored in `dtype`: they never take an update, and half the bytes is what lets a big model fit;
- logits are taken from the LM head in float32 (on a GPU under autocast: TF32 tensor cores,
  float32 accumulation), and log-softmax, log-probs, KL, advantages and losses are float32
  whatever the weights are (lm/policy.py).
float16 needs a loss scale against gradient underflow (torch.amp.GradScaler, algos.py);
bfloat16 has float32's range and needs none.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import dist
from .errors import DeviceError


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    """Compute dtype of forward and backward passes (autocast) and of frozen weights."""

    @property
    def mixed(self) -> bool:
        return self.dtype != torch.float32

    @property
    def frozen_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def trainable_dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def needs_loss_scale(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        """The context of every forward pass: autocast in `dtype`, or nothing in float32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def configure_matmuls(self) -> None:
        """On a CUDA GPU under autocast, the float32 matmuls left (the LM head's logits, the value
        head) run on TF32 tensor cores: 10-bit-mantissa inputs, float32 accumulation and output.
        In plain float32 they would, by estimate, take about as long as all the bfloat16 layers (a 152k
        vocabulary's head is 15% of Qwen2.5-1.5B's FLOPs, at 1/15 of bfloat16's rate). A float32
        run, and every CPU run, keeps full float32 matmuls."""
        if self.device.type == "cuda" and self.mixed:
            torch.backends.cuda.matmul.allow_tf32 = True


def _cuda_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _local_gpu(count: int) -> int:
    """The GPU of this process: under torchrun (or --nproc) the one its LOCAL_RANK names."""
    ranks = dist.launched()
    if ranks.local_world > 1 and ranks.local_rank >= count:
        raise DeviceError(f"{ranks.local_world} processes on this machine need a GPU each, and torch sees {count}: "
                          "start at most that many per machine (--nproc-per-node), or use device=cpu")
    return ranks.local_rank


def resolve_device(name: str, small_model: bool = False) -> torch.device:
    """`auto`: this process's CUDA GPU (the first, or under torchrun the one LOCAL_RANK names),
    else Apple mps, else the CPU (small_model: the CPU, where small MLPs run fastest); or exactly
    the device named, which must exist."""
    if name == "auto":
        if small_model:
            return torch.device("cpu")
        if _cuda_count():
            return torch.device("cuda", _local_gpu(_cuda_count()))
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise DeviceError("device=mps was asked for, but this machine has no Apple GPU that torch can use: "
                              "use device=auto or cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2] or "0"
        if not index.isdigit():
            raise DeviceError(f"device '{name}' is not a device: use cuda, cuda:N (N = 0, 1, ...), mps, cpu or auto")
        count = _cuda_count()
        if count == 0:
            raise DeviceError(f"device={name} was asked for, but torch sees no CUDA GPU here "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}): "
                              "use device=auto or cpu")
        if int(index) >= count:
            raise DeviceError(f"device={name} was asked for, but this machine has {count} CUDA GPU(s) "
                              f"(cuda:0 .. cuda:{count - 1})")
        if name == "cuda":
            return torch.device("cuda", _local_gpu(count))
        if dist.launched().local_world > 1:
            raise DeviceError(f"device={name} names one GPU, and {dist.launched().local_world} processes share "
                              "this machine: use device=cuda or auto (each process takes the GPU its LOCAL_RANK names)")
        return torch.device("cuda", int(index))
    raise DeviceError(f"device '{name}' is not a device: use auto, cpu, cuda, cuda:N or mps")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that has it, float32 elsewhere; or the dtype named, if the device
    can compute in it."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise DeviceError(f"dtype '{name}' is not one of: auto, {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"dtype=bfloat16 was asked for, but {torch.cuda.get_device_name(device)} cannot "
                          "compute in it (bfloat16 needs an Ampere-class GPU or newer): use dtype=float16 or float32")
    if dtype != torch.float32 and not torch.amp.is_autocast_available(device.type):
        raise DeviceError(f"dtype={name} was asked for, but torch has no autocast for {device.type} here: "
                          "use dtype=float32")
    return dtype


def resolve(cfg) -> Placement:
    """The run's placement. A control run's `auto` is the CPU and its dtype float32 (small MLPs)."""
    if not cfg.is_lm and cfg.device not in ("auto", "cpu"):
        # its rollouts act with a numpy copy of the MLP, and a 64x64 update is faster on the CPU
        # than one kernel launch round trip per layer on a GPU
        raise DeviceError(f"device={cfg.device}: control policies train on the CPU (their rollouts act "
                          "with a numpy copy of the MLP): use device=cpu or auto")
    device = resolve_device(cfg.device, small_model=not cfg.is_lm)
    dtype = resolve_dtype(cfg.dtype, device) if cfg.is_lm else torch.float32
    return Placement(device=device, dtype=dtype)
