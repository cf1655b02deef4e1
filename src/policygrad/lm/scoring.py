"""One scoring path: a rank's sampled completions or episodes -> the batch an update learns from
(rewards shaped by the KL penalty, values, groups, baselines, the KL coefficient) and the step's
metrics. Single completions (lm/rollout.py) and multi-turn episodes (lm/episodes.py) place their
task rewards on their own tokens; everything after that is here, once.

`Scoring` is the state scoring carries from step to step (the KL controller, the moving-average
baseline, the step count the sampling seeds derive from); a checkpoint saves it.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..batch import Batch
from ..core.losses import KL_ESTIMATORS


class KLController:
    """Fixed, or adaptive towards a target KL per completion (Ziegler et al. 2019, section 2.2)."""

    def __init__(self, cfg):
        self.coef, self.cfg = cfg.kl_coef, cfg

    def update(self, kl_per_completion: float, n_completions: int) -> None:
        if not self.cfg.adaptive_kl:
            return
        error = float(np.clip(kl_per_completion / self.cfg.kl_target - 1.0, -0.2, 0.2))
        self.coef *= 1.0 + error * n_completions / self.cfg.kl_horizon


def last_tokens(mask: torch.Tensor) -> torch.Tensor:
    """(B,) the position of each completion's last token."""
    return (mask.sum(1).long() - 1).clamp(min=0)


def kl_penalty(rewards: torch.Tensor, batch: Batch, kl_coef: float, kl_estimator: str, kl_in: str) -> torch.Tensor:
    """(B, T) rewards less, with kl_in=reward, kl_coef x the KL estimate of every token (Ziegler et
    al. 2019); with kl_in=loss the KL is a loss term (algos) and the rewards stay as they are."""
    if kl_in == "reward" and kl_coef:
        estimate = KL_ESTIMATORS[kl_estimator](batch.ref_log_prob - batch.log_prob)  # (B, T)
        rewards = rewards - kl_coef * estimate * batch.mask
    return rewards


def shaped_rewards(score: torch.Tensor, batch: Batch, kl_coef: float, kl_estimator: str, kl_in: str
                   ) -> torch.Tensor:
    """(B, T) per-token rewards of single completions: the task score on each one's last token,
    less the KL penalty (kl_penalty)."""
    B, T = batch.mask.shape
    rewards = torch.zeros_like(batch.mask)                                    # (B, T)
    rewards[torch.arange(B, device=rewards.device), last_tokens(batch.mask)] = score.to(rewards.device)
    return kl_penalty(rewards, batch, kl_coef, kl_estimator, kl_in)


def length_truncated(actions: torch.Tensor, mask: torch.Tensor, eos_ids: set[int], max_new_tokens: int
                     ) -> torch.Tensor:
    """(B,) 1.0 where the length limit cut a completion: it holds max_new_tokens tokens and the last
    is no EOS. One whose EOS fell on the last allowed position finished on its own."""
    lengths = mask.sum(1)                                                      # (B,)
    final = actions.gather(1, last_tokens(mask)[:, None]).squeeze(1)           # (B,) its last token
    ended = torch.isin(final, torch.tensor(sorted(eos_ids), device=actions.device))  # (B,)
    return ((lengths >= max_new_tokens) & ~ended).float()


def overlong_penalty(lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float) -> torch.Tensor:
    """(B,) DAPO's soft overlong punishment (Yu et al. 2025, eq. 13) of completions of `lengths`
    tokens (EOS included), times `penalty`: 0 up to max_new_tokens - buffer tokens, then falling
    linearly to -penalty at max_new_tokens (the limit: no completion is longer). buffer 0: none."""
    if buffer == 0:
        return torch.zeros_like(lengths)
    # eq. 13 as written: (L_max - L_cache - |y|) / L_cache, L_max = max_new_tokens, L_cache = buffer
    ramp = (max_new_tokens - buffer - lengths) / buffer                        # (B,) < 0 inside the buffer
    return penalty * ramp.clamp(min=-1.0, max=0.0)                             # (B,)


def kl_per_completion(batch: Batch) -> torch.Tensor:
    """(B,) sum over a completion's tokens of log pi - log pi_ref (k1): nats per completion."""
    return ((batch.log_prob - batch.ref_log_prob) * batch.mask).sum(1)


