"""A run's config from its layers (later wins): dataclass defaults < the shipped preset for (env,
algo), or for a language model the LM defaults < the algorithm's < LoRA's < the task's own < the
recipe's (`recipe=NAME`) < `--config FILE.yaml` < `key=value` overrides < explicit CLI flags (or
Python keywords)."""
from __future__ import annotations

import dataclasses
import os
from importlib import resources
from typing import Any, Callable

import yaml

from .config import Config, apply, canonical, field_names, validate
from .errors import ConfigError
from .lm import tasks


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings to a dict; values are read as YAML scalars (1e-3, true, [64,64], null)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def load_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file '{path}' not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of key: value")
    return data


def preset(env: str, algo: str) -> dict[str, Any]:
    """Tuned hyper-parameters shipped for (env, algo); empty for any other env."""
    text = resources.files("policygrad.control").joinpath("presets.yaml").read_text(encoding="utf-8")
    table = yaml.safe_load(text) or {}
    return dict((table.get(env) or {}).get(algo) or {})


LM_DEFAULTS: dict[str, Any] = {
    "gamma": 1.0, "gae_lambda": 0.95, "lr": 1e-5, "value_lr": 1e-4, "advantage": "sequence",
    "max_grad_norm": 1.0, "eval_every": 10, "n_epochs": 1, "batch_size": 16, "cg_iters": 10,
    "cg_damping": 0.1, "normalize_advantages": True,
}
LM_ALGO_DEFAULTS: dict[str, dict[str, Any]] = {
    "reinforce": {"lr": 3e-5},
    # measured on positive-review, 40 steps: lr 1e-5 gained +0.23 test reward (KL 1.8 nats), 2.5e-5
    # +0.47 (KL 6.6 nats), 1.5e-5 +0.48 (KL 4.5 nats)
    "ppo": {"n_epochs": 2, "batch_size": 8, "lr": 1.5e-5},
    # On SmolLM2-135M a Fisher-vector product costs a backward pass or more (3.5 s for 2
    # completions, 5 s for 4: parameter-sized work dominates), so few CG iterations on a 1/8
    # sub-sample (the TRPO paper used 1/10); checkpointing off, as its recomputation repeats inside
    # every double backward (gradient_checkpointing is off by default). The step is far from
    # quadratic: backtrack faster than control's 0.8.
    # max_kl 0.01 moved too little: after 22 of 40 steps the training reward had not risen.
    "trpo": {"max_kl": 0.02, "value_epochs": 2, "cg_iters": 5, "fvp_fraction": 0.125,
             "line_search_shrink": 0.5},
}


# With LoRA only the adapter moves, from B = 0: a gradient step moves the policy far less than the
# same lr on every weight, and LoRA recipes run ~10x the full fine-tune's lr (measured on
# positive-review: docs/results.md, "LoRA").
LM_LORA_DEFAULTS: dict[str, dict[str, Any]] = {
    "reinforce": {"lr": 3e-4},
    "ppo": {"lr": 1.5e-4},
}


# Published recipes as presets of keys, each as its paper (or, where the paper is silent, its
# reference implementation) sets them; docs/recipes.md is the table. Only what the recipe is about:
# learning rate, batch and epochs stay the run's.
RECIPES: dict[str, dict[str, Any]] = {
    # Shao et al. 2024 (DeepSeekMath), eq. 3: group-whitened outcome advantages, each
    # completion's token mean, PPO's clip 0.2, a k3 KL term in the loss at beta 0.04
    "grpo": {"algo": "ppo", "advantage": "sequence", "baseline": "group", "normalize_advantages": False,
             "loss_agg": "seq-mean-token-mean", "clip_eps": 0.2, "kl_in": "loss", "kl_estimator": "k3",
             "kl_coef": 0.04},
    # Yu et al. 2025 (DAPO): clip-higher (0.2 / 0.28), the token mean over the batch, no KL; its
    # soft overlong punishment (penalty 1) over a buffer sized from the run (RECIPE_DERIVED); dynamic
    # sampling drops the groups whose rewards are all equal and draws more (at most max_draws rounds)
    "dapo": {"algo": "ppo", "advantage": "sequence", "baseline": "group", "normalize_advantages": False,
             "loss_agg": "token-mean", "clip_low": 0.2, "clip_high": 0.28, "kl_coef": 0.0},
    # Liu et al. 2025 (Understanding R1-Zero-like training, Dr. GRPO): no std in the advantage, sums
    # over a constant (max_new_tokens) in place of each completion's length, no KL term
    "dr_grpo": {"algo": "ppo", "advantage": "sequence", "baseline": "group-mean", "normalize_advantages": False,
                "loss_agg": "seq-mean-token-sum-norm", "clip_eps": 0.2, "kl_coef": 0.0},
    # Zheng et al. 2025 (GSPO): one length-normalised ratio per completion, clipped to
    # [1 - 3e-4, 1 + 4e-4], averaged per completion, no KL
    "gspo": {"algo": "ppo", "advantage": "sequence", "baseline": "group", "normalize_advantages": False,
             "ratio_level": "sequence", "clip_low": 3e-4, "clip_high": 4e-4, "loss_agg": "seq-mean-token-mean",
             "kl_coef": 0.0},
    # MiniMax 2025 (MiniMax-M1), eq. 4-5: the clipped, detached ratio weighs A x log pi over the
    # batch's tokens; no lower bound (clip_low 1: the ratio is never below 0), the paper tunes only
    # the upper one without publishing it: 0.28 as DAPO's, Trinity-RFT's default
    "cispo": {"algo": "ppo", "surrogate": "cispo", "advantage": "sequence", "baseline": "group",
              "normalize_advantages": False, "loss_agg": "token-mean", "clip_low": 1.0, "clip_high": 0.28,
              "kl_coef": 0.0},
    # Ahmadian et al. 2024 (Back to basics, RLOO): a completion is one action, its summed log-prob
    # times the leave-one-out advantage; the KL to the reference as a reward penalty
    "rloo": {"algo": "reinforce", "advantage": "sequence", "baseline": "rloo", "normalize_advantages": False,
             "loss_agg": "seq-mean-token-sum", "kl_in": "reward", "kl_estimator": "k1"},
    # Hu 2025 (REINFORCE++): the token-level KL penalty in the reward, undiscounted returns to
    # go, whitened over the global batch (its baseline), PPO's clipped surrogate over tokens
    "reinforce_pp": {"algo": "ppo", "advantage": "mc", "gamma": 1.0, "normalize_advantages": True,
                     "loss_agg": "token-mean", "clip_eps": 0.2, "kl_in": "reward", "kl_estimator": "k1"},
}


