"""A run's config from its layers (later wins): dataclass defaults < the shipped preset for (env,
algo), or for a language model the LM defaults < the algorithm's < LoRA's < the task's own <
`--config FILE.yaml` < `key=value` overrides < explicit CLI flags (or Python keywords)."""
from __future__ import annotations

import dataclasses
import os
from importlib import resources
from typing import Any

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


def lm_defaults(task: str, algo: str, user: dict[str, Any]) -> dict[str, Any]:
    # reads the task's data: an unknown task fails here, before any run starts
    lora = bool(user.get("lora_r")) or user.get("adapter") is not None
    defaults = {**LM_DEFAULTS, **LM_ALGO_DEFAULTS.get(algo, {}),
                **(LM_LORA_DEFAULTS.get(algo, {}) if lora else {}),
                **tasks.load(task, set(field_names())).defaults}
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
    base = lm_defaults(probe.task, probe.algo, layered) if probe.task else preset(probe.env, probe.algo)
    cfg = apply(Config(), base)
    cfg = validate(apply(cfg, layered), user=set(layered))
    if cfg.ptx_data and os.path.isfile(cfg.ptx_data):  # a run (and its resume) finds it from any folder
        cfg = dataclasses.replace(cfg, ptx_data=os.path.abspath(cfg.ptx_data))
    return cfg
