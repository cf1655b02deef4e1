"""`policygrad sft`: supervised fine-tuning, and best-of-N rejection-sampling fine-tuning.

Rows are `prompt`/`completion` pairs, chat `messages` or plain `text` (lm/supervised.py): the loss
is the mean token NLL over completion (assistant) tokens only. One file is cut 80/10/10 (as task
data is), or train/validation/test are given; held-out NLL is logged before training, after every
epoch (validation) and at the end (test). The model is the policy class RL trains (LoRA with
lora_r > 0, autocast, chunked log-probabilities), checkpoints hold its weights, the optimiser and
the data position, so a killed run resumes exactly. The result, `model/` in the run folder, is a
folder plain transformers loads (with LoRA, a PEFT adapter folder): `policygrad train --model
OUT/model` starts RL from it (with LoRA, `adapter=OUT/model`).

Best-of-N (Touvron et al., 2023, "rejection sampling"): `best_of` > 0 with a task samples N
completions for each of the task's training prompts, keeps the one the task's reward scores
highest, and fine-tunes on those rows, a strong and simple baseline for RL.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from .. import checkpoint
from .. import config as config_mod
from .. import placement as placement_mod
from .. import resolve
from ..config import setting
from ..errors import ConfigError
from ..lm import supervised, tasks
from ..lm.policy import build_policy, policy_files, write_policy_config
from ..log import RunLogger
from . import StageConfig, advance, epoch_steps, stage_config

OUTPUT = "model"


@dataclass
class SFTConfig(StageConfig):
    """`policygrad sft`'s keys: StageConfig's (the model is the one fine-tuned) and these."""
    data: str = ""
    """Rows: a JSONL, CSV or Parquet file of prompt/completion, messages or text rows (rows given
    from Python: their fingerprint; with best_of: empty, the rows are sampled)."""
    max_length: int = setting(512, rule="positive")
    """Tokens kept of each row (the prompt's start and the completion's end are cut)."""
    micro_batch_size: int = setting(0, rule="non_negative")
    """Rows per forward/backward pass; gradients accumulate over a step (0: the whole step at once)."""
    keep_checkpoints: int = setting(2, rule="positive")
    """Newest checkpoints kept."""
    dtype: str = "auto"
    """Compute precision: auto | float32 | bfloat16 (weights and AdamW stay float32)."""
    lora_r: int = setting(0, rule="non_negative")
    """Rank of LoRA adapters; 0: every weight is fine-tuned (with LoRA try 10x the lr)."""
    lora_alpha: float = 32.0
    """LoRA scale numerator."""
    task: Optional[str] = None
    """Best-of-N: the task whose training prompts are sampled and whose reward ranks the samples."""
    best_of: int = 0
    """Best-of-N: completions sampled per training prompt (the best is kept); 0: plain SFT on data."""

    def check(self) -> "SFTConfig":
        super().check()
        if self.dtype == "float16":
            raise ConfigError("dtype=float16 would need a loss scale, which sft does not keep: use dtype=bfloat16 "
                              "or float32")
        if self.best_of == 1 or self.best_of < 0:
            raise ConfigError(f"best_of must be 2 or more (0: plain SFT on data); got {self.best_of}")
        if self.best_of and not self.task:
            raise ConfigError("best_of needs a task (--task NAME or --from-run RUN) whose reward ranks the samples")
        if self.task and not self.best_of:
            raise ConfigError(f"task={self.task} is read only by best-of-N: set best_of (--best-of N), or drop it")
        return self


def make_config(values: dict) -> SFTConfig:
    return stage_config(SFTConfig, values, "sft")


def policy_config(cfg: SFTConfig) -> config_mod.Config:
    """The RL config the policy class reads (device, dtype, LoRA); sampling keys at temperature 1."""
    return config_mod.Config(task="sft", model=cfg.model, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                             lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, samples_per_prompt=1)


# --- best-of-N ----------------------------------------------------------------------------------
def best_of_rows(cfg: SFTConfig) -> tuple[list[dict], dict]:
    """The best of cfg.best_of samples for each of the task's training prompts, by its reward
    (prompts in chunks of the task's prompts_per_step, each chunk with its own seed)."""
    from ..lm.rollout import LMWorkload  # transformers' generation: best-of-N only
    rl = resolve.resolve({}, {"seed": cfg.seed}, {"task": cfg.task, "model": cfg.model, "algo": "reinforce"})
    work = LMWorkload(rl, rl.seed)
    rows, chosen, means = work.task.rows("train"), [], []
    n = cfg.best_of
    for start in range(0, len(rows), rl.prompts_per_step):
        chunk = rows[start:start + rl.prompts_per_step]
        _, completions, rewards = work.sample(chunk, n, seed=cfg.seed * 1_000_003 + start, reference=False)
        for i, row in enumerate(chunk):
            own = rewards[i * n:(i + 1) * n]
            best = int(np.argmax(own))
            reply = completions[i * n + best]
            # a chat prompt keeps its whole conversation: the context the reply was sampled in
            kept = {"messages": [*row["messages"], {"role": "assistant", "content": reply}]} if row.get("messages") \
                else {"prompt": row["prompt"], "completion": reply}
            chosen.append({**kept, "reward": float(own[best])})
            means.append(float(np.mean(own)))
    return chosen, {"prompts": len(rows), "sample_reward_mean": float(np.mean(means)),
                    "best_reward_mean": float(np.mean([r["reward"] for r in chosen]))}


# --- the stage ----------------------------------------------------------------------------------
def step_loss(policy, examples: list[supervised.Example], micro: int) -> tuple[float, int]:
    """Backward passes of the mean token NLL of `examples` over micro-batches; (mean NLL, tokens)."""
    tokens = sum(sum(e.loss) for e in examples)
    size = micro or len(examples)
    total = 0.0
    for start in range(0, len(examples), size):
        batch = supervised.collate(examples[start:start + size], policy.tokenizer.pad_token_id,
                                   policy.placement.device)
        loss = supervised.nll_sum(policy, batch) / tokens
        loss.backward()
        total += loss.item()
    return total, tokens


def save(out: Path, policy, adapted, opt, cfg: SFTConfig, run: dict, writer) -> None:
    checkpoint.save(out, f"update-{run['update']:06d}", {}, {"sft": opt},
                    {"config": dataclasses.asdict(cfg), "run": dict(run)}, extra_files=policy_files(policy, adapted),
                    write_small=lambda folder: write_policy_config(policy, adapted, cfg.model, folder),
                    keep=cfg.keep_checkpoints, writer=writer)


def train(cfg: SFTConfig, out: Path, rows: Any = None, progress: bool = True, resume: bool = False) -> dict:
    """Fine-tune; the model is written to out/model. rows: rows or a Dataset instead of cfg.data.
    With best_of, the chosen rows are sampled first (and kept in out/best-of-N.jsonl). Returns the
    closing numbers."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    sampled = {}
    if cfg.best_of:
        rows, sampled = _best_of_file(cfg, out)
    splits = tasks.splits_of(rows if rows is not None else cfg.data, supervised.check_row)
    path = checkpoint.latest(out) if resume else None
    pcfg = policy_config(cfg)
    placement = placement_mod.resolve(pcfg)
    policy, adapted = build_policy(pcfg, placement, cfg.seed, path / "policy" if path else None, with_reference=False)
    eos = supervised.eos_of(policy)
    data = {s: supervised.encode_rows(r, policy.tokenizer, eos, cfg.max_length, f"sft data ({s} split)")
            for s, r in splits.items()}
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    run = {"update": 0, "epoch": 0, "position": 0, "before": {}}
    if path is not None:
        _, opt_tensors, state = checkpoint.load(path)
        checkpoint.optimizer_from_flat(opt, checkpoint.split_optimizer_tensors(opt_tensors, "sft"),
                                       state["optimizers"]["sft"])
        run = dict(state["run"])
    else:  # the starting model's held-out NLL, the baseline the fine-tune is measured against
        run["before"] = {f"{s}/nll": supervised.mean_nll(policy, data[s], cfg.batch_size)
                         for s in ("validation", "test")}
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    checkpoint.cut_metrics(out / "metrics.jsonl", run["update"])
    steps_per_epoch = math.ceil(len(data["train"]) / cfg.batch_size)
    logger = RunLogger(out, cfg.epochs * steps_per_epoch, "step", progress=progress, done=run["update"],
                       purge_step=run["update"] + 1 if path else None)
    writer = checkpoint.CheckpointWriter()
    try:
        _epochs(cfg, out, policy, adapted, opt, params, data, run, logger, writer, start)
        final = {"test/nll": supervised.mean_nll(policy, data["test"], cfg.batch_size),
                 "test/nll_before": run["before"]["test/nll"], "test/n": len(data["test"])}
        save(out, policy, adapted, opt, cfg, {**run, "finished": True}, writer)
        writer.wait()
        write_output(out, checkpoint.latest(out) / "policy")
        logger.log_final(run["update"], final)
    finally:
        writer.wait()
        logger.close()
    return {"updates": run["update"], "epochs": cfg.epochs, "model": str(out / OUTPUT),
            **{k.replace("/", "_"): v for k, v in final.items()}, **sampled, "wall_s": time.perf_counter() - start}


def _epochs(cfg: SFTConfig, out: Path, policy, adapted, opt, params, data: dict, run: dict, logger, writer,
            start: float) -> None:
    """The training steps from where `run` stands: shuffled rows per epoch, a validation NLL and a
    checkpoint at each epoch's end, a checkpoint every cfg.checkpoint_every steps."""
    train_rows = data["train"]
    for epoch, batch in epoch_steps(train_rows, cfg, run, writer):
        opt.zero_grad(set_to_none=True)
        nll, tokens = step_loss(policy, batch, cfg.micro_batch_size)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
        finite = math.isfinite(nll) and math.isfinite(norm.item())
        if finite:  # a non-finite step would poison the weights and AdamW's moments for good
            opt.step()
        epoch_end, checkpoint_due = advance(run, batch, train_rows, cfg)
        row = {"update": run["update"], "step": run["update"], "epoch": epoch,
               "time/elapsed_s": time.perf_counter() - start, "train/nll": nll, "train/tokens": tokens,
               "grad/norm": norm.item(), "update/nonfinite": float(not finite)}
        if epoch_end:  # held-out NLL
            row["eval/nll"] = supervised.mean_nll(policy, data["validation"], cfg.batch_size)
            row["eval/nll_before"] = run["before"]["validation/nll"]
        logger.log(run["update"], row, 1, headline="train/nll")
        if checkpoint_due:
            save(out, policy, adapted, opt, cfg, run, writer)


def _best_of_file(cfg: SFTConfig, out: Path) -> tuple[list[dict], dict]:
    """The best-of-N rows, sampled once: a resumed run reads them back from its folder."""
    path = out / f"best-of-{cfg.best_of}.jsonl"
    info = out / f"best-of-{cfg.best_of}.json"
    if path.is_file() and info.is_file():
        # "\n" only: a completion may hold U+2028, which splitlines() breaks at
        return [json.loads(line) for line in path.read_text().split("\n") if line.strip()], json.loads(info.read_text())
    rows, summary = best_of_rows(cfg)
    checkpoint.write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    checkpoint.write_text_atomic(info, json.dumps(summary))
    return rows, summary


def write_output(out: Path, policy_folder: Path) -> None:
    """out/model: the final checkpoint's policy folder (transformers or PEFT loads it), copied
    atomically."""
    tmp = out / f".tmp-{OUTPUT}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(policy_folder, tmp)
    shutil.rmtree(out / OUTPUT, ignore_errors=True)
    tmp.rename(out / OUTPUT)
