"""Config resolution refuses every key combination a run cannot use, each in one message that
names the keys and what would be right; the combinations a run can use resolve."""
import dataclasses
import re
from typing import Optional

import pytest

from policygrad.config import CONTROL_KEYS, LM_KEYS, Config, ConfigError, field_names, validate
from policygrad.resolve import resolve

TASK = "positive-review"  # a built-in task: resolving it reads its packaged prompts, no model


def resolve_run(kind: str, algo: str, overrides: dict) -> Config:
    where = {"env": "CartPole-v1"} if kind == "control" else {"task": TASK}
    return resolve({}, overrides, {"algo": algo, **where})


# (kind, algo, user overrides, texts the message must contain)
REFUSED = {
    # the advantage and the critic it needs
    "sequence advantage on control": ("control", "ppo", {"advantage": "sequence"},
                                      ["advantage=sequence", "control run", "gae or mc"]),
    "gae on an LM without value head": ("lm", "ppo", {"advantage": "gae"},
                                        ["advantage=gae", "use_value_head=true"]),
    "gae on an LM, value head off": ("lm", "trpo", {"advantage": "gae", "use_value_head": False},
                                     ["advantage=gae", "use_value_head=true"]),
    "value head beside sequence": ("lm", "ppo", {"use_value_head": True, "advantage": "sequence"},
                                   ["use_value_head=true", "advantage=sequence", "gae or mc"]),
    # sequence baselines
    "rloo with one sample": ("lm", "reinforce", {"samples_per_prompt": 1},
                             ["baseline=rloo", "samples_per_prompt >= 2", "got 1"]),
    "group with one sample": ("lm", "ppo", {"samples_per_prompt": 1, "baseline": "group"},
                              ["baseline=group", "samples_per_prompt >= 2"]),
    "baseline with gae": ("lm", "ppo", {"baseline": "rloo", "use_value_head": True},
                          ["baseline", "advantage=sequence", "advantage=gae"]),
    "baseline with mc": ("lm", "reinforce", {"baseline": "group", "advantage": "mc"},
                         ["baseline", "advantage=mc"]),
    # dynamic sampling (issue #25)
    "dynamic sampling with one sample": ("lm", "reinforce", {"dynamic_sampling": True, "samples_per_prompt": 1,
                                                             "baseline": "moving-average"},
                                         ["dynamic_sampling=true", "samples_per_prompt >= 2"]),
    "max_draws without dynamic sampling": ("lm", "ppo", {"max_draws": 5}, ["max_draws", "dynamic_sampling=true"]),
    "max_draws zero": ("lm", "ppo", {"dynamic_sampling": True, "max_draws": 0}, ["max_draws", "positive"]),
    "dynamic_sampling on control": ("control", "ppo", {"dynamic_sampling": True},
                                    ["dynamic_sampling is a language-model key"]),
    # KL
    "adaptive KL from 0": ("lm", "reinforce", {"adaptive_kl": True, "kl_coef": 0.0},
                           ["adaptive_kl=true", "kl_coef > 0"]),
    "kl_target without adaptive": ("lm", "reinforce", {"kl_target": 3.0}, ["kl_target", "adaptive_kl=true"]),
    "kl_horizon without adaptive": ("lm", "reinforce", {"kl_horizon": 100}, ["kl_horizon", "adaptive_kl=true"]),
    "kl_target zero": ("lm", "reinforce", {"adaptive_kl": True, "kl_target": 0.0}, ["kl_target", "positive"]),
    "kl_coef negative": ("lm", "reinforce", {"kl_coef": -0.1}, ["kl_coef", ">= 0"]),
    # truncated sampling while training
    "top_p below 1": ("lm", "ppo", {"top_p": 0.9}, ["top_p=0.9", "top_p=1.0 top_k=0", "--top-p", "biased"]),
    "top_k set": ("lm", "reinforce", {"top_k": 50}, ["top_k=50", "top_p=1.0 top_k=0", "--top-k"]),
    # critic keys
    "clip_value_eps without critic": ("lm", "ppo", {"clip_value_eps": 0.2}, ["clip_value_eps", "use_value_head"]),
    "clip_value_eps with trpo": ("control", "trpo", {"clip_value_eps": 0.2}, ["clip_value_eps", "PPO", "trpo"]),
    "clip_value_eps zero": ("control", "ppo", {"clip_value_eps": 0.0}, ["clip_value_eps", "positive"]),
    "vf_coef without critic": ("lm", "ppo", {"vf_coef": 1.0}, ["vf_coef", "critic", "use_value_head"]),
    "value_lr without critic": ("lm", "reinforce", {"value_lr": 1e-4}, ["value_lr", "critic"]),
    "value_lr with control ppo": ("control", "ppo", {"value_lr": 1e-3}, ["value_lr", "lr"]),
    "value_baseline with ppo gae": ("control", "ppo", {"value_baseline": False},
                                    ["value_baseline", "REINFORCE", "algo=ppo"]),
    "value_baseline on a critic-free LM": ("lm", "reinforce", {"value_baseline": False},
                                           ["value_baseline", "critic"]),
    # keys of another algorithm
    "target_kl with trpo": ("control", "trpo", {"target_kl": 0.01}, ["target_kl", "PPO", "trpo"]),
    "target_kl with reinforce": ("lm", "reinforce", {"target_kl": 0.01}, ["target_kl", "reinforce"]),
    "target_kl zero": ("control", "ppo", {"target_kl": 0.0}, ["target_kl", "positive"]),
    "clip_eps with trpo": ("control", "trpo", {"clip_eps": 0.1}, ["clip_eps is PPO's", "algo=ppo"]),
    "clip_schedule with reinforce": ("control", "reinforce", {"clip_schedule": "linear"}, ["clip_schedule is PPO's"]),
    "n_epochs with reinforce": ("lm", "reinforce", {"n_epochs": 2}, ["n_epochs is PPO's"]),
    "max_kl with ppo": ("control", "ppo", {"max_kl": 0.02}, ["max_kl is TRPO's", "algo=trpo"]),
    "cg_iters with reinforce": ("lm", "reinforce", {"cg_iters": 5}, ["cg_iters is TRPO's"]),
    "cg_damping with ppo": ("control", "ppo", {"cg_damping": 0.01}, ["cg_damping is TRPO's"]),
    "line_search_steps with ppo": ("control", "ppo", {"line_search_steps": 5}, ["line_search_steps is TRPO's"]),
    "line_search_shrink with ppo": ("lm", "ppo", {"line_search_shrink": 0.5}, ["line_search_shrink is TRPO's"]),
    "fvp_fraction with ppo": ("lm", "ppo", {"fvp_fraction": 0.5}, ["fvp_fraction is TRPO's"]),
    "value_epochs with ppo": ("control", "ppo", {"value_epochs": 3}, ["value_epochs is TRPO's"]),
    "ent_coef with trpo": ("control", "trpo", {"ent_coef": 0.01}, ["ent_coef", "TRPO has none"]),
    "vf_coef with trpo": ("control", "trpo", {"vf_coef": 0.5}, ["vf_coef", "TRPO has none"]),
    "batch_size with reinforce": ("control", "reinforce", {"batch_size": 64}, ["batch_size", "REINFORCE"]),
    "gae_lambda with mc": ("control", "reinforce", {"gae_lambda": 0.9}, ["gae_lambda", "advantage=mc"]),
    "gae_lambda with sequence": ("lm", "ppo", {"gae_lambda": 0.9}, ["gae_lambda", "advantage=sequence"]),
    # the kind of run
    "kl_coef on control": ("control", "ppo", {"kl_coef": 0.1},
                           ["kl_coef is a language-model key", "control run (env CartPole-v1)"]),
    "model on control": ("control", "ppo", {"model": "smollm2-135m"}, ["model is a language-model key"]),
    "top_p on control": ("control", "ppo", {"top_p": 0.9}, ["top_p is a language-model key"]),
    "micro_batch_size on control": ("control", "ppo", {"micro_batch_size": 4}, ["micro_batch_size", "language-model"]),
    "num_envs on an LM": ("lm", "ppo", {"num_envs": 4}, ["num_envs is a control key", f"task {TASK}"]),
    "env on an LM": ("lm", "ppo", {"env": "CartPole-v1"}, ["env is a control key"]),
    "stop_at_return on an LM": ("lm", "reinforce", {"stop_at_return": 0.5}, ["stop_at_return is a control key"]),
    "hidden_sizes on an LM": ("lm", "ppo", {"hidden_sizes": [32]}, ["hidden_sizes is a control key"]),
    # ranges
    "micro_batch_size negative": ("lm", "ppo", {"micro_batch_size": -1}, ["micro_batch_size", ">= 0"]),
    "ent_coef negative": ("control", "ppo", {"ent_coef": -0.01}, ["ent_coef", ">= 0"]),
    "vf_coef negative": ("control", "ppo", {"vf_coef": -1.0}, ["vf_coef", ">= 0"]),
    "cg_damping negative": ("control", "trpo", {"cg_damping": -0.1}, ["cg_damping", ">= 0"]),
    "max_grad_norm negative": ("control", "ppo", {"max_grad_norm": -1.0}, ["max_grad_norm", ">= 0"]),
    "top_k negative": ("lm", "ppo", {"top_k": -1}, ["top_k", ">= 0"]),
    "seed negative": ("control", "ppo", {"seed": -1}, ["seed", ">= 0"]),
    "clip_obs zero": ("control", "ppo", {"clip_obs": 0.0}, ["clip_obs", "positive"]),
    "lr not a number": ("control", "ppo", {"lr": float("nan")}, ["lr", "finite"]),
    "max_kl infinite": ("control", "trpo", {"max_kl": float("inf")}, ["max_kl", "finite"]),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_each_bad_combination_is_refused_with_a_message_naming_its_keys(name):
    kind, algo, overrides, needles = REFUSED[name]
    with pytest.raises(ConfigError) as info:
        resolve_run(kind, algo, overrides)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


ACCEPTED = {
    "control defaults": ("control", "ppo", {}),
    "control mc reinforce without baseline": ("control", "reinforce", {"advantage": "mc", "value_baseline": False}),
    "ppo mc without baseline": ("control", "ppo", {"advantage": "mc", "value_baseline": False}),
    "ppo value clip and target_kl": ("control", "ppo", {"clip_value_eps": 0.2, "target_kl": 0.02}),
    "trpo keys": ("control", "trpo", {"max_kl": 0.02, "cg_iters": 5, "value_lr": 1e-3, "batch_size": 64}),
    "lm defaults": ("lm", "ppo", {}),
    "lm value head gives gae": ("lm", "ppo", {"use_value_head": True, "clip_value_eps": 0.2, "vf_coef": 1.0,
                                              "value_lr": 1e-4, "gae_lambda": 0.9}),
    "lm value head with mc": ("lm", "reinforce", {"use_value_head": True, "advantage": "mc",
                                                  "value_baseline": False}),
    "lm mc without critic": ("lm", "reinforce", {"advantage": "mc"}),
    "lm one sample, moving average": ("lm", "reinforce", {"samples_per_prompt": 1, "baseline": "moving-average"}),
    "lm dynamic sampling": ("lm", "trpo", {"dynamic_sampling": True, "max_draws": 5}),
    "lm adaptive KL": ("lm", "ppo", {"adaptive_kl": True, "kl_coef": 0.1, "kl_target": 3.0, "kl_horizon": 100}),
    "lm micro-batches and sampling keys": ("lm", "trpo", {"micro_batch_size": 2, "temperature": 0.7,
                                                          "top_p": 1.0, "top_k": 0, "fvp_fraction": 0.5}),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_combinations_a_run_can_use_resolve(name):
    kind, algo, overrides = ACCEPTED[name]
    cfg = resolve_run(kind, algo, overrides)
    assert all(getattr(cfg, k) == v for k, v in overrides.items())


def test_use_value_head_alone_switches_an_lm_run_to_gae():
    assert resolve_run("lm", "ppo", {"use_value_head": True}).advantage == "gae"
    assert resolve_run("lm", "ppo", {}).advantage == "sequence"


def test_only_keys_the_user_set_are_checked_against_the_kind_of_run():
    # defaults, presets and LM defaults set LM and control keys alike; the saved config of a run
    # holds every key: none of them is a user's choice, so validate alone accepts them
    cfg = resolve_run("control", "ppo", {})
    assert validate(dataclasses.replace(cfg)) == cfg
    lm = resolve_run("lm", "trpo", {})
    assert lm.cg_damping == 0.1 and lm.fvp_fraction == 0.125  # LM_DEFAULTS and TRPO's LM defaults
    with pytest.raises(ConfigError, match="num_envs is a control key"):
        validate(lm, user={"num_envs"})


def test_keys_from_a_file_and_flags_count_as_set_by_the_user():
    with pytest.raises(ConfigError, match="kl_coef is a language-model key"):
        resolve({"kl_coef": 0.1}, {}, {"algo": "ppo", "env": "CartPole-v1"})
    with pytest.raises(ConfigError, match="model is a language-model key"):
        resolve({}, {}, {"algo": "ppo", "env": "CartPole-v1", "model": "smollm2-135m"})
    with pytest.raises(ConfigError, match="max_kl is TRPO's"):
        resolve({"max-kl": 0.02}, {}, {"algo": "ppo", "env": "CartPole-v1"})


def test_every_key_is_of_one_kind_or_shared_and_the_kinds_are_disjoint():
    assert not set(LM_KEYS) & set(CONTROL_KEYS)
    assert set(LM_KEYS) | set(CONTROL_KEYS) <= set(field_names())


def test_python_callers_keep_the_default_algorithm_and_env():
    cfg = resolve({}, {}, {})
    assert (cfg.algo, cfg.env, cfg.task) == ("ppo", "CartPole-v1", None)


def test_a_run_folder_from_before_new_keys_is_the_same_run():
    """A config saved before `shard` existed, with another torch_threads (speed, not results), is
    the same run; a changed key that alters what is computed is not."""
    from policygrad.config import same_run, to_dict
    current = to_dict(Config(algo="ppo"))
    saved = {k: v for k, v in current.items() if k != "shard"} | {"torch_threads": 2}
    assert same_run(saved, current)
    assert not same_run({**saved, "lr": 0.5}, current)
    assert not same_run(None, current)


# Keys with choices that an `if` decides rather than a registry (schedules, switches of one module).
DECIDED_BY_AN_IF = {"vectorization", "lr_schedule", "clip_schedule", "activation", "kl_in", "lora_reference",
                    "shard"}


def test_every_registry_holds_exactly_the_choices_of_the_key_that_names_it():
    from policygrad import algos, placement, resolve
    from policygrad.config import CHOICES
    from policygrad.core import advantages, losses, trpo
    registries = {
        "algo": algos.ALGOS,
        "advantage": advantages.ADVANTAGES,
        "baseline": advantages.SEQUENCE_BASELINES,
        "turn_advantage": advantages.TURN_ADVANTAGES,
        "kl_estimator": losses.KL_ESTIMATORS,
        "behaviour_level": losses.BEHAVIOUR_LEVELS,
        "behaviour_correction": {"none": None, **losses.BEHAVIOUR_CORRECTIONS},  # none: no weight at all
        "dtype": {"auto": None, **placement.DTYPES},  # auto: picked for the device
        "fvp": trpo.FISHER_PRODUCTS,
        "loss_agg": losses.LOSS_AGGREGATIONS,
        "ratio_level": losses.RATIO_LEVELS,
        "surrogate": losses.PPO_SURROGATES,
        "recipe": {"none": None, **resolve.RECIPES},  # none: no preset
    }
    for key, registry in registries.items():
        assert set(registry) == set(CHOICES[key]), key
    assert set(losses.KL_LOSS_FORMS) == set(CHOICES["kl_estimator"])
    # a new key with choices is either a registry's (above) or decided by an if
    assert set(CHOICES) == set(registries) | DECIDED_BY_AN_IF
    # the config says which algorithm differentiates twice (the LM workload reads it) as ALGOS does
    for algo, entry in algos.ALGOS.items():
        assert Config(algo=algo).double_backward == entry.double_backward, algo


def test_key_groups_and_choices_come_from_the_fields_tags():
    from policygrad.config import CHOICES, CRITIC_KEYS, FAMILIES, LORA_SHAPE_KEYS, PPO_KEYS, TRPO_KEYS, family_keys
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert CHOICES["algo"] == fields["algo"].metadata["choices"] == ("reinforce", "trpo", "ppo")
    assert set(PPO_KEYS) == {"n_epochs", "clip_eps", "clip_schedule", "clip_low", "clip_high", "clip_ratio_c",
                             "ratio_level", "surrogate"}
    assert "value_epochs" in TRPO_KEYS and "value_epochs" in CRITIC_KEYS  # a key may be of two families
    assert set(LORA_SHAPE_KEYS) <= set(LM_KEYS)
    for family in FAMILIES:
        assert family_keys(family), family
    assert all(set(f.metadata.get("families", ())) <= set(FAMILIES) for f in fields.values())


@pytest.mark.parametrize("key, value, words", [
    ("lr", -1.0, "lr must be positive; got -1.0"),
    ("target_kl", 0.0, "target_kl must be positive (or null to disable); got 0.0"),
    ("ent_coef", -0.1, "ent_coef must be >= 0; got -0.1"),
    ("gamma", 1.5, "gamma must lie in [0, 1]; got 1.5"),
    ("activation", "gelu", "activation 'gelu' is not one of: tanh, relu"),
    ("lr", float("nan"), "lr must be a finite number; got nan"),
])
def test_a_tagged_rule_refuses_a_value_out_of_range(key, value, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        validate(dataclasses.replace(Config(), **{key: value}))


def test_one_coercer_serves_the_config_and_the_stages():
    from policygrad.config import apply, coerce
    from policygrad.stages import sft
    # numbers written as text, floats that are ints, ints where floats are due: alike in both
    assert apply(Config(), {"lr": "1e-4", "n_epochs": 3.0, "gamma": 1}).lr == 1e-4
    cfg = sft.make_config({"lr": "1e-4", "epochs": 3.0, "max_grad_norm": 1})
    assert (cfg.lr, cfg.epochs, cfg.max_grad_norm) == (1e-4, 3, 1.0) and isinstance(cfg.epochs, int)
    assert coerce("task", None, Optional[str]) is None
    # the messages name the key as each surface does
    with pytest.raises(ConfigError, match=re.escape("config key 'n_epochs' must be int; got 2.5")):
        apply(Config(), {"n_epochs": 2.5})
    with pytest.raises(ConfigError, match=re.escape("epochs must be int; got 2.5")):
        sft.make_config({"epochs": 2.5})
    with pytest.raises(ConfigError, match=re.escape("lr must be float; got True")):
        sft.make_config({"lr": True})
    with pytest.raises(ConfigError, match=re.escape("config key 'hidden_sizes' must be a list")):
        apply(Config(), {"hidden_sizes": 64})
