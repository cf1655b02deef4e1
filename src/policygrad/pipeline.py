"""The stages around RL from Python: supervised fine-tuning (and best-of-N), preference pairs,
reward models, and the held-out NLL of a model. Each takes objects where the command line takes
strings, as `policygrad.train` does; the CLI's `sft`, `pairs` and `rm` call these."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch

from . import checkpoint as checkpoint_mod
from . import placement as placement_mod
from . import runs, trainer
from .api import SPLITS, _is_name, _read_json, _resolve
from .config import Config
from .errors import UsageError
from .lm import models, supervised, tasks
from .stages import reward_model as reward_model_stage
from .results import TrainResult
from .stages.pairs import build_pairs


def reward_model(data: Any, *, out: Union[str, os.PathLike], model: Any = "smollm2-135m", overwrite: bool = False,
                 progress: bool = True, **keys) -> dict:
    """A reward model (the base model with a scalar head) trained on preference pairs with the
    Bradley-Terry loss: data is a pairs file's path, rows, a Dataset or a dict of splits (prompt,
    chosen, rejected, margin). Its folder, out/reward-model, is an `rm:` reward. The same call
    again resumes the run in `out`. Returns the closing numbers."""
    if out is None:
        raise UsageError("reward_model needs out= (the folder its model is written to)")
    # pairs in memory are named by their content, as a task built from rows is
    label = str(data) if _is_name(data) else \
        f"rows@{tasks.fingerprint(tasks.Task('rows', reward_model_stage.pair_splits(data), tasks.RewardSet()))}"
    cfg = reward_model_stage.make_config({"model": str(model), "data": label, **keys})
    folder = Path(out)
    resume, complete = runs.prepare_run(folder, cfg, overwrite)
    if complete:
        return {"reward_model": str(folder / reward_model_stage.OUTPUT), "already_complete": True,
                **_read_json(folder / "final_eval.json")}
    summary = reward_model_stage.train(cfg, folder, None if _is_name(data) else data, progress=progress, resume=resume)
    return {"reward_model": str(folder / reward_model_stage.OUTPUT), **summary}


def sft(data: Any = None, *, out: Union[str, os.PathLike], model: Any = None, tokenizer: Any = None,
        task: Any = None, best_of: int = 0, from_run: Union[str, os.PathLike, None] = None, overwrite: bool = False,
        progress: bool = True, **keys) -> dict:
    """Supervised fine-tuning on data (a file's path, rows, a Dataset or a dict of splits of
    prompt/completion, messages or text rows), or best-of-N: `best_of` samples per training
    prompt of `task`, the best by its reward kept and learnt. from_run: start from a trained run's
    model and take its task. The model is written to out/model; the same call again resumes the
    run in `out`. Returns the closing numbers."""
    from .stages import sft as stage  # transformers' model classes, through lm.policy
    if out is None:
        raise UsageError("sft needs out= (the folder its model is written to)")
    if task is not None and not best_of:
        raise UsageError("task (--task) is read only by best-of-N (--best-of N): drop it to fine-tune on data")
    if from_run is not None:
        if model is not None:
            raise UsageError("from_run (--from-run) starts from that run's model: drop model (--model)")
        model, task = _from_run(Path(from_run), task)
    model = "smollm2-135m" if model is None else model
    if (data is None) == (not best_of):
        raise UsageError("sft needs either data (--data FILE) or best-of-N (--best-of N with --task or --from-run)")
    folder = Path(out)
    model_object = None if _is_name(model) else model  # kept in the run folder, named by its path
    if model_object is not None:
        model = str((folder / runs.BASE_MODEL).resolve())
    task_name = tasks.from_python(task) if task is not None else None
    label = None if data is None else str(data) if _is_name(data) else \
        f"rows@{tasks.fingerprint(tasks.Task('rows', tasks.splits_of(data, supervised.check_row), tasks.RewardSet()))}"
    cfg = stage.make_config({"model": str(model), **({"data": label} if label else {}),
                             **({"task": task_name, "best_of": best_of} if best_of else {}), **keys})
    resume, complete = runs.prepare_run(folder, cfg, overwrite)
    if model_object is not None and not (folder / runs.BASE_MODEL / "config.json").is_file():
        models.write_model(model_object, tokenizer, folder / runs.BASE_MODEL)
    if complete:
        sampled = _read_json(folder / f"best-of-{best_of}.json") if best_of else {}
        return {"model": str(folder / stage.OUTPUT), "already_complete": True,
                **{k.replace("/", "_"): v for k, v in _read_json(folder / "final_eval.json").items()}, **sampled}
    return stage.train(cfg, folder, None if data is None or _is_name(data) else data, progress=progress,
                       resume=resume)


def nll(model: Any, data: Any, *, tokenizer: Any = None, checkpoint: str = "latest", max_length: int = 512,
        batch_size: int = 8, device: str = "auto") -> float:
    """The mean token NLL of data (a file's path, rows or a Dataset of text, prompt/completion or
    chat rows; loss on the tokens SFT learns) under a model: a folder, an alias or a transformers
    object (where it is), a training run (a folder or TrainResult, at `checkpoint`) or an SFT run
    folder (its model/, an adapter with LoRA)."""
    policy = _scoring_policy(model, tokenizer, checkpoint, device)
    rows = tasks.rows_of(data, "data", supervised.check_row)
    examples = supervised.encode_rows(rows, policy.tokenizer, supervised.eos_of(policy), max_length, "data")
    return supervised.mean_nll(policy, examples, batch_size)


def _scoring_policy(model: Any, tokenizer: Any, checkpoint: str, device: str):
    """The policy class around `model` (no reference): what computes log-probabilities of data."""
    from .lm.policy import LMPolicy, build_policy  # transformers: only scoring loads it
    from .stages import sft as sft_stage  # the same
    if isinstance(model, TrainResult):
        model, tokenizer = (model.out, None) if model.out is not None else (model.policy, model.tokenizer)
    if not _is_name(model):  # an object: scored where it is
        if tokenizer is None:
            raise UsageError("nll of a model object needs tokenizer= (its tokenizer)")
        where = placement_mod.Placement(next(model.parameters()).device, torch.float32)
        return LMPolicy(model, tokenizer, Config(task="nll"), with_reference=False, placement=where)
    folder = Path(model)
    if (folder / sft_stage.OUTPUT).is_dir() and (folder / "config.yaml").is_file():  # an SFT run
        saved = runs.saved_config(folder)
        cfg = Config(task="nll", model=str(saved.get("model")), lora_r=int(saved.get("lora_r") or 0),
                     lora_alpha=float(saved.get("lora_alpha") or 32.0), device=device)
        return build_policy(cfg, placement_mod.resolve(cfg), 0, folder / sft_stage.OUTPUT, with_reference=False)[0]
    if (folder / "checkpoints").is_dir():  # a training run
        return trainer.load_workload(checkpoint_mod.named(folder, checkpoint), device=device)[0].policy
    cfg = Config(task="nll", model=str(model), device=device)
    return build_policy(cfg, placement_mod.resolve(cfg), 0, with_reference=False)[0]


def _from_run(run: Path, task: Any) -> tuple[str, Any]:
    """A trained run's final model folder and (unless given) its task."""
    saved = runs.saved_config(run) if (run / "config.yaml").is_file() else {}
    if not saved.get("task"):
        raise UsageError(f"--from-run '{run}' is not a language-model run folder (no config.yaml with a task)")
    if saved.get("lora_r") or saved.get("adapter"):
        raise UsageError(f"--from-run '{run}' trained a LoRA adapter: merge it first (policygrad merge {run} "
                         "--out MODEL), then sft --model MODEL --task TASK")
    return str(checkpoint_mod.named(run, "latest").resolve() / "policy"), task if task is not None else saved["task"]


def pairs(task: Any, out: Union[str, os.PathLike], *, model: Any = "smollm2-135m", samples: int = 4,
          min_gap: float = 0.3, split: str = "train", data: Any = None, rewards: Any = None, **keys) -> dict:
    """Preference pairs from a task with a rule reward: `samples` completions per prompt of
    `split`, the i-th best against the i-th worst where their rewards differ by min_gap or more,
    written to `out` (JSONL). What was written."""
    if samples < 2:
        raise UsageError(f"samples (--samples) must be 2 or more to make a pair; got {samples}")
    if split not in ("train", *SPLITS):
        raise UsageError(f"split (--split) must be train, validation or test; got {split!r}")
    cfg = _resolve(task=task, model=model, data=data, rewards=rewards, require_named=False, **keys)
    return build_pairs(cfg, Path(out), samples, float(min_gap), split)
