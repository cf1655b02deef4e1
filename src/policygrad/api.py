"""The Python API: policygrad.train, evaluate and sample, taking objects or strings.

Everything the CLI does goes through here, with the same names, defaults and checks; cli.py
parses its arguments into these calls and prints what they return. Objects go where the CLI takes
strings:
- model: a folder or an alias, or a transformers model object (with tokenizer=). An object is
  written once into the run folder (base-model/), so the run names its model by that folder's
  absolute path as any other, and a resume, `merge` or `eval` finds the model it started from;
- task, data, rewards: a task name, a policygrad.Task or a text gymnasium.Env; rows, a
  datasets.Dataset or DatasetDict, or files; reward functions (prompts, completions, **columns)
  -> list[float], names and specs, each optionally weighted. A task built from objects is
  registered as `<name>@<fingerprint>` (its rows, and its rewards' names, weights and code), the
  name the run's config records;
- env: a Gymnasium id, or an env instance, class or factory (registered as
  policygrad/<Name>-<digits>-v0, the digits from its class or the factory's code); a text env (its
  observation_space a gymnasium.spaces.Text) is a multi-turn task, as task= would take it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings

import gymnasium as gym
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from . import checkpoint as checkpoint_mod
from . import config as config_mod
from . import dist, placement, resolve, runs, trainer
from .config import Config
from .control.rollout import evaluate as play_episodes
from .control.rollout import register_env
from .curves import plot_runs
from .errors import UsageError
from .lm import models, tasks
from .lm.models import check_model_object
from .lm.reward_server import serve
from .lm.tasks import prompt_text
from .merging import MergeWarning, merge_run
from .results import ControlEvaluation, Evaluation, LMEvaluation, Sample, TrainResult
from .trainer import Callback

SPLITS = ("validation", "test")


# --- turning objects into the config's names --------------------------------------------------
def _config_values(config: Any) -> dict:
    if config is None:
        return {}
    if isinstance(config, Config):
        return config_mod.to_dict(config)
    if isinstance(config, Mapping):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        return resolve.load_yaml(str(config))
    raise UsageError(f"config must be a policygrad.Config, a dict of config keys or a YAML file's path; "
                     f"got {type(config).__name__}")


def _is_name(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def _task_name(task: Any, data: Any, rewards: Any, values: dict) -> Optional[str]:
    """The config's task: as given, or (objects, data, rewards) built and registered."""
    if task is None and data is None and rewards is None:
        return None
    if task is None:
        task = values.get("task")  # data or rewards replacing those of the config's task
    return tasks.from_python(task, data, rewards, set(config_mod.field_names()))


def _as_task(env: Any, task: Any) -> tuple[Any, Any]:
    """(env, task): a text env given as env= (one whose observation_space is gymnasium.spaces.Text;
    an instance, or the class or factory that makes one) is a language-model task, played as
    multi-turn episodes; any other env stays a control env."""
    if env is None or _is_name(env):
        return env, task
    made = env
    if not isinstance(env, gym.Env):
        try:
            made = env()
        except Exception:  # not made here: the control path names the error
            return env, task
    if not isinstance(getattr(made, "observation_space", None), gym.spaces.Text):
        return env, task
    if task is not None:
        raise UsageError("env= is a text env, which is itself the task: drop task=, or pass the env as task=")
    return None, env


def _env_name(env: Any) -> Optional[str]:
    if env is None or _is_name(env):
        return None if env is None else str(env)
    return register_env(env)


def make_config(config: Any = None, **keys) -> Config:
    """The Config train() resolves from the same arguments (`config`, algo, env, task, model by
    name, data, rewards, any config key), with the CLI's presets, task defaults and checks."""
    return _resolve(config, **keys)


