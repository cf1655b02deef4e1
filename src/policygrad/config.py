"""One flat, documented config: its fields, their checks (each value, and the keys together) and
its dict form. How a run's values are layered onto it is resolve.py's job."""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Optional

from .errors import ConfigError


FAMILIES = ("lm", "control", "ppo", "trpo", "critic", "lora_shape")
"""The kinds of run a key is read by (tagged on its field; the key groups below derive from them)."""

RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "must be positive"),
    "positive_when_set": (lambda v: v is None or v > 0, "must be positive (or null to disable)"),
    "non_negative": (lambda v: v >= 0, "must be >= 0"),
    "unit_interval": (lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]"),
}
"""Range rules a field may be tagged with: (whether a value keeps it, what the message says)."""


def setting(default: Any = None, *families: str, choices: tuple[str, ...] = (), rule: Optional[str] = None,
            factory: Optional[Callable[[], Any]] = None) -> Any:
    """A config field with its tags in the field's metadata: the families of run that read it
    (FAMILIES; none: every run), the values it may take, and its range rule (RULES)."""
    assert set(families) <= set(FAMILIES) and rule in (None, *RULES), (families, rule)
    metadata = {"families": families, "choices": choices, "rule": rule}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def check_choices(cfg: Any) -> None:
    """Each field of a config dataclass tagged with choices holds one of them."""
    for f in dataclasses.fields(cfg):
        allowed = f.metadata.get("choices")
        if allowed and getattr(cfg, f.name) not in allowed:
            raise ConfigError(f"{f.name} '{getattr(cfg, f.name)}' is not one of: {', '.join(allowed)}")


def check_ranges(cfg: Any) -> None:
    """Each field of a config dataclass against its range rule, rule by rule (RULES order)."""
    for rule, (keeps, says) in RULES.items():
        for f in dataclasses.fields(cfg):
            if f.metadata.get("rule") == rule and not keeps(getattr(cfg, f.name)):
                raise ConfigError(f"{f.name} {says}; got {getattr(cfg, f.name)}")