def values_of(policy, batch: Batch, bootstrap: Optional[tuple[torch.Tensor, torch.Tensor]] = None
              ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(values, next_values), (B, T) each, from the value head (None, None without one). A single
    completion's next value is the next token's (0 after its last: it ends, at EOS or the length
    limit, without bootstrapping). bootstrap = (finals, positions), (B,) each, for episodes: the
    next value is 0 but at each episode's final model token, where it is the value read at
    `positions` (lm/episodes.bootstrap_positions)."""
    if policy.value_head is None:
        return None, None
    with torch.no_grad():
        raw = policy.values(batch)                                             # (B, T)
    values = raw * batch.mask                                                  # (B, T)
    if bootstrap is None:
        return values, torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    finals, positions = bootstrap
    rows = torch.arange(values.shape[0], device=values.device)
    next_values = torch.zeros_like(values)                                     # (B, T)
    next_values[rows, finals] = raw[rows, positions]
    return values, next_values


def flat_groups(task_reward: np.ndarray, samples_per_prompt: int) -> np.ndarray:
    """(G,) bool: whether each prompt group's completions (runs of samples_per_prompt rows) all got
    the same task reward, to rounding: a group baseline then leaves them nothing to learn from. The
    one flatness test, of no_signal's metrics and of dynamic sampling (lm/dynamic.py)."""
    groups = np.asarray(task_reward, dtype=np.float64).reshape(-1, samples_per_prompt)  # (G, k)
    return groups.max(1) - groups.min(1) <= 1e-9 * (1.0 + np.abs(groups).max(1))      # (G,)


def no_signal(task_reward: np.ndarray, samples_per_prompt: int) -> tuple[float, float]:
    """The share of prompt groups whose completions all got the same task reward (flat_groups), and
    1.0 if the whole batch did, else 0.0.

    With one sample per prompt a group cannot spread, so every group would count as flat: the
    share is then the whole batch's flatness, the spread a moving-average baseline learns from
    (issue #23)."""
    everything = float(flat_groups(task_reward, len(task_reward))[0])
    if samples_per_prompt == 1:
        return everything, everything
    return float(flat_groups(task_reward, samples_per_prompt).mean()), everything


class NoSignalWatch:
    """Remembers the share of flat prompt groups (with one sample per prompt: flat batches) over the
    last `window` steps and words one warning, once, when most of them had no reward spread: such a
    run shows a flat curve for a reason."""

    def __init__(self, window: int = 10, samples_per_prompt: int = 2):
        self.window, self.recent, self.warned = window, [], False
        self.what = "batches" if samples_per_prompt == 1 else "prompt groups"

    def add(self, share: float) -> Optional[str]:
        self.recent = (self.recent + [share])[-self.window:]
        if self.warned or len(self.recent) < self.window or np.mean(self.recent) <= 0.5:
            return None
        self.warned = True
        return (f"{np.mean(self.recent):.0%} of the {self.what} in the last {self.window} steps got the "
                "same reward for every completion, which gives the policy nothing to learn from; more "
                "samples_per_prompt, a longer max_new_tokens or a denser reward usually help")


class Scoring:
    """A workload's scoring state: the KL coefficient, the moving-average baseline, the training
    steps taken (each step's sampling seed derives from it), and the last step's per-completion
    scores and KLs (every rank's), which move the first two after the update."""

    def __init__(self, cfg):
        self.cfg, self.kl, self.moving_baseline, self.steps = cfg, KLController(cfg), 0.0, 0
        self.last_scores: Optional[torch.Tensor] = None
        self.last_kl: Optional[torch.Tensor] = None

    def step_seed(self, seed: int) -> int:
        """The sampling seed of the next training step, which it counts: a resumed run samples
        what the uninterrupted one would."""
        step_seed = seed * 1_000_003 + self.steps
        self.steps += 1
        return step_seed

    def finish(self, batch: Batch, rewards: torch.Tensor, values: Optional[torch.Tensor],
               next_values: Optional[torch.Tensor], prompts: int, **fields) -> Batch:
        """The batch the update learns from: the task rewards (B, T) less the KL penalty, the
        values, each row's group (`prompts` prompts of samples_per_prompt rows each), the moving
        baseline and this step's KL coefficient; `fields`: any other Batch fields to set."""
        B, device = batch.mask.shape[0], batch.mask.device
        rewards = kl_penalty(rewards, batch, self.kl.coef, self.cfg.kl_estimator, self.cfg.kl_in)  # (B, T)
        group = torch.arange(prompts, device=device).repeat_interleave(self.cfg.samples_per_prompt)  # (B,)
        baseline = torch.full((B,), self.moving_baseline, device=device)                              # (B,)
        return batch.replace(rewards=rewards, values=values, next_values=next_values, group=group,
                             baseline=baseline, kl_coef=self.kl.coef, **fields)

    def record(self, scores: torch.Tensor, kls: torch.Tensor) -> None:
        """Keep every rank's per-completion scores (summed shaped rewards) and KLs (nats), (B_global,)
        each, for after_update."""
        self.last_scores, self.last_kl = scores, kls

    def metrics(self, kls: Any, lengths: Any, times: dict) -> dict:
        """The step's KL, length and speed metrics from every rank's per-completion KLs and model
        token counts (arrays or tensors, (B_global,) each); `times`: the sampling phases'."""
        return {"kl/to_reference": float(kls.mean()), "kl/coef": self.kl.coef,
                "train/completion_length": float(lengths.mean()), **times,
                # every rank's tokens over this rank's generation time: ranks generate side by side
                "time/tokens_per_s": float(lengths.sum()) / max(times["time/generate_s"], 1e-9)}

    def after_update(self) -> None:
        self.kl.update(float(self.last_kl.mean()), len(self.last_kl))
        self.moving_baseline = 0.9 * self.moving_baseline + 0.1 * float(self.last_scores.mean())

    def state(self) -> dict:
        return {"kl_coef": self.kl.coef, "moving_baseline": self.moving_baseline, "steps": self.steps}

    def load_state(self, state: dict) -> None:
        self.kl.coef = float(state["kl_coef"])
        self.moving_baseline = float(state["moving_baseline"])
        self.steps = int(state["steps"])