def _resolve(config: Any = None, *, algo: Optional[str] = None, env: Any = None, task: Any = None,
             model: Any = None, data: Any = None, rewards: Any = None, model_folder: Optional[Path] = None,
             require_named: bool = True, **keys) -> Config:
    """The run's Config: `config` (a Config, taken whole, or a dict or YAML file, layered as
    --config is), then the named things, then any config key as a keyword. model_folder: where
    train() writes a model object."""
    if model is not None and not _is_name(model) and model_folder is None:
        raise UsageError("make_config takes a model by folder or alias; pass a model object to train()")
    values = _config_values(config)
    env, task = _as_task(env, task)
    named = {"algo": algo, "env": _env_name(env), "task": _task_name(task, data, rewards, {**values, **keys}),
             "model": None if model is None else str(model) if _is_name(model) else str(model_folder)}
    named = {k: v for k, v in named.items() if v is not None}
    if isinstance(config, Config):
        if "recipe" in keys:  # a Config is taken whole: nothing would lay the recipe's keys under it
            raise UsageError("recipe= presets keys while a config is resolved; a Config object is taken "
                             "whole: pass recipe= without it, or set the keys on the Config")
        changes = config_mod.canonical({**named, **keys})
        return config_mod.validate(config_mod.apply(config, changes), user=set(changes))
    if require_named:
        runs.check_run_named({**values, **keys, **named})
    return resolve.resolve(values, keys, named)


# --- train ------------------------------------------------------------------------------------
def train(config: Any = None, *, algo: Optional[str] = None, env: Any = None, task: Any = None,
          model: Any = None, tokenizer: Any = None, data: Any = None, rewards: Any = None,
          out: Optional[Union[str, os.PathLike]] = None, overwrite: bool = False,
          resume: Optional[Union[str, os.PathLike]] = None, progress: bool = True,
          callbacks: Sequence[Callback] = (), **keys) -> TrainResult:
    """Train a policy; see the module's docstring for what each argument takes.

    out: the run folder; the same call again resumes it from its newest checkpoint (a different
    run there is refused unless overwrite=True). out=None trains in a temporary folder, removed
    on return: the result keeps the model, metrics and evaluation in memory.
    resume: continue the run in that folder with its own config (objects it was built from, such
    as reward functions, are passed again). callbacks: each called with every update's metrics;
    one that returns True stops the run after that update (final evaluation and checkpoint kept).
    Under torchrun every process calls train() alike, with an out= folder they all see."""
    callbacks = [callbacks] if callable(callbacks) else callbacks or ()
    check_arguments(model, tokenizer, callbacks, keys)
    if resume is not None:  # its settings are the saved ones; what it was built from may be given again
        given = [k for k, v in {"config": config, "algo": algo, "out": out, **keys}.items() if v is not None]
        if given:
            raise UsageError(f"resume continues a run with its own config.yaml; drop {', '.join(given)}")
        config = config_mod.validate(config_mod.apply(Config(), runs.saved_config(Path(resume))))
        out = resume
    if out is None and dist.launched().world > 1:
        raise UsageError("training as several processes needs out= (a folder every process sees)")
    if model is not None and not _is_name(model):
        check_model_object(model)
    scratch = Path(tempfile.mkdtemp(prefix="policygrad-run-")) if out is None else None
    folder = scratch or Path(out)
    try:
        cfg = _resolve(config, algo=algo, env=env, task=task, model=model, data=data, rewards=rewards,
                      model_folder=folder.resolve() / runs.BASE_MODEL, require_named=resume is None, **keys)
        return _train(cfg, folder, None if model is None or _is_name(model) else model, tokenizer, overwrite,
                      progress, callbacks, keep=scratch is None)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def check_arguments(model: Any, tokenizer: Any, callbacks: Any, keys: dict) -> None:
    if "nproc" in keys:
        raise UsageError("nproc is the command line's launcher; from Python, run your script as N processes "
                         "with torchrun --nproc-per-node N (every process calls train alike)")
    if tokenizer is not None and (model is None or _is_name(model)):
        raise UsageError("tokenizer= goes with a model object; a model folder or alias brings its own tokenizer")
    if not isinstance(callbacks, (list, tuple)) or not all(callable(c) for c in callbacks):
        raise UsageError("callbacks must be a list of functions, each called with an update's metrics")


