"""`policygrad rm`: a reward model learnt from preference pairs with the Bradley-Terry loss.

Rows hold `prompt`, `chosen`, `rejected` and optionally `margin`; one file is cut 80/10/10 by
prompt (as task data is), or train/validation/test are given. The model is the base model with a
scalar head (AutoModelForSequenceClassification, num_labels = 1), reading each (prompt, answer)
exactly as the `rm:` reward will (reward_model.scored_text). Held-out pairwise accuracy is logged
every epoch; checkpoints hold the weights, the optimiser and the data position, so a killed run
resumes exactly. The result, `reward-model/` in the run folder, is a folder transformers loads and
`rm:RUN/reward-model` scores with; `reward_stats.json` beside it holds the mean and std of its
rewards on the training answers (to normalise them) and the truncation it was trained with (which
the `rm:` reward applies too).
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

import torch
import yaml
from safetensors.torch import load_file

from .. import checkpoint
from ..config import setting
from ..core.losses import bradley_terry_loss
from ..errors import ConfigError
from ..lm import models, tasks
from ..lm.reward_model import STATS_FILE, Truncation, encode, scored_text
from ..log import RunLogger
from . import StageConfig, advance, epoch_steps, stage_config

OUTPUT = "reward-model"


@dataclass
class RewardModelConfig(StageConfig):
    """`policygrad rm`'s keys: StageConfig's, the model being the base a scalar head is put on;
    a row is a preference pair."""
    data: str = ""
    """Pairs: a JSONL, CSV or Parquet file of prompt, chosen, rejected (and margin) rows."""
    max_length: int = setting(256, rule="positive")
    """Tokens kept of each scored text, prompt and answer (the end is cut); the rm: reward cuts alike."""
    device: str = setting("auto", choices=("auto", "cpu", "cuda"))
    """auto (cuda when there is one), cpu or cuda."""


def make_config(values: dict) -> RewardModelConfig:
    return stage_config(RewardModelConfig, values, "rm")


# --- data -------------------------------------------------------------------------------------
def check_pair(row: Any, where: str) -> dict:
    """One pair, checked as it is read: before the cut into splits, which groups rows by prompt."""
    if not isinstance(row, dict):
        raise tasks.TaskError(f"{where}: expected an object with 'prompt', 'chosen' and 'rejected'")
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(row.get(key), str):
            raise tasks.TaskError(f"{where}: a preference pair needs text '{key}'; columns: "
                                  f"{', '.join(map(str, row)) or 'none'}")
    if row.get("margin") is not None and not isinstance(row["margin"], (int, float)):
        raise tasks.TaskError(f"{where}: 'margin' must be a number; got {row['margin']!r}")
    return row


def pair_splits(data: Any) -> dict[str, list[dict]]:
    """Train/validation/test pairs from a file's path, rows, a Dataset or a dict of splits."""
    return tasks.splits_of(data, check_pair, whole_prompts_only=True)


# --- the model --------------------------------------------------------------------------------
def load_scorer(name: str, seed: int, device: torch.device, weights: Optional[Path] = None):
    """(model, tokenizer): the base model with a scalar head, the head drawn from `seed`; or the
    trained folder `weights`."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # transformers: not for control runs
    from transformers.utils import logging as hf_logging  # transformers: not for control runs

    hf_logging.disable_progress_bar()
    path = weights or models.resolve(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialised" is the point here
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as e:
            raise models.ModelError(f"cannot load '{name}' as a reward model: {str(e).splitlines()[0]}") from None
        finally:
            hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device), tokenizer


def scores(model, tokenizer, answered: list[tuple[str, str]], max_length: int) -> torch.Tensor:
    """(N,) the model's reward for each (prompt, answer), in one padded batch."""
    texts = [scored_text(tokenizer, prompt, answer) for prompt, answer in answered]
    enc = encode(tokenizer, texts, truncation_of(tokenizer, max_length))
    return model(**enc.to(model.device)).logits[:, 0].float()


def truncation_of(tokenizer, max_length: int) -> Truncation:
    """The cut training applies: max_length tokens, on the side the tokenizer cuts (its default)."""
    return Truncation(max_length, tokenizer.truncation_side)


def pair_loss(model, tokenizer, rows: list[dict], max_length: int) -> tuple[torch.Tensor, dict]:
    """The Bradley-Terry loss of a batch of pairs; chosen and rejected answers in one forward pass."""
    both = scores(model, tokenizer, [(r["prompt"], r["chosen"]) for r in rows] +
                  [(r["prompt"], r["rejected"]) for r in rows], max_length)   # (2P,)
    margin = torch.tensor([float(r.get("margin") or 0.0) for r in rows], device=both.device)
    return bradley_terry_loss(both[:len(rows)], both[len(rows):], margin)


