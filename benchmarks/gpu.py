"""GPU benchmark: REINFORCE steps on randomly initialised SmolLM2-135M, Qwen2.5-0.5B and Qwen2.5-1.5B.

    PYTHONPATH=src python benchmarks/gpu.py                       # all three models, full and LoRA, bf16
    python benchmarks/gpu.py --models qwen2.5-1.5b --modes full --steps 5 --tf32
    python benchmarks/gpu.py --device cpu --dtype float32 --tiny  # a smoke run in seconds (the test)

The models are built from their published config.json (benchmarks/configs/, each naming its
source) with random weights: timing needs no trained weights once every completion is forced to
its full length (min_new_tokens = max_new_tokens), and prompts are random token ids, so nothing
is downloaded and only torch, transformers, peft and this tree's src/ are needed.

Each step is the trainer's REINFORCE step, phase by phase, with the library's own pieces
(LMPolicy, TransformersGenerator, core.advantages, algos.ALGOS["reinforce"]):
  generate   sampling (`sampling_s`) plus, under autocast, the training pass's old log-probs
             (`old_log_prob_s`), as LMPolicy.generate does;
  reference  the frozen reference's log-probs (full: a bfloat16 copy; LoRA: adapter off);
  train      one update: forward, backward, gradient clip, Adam step.
Full fine-tuning keeps float32 trainable weights and Adam state under bf16 autocast; LoRA keeps the
base in the compute dtype and a float32 adapter (placement.py). One warm-up step, then the median of
--steps steps, per phase.

Model FLOPs (the MFU numerator) count the weight matmuls of the positions each pass really runs:
a forward pass costs 2 * (N_body * body positions + N_head * head positions), where N_body is every
parameter but the input embedding and the LM head (decoder layers, final norm) and N_head =
vocab * hidden (the head's matmul, tied or not); so N = N_body + N_head is all parameters except the
input embedding. Shared-prompt passes run each prompt once per group and the head only at
completion positions, so body positions = prompts * prompt_len + completions * (new_tokens - 1) and
head positions = completions * new_tokens. Generation and reference passes are forward only (2N per
position); training is 6N per position for a full fine-tune (forward, and a backward for the
activations' and the weights' gradients) and 4N with LoRA (frozen weights need no weight gradients).
Attention's score and value matmuls are not counted (at these lengths about 2% more for
Qwen2.5-1.5B), so the MFU is a slight underestimate. MFU = model FLOPs / (seconds * the card's dense
bfloat16 peak): H100/H200 SXM 989.4e12, A100 312e12 (--peak-tflops for others).

The target figure is `mfu_train` of qwen2.5-1.5b full (the training pass alone). Note: the LM head
runs in float32 by design (lm/policy.py, float32_head); --tf32 lets those matmuls use TF32 tensor
cores, which training does not do by default. A human table goes to stderr; the last line on
stdout is one JSON object with every number.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # measure the code beside this script, installed or not

from policygrad.algos import ALGOS, Progress  # noqa: E402
from policygrad.batch import Batch  # noqa: E402
from policygrad.config import Config, ConfigError  # noqa: E402
from policygrad.resolve import LM_ALGO_DEFAULTS, LM_DEFAULTS, LM_LORA_DEFAULTS  # noqa: E402
from policygrad.core import advantages  # noqa: E402
from policygrad.core.losses import KL_ESTIMATORS  # noqa: E402
from policygrad.lm import adapters  # noqa: E402
from policygrad.lm.generation import Sampling  # noqa: E402
from policygrad.lm.policy import LMPolicy, Reference, frozen_copy  # noqa: E402
from policygrad.placement import Placement, resolve_device, resolve_dtype  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = ("smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b")
MODES = ("full", "lora")
TARGET = {"model": "qwen2.5-1.5b", "mode": "full", "metric": "mfu_train", "goal": 0.30}
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200", 989.4e12), ("H100", 989.4e12),
             ("A100", 312e12)]
"""Dense bfloat16 tensor-core peaks from NVIDIA's data sheets, matched in order against the
device name (SXM parts; PCIe and NVL H100s are slower)."""
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "bos_token_id": 0,
        "eos_token_id": 511, "pad_token_id": 511}
"""--tiny: each model shrunk to seconds on a CPU (its family and layout kept)."""


@dataclass(frozen=True)
class Job:
    prompts: int
    samples: int
    prompt_len: int
    new_tokens: int

    @property
    def completions(self) -> int:
        return self.prompts * self.samples

    def pass_positions(self) -> tuple[int, int]:
        """(body, head) positions of one shared-prompt pass over the batch (lm/policy.py)."""
        body = self.prompts * self.prompt_len + self.completions * (self.new_tokens - 1)
        return body, self.completions * self.new_tokens

    def sampling_positions(self) -> tuple[int, int]:
        """(body, head) positions of sampling: each prompt but its last token prefilled once per group
        (logits of its last position only), then the last prompt token and every new token but the
        last through every row (lm/generation.py)."""
        decoded = self.completions * self.new_tokens
        return self.prompts * (self.prompt_len - 1) + decoded, self.prompts + decoded


class StandInTokenizer:
    """What LMPolicy reads of a tokenizer when prompts arrive as token ids: the special ids."""
    chat_template = None

    def __init__(self, pad_token_id: int, eos_token_id: int):
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id


class Clock:
    """Wall time per phase, the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def model_spec(name: str, tiny: bool) -> dict:
    spec = json.loads((CONFIGS / f"{name}.json").read_text())
    spec = {k: v for k, v in spec.items() if not k.startswith("_") and k not in ("torch_dtype", "dtype")}
    return {**spec, **TINY} if tiny else spec