def _train(cfg: Config, folder: Path, model_object: Any, tokenizer: Any, overwrite: bool, progress: bool,
           callbacks: Sequence[Callback], keep: bool) -> TrainResult:
    if model_object is None:
        runs.preflight(cfg)  # before the run folder is touched
    caller_group = dist.group_exists()  # the caller's own process group is left as it was
    ranks = dist.init(_device_type(cfg))
    started_group = ranks.world > 1 and not caller_group
    finished = False
    try:
        resume, complete = dist.on_main(lambda: runs.prepare_run(folder, cfg, overwrite))
        if model_object is not None:
            if not resume:
                dist.on_main(lambda: models.write_model(model_object, tokenizer, folder / runs.BASE_MODEL))
            runs.preflight(cfg)
        if complete:  # read back; its model loads when result.policy is first asked for
            work, final, summary = None, _read_json(folder / "final_eval.json"), {}
        else:
            run = trainer.run(cfg, folder, progress=progress, resume=resume, callbacks=callbacks)
            work, final, summary = run.work, run.final, run.summary
            dist.agree(False)  # rank 0 has closed metrics.jsonl: every rank reads it whole
        result = TrainResult(cfg, _final(cfg, final, folder), _history(folder), folder if keep else None, summary,
                             was_complete=complete, workload=work)
        finished = True
        return result
    finally:
        if started_group:
            dist.shutdown(together=finished)  # a process group left to the interpreter's exit can abort it