# Recipe keys whose value follows the run's other keys, which a recipe cannot know: fn(cfg, task) ->
# value, set once every layer is in (so the value is the run's: config.yaml records it), unless the
# user set the key. DAPO's overlong buffer is a share of the length limit: 4096 of 20480 tokens, a
# fifth. Both DAPO's batch options shape single completions: on a multi-turn task (the workload
# refuses them there) the recipe leaves them off, and sets the loss side alone.
RECIPE_DERIVED: dict[str, dict[str, Callable[[Config, tasks.Task], Any]]] = {
    "dapo": {"overlong_buffer": lambda cfg, task: 0 if task.env is not None else cfg.max_new_tokens // 5,
             "dynamic_sampling": lambda cfg, task: task.env is None},
}


def lm_defaults(task: tasks.Task, algo: str, user: dict[str, Any]) -> dict[str, Any]:
    lora = bool(user.get("lora_r")) or user.get("adapter") is not None
    defaults = {**LM_DEFAULTS, **LM_ALGO_DEFAULTS.get(algo, {}),
                **(LM_LORA_DEFAULTS.get(algo, {}) if lora else {}), **task.defaults}
    if user.get("use_value_head") and "advantage" not in user:
        defaults["advantage"] = "gae"  # a value head is there to be used
    if user.get("use_value_head") and user.get("advantage", "gae") == "gae" and "turn_advantage" not in user:
        defaults["turn_advantage"] = "gae"  # over the turns of a multi-turn task too
    if user.get("kl_in") == "reward" and "kl_estimator" not in user:
        defaults["kl_estimator"] = "k1"  # a task whose KL is a loss term may default to k2 or k3
    return defaults


def resolve(file_values: dict[str, Any], overrides: dict[str, Any], flags: dict[str, Any]) -> Config:
    """Build the run's config from a YAML file's values, key=value overrides and explicit flags."""
    # each layer under the keys' own names, so that a later layer's alias replaces an earlier key
    layered = {**canonical(file_values), **canonical(overrides),
               **canonical({k: v for k, v in flags.items() if v is not None})}
    probe = apply(Config(), layered)  # find algo/env/task (and reject unknown keys) before defaults
    recipe = RECIPES.get(probe.recipe, {}) if probe.task else {}
    probe = apply(probe, {**recipe, **layered})  # the recipe's algo, unless the user names one
    # reads the task's data: an unknown task fails here, before any run starts
    task = tasks.load(probe.task, set(field_names())) if probe.task else None
    base = lm_defaults(task, probe.algo, {**recipe, **layered}) if task else preset(probe.env, probe.algo)
    cfg = apply(apply(Config(), {**base, **recipe}), layered)
    derived = RECIPE_DERIVED.get(probe.recipe, {}) if task else {}
    cfg = apply(cfg, {key: fn(cfg, task) for key, fn in derived.items() if key not in layered})
    cfg = validate(cfg, user=set(layered))
    if cfg.ptx_data and os.path.isfile(cfg.ptx_data):  # a run (and its resume) finds it from any folder
        cfg = dataclasses.replace(cfg, ptx_data=os.path.abspath(cfg.ptx_data))
    return cfg