def build_model(spec: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """Random weights in `dtype` on `device`, initialised there (seconds for 1.5B on a GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec))
    return model.to(dtype).eval()


def param_counts(model) -> tuple[int, int]:
    """(N_body, N_head): parameters but the input embedding and the LM head; vocab * hidden."""
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    body = sum(p.numel() for p in model.parameters() if p is not embed and p is not head)
    return body, head.numel()


def run_config(mode: str, name: str, args: argparse.Namespace) -> Config:
    """The trainer's LM defaults for REINFORCE (LoRA's own lr), sized by the command line."""
    values = {**LM_DEFAULTS, **LM_ALGO_DEFAULTS["reinforce"],
              **(LM_LORA_DEFAULTS["reinforce"] if mode == "lora" else {}),
              "algo": "reinforce", "model": name, "baseline": "rloo", "prompts_per_step": args.prompts,
              "samples_per_prompt": args.samples, "max_new_tokens": args.new_tokens,
              "micro_batch_size": args.micro_batch, "device": args.device, "dtype": args.dtype,
              "lora_r": args.lora_r if mode == "lora" else 0}
    if args.logprob_chunk:
        values["logprob_chunk"] = args.logprob_chunk
    return Config(**values)


def build_policy(name: str, mode: str, cfg: Config, place: Placement, tiny: bool
                 ) -> tuple[LMPolicy, tuple[int, int]]:
    """Full: float32 weights to train, a frozen copy in the compute dtype as the reference. LoRA: the
    base in the compute dtype with a float32 adapter, the reference the same model adapter off."""
    spec = model_spec(name, tiny)
    eos = spec["eos_token_id"]
    ids = StandInTokenizer(spec.get("pad_token_id") if spec.get("pad_token_id") is not None else eos, eos)
    if mode == "full":
        model = build_model(spec, place.device, place.trainable_dtype, seed=0)
        return LMPolicy(model, ids, cfg, placement=place, reference=frozen_copy(model, place)), param_counts(model)
    base = build_model(spec, place.device, place.frozen_dtype, seed=0)
    counts = param_counts(base)
    adapted = adapters.attach(base, cfg)
    reference = Reference(adapted.model, adapted.reference())
    return LMPolicy(adapted.model, ids, cfg, placement=place, reference=reference), counts


def one_step(policy: LMPolicy, opts, cfg: Config, prompts: torch.Tensor, job: Job, seed: int) -> dict:
    """The trainer's REINFORCE step on random prompts and random rewards, timed phase by phase."""
    clock = Clock(policy.placement.device)
    attention = torch.ones_like(prompts)
    sampling = Sampling(max_new_tokens=job.new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                        top_k=cfg.top_k, min_new_tokens=job.new_tokens)
    with clock("step"):
        with clock("sampling"):
            out = policy.generator.generate(prompts, attention, sampling, seed, job.samples)
        batch = Batch(obs=torch.cat([prompts, out.tokens], 1), obs_mask=torch.cat([attention.float(), out.mask], 1),
                      actions=out.tokens, log_prob=out.log_prob, behaviour_log_prob=out.log_prob,
                      rewards=out.mask * 0, terminated=out.mask * 0, truncated=out.mask * 0, mask=out.mask)
        with clock("old_log_prob"), torch.no_grad():
            if not out.exact:  # under autocast the policy recomputes them (LMPolicy.generate)
                batch = batch.replace(log_prob=policy.log_prob(batch))
        with clock("reference"):
            batch = batch.replace(ref_log_prob=policy.reference_log_prob(batch))
        batch = with_advantages(batch, cfg, job, seed)
        with clock("train"):
            metrics = ALGOS["reinforce"].update(policy, opts, batch, cfg,
                                                Progress(1.0, torch.Generator().manual_seed(seed)))
    full_length = float(batch.mask.sum()) == batch.mask.numel()
    return {**clock.times, "generate": clock.times["sampling"] + clock.times["old_log_prob"],
            "nonfinite": metrics["update/nonfinite"], "full_length": full_length}