def _device_type(cfg: Config) -> str:
    return placement.resolve(cfg).device.type


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _history(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _final(cfg: Config, final: dict, folder: Path) -> Optional[Evaluation]:
    if not final:
        return None
    if cfg.is_lm:
        written = sorted((folder / "samples").glob("test-step*.jsonl"))
        # JSON lines split at "\n" only: generated text may hold U+2028 or U+0085, which splitlines()
        # also breaks at (ensure_ascii=False writes them as they are)
        samples = [json.loads(line) for line in written[-1].read_text().split("\n") if line.strip()] if written else []
        return LMEvaluation.from_metrics(final, "test", samples)
    return ControlEvaluation(cfg.env, cfg.eval_episodes, final["eval/return_mean"], final["eval/return_std"])


# --- evaluate and sample ----------------------------------------------------------------------
def _run_checkpoint(run: Any, checkpoint: str, device: Optional[str], env: Any = None, task: Any = None,
                    data: Any = None, rewards: Any = None) -> Optional[Path]:
    """A run folder's checkpoint (None for a TrainResult, which is in memory); objects the run was
    built from (reward functions, an env factory) are registered again first."""
    if isinstance(run, TrainResult):
        if checkpoint != "latest" or device is not None:
            raise UsageError("checkpoint= and device= pick from a run folder; a TrainResult is evaluated as it is "
                             "(pass result.out for its folder)")
        return None
    if not _is_name(run):
        raise UsageError(f"run must be a run folder or a TrainResult; got {type(run).__name__}")
    folder = Path(run)
    if not folder.is_dir():
        raise UsageError(f"run folder '{folder}' does not exist")
    env, task = _as_task(env, task)
    _env_name(env)
    if task is not None or data is not None or rewards is not None:
        _task_name(task, data, rewards, runs.saved_config(folder))
    return checkpoint_mod.named(folder, checkpoint)


def _run_workload(run: Any, checkpoint: str, device: Optional[str], **objects):
    """(workload, config) of a TrainResult or of a run folder's checkpoint."""
    path = _run_checkpoint(run, checkpoint, device, **objects)
    return (run.work(), run.config) if path is None else trainer.load_workload(path, device=device)


def _base_workload(run: Any, checkpoint: str, device: Optional[str], **objects):
    """The model a language-model run started from, with the run's config (read, not loaded)."""
    from .lm.rollout import LMWorkload  # transformers: not for control runs
    path = _run_checkpoint(run, checkpoint, device, **objects)
    cfg = run.config if path is None else trainer.load_config(checkpoint_mod.load_state(path), path)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
    if not cfg.is_lm:
        raise UsageError("base=True compares a language model with the model it started from; this is a control run")
    if cfg.model.endswith(runs.BASE_MODEL) and not Path(cfg.model).is_dir():
        raise UsageError(f"the run started from a model object whose copy '{cfg.model}' is gone (trained with "
                         "out=None?): train with out= to keep it, or evaluate(model=<the object>, ...)")
    return LMWorkload(cfg, cfg.seed), cfg


def evaluate(run: Any = None, *, split: str = "test", checkpoint: str = "latest", episodes: int = 20,
             seed: int = 12345, device: Optional[str] = None, base: bool = False, model: Any = None,
             tokenizer: Any = None, task: Any = None, data: Any = None, rewards: Any = None, env: Any = None,
             **keys) -> Evaluation:
    """A trained run (a TrainResult or a run folder, at `checkpoint`) on its task's held-out split,
    or a control policy on `episodes` deterministic episodes from `seed`. base=True evaluates the
    model the run started from instead, with the run's config. Without a run: an untrained model
    (model=, task= or data= and rewards=, any config key) on a task: the baseline."""
    if split not in SPLITS:
        raise UsageError(f"split (--split) must be validation or test; got {split!r}")
    if episodes <= 0:
        raise UsageError(f"episodes (--episodes) must be positive; got {episodes}")
    if run is None:
        return _evaluate_untrained(split, device, model, tokenizer, task, data, rewards, keys)
    ignored = [k for k, v in {"model": model, "tokenizer": tokenizer, **keys}.items() if v is not None]
    if ignored:
        raise UsageError(f"a run is evaluated with its own model and config; {', '.join(ignored)} are for "
                         "an untrained model without a run")
    objects = {"env": env, "task": task, "data": data, "rewards": rewards}
    work, cfg = (_base_workload if base else _run_workload)(run, checkpoint, device, **objects)
    if cfg.is_lm:
        return LMEvaluation.from_metrics(work.evaluate(split), split)
    returns = play_episodes(work.policy, cfg.env, episodes, seed)
    return ControlEvaluation(cfg.env, len(returns), float(returns.mean()), float(returns.std()), returns.tolist())


def _evaluate_untrained(split: str, device: Optional[str], model: Any, tokenizer: Any, task: Any, data: Any,
                        rewards: Any, keys: dict) -> LMEvaluation:
    from .lm.rollout import LMWorkload  # transformers: not for control runs
    if task is None and data is None:
        raise UsageError("evaluate needs a run, or task= (and model=) to evaluate an untrained model")
    with tempfile.TemporaryDirectory(prefix="policygrad-model-") as scratch:
        folder = Path(scratch) / runs.BASE_MODEL
        if model is not None and not _is_name(model):
            models.write_model(model, tokenizer, folder)
        cfg = _resolve(task=task, model=model, data=data, rewards=rewards, model_folder=folder,
                       require_named=False, **({"device": device} if device else {}), **keys)
        return LMEvaluation.from_metrics(LMWorkload(cfg, cfg.seed).evaluate(split), split)


def check_sampling(n: int, temperature: Optional[float], top_p: Optional[float], top_k: Optional[int]) -> None:
    if n <= 0:
        raise UsageError(f"n (-n) must be positive; got {n}")
    if temperature is not None and not temperature > 0:
        raise UsageError(f"temperature (--temperature) must be positive; got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"top_p (--top-p) must lie in (0, 1]; got {top_p}")
    if top_k is not None and top_k < 0:
        raise UsageError(f"top_k (--top-k) must be >= 0 (0: no limit); got {top_k}")


def sample(run: Any, prompts: Union[str, Sequence[Union[str, dict]], None] = None, *, n: int = 1, seed: int = 0,
           temperature: Optional[float] = None, top_p: Optional[float] = None, top_k: Optional[int] = None,
           checkpoint: str = "latest", device: Optional[str] = None,
           env_seeds: Optional[Sequence[int]] = None, model_defaults: bool = False) -> list[Sample]:
    """n completions of each prompt (a string, or a row with chat `messages`) from a trained
    language-model run (a TrainResult or a run folder); sampling settings default to the run's.
    Truncated sampling (top_p, top_k) is for reading completions only; training refuses it. A
    multi-turn run (a text env's task) plays n whole episodes from each of env_seeds instead.
    model_defaults: also apply the model's own generation_config processors (a repetition_penalty,
    ...), which training and evaluation never do."""
    check_sampling(n, temperature, top_p, top_k)
    if _is_name(run) and (not Path(run).is_dir() or checkpoint_mod.latest(Path(run)) is None):
        raise UsageError(f"'{run}' is not a run folder with a checkpoint")
    work, cfg = _run_workload(run, checkpoint, device)
    if not cfg.is_lm:
        raise UsageError(f"run '{run}' trained a control policy; `sample` is for language models")
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    sampling = dataclasses.replace(cfg, **{k: v for k, v in given.items() if v is not None})
    if (work.episodes is not None) != (env_seeds is not None) or (prompts is None) == (env_seeds is None):
        raise UsageError(f"run '{run}' plays a text env's episodes: give env seeds (--env-seed N), not prompts"
                         if work.episodes is not None else f"run '{run}' answers prompts: give prompts "
                         "(--prompt TEXT); env seeds are for multi-turn runs")
    if env_seeds is not None:
        played, _ = work.episodes.play([{"env_seed": int(s)} for s in env_seeds], n, seed, sampling, model_defaults)
        return [Sample(**{k: e.as_sample()[k] for k in ("prompt", "completion", "conversation")},
                       rewards=list(e.rewards)) for e in played]
    rows = [p if isinstance(p, dict) else {"prompt": p} for p in ([prompts] if isinstance(prompts, str) else prompts)]
    texts = [work.policy.render(r) for r in rows for _ in range(n)]
    batch = work.policy.generate(texts, sampling, seed, model_defaults=model_defaults)
    shown = [prompt_text(r) for r in rows for _ in range(n)]
    return [Sample(p, c) for p, c in zip(shown, work.policy.decode(batch.actions, batch.mask))]


# --- the other commands -----------------------------------------------------------------------
def merge(run: Union[str, os.PathLike], out: Union[str, os.PathLike], checkpoint: str = "latest",
          dtype: str = "float32") -> Path:
    """A language-model run's model (its LoRA adapter merged in) written to `out` as a plain
    transformers folder; the folder written. dtype: float32 (keeps every update), bfloat16,
    float16 or base (the base model's own); a MergeWarning when it rounds away over 1% of the
    update's norm."""
    if not Path(run).is_dir():
        raise UsageError(f"run folder '{run}' does not exist")
    merged = merge_run(Path(run), Path(out), checkpoint, dtype)
    if merged.warning():
        warnings.warn(merged.warning(), MergeWarning, stacklevel=2)
    return merged.out


def plot(runs_: Sequence[Union[str, os.PathLike]], metric: Union[str, Sequence[str], None] = None,
         out: Union[str, os.PathLike] = "curves.png", smooth: float = 0.6, x: Optional[str] = None) -> dict:
    """Learning curves of runs (seeds of one run: mean and min-max band) into an image; what was
    plotted and which runs lack the metric. metric: one or several (one figure); by default the
    held-out curve of the first run's kind."""
    folders = [Path(r) for r in ([runs_] if _is_name(runs_) else runs_)]
    if metric is not None and not isinstance(metric, str):
        if not metric:
            raise UsageError("metric is an empty list: name at least one metric, or None for the default")
        metric = list(metric)[0] if len(metric) == 1 else list(metric)
    if metric is None:
        first = folders[0] if folders else Path(".")
        is_lm = bool((runs.saved_config(first) if (first / "config.yaml").is_file() else {}).get("task"))
        metric = "eval/reward_mean" if is_lm else "eval/return_mean"
    return {"metric": metric, **plot_runs(folders, metric, Path(out), smooth, x)}


def serve_reward(task: Any = None, rewards: Any = None, host: str = "127.0.0.1", port: int = 8000,
                 timeout: float = 30.0) -> None:
    """Serve a task's rewards, or rewards (functions, names, specs), over HTTP until interrupted."""
    if (task is None) == (rewards is None):
        raise UsageError("serve-reward needs either a task (--task NAME) or rewards (--reward SPEC, repeatable)")
    if not 0 < port < 65536:
        raise UsageError(f"port (--port) must be in 1..65535; got {port}")
    reward_set = (tasks.load(tasks.from_python(task), set(config_mod.field_names())).rewards if rewards is None
                  else tasks.reward_set(rewards))
    reward_set.configure(timeout=timeout, retries=0)
    serve(reward_set, host, port)


# --- stages around RL -------------------------------------------------------------------------
