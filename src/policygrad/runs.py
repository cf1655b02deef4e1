"""A run before it starts: which keys name it, what can be checked in a second, and its folder
(a new run, a resume of the same run, or a refusal of a different one). The CLI and the Python
API both go through here."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from . import checkpoint, placement
from . import config as config_mod
from .control.rollout import make_envs
from .errors import UsageError
from .lm import adapters, models, supervised, tasks
from .trainer import is_complete

RUN_FILES = ("config.yaml", "metrics.jsonl", "tb", "checkpoints", "samples", "final_eval.json", "wandb",
             "wandb-id", "curves.png", "base-model")
"""What a run writes into its folder; --overwrite removes these and nothing else."""
BASE_MODEL = "base-model"
"""Where a run started from a model object (policygrad.train(model=<transformers model>)) keeps it."""


def check_run_named(named: dict) -> None:
    """A run is named in full: an algorithm, and either an env or a task (by flag or keyword,
    config file or override); no default picks one silently."""
    named = {k.replace("-", "_"): v for k, v in named.items() if v is not None}
    if "env" in named and "task" in named:
        raise UsageError(f"give either --env (a control run) or --task (a language-model run), not both; "
                         f"got env {named['env']} and task {named['task']}")
    if "env" not in named and "task" not in named:
        raise UsageError("train needs --env ENV (a Gymnasium control run, e.g. CartPole-v1) or --task TASK "
                         "(a language-model run; see `policygrad tasks`)")
    if "model" in named and "task" not in named:
        raise UsageError(f"--model is the language model of a --task run; this is a control run "
                         f"(env {named['env']}): drop --model, or give --task instead of --env")
    if "algo" not in named and named.get("recipe", "none") == "none":  # a recipe names its algorithm
        raise UsageError("train needs --algo reinforce, trpo or ppo, or a --recipe (or algo in --config or "
                         "algo=...)")


def preflight(cfg) -> None:
    """What can be checked in a second fails here, before the run folder is touched: the device and
    dtype, the model, LoRA targets and a starting adapter, the environment."""
    placement.resolve(cfg)
    if cfg.is_lm:
        folder = models.resolve(cfg.model)
        if cfg.uses_lora:
            adapters.check(cfg, folder)
        if cfg.ptx_coef > 0:  # its rows' columns (tokenising them waits for the first update)
            tasks.rows_of(cfg.ptx_data, "ptx_data", supervised.check_row)
    else:
        make_envs(cfg.env, 1).close()


def saved_config(run: Path) -> dict:
    """A run folder's config.yaml (to resume it)."""
    if not (run / "config.yaml").is_file():
        raise UsageError(f"'{run}' is not a run folder (it has no config.yaml)")
    try:
        values = yaml.safe_load((run / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise UsageError(f"'{run / 'config.yaml'}' is not valid YAML ({e.__class__.__name__}); "
                         "fix it or start over with --overwrite") from None
    if not isinstance(values, dict):
        raise UsageError(f"'{run / 'config.yaml'}' must be a mapping of config keys")
    return values


def prepare_out(out: Path, cfg_dict: dict, overwrite: bool) -> bool:
    """Whether to resume the run in `out`. The same config there resumes it from its newest
    checkpoint (or starts it over when it has none); a different one is refused; overwrite
    clears only the run's own files."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out '{out}' is a file, not a folder")
    saved = out / "config.yaml"
    if not saved.exists():
        return False
    if not overwrite:
        try:
            same = config_mod.same_run(yaml.safe_load(saved.read_text()), cfg_dict)
        except yaml.YAMLError:
            same = False
        if not same:
            raise UsageError(f"--out '{out}' holds a different run; choose another --out, pass --overwrite "
                             f"(overwrite=True) to replace it, or --resume {out} to continue it")
        if checkpoint.latest(out) is not None:
            return True
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return False


def prepare_run(out: Path, cfg, overwrite: bool) -> tuple[bool, bool]:
    """(whether to resume the run in out, whether it is already complete)."""
    resume = prepare_out(out, config_mod.to_dict(cfg), overwrite)
    return resume, resume and is_complete(out)