@torch.no_grad()
def evaluate(model, tokenizer, rows: list[dict], cfg: RewardModelConfig, prefix: str) -> dict:
    """Pairwise accuracy and loss over rows, in batches."""
    model.eval()
    losses, correct = [], []
    for start in range(0, len(rows), cfg.batch_size):
        chunk = rows[start:start + cfg.batch_size]
        loss, metrics = pair_loss(model, tokenizer, chunk, cfg.max_length)
        losses.append(loss.item() * len(chunk))
        correct.append(metrics["rm/accuracy"] * len(chunk))
    model.train()
    return {f"{prefix}/accuracy": sum(correct) / len(rows), f"{prefix}/loss": sum(losses) / len(rows),
            f"{prefix}/n": len(rows)}


@torch.no_grad()
def reward_stats(model, tokenizer, rows: list[dict], cfg: RewardModelConfig) -> dict:
    """Mean and std of the model's rewards over the training answers, chosen and rejected."""
    model.eval()
    answered = [(r["prompt"], r[k]) for r in rows for k in ("chosen", "rejected")]
    values = torch.cat([scores(model, tokenizer, answered[s:s + 2 * cfg.batch_size], cfg.max_length)
                        for s in range(0, len(answered), 2 * cfg.batch_size)])
    return {"mean": values.mean().item(), "std": values.std().item(), "n": len(values),
            "truncation": dataclasses.asdict(truncation_of(tokenizer, cfg.max_length))}


# --- the stage --------------------------------------------------------------------------------
def device_of(cfg: RewardModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' asked for, but torch sees no CUDA device here")
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def save(out: Path, model, tokenizer, opt, cfg: RewardModelConfig, run: dict, writer) -> None:
    def small_files(folder: Path) -> None:
        model.config.save_pretrained(folder / OUTPUT)
        tokenizer.save_pretrained(folder / OUTPUT)
    weights = {k: v.detach() for k, v in model.state_dict().items()}
    checkpoint.save(out, f"update-{run['update']:06d}", {}, {"rm": opt},
                    {"config": dataclasses.asdict(cfg), "run": dict(run)},
                    extra_files={f"{OUTPUT}/model.safetensors": weights}, write_small=small_files, writer=writer)


def train(cfg: RewardModelConfig, out: Path, pairs: Any = None, progress: bool = True, resume: bool = False) -> dict:
    """Train the reward model; its folder is out/reward-model. pairs: rows or a Dataset instead of
    cfg.data. Returns the closing numbers."""
    splits = pair_splits(pairs if pairs is not None else cfg.data)
    device = device_of(cfg)
    path = checkpoint.latest(out) if resume else None
    model, tokenizer = load_scorer(cfg.model, cfg.seed, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    run = {"update": 0, "epoch": 0, "position": 0, "finished": False}
    if path is not None:
        _, opt_tensors, state = checkpoint.load(path)
        model.load_state_dict(checkpoint_tensors(path), strict=True)
        checkpoint.optimizer_from_flat(opt, checkpoint.split_optimizer_tensors(opt_tensors, "rm"),
                                       state["optimizers"]["rm"])
        run = dict(state["run"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    checkpoint.cut_metrics(out / "metrics.jsonl", run["update"])
    train_rows = splits["train"]
    steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
    logger = RunLogger(out, cfg.epochs * steps_per_epoch, "step", progress=progress, done=run["update"],
                       purge_step=run["update"] + 1 if path else None)
    writer = checkpoint.CheckpointWriter()
    model.train()
    start = time.perf_counter()
    try:
        for epoch, batch in epoch_steps(train_rows, cfg, run, writer):
            loss, metrics = pair_loss(model, tokenizer, batch, cfg.max_length)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
            opt.step()
            epoch_end, checkpoint_due = advance(run, batch, train_rows, cfg)
            row = {"update": run["update"], "step": run["update"], "epoch": epoch,
                   "time/elapsed_s": time.perf_counter() - start, "grad/norm": norm.item(), **metrics}
            if epoch_end:  # held-out accuracy
                row.update(evaluate(model, tokenizer, splits["validation"], cfg, "eval"))
            logger.log(run["update"], row, 1, headline="rm/accuracy")
            if checkpoint_due:
                save(out, model, tokenizer, opt, cfg, run, writer)
        final = evaluate(model, tokenizer, splits["test"], cfg, "test")
        stats = reward_stats(model, tokenizer, train_rows, cfg)
        run["finished"] = True
        save(out, model, tokenizer, opt, cfg, run, writer)
        writer.wait()
        write_output(out, model, tokenizer, stats)
        logger.log_final(run["update"], final)
    finally:
        writer.wait()
        logger.close()
    return {"updates": run["update"], "epochs": cfg.epochs, **{k.replace("/", "_"): v for k, v in final.items()},
            "reward_mean": stats["mean"], "reward_std": stats["std"], "wall_s": time.perf_counter() - start}


def checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / OUTPUT / "model.safetensors"))


def write_output(out: Path, model, tokenizer, stats: dict) -> None:
    """out/reward-model: a folder transformers loads, with reward_stats.json (written atomically)."""
    tmp = out / f".tmp-{OUTPUT}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / STATS_FILE).write_text(json.dumps(stats, indent=1))
    shutil.rmtree(out / OUTPUT, ignore_errors=True)
    tmp.rename(out / OUTPUT)