def with_advantages(batch: Batch, cfg: Config, job: Job, seed: int) -> Batch:
    """Random task scores on each completion's last token, the KL penalty on every token (as
    lm/rollout.py shapes them), then the RLOO advantages."""
    B, T = batch.mask.shape
    device = batch.mask.device
    score = torch.randn(B, generator=torch.Generator().manual_seed(seed)).to(device)      # (B,)
    last = (batch.mask.sum(1).long() - 1).clamp(min=0)                                      # (B,)
    rewards = torch.zeros_like(batch.mask)                                                  # (B, T)
    rewards[torch.arange(B, device=device), last] = score
    rewards = rewards - cfg.kl_coef * KL_ESTIMATORS[cfg.kl_estimator](batch.ref_log_prob - batch.log_prob) * batch.mask
    terminated = torch.zeros_like(batch.mask)
    terminated[torch.arange(B, device=device), last] = 1.0
    group = torch.arange(job.prompts, device=device).repeat_interleave(job.samples)        # (B,)
    batch = batch.replace(rewards=rewards, terminated=terminated, group=group, kl_coef=cfg.kl_coef,
                          baseline=torch.zeros(B, device=device))
    return advantages.compute(batch, cfg)


def model_flops(job: Job, counts: tuple[int, int], mode: str, mixed: bool) -> dict[str, float]:
    """Model FLOPs of each phase of one step (module docstring)."""
    n_body, n_head = counts
    forward = lambda positions: 2.0 * (n_body * positions[0] + n_head * positions[1])
    passes = forward(job.pass_positions())
    return {"sampling": forward(job.sampling_positions()), "old_log_prob": passes if mixed else 0.0,
            "reference": passes, "train": (3.0 if mode == "full" else 2.0) * passes}


def measure(name: str, mode: str, job: Job, args: argparse.Namespace, place: Placement,
            peak: Optional[float]) -> dict:
    """Build one model in one mode, run a warm-up step and args.steps timed ones; every number."""
    started = time.perf_counter()
    cfg = run_config(mode, name, args)
    policy, counts = build_policy(name, mode, cfg, place, args.tiny)
    opts = ALGOS["reinforce"].make_optimizers(policy, cfg)
    vocab = policy.model.config.vocab_size
    prompts = torch.randint(0, vocab, (job.prompts, job.prompt_len), generator=torch.Generator().manual_seed(1))
    prompts = prompts.repeat_interleave(job.samples, 0).to(place.device)                  # (B, P)
    cuda = place.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(place.device)
    steps = [one_step(policy, opts, cfg, prompts, job, seed=s) for s in range(args.steps + 1)][1:]
    median = {k: statistics.median(s[k] for s in steps)
              for k in ("step", "generate", "sampling", "old_log_prob", "reference", "train")}
    flops = model_flops(job, counts, mode, place.mixed)
    generate_flops = flops["sampling"] + flops["old_log_prob"]
    mfu = lambda f, seconds: None if peak is None else f / (seconds * peak)
    return {
        "model": name, "mode": mode, "n_body": counts[0], "n_head": counts[1],
        "trainable_params": sum(p.numel() for p in policy.actor_parameters()),
        **{f"{k}_s": v for k, v in median.items()},
        "generated_tokens_per_s": job.completions * job.new_tokens / median["sampling"],
        "train_tokens_per_s": job.completions * (job.prompt_len + job.new_tokens) / median["train"],
        "flops": {**flops, "step": sum(flops.values())},
        "mfu_step": mfu(sum(flops.values()), median["step"]),
        "mfu_generate": mfu(generate_flops, median["generate"]),
        "mfu_reference": mfu(flops["reference"], median["reference"]),
        "mfu_train": mfu(flops["train"], median["train"]),
        "peak_memory_gib": torch.cuda.max_memory_allocated(place.device) / 2**30 if cuda else None,
        "nonfinite_updates": sum(s["nonfinite"] for s in steps), "full_length": all(s["full_length"] for s in steps),
        "wall_s": time.perf_counter() - started,
    }