@dataclass
class Config:
    # --- what to train ---
    algo: str = setting("ppo", choices=("reinforce", "trpo", "ppo"))
    """Algorithm: reinforce | trpo | ppo."""
    env: str = setting("CartPole-v1", "control")
    """A registered Gymnasium environment id (control runs)."""
    task: Optional[str] = None
    """A text task: a built-in name (`policygrad tasks`) or a task YAML file; set, it makes a
    language-model run."""
    recipe: str = setting("none", "lm", choices=("none", "grpo", "dapo", "dr_grpo", "gspo", "cispo", "rloo",
                                                 "reinforce_pp"))
    """A published recipe's keys as a preset (resolve.RECIPES; docs/recipes.md says what each sets,
    with its paper): above the task's defaults, below the user's own keys, which override it."""
    model: str = setting("smollm2-135m", "lm")
    """Language model: a local Hugging Face folder or an alias (smollm2-135m)."""
    total_steps: int = setting(100_000, rule="positive")
    """Control: environment steps to train for. Language models: training steps (one batch of
    completions each). Also named `steps`, as the CLI's --steps."""
    seed: int = setting(1, rule="non_negative")
    """Seed of the run; each rank and environment derives its own from it."""

    # --- rollouts ---
    num_envs: int = setting(8, "control", rule="positive")
    """Parallel environments in the vector env."""
    n_steps: int = setting(128, "control", rule="positive")
    """Steps per environment in each rollout; a rollout holds num_envs * n_steps transitions."""
    vectorization: str = setting("sync", "control", choices=("sync", "async"))
    """Gymnasium vector env: sync (one process) | async (one process per env)."""

    # --- advantages ---
    advantage: str = setting("gae", choices=("gae", "mc", "sequence"))
    """Advantage estimator: gae | mc (Monte-Carlo discounted returns minus the baseline)."""
    gamma: float = setting(0.99, rule="unit_interval")
    """Discount factor."""
    gae_lambda: float = setting(0.95, rule="unit_interval")
    """GAE lambda (1.0 gives Monte-Carlo returns minus the value)."""
    normalize_advantages: bool = True
    """Whiten advantages over the batch's valid steps before the update. It acts after a sequence
    baseline: with baseline=none it subtracts the batch mean (so `none` becomes a batch-mean
    baseline), and with baseline=group it whitens the group-whitened advantages a second time,
    over the batch's tokens (set false for the group whitening alone, as GRPO)."""

    # --- optimisation (shared) ---
    lr: float = setting(3e-4, rule="positive")
    """Adam learning rate of the policy (and, for PPO/REINFORCE, the shared value head)."""
    lr_schedule: str = setting("constant", choices=("constant", "linear"))
    """constant | linear (anneal to 0 over total_steps)."""
    max_grad_norm: float = setting(0.5, rule="non_negative")
    """Clip the global gradient norm to this (0 disables)."""
    value_baseline: bool = setting(True, "critic")
    """REINFORCE: subtract a learned value baseline."""
    vf_coef: float = setting(0.5, "critic", rule="non_negative")
    """Weight of the value loss in the joint loss (PPO, REINFORCE)."""
    ent_coef: float = setting(0.0, rule="non_negative")
    """Weight of the entropy bonus."""

    # --- PPO ---
    n_epochs: int = setting(10, "ppo", rule="positive")
    """PPO epochs over each rollout."""
    batch_size: int = setting(64, rule="positive")
    """Minibatch size (transitions) for PPO and for TRPO's value regression."""
    clip_eps: float = setting(0.2, "ppo", rule="positive")
    """PPO ratio clip epsilon."""
    clip_low: Optional[float] = setting(None, "ppo", rule="positive_when_set")
    """The ratio's lower clip, 1 - clip_low (None: clip_eps)."""
    clip_high: Optional[float] = setting(None, "ppo", rule="positive_when_set")
    """The ratio's upper clip, 1 + clip_high (None: clip_eps); above clip_low it is DAPO's
    clip-higher (Yu et al. 2025: 0.28 with clip_low 0.2)."""
    clip_ratio_c: Optional[float] = setting(None, "ppo", rule="positive_when_set")
    """Dual clip (Ye et al. 2020): with a negative advantage the loss is at most c x |A|, however
    large the ratio (> 1; 3 is usual; None disables)."""
    ratio_level: str = setting("token", "lm", "ppo", choices=("token", "sequence"))
    """The ratio PPO clips: token (each token's pi_theta / pi_old) | sequence (GSPO, Zheng et al.
    2025: a completion's geometric mean of its token ratios, one clip per completion)."""
    surrogate: str = setting("clip", "ppo", choices=("clip", "cispo"))
    """PPO's policy loss: clip (the clipped surrogate) | cispo (MiniMax 2025: the ratio, clipped to
    [1 - clip_low, 1 + clip_high] and detached, weighs A x log pi; no token's gradient is cut)."""
    clip_schedule: str = setting("constant", "ppo", choices=("constant", "linear"))
    """constant | linear (anneal clip_eps to 0 over total_steps)."""
    clip_value_eps: Optional[float] = setting(None, rule="positive_when_set")
    """Clip the value update to +-this around the old value (None disables)."""
    target_kl: Optional[float] = setting(None, rule="positive_when_set")
    """Stop the PPO epochs early once the approximate KL exceeds 1.5 * this (None disables)."""

    # --- TRPO ---
    max_kl: float = setting(0.01, "trpo", rule="positive")
    """Trust region: the mean KL(old || new) a TRPO step may reach."""
    cg_iters: int = setting(15, "trpo", rule="positive")
    """Conjugate-gradient iterations for the natural-gradient direction."""
    cg_damping: float = setting(0.1, "trpo", rule="non_negative")
    """Damping added to the Fisher-vector product."""
    line_search_steps: int = setting(10, "trpo", rule="positive")
    """Backtracking steps before a TRPO update is rejected."""
    line_search_shrink: float = setting(0.8, "trpo", rule="unit_interval")
    """Step shrink factor per backtracking step."""
    fvp: str = setting("exact", "trpo", choices=("exact", "gauss_newton"))
    """TRPO's Fisher-vector products: exact (the Hessian of the KL, a double backward through the
    model) | gauss_newton (J^T H J v, H the output distribution's Fisher: one forward-mode pass and
    one ordinary backward, equal at new = old to rounding; what shard=fsdp needs, and cheaper with
    micro-batches: benchmarks/fvp.py)."""
    value_lr: float = setting(1e-3, "critic", rule="positive")
    """TRPO: Adam learning rate of the value regression."""
    value_epochs: int = setting(10, "trpo", "critic", rule="positive")
    """TRPO: passes of value regression over each rollout."""

    # --- policy network ---
    hidden_sizes: list[int] = setting(None, "control", factory=lambda: [64, 64])
    """Hidden layer widths of the actor and of the critic MLP."""
    activation: str = setting("tanh", "control", choices=("tanh", "relu"))
    """tanh | relu."""
    log_std_init: float = setting(0.0, "control")
    """Initial log standard deviation of the Gaussian head (Box actions)."""
    ortho_init: bool = setting(True, "control")
    """Orthogonal initialisation (gain sqrt(2) hidden, 0.01 policy head, 1 value head)."""
    normalize_obs: bool = setting(False, "control")
    """Running observation normalisation (saved with the checkpoint)."""
    normalize_reward: bool = setting(False, "control")
    """Scale rewards by the running std of the discounted return (as SB3's VecNormalize)."""
    clip_obs: float = setting(10.0, "control", rule="positive")
    """Clip normalised observations to +-this."""

    # --- language models ---
    prompts_per_step: int = setting(4, "lm", rule="positive")
    """Prompts in each training batch."""
    samples_per_prompt: int = setting(4, "lm", rule="positive")
    """Completions sampled per prompt (the group of the rloo and group baselines)."""
    dynamic_sampling: bool = setting(False, "lm")
    """DAPO's dynamic sampling (Yu et al. 2025): drop each prompt group whose completions all got
    the same task reward (before any KL penalty; under a group baseline it has nothing to teach) and
    draw prompts_per_step more prompts, round after round, until prompts_per_step groups are kept
    or max_draws rounds were drawn; the first prompts_per_step kept, in draw order, are trained on.
    A step that keeps none takes no update. Single-turn tasks, samples_per_prompt >= 2."""
    max_draws: int = setting(3, "lm", rule="positive")
    """dynamic_sampling: the most rounds of prompts_per_step prompts one step samples (each costs a
    round of generation); a step still short after them trains on the groups it kept."""
    max_new_tokens: int = setting(32, "lm", rule="positive")
    """Longest completion, in tokens."""
    overlong_filter: bool = setting(False, "lm")
    """Completions the length limit cut (max_new_tokens tokens without an EOS) weigh nothing in the
    update: no policy, KL, entropy or value term, and no count in any loss_agg's denominator; their
    rewards still count in the baselines (DAPO's overlong filtering, Yu et al. 2025). Single
    completions only (a multi-turn task refuses it)."""
    overlong_buffer: int = setting(0, "lm", rule="non_negative")
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a completion reaching into the last
    overlong_buffer tokens before max_new_tokens loses overlong_penalty x the share of the buffer it
    used, added to its task reward before baselines and whitening (never to evaluation's reward).
    0: off; below max_new_tokens. recipe=dapo sets a fifth of max_new_tokens (DAPO: 4096 of 20480)."""
    overlong_penalty: float = setting(1.0, "lm", rule="non_negative")
    """The soft overlong punishment at max_new_tokens, in task-reward units (veRL's
    overlong_buffer.penalty_factor)."""
    temperature: float = setting(1.0, "lm", rule="positive")
    """Sampling temperature (log-probabilities are of the tempered distribution)."""
    top_p: float = setting(1.0, "lm", rule="unit_interval")
    """Nucleus sampling mass (1.0 disables)."""
    top_k: int = setting(0, "lm", rule="non_negative")
    """Sample among the k most likely tokens (0 disables)."""
    behaviour_correction: str = setting("none", "lm", choices=("none", "tis", "mis"))
    """Correct for a sampler whose log-probs differ from the trainer's (another engine, or bfloat16
    sampling): the update's ratio becomes pi_theta / pi_old x w, w = pi_old / pi_sampler: none |
    tis (w truncated at behaviour_cap) | mis (tokens or sequences whose w leaves [1/cap, cap]
    masked out). With an exact sampler (float32) w is 1 and the update is unchanged."""
    behaviour_level: str = setting("token", "lm", choices=("token", "sequence", "geometric"))
    """What w is computed over: token (each token's own) | sequence (the product over a completion's
    tokens) | geometric (their geometric mean, a per-token size)."""
    behaviour_cap: float = setting(2.0, "lm")
    """tis: the most w may be; mis: w outside [1/cap, cap] is masked (> 1)."""
    baseline: str = setting("rloo", "lm", choices=("none", "moving-average", "rloo", "group", "group-mean"))
    """Critic-free baseline of a sequence's score: none | moving-average | rloo | group (minus the
    group's mean, over its std: GRPO) | group-mean (minus the group's mean alone: Dr. GRPO).
    normalize_advantages then whitens over the batch (REINFORCE++'s global normalisation)."""
    loss_agg: str = setting("token-mean", "lm", choices=("token-mean", "seq-mean-token-mean",
                                                         "seq-mean-token-sum-norm", "seq-mean-token-sum"))
    """How the per-token losses (policy, KL term, entropy, value) are averaged, over the global batch
    whatever the micro-batches and ranks (veRL's loss_agg_mode names): token-mean (every token
    alike: DAPO) | seq-mean-token-mean (each completion's token mean, then the mean over completions:
    GRPO) | seq-mean-token-sum-norm (each completion's token sum / max_new_tokens, then the mean:
    Dr. GRPO) | seq-mean-token-sum (each completion's token sum, then the mean: a sequence's
    REINFORCE, as RLOO)."""
    kl_coef: float = setting(0.05, "lm", rule="non_negative")
    """Price of one nat of KL(policy || reference) per completion, in task-reward units; the same
    unit with kl_in=reward and kl_in=loss (docs/language-models.md, "The KL to the reference, exactly")."""
    kl_estimator: str = setting("k1", "lm", choices=("k1", "k2", "k3"))
    """Per-token KL estimator: k1 | k2 | k3 (k2 and k3 only with kl_in=loss: as a reward their
    gradient of the KL is biased)."""
    kl_in: str = setting("reward", "lm", choices=("reward", "loss"))
    """Where the KL term goes: reward (a per-token penalty in the rewards: the sequence-level KL) |
    loss (an importance-weighted per-token term added to the loss: the per-token KL)."""
    adaptive_kl: bool = setting(False, "lm")
    """Adapt the KL coefficient towards kl_target (Ziegler et al. 2019, eq. 2), in either kl_in mode."""
    kl_target: float = setting(6.0, "lm", rule="positive")
    """Target KL per completion (nats) of the adaptive controller."""
    kl_horizon: int = setting(10_000, "lm", rule="positive")
    """Horizon (completions) of the adaptive controller."""
    use_value_head: bool = setting(False, "lm")
    """Language-model PPO/TRPO: learn a value head and use GAE instead of a critic-free baseline."""
    whiten_rewards: bool = setting(False, "lm")
    """Whiten the task rewards over each batch before the KL penalty is added."""
    ptx_data: Optional[str] = setting(None, "lm")
    """J_data: a file of real data (text, prompt/completion or chat rows) whose mean token NLL,
    times ptx_coef, is added to every gradient step's loss (InstructGPT's "PTX" mix, which keeps
    the model's language while RL moves it; TRPO: added to the surrogate it steps on)."""
    ptx_coef: float = setting(0.0, "lm", rule="non_negative")
    """gamma, the weight of the data loss; 0: none."""
    ptx_batch_size: int = setting(8, "lm", rule="positive")
    """Rows of ptx_data per update (taken in a shuffled order, epoch after epoch)."""
    ptx_max_length: int = setting(256, "lm", rule="positive")
    """Tokens kept of each ptx_data row."""
    reward_normalize: bool = setting(False, "lm")
    """Normalise a learned reward model's scores (rm: rewards) with the mean and std of its rewards
    on its training answers, saved beside it (reward_stats.json)."""
    micro_batch_size: int = setting(0, "lm", rule="non_negative")
    """Completions per forward/backward pass; gradients accumulate over a minibatch (0: all at once)."""
    fvp_fraction: float = setting(1.0, "trpo", rule="unit_interval")
    """TRPO: share of a batch's rows, drawn at random, used for the Fisher-vector products:
    transitions of a control rollout (default 1.0, all of them, as sb3-contrib), completions of a
    language model (default 0.125: each product is a pass through the whole model and back)."""
    gradient_checkpointing: bool = setting(False, "lm")
    """Language models: recompute activations in the backward pass instead of keeping them. Every
    training pass then runs each completion in full, checkpointed (the shared-prompt pass keeps a
    KV cache, which a checkpointed layer cannot pass): less memory, a slower step (docs/results.md: peak RSS
    and step time with and without, `benchmarks/lm.py --only memory`)."""
    share_prompts: bool = setting(True, "lm")
    """Forward passes over a batch's n completions of one prompt run the prompt once and repeat its
    KV cache (sampling, reference, training); false: every row in full, as a check."""
    logprob_chunk: int = setting(8, "lm", rule="positive")
    """Completion positions per chunk when computing log-probabilities over the vocabulary."""
    max_turns: int = setting(8, "lm", rule="positive")
    """Multi-turn tasks (a text env): the most replies in an episode. Reaching it ends the episode
    as a terminal state (the game's horizon: nothing is bootstrapped after it), unless
    max_turns_truncates."""
    max_turns_truncates: bool = setting(False, "lm")
    """Multi-turn tasks: an episode that reaches max_turns is truncated, and a critic bootstraps its
    return from the value of the state after the environment's last answer (for envs that are
    really endless, whose turn count the model does not see)."""
    max_episode_tokens: int = setting(1024, "lm", rule="positive")
    """Multi-turn tasks: the most tokens of an episode after its first prompt (the model's and the
    environment's); an episode that spends them is truncated."""
    tool_timeout: float = setting(10.0, "lm", rule="positive")
    """Multi-turn tasks whose env offers tools: seconds one tool call may run; one that overruns
    answers the model with an error (a failed call, lm/tools.py), and the episode goes on."""
    turn_advantage: str = setting("outcome", "lm", choices=("outcome", "discounted", "gae"))
    """Multi-turn tasks' credit assignment: outcome (the episode's return on every turn, minus the
    baseline) | discounted (each turn's discounted return-to-go, gamma over turns, minus the
    baseline) | gae (GAE over turns from a value head: use_value_head=true, advantage=gae)."""
    eval_prompts: int = setting(40, "lm", rule="positive")
    """Validation prompts per periodic evaluation (the test split is evaluated whole)."""

    # --- devices, precision, adapters ---
    device: str = "auto"
    """auto (language models: the first CUDA GPU, else Apple mps, else the CPU; control: the CPU,
    where small MLPs run fastest) | cpu | cuda | cuda:N | mps."""
    dtype: str = setting("auto", "lm", choices=("auto", "float32", "bfloat16", "float16"))
    """Language models' compute precision: auto (bfloat16 on a GPU that has it, else float32) |
    float32 | bfloat16 | float16. Trainable weights and optimiser state stay float32; forward and
    backward run under autocast; frozen weights (reference, LoRA base) are stored in this dtype."""
    lora_r: int = setting(0, "lm", rule="non_negative")
    """Rank of LoRA adapters (PEFT) on the language model; 0: full fine-tuning."""
    lora_alpha: float = setting(32.0, "lm", "lora_shape", rule="positive")
    """LoRA scale numerator: an adapter's update is (lora_alpha / lora_r) * B @ A."""
    lora_dropout: float = setting(0.0, "lm", "lora_shape", rule="unit_interval")
    """Dropout on the adapters' input in training passes (sampling never drops: a positive value
    makes the trained and the sampled policy differ)."""
    lora_target_modules: Optional[list[str]] = setting(None, "lm", "lora_shape")
    """Module names (or name suffixes) that get adapters; None: every linear layer of attention and
    MLP (not the LM head)."""
    adapter: Optional[str] = setting(None, "lm")
    """Start from this PEFT LoRA adapter folder (made for `model`) and train it further; its own
    adapter_config.json sets r, alpha, dropout and targets."""
    lora_reference: str = setting("initial", "lm", choices=("initial", "base"))
    """With adapter=PATH, the KL reference: initial (the model with the starting adapter, what the
    run starts from) | base (the bare base model, adapter off)."""

    # --- evaluation, logging ---
    eval_every: int = setting(10_000, rule="non_negative")
    """Evaluate every this many environment steps (control) or training steps (language models);
    0: only at the end."""
    eval_episodes: int = setting(10, "control", rule="positive")
    """Episodes per periodic evaluation (deterministic actions)."""
    stop_at_return: Optional[float] = setting(None, "control")
    """Stop early once the mean return of the last 20 training episodes reaches this (None: never)."""
    torch_threads: Optional[int] = setting(None, rule="positive_when_set")
    """Torch intra-op threads per process; None: one for control (small MLPs run fastest on one),
    and for a language model the machine's cores shared out among the processes on it."""

    # --- processes ---
    shard: str = setting("ddp", choices=("ddp", "fsdp"))
    """How a run launched as several processes (torchrun, or `train --nproc N`) shares the model:
    ddp (every rank holds the whole model; gradients are summed over ranks) | fsdp (language
    models: each transformer block's weights, gradients and optimiser state are split over the
    ranks with torch's fully_shard, for models that do not fit one device)."""
    wandb: bool = False
    """Also log to Weights & Biases (offline unless WANDB_MODE says otherwise; `wandb sync` later)."""

    # --- checkpoints, resume, failure handling ---
    checkpoint_every: int = setting(10, rule="non_negative")
    """Write a checkpoint every this many updates (0: only at the end and at a new best
    validation result); a killed run resumes from the newest one."""
    keep_checkpoints: int = setting(2, rule="positive")
    """Newest checkpoints kept; the best by validation result is kept as well."""
    max_bad_updates: int = setting(3, rule="positive")
    """Stop after this many updates in a row whose loss or gradient was not finite (each is
    skipped: the parameters and optimiser state stay as they were)."""
    reward_timeout: float = setting(30.0, "lm", rule="positive")
    """Seconds a reward (a function or a remote server) may take for one batch before it fails."""
    reward_retries: int = setting(3, "lm", rule="non_negative")
    """Retries of a remote (http) reward after a failed request (back-off 0.5 s, 1 s, 2 s, ...)
    before the run stops with an error."""

    @property
    def is_lm(self) -> bool:
        return self.task is not None

    @property
    def uses_lora(self) -> bool:
        return self.is_lm and (self.lora_r > 0 or self.adapter is not None)

    @property
    def double_backward(self) -> bool:
        """The algorithm differentiates through a gradient (TRPO's Fisher-vector products; with
        fvp=gauss_newton, forward mode instead), so the model must use ops that support it
        (algos.ALGOS[algo].double_backward says the same)."""
        return self.algo == "trpo"

    @property
    def uses_critic(self) -> bool:
        """A learned value enters the update: always in control (the MLP critic); for a language
        model only with a value head and an advantage that reads it (gae or mc)."""
        return not self.is_lm or (self.use_value_head and self.advantage != "sequence")

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def rollout_size(self) -> int:
        return self.completions_per_step if self.is_lm else self.num_envs * self.n_steps

    @property
    def total_updates(self) -> int:
        return self.total_steps if self.is_lm else max(1, self.total_steps // self.rollout_size)


CHOICES: dict[str, tuple[str, ...]] = {f.name: f.metadata["choices"] for f in dataclasses.fields(Config)
                                       if f.metadata.get("choices")}
"""The values each key with choices may take (tagged on its field; tests/test_config.py checks that
every registry a key names holds these)."""

# Keys only one kind of run reads. Every key has a default, so only a key the user set (file,
# override or flag) for the other kind is refused: it would be silently ignored.
def family_keys(family: str) -> tuple[str, ...]:
    """Config's keys tagged with `family` (FAMILIES), in field order."""
    return tuple(f.name for f in dataclasses.fields(Config) if family in f.metadata.get("families", ()))


LM_KEYS = family_keys("lm")
CONTROL_KEYS = family_keys("control")
PPO_KEYS = family_keys("ppo")
TRPO_KEYS = family_keys("trpo")
CRITIC_KEYS = family_keys("critic")
LORA_SHAPE_KEYS = family_keys("lora_shape")

Check = Callable[[Config], bool]
# Keys the user set that this run would ignore: (keys, when the run ignores them, why and what would
# be right). The first that applies is the message; fields of the config fill its {braces}.
IGNORED: list[tuple[tuple[str, ...], Check, str]] = [
    (LM_KEYS, lambda c: not c.is_lm,
     "{key} is a language-model key; this is a control run (env {env}): drop it, or give a task"),
    (CONTROL_KEYS, lambda c: c.is_lm,
     "{key} is a control key; this is a language-model run (task {task}): drop it"),
    (PPO_KEYS, lambda c: c.algo != "ppo", "{key} is PPO's; this run's algo is {algo}: drop it, or use algo=ppo"),
    (TRPO_KEYS, lambda c: c.algo != "trpo", "{key} is TRPO's; this run's algo is {algo}: drop it, or use algo=trpo"),
    (("vf_coef", "ent_coef"), lambda c: c.algo == "trpo",
     "{key} weighs a term of PPO's and REINFORCE's joint loss; TRPO has none (its value regression "
     "runs on its own, at value_lr): drop it, or use algo=ppo or reinforce"),
    (("batch_size",), lambda c: c.algo == "reinforce",
     "batch_size is the minibatch of PPO (and of TRPO's value regression); REINFORCE steps once on the "
     "whole batch: drop it (micro_batch_size splits a language model's passes)"),
    (CRITIC_KEYS, lambda c: not c.uses_critic,
     "{key} tunes a critic; this language-model run has none (advantage={advantage}, "
     "use_value_head={use_value_head}): drop it, or set use_value_head=true with advantage=gae"),
    (("value_baseline",), lambda c: c.algo != "reinforce" and c.advantage != "mc",
     "value_baseline switches the learned baseline of REINFORCE (and of advantage=mc); this run is "
     "algo={algo} with advantage={advantage}: drop it"),
    (("value_lr",), lambda c: not c.is_lm and c.algo != "trpo",
     "value_lr is the learning rate of a separate critic optimiser (TRPO's, or a language model's value "
     "head); {algo} trains this critic together with the policy at lr: drop it, or set lr"),
    (("baseline",), lambda c: c.advantage != "sequence",
     "baseline is the critic-free baseline of advantage=sequence; this run uses advantage={advantage}: "
     "drop it, or set advantage=sequence"),
    (("gae_lambda",), lambda c: c.advantage != "gae",
     "gae_lambda acts only with advantage=gae; this run uses advantage={advantage}: drop it"),
    (("lora_r",), lambda c: c.adapter is not None,
     "lora_r is the rank of a new adapter; adapter={adapter} brings its own (its adapter_config.json): "
     "drop lora_r, or drop adapter to start a new one"),
    (LORA_SHAPE_KEYS, lambda c: c.adapter is not None,
     "{key} shapes a new adapter; adapter={adapter} brings its own (its adapter_config.json): drop {key}"),
    (LORA_SHAPE_KEYS, lambda c: not c.uses_lora,
     "{key} shapes a LoRA adapter, and this run fine-tunes every weight (lora_r=0): set lora_r > 0, "
     "or drop {key}"),
    (("lora_reference",), lambda c: c.adapter is None,
     "lora_reference chooses between the starting adapter and the bare base model as the KL "
     "reference; without adapter=PATH the two are the same model: drop it, or give adapter=PATH"),
    (("ptx_batch_size", "ptx_max_length"), lambda c: c.ptx_coef == 0,
     "{key} shapes the data loss, which is off (ptx_coef=0): set ptx_coef > 0 with ptx_data, or drop {key}"),
    (("overlong_penalty",), lambda c: c.overlong_buffer == 0,
     "overlong_penalty sizes the soft overlong punishment, which is off (overlong_buffer=0): set "
     "overlong_buffer > 0 (tokens before max_new_tokens where it ramps up), or drop overlong_penalty"),
    (("max_draws",), lambda c: not c.dynamic_sampling,
     "max_draws bounds dynamic sampling's rounds, which is off: set dynamic_sampling=true, or drop max_draws"),
    (("kl_target", "kl_horizon"), lambda c: not c.adaptive_kl,
     "{key} steers the adaptive KL controller, which is off: set adaptive_kl=true, or drop {key}"),
    (("clip_ratio_c",), lambda c: c.surrogate == "cispo",
     "clip_ratio_c bounds the clipped surrogate's loss where the advantage is negative; surrogate=cispo "
     "clips its importance weight instead and has no such bound: drop clip_ratio_c"),
]
# Combinations no run can use, whoever set them: (when the config is refused, why and what would be right).
CONFLICTS: list[tuple[Check, str]] = [
    (lambda c: c.shard == "fsdp" and not c.is_lm,
     "shard=fsdp splits a language model's transformer blocks over the processes; a control run's "
     "MLP (env {env}) is small enough to replicate: use shard=ddp"),
    (lambda c: c.advantage == "sequence" and not c.is_lm,
     "advantage=sequence scores whole completions of a language model; this is a control run "
     "(env {env}): use advantage=gae or mc, or give a task"),
    (lambda c: c.is_lm and c.advantage == "gae" and not c.use_value_head,
     "advantage=gae needs a critic, and a language model has one only with use_value_head=true: set "
     "it, or use advantage=sequence (critic-free) or mc"),
    (lambda c: c.is_lm and c.use_value_head and c.advantage == "sequence",
     "use_value_head=true adds a value head that advantage=sequence never reads: use advantage=gae "
     "or mc with it, or use_value_head=false"),
    (lambda c: c.is_lm and c.dynamic_sampling and c.samples_per_prompt < 2,
     "dynamic_sampling=true drops the prompt groups whose completions all got the same reward, and one "
     "sample per prompt is always such a group: set samples_per_prompt >= 2, or dynamic_sampling=false"),
    (lambda c: c.is_lm and c.advantage == "sequence" and c.baseline in ("rloo", "group", "group-mean")
     and c.samples_per_prompt < 2,
     "baseline={baseline} compares the completions of one prompt and needs samples_per_prompt >= 2 "
     "(got {samples_per_prompt}): raise it, or use baseline=moving-average or none"),
    (lambda c: c.is_lm and c.turn_advantage == "gae" and c.advantage != "gae",
     "turn_advantage=gae reads a value head at every turn: set use_value_head=true and advantage=gae, "
     "or use turn_advantage=outcome or discounted"),
    (lambda c: c.behaviour_cap <= 1.0,
     "behaviour_cap={behaviour_cap} must be above 1 (w is truncated at cap, or kept within [1/cap, cap]): "
     "2 is usual"),
    (lambda c: c.clip_ratio_c is not None and c.clip_ratio_c <= 1.0,
     "clip_ratio_c={clip_ratio_c} must be above 1: the dual clip bounds a negative advantage's loss at "
     "c x |A|, beyond the ordinary clip's (Ye et al. 2020); 3 is usual"),
    # GSPO's one ratio per completion meets one advantage per completion; token advantages (a critic,
    # or advantage=mc) would each be weighed by a ratio that is not theirs
    (lambda c: c.is_lm and c.ratio_level == "sequence" and c.advantage != "sequence",
     "ratio_level=sequence clips one ratio per completion against one advantage per completion; "
     "advantage={advantage} gives every token its own: use advantage=sequence, or ratio_level=token"),
    (lambda c: c.is_lm and c.algo == "trpo" and c.loss_agg != "token-mean",
     "loss_agg={loss_agg} with TRPO: its surrogate and its KL bound are means over tokens, and its "
     "step weighs micro-batches by their tokens: use loss_agg=token-mean, or algo=reinforce or ppo"),
    (lambda c: c.is_lm and c.overlong_buffer >= c.max_new_tokens,
     "overlong_buffer={overlong_buffer} must be below max_new_tokens={max_new_tokens}: the overlong "
     "punishment ramps up over the last overlong_buffer tokens before the limit (DAPO: a fifth of it)"),
    (lambda c: c.adaptive_kl and c.kl_coef == 0,
     "adaptive_kl=true multiplies kl_coef, and from 0 it stays 0: set kl_coef > 0, or adaptive_kl=false"),
    (lambda c: c.target_kl is not None and c.algo != "ppo",
     "target_kl stops PPO's epochs early; algo {algo} has none: drop it (TRPO bounds its step by max_kl)"),
    (lambda c: c.clip_value_eps is not None and c.algo != "ppo",
     "clip_value_eps clips PPO's value loss; algo {algo} does not read it: drop it, or use algo=ppo"),
    (lambda c: c.clip_value_eps is not None and not c.uses_critic,
     "clip_value_eps clips a critic's update; this language-model run has none: set use_value_head=true "
     "with advantage=gae, or drop clip_value_eps"),
    (lambda c: c.is_lm and c.algo == "trpo" and c.dtype == "float16",
     "dtype=float16 with TRPO: its natural-gradient step works on raw gradients and Fisher-vector "
     "products, which float16 underflows without a loss scale: use dtype=bfloat16 or float32"),
    (lambda c: c.ptx_coef > 0 and not c.ptx_data,
     "ptx_coef={ptx_coef} weighs a data loss, and no ptx_data names its data: set ptx_data=FILE "
     "(text, prompt/completion or chat rows), or ptx_coef=0"),
    (lambda c: bool(c.ptx_data) and c.ptx_coef == 0,
     "ptx_data={ptx_data} is read only with a data loss, and ptx_coef is 0: set ptx_coef > 0 "
     "(0.1 to 1 is a usual start), or drop ptx_data"),
    (lambda c: c.lora_target_modules is not None and len(c.lora_target_modules) == 0,
     "lora_target_modules=[] names no module: list module names such as [q_proj, v_proj], or null "
     "for every linear layer of attention and MLP"),
    # As a reward, an estimator's own dependence on the policy is dropped (a score-function gradient
    # sees only its value); that dependence has zero mean only for k1 (tests/test_kl.py).
    (lambda c: c.is_lm and c.kl_in == "reward" and c.kl_estimator != "k1",
     "kl_estimator={kl_estimator} as a reward penalty gives a biased gradient of KL(policy || reference) "
     "(only k1's is exact there): use kl_estimator=k1 with kl_in=reward, or kl_in=loss, where every "
     "estimator is exact"),
    # generate() samples from the truncated, renormalised distribution while the ratios and
    # gradients use log-probabilities of the full one: the update would be biased.
    (lambda c: c.top_p < 1.0,
     "top_p={top_p} would train on samples of a truncated distribution while the ratios and gradients "
     "use the full one (a biased update): train with top_p=1.0 top_k=0; `policygrad sample` accepts "
     "--top-p and --top-k"),
    (lambda c: c.top_k > 0,
     "top_k={top_k} would train on samples of a truncated distribution while the ratios and gradients "
     "use the full one (a biased update): train with top_p=1.0 top_k=0; `policygrad sample` accepts "
     "--top-p and --top-k"),
]


def check_world(cfg: Config, world: int) -> None:
    """The run fits `world` processes: the global batch splits evenly over them (each rank takes
    whole prompts or whole environments), and sharding applies. One line, before any rank trains."""
    if world == 1:
        if cfg.shard == "fsdp":
            raise ConfigError("shard=fsdp splits a model over the processes of a launch; this run is one "
                              "process: launch it with --nproc N (or torchrun), or drop shard")
        return
    what, count = ("prompts_per_step", cfg.prompts_per_step) if cfg.is_lm else ("num_envs", cfg.num_envs)
    if world > count:
        raise ConfigError(f"{world} processes need at least {world} {what} (each rank takes whole "
                          f"{'prompts' if cfg.is_lm else 'environments'}); got {what}={count}: raise {what} "
                          f"or use fewer processes")
    if count % world:
        raise ConfigError(f"{what}={count} does not split evenly over {world} processes: use a multiple of "
                          f"{world} (the global batch is the same whatever the number of processes)")
    if cfg.shard == "fsdp" and cfg.uses_lora:
        raise ConfigError("shard=fsdp with LoRA: the adapters are small enough to replicate, and ddp sums their "
                          "gradients over the ranks: use shard=ddp")
    if cfg.shard == "fsdp" and cfg.dtype == "float16":
        raise ConfigError("shard=fsdp with dtype=float16: the loss scale would unscale sharded and replicated "
                          "gradients together, which torch's GradScaler does not do: use dtype=bfloat16")
    if cfg.shard == "fsdp" and cfg.algo == "trpo" and cfg.fvp == "exact":
        raise ConfigError("shard=fsdp with TRPO's fvp=exact: its Fisher-vector products differentiate twice "
                          "through the model, which fully_shard's gradient hooks do not support: use "
                          "fvp=gauss_newton (the same products from first derivatives), or shard=ddp")


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


ALIASES: dict[str, str] = {"steps": "total_steps"}
"""Other names of a key. The CLI's --steps is total_steps, and Python, YAML and key=value take the
CLI's names (#23: train(steps=2) was refused with a hint at n_steps, the rollout length)."""


def canonical(values: dict[str, Any]) -> dict[str, Any]:
    """values under the fields' own names (hyphens as underscores, aliases as their key). A key
    given under two names is refused: neither says which value is meant."""
    out: dict[str, Any] = {}
    given: dict[str, str] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        name = ALIASES.get(name, name)
        if name in out:
            raise ConfigError(f"'{given[name]}' and '{key}' both set {name}: give one")
        out[name], given[name] = value, key
    return out


def coerce(key: str, value: Any, hint: Any, named: Optional[str] = None) -> Any:
    """value checked against the type hint of its field (Config's or a stage config's); ints are
    accepted where floats are due, and numbers written as text (PyYAML reads 4e-5 as a string).
    `named`: how a message names the key (default: config key 'KEY')."""
    named = f"config key '{key}'" if named is None else named
    origin = typing.get_origin(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return coerce(key, value, inner, named)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{named} must be a list, e.g. {key}=[64,64]; got {value!r}")
        return [coerce(key, v, inner, named) for v in value]
    if isinstance(value, str) and hint in (int, float):
        try:  # PyYAML reads 4e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e5 parses as a float
            return int(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, int, float, os.PathLike)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{named} must be {getattr(hint, '__name__', hint)}; got {value!r}")


def _unknown_key(key: str) -> ConfigError:
    names = field_names()
    near = difflib.get_close_matches(key, names + list(ALIASES), n=1)
    hint = f" (did you mean '{ALIASES.get(near[0], near[0])}'?)" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint}; valid keys: {', '.join(names)}")


def apply(cfg: Config, values: dict[str, Any]) -> Config:
    """Return cfg with values set, each checked against its field's type."""
    hints = typing.get_type_hints(Config)
    changes = {}
    for key, value in canonical(values).items():
        if key not in hints or key not in field_names():
            raise _unknown_key(key)
        changes[key] = coerce(key, value, hints[key])
    return dataclasses.replace(cfg, **changes)


def validate(cfg: Config, user: Collection[str] = ()) -> Config:
    """cfg, once each value is in range and the keys fit together. `user`: the keys the user set
    (resolve knows them); one that this run would ignore is refused."""
    check_values(cfg)
    check_combinations(cfg, user)
    return cfg


def check_values(cfg: Config) -> None:
    """Each key on its own: choices and ranges."""
    check_choices(cfg)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number; got {value}")
    check_ranges(cfg)
    if not cfg.hidden_sizes or any(h <= 0 for h in cfg.hidden_sizes):
        raise ConfigError(f"hidden_sizes must be a non-empty list of positive ints; got {cfg.hidden_sizes}")


def check_combinations(cfg: Config, user: Collection[str] = ()) -> None:
    """Every cross-key rule, in one place: keys the user set that this run ignores (IGNORED), then
    combinations no run can use (CONFLICTS)."""
    fields = vars(cfg)
    for keys, ignored, message in IGNORED:
        for key in keys:
            if key in user and ignored(cfg):
                raise ConfigError(message.format(key=key, **fields))
    for conflict, message in CONFLICTS:
        if conflict(cfg):
            raise ConfigError(message.format(**fields))


# Language-model runs start from these, then the algorithm's and the task's own defaults.
def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


PERFORMANCE_ONLY = ("torch_threads",)
"""Keys that change how fast a run goes, not what it computes: a run resumes whatever they say."""


def same_run(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a run folder's saved config describes the run `current` would train: keys added to
    Config since it was saved take their defaults, and performance-only keys do not count."""
    if not isinstance(saved, dict):
        return False
    defaults = to_dict(Config())
    keep = lambda d: {k: v for k, v in {**defaults, **d}.items() if k not in PERFORMANCE_ONLY}
    return keep(saved) == keep(current)