def peak_flops(device: torch.device, override: Optional[float]) -> tuple[Optional[float], str]:
    """The card's dense bfloat16 peak in FLOP/s, and the device's name."""
    if device.type != "cuda":
        return (override * 1e12 if override else None), "cpu"
    name = torch.cuda.get_device_name(device)
    if override:
        return override * 1e12, name
    return next((p for key, p in PEAK_BF16 if key in name), None), name


def table(results: list[dict]) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    gib = lambda x: "-" if x is None else f"{x:.1f}"
    lines = [f"{'model':<14}{'mode':<6}{'step s':>8}{'gen s':>8}{'ref s':>8}{'train s':>8}{'gen tok/s':>11}"
             f"{'train tok/s':>12}{'MFU step':>9}{'MFU train':>10}{'peak GiB':>9}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['model']:<14}{r['mode']:<6}  {r['error']}")
            continue
        lines.append(f"{r['model']:<14}{r['mode']:<6}{r['step_s']:>8.2f}{r['generate_s']:>8.2f}{r['reference_s']:>8.3f}"
                     f"{r['train_s']:>8.3f}{r['generated_tokens_per_s']:>11.0f}{r['train_tokens_per_s']:>12.0f}"
                     f"{pct(r['mfu_step']):>9}{pct(r['mfu_train']):>10}{gib(r['peak_memory_gib']):>9}")
    return "\n".join(lines)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: full, lora")
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step (the median is reported)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype: bfloat16 | float16 | float32")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--samples", type=int, default=4, help="completions per prompt")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens per completion (forced)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (every linear layer of the blocks)")
    p.add_argument("--micro-batch", type=int, default=0, help="micro_batch_size (0: the whole batch at once)")
    p.add_argument("--logprob-chunk", type=int, default=0, help="logprob_chunk (0: the config default)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in float32 matmuls (the LM head's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, TFLOP/s")
    p.add_argument("--tiny", action="store_true", help="shrink every model to 2 layers, hidden 64, vocab 512")
    args = p.parse_args(argv)
    args.models, args.modes = args.models.split(","), args.modes.split(",")
    for given, valid, what in ((args.models, MODELS, "model"), (args.modes, MODES, "mode")):
        unknown = [x for x in given if x not in valid]
        if unknown:
            p.error(f"unknown {what}(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    if min(args.steps, args.prompts, args.samples, args.new_tokens) < 1 or args.prompt_len < 2:
        p.error("--steps, --prompts, --samples and --new-tokens must be >= 1, --prompt-len >= 2")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
        place = Placement(device, resolve_dtype(args.dtype, device))
    except ConfigError as e:
        print(f"gpu.py: error: {e}", file=sys.stderr)
        return 2
    import peft
    import transformers
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices between peft and transformers
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    peak, device_name = peak_flops(device, args.peak_tflops)
    job = Job(args.prompts, args.samples, args.prompt_len, args.new_tokens)
    started, results = time.perf_counter(), []
    for name in args.models:
        for mode in args.modes:
            try:
                results.append(measure(name, mode, job, args, place, peak))
            except torch.cuda.OutOfMemoryError:
                results.append({"model": name, "mode": mode, "error": "out of memory"})
            free(device)
            print(f"gpu.py: {name} {mode} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    target = next((r.get(TARGET["metric"]) for r in results
                   if r["model"] == TARGET["model"] and r["mode"] == TARGET["mode"]), None)
    print(table(results), file=sys.stderr)
    print(json.dumps({
        "device": device_name, "dtype": str(place.dtype).removeprefix("torch."), "torch": torch.__version__,
        "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": peft.__version__,
        "tiny": args.tiny, "tf32": args.tf32, "peak_flops": peak, "steps": args.steps, "lora_r": args.lora_r,
        "job": {"prompts": job.prompts, "samples": job.samples, "prompt_len": job.prompt_len,
                "new_tokens": job.new_tokens},
        "flops_per_position": {"forward": "2N", "train_full": "6N", "train_lora": "4N",
                               "N": "n_body (all but input embedding and head) + n_head (vocab*hidden)"},
        "results": results, "wall_s": time.perf_counter() - started,
        "target": {**TARGET, "value": target, "met": None if target is None else target >= TARGET["goal"]},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
