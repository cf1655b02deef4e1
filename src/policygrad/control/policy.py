"""MLP actor-critic for Gymnasium spaces: Categorical head for Discrete, diagonal Gaussian with a
state-independent log-std for Box. Observation and return normalisers live here as buffers, so they
are saved in the same safetensors file as the weights.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from ..batch import Batch
from ..core.losses import categorical_kl, gaussian_kl, masked_mean

LOG_2PI = math.log(2.0 * math.pi)


class RunningNorm(nn.Module):
    """Running mean and variance (Chan et al. parallel update), as SB3's RunningMeanStd."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def update(self, x: np.ndarray) -> None:
        x = torch.as_tensor(x, dtype=torch.float64)                     # (N, *shape)
        n = x.shape[0]
        batch_mean, batch_var = x.mean(0), x.var(0, unbiased=False)
        delta = batch_mean - self.mean
        total = self.count + n
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total
        self.mean += delta * n / total
        self.var.copy_(m2 / total)
        self.count.copy_(total)


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    act = {"tanh": nn.Tanh, "relu": nn.ReLU}[activation]
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), act()]
    return nn.Sequential(*layers)


def orthogonal_init(module: nn.Sequential, head: nn.Linear, head_gain: float) -> None:
    """Orthogonal weights, zero biases; gains as in the PPO implementation details (Huang et al. 2022)."""
    for layer in module:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, math.sqrt(2.0))
            nn.init.zeros_(layer.bias)
    nn.init.orthogonal_(head.weight, head_gain)
    nn.init.zeros_(head.bias)


class ControlPolicy(nn.Module):
    """Actor and critic as two MLPs over the same (normalised) observation."""

    def __init__(self, observation_space: spaces.Space, action_space: spaces.Space, cfg):
        super().__init__()
        obs_dim = int(np.prod(observation_space.shape))
        self.discrete = isinstance(action_space, spaces.Discrete)
        act_dim = int(action_space.n) if self.discrete else int(np.prod(action_space.shape))
        sizes = [obs_dim, *cfg.hidden_sizes]
        self.actor_body, self.critic_body = mlp(sizes, cfg.activation), mlp(sizes, cfg.activation)
        self.actor_head = nn.Linear(sizes[-1], act_dim)
        self.critic_head = nn.Linear(sizes[-1], 1)
        if cfg.ortho_init:
            orthogonal_init(self.actor_body, self.actor_head, 0.01)
            orthogonal_init(self.critic_body, self.critic_head, 1.0)
        self.log_std = None if self.discrete else nn.Parameter(torch.full((act_dim,), cfg.log_std_init))
        self.obs_norm = RunningNorm((obs_dim,)) if cfg.normalize_obs else None
        self.return_norm = RunningNorm(()) if cfg.normalize_reward else None
        self.clip_obs = cfg.clip_obs
        if not self.discrete:
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))

    # --- parameters, as TRPO needs them apart ---
    def actor_parameters(self) -> list[nn.Parameter]:
        extra = [] if self.log_std is None else [self.log_std]
        return [*self.actor_body.parameters(), *self.actor_head.parameters(), *extra]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [*self.critic_body.parameters(), *self.critic_head.parameters()]

    # --- observations ---
    def normalize(self, obs: np.ndarray, update: bool) -> np.ndarray:
        """Flatten and (if enabled) normalise raw observations (N, *shape) -> (N, obs_dim) float32."""
        obs = np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
        if self.obs_norm is None:
            return obs
        if update:
            self.obs_norm.update(obs)
        mean, std = self.obs_norm.mean.numpy(), np.sqrt(self.obs_norm.var.numpy() + 1e-8)
        return np.clip((obs - mean) / std, -self.clip_obs, self.clip_obs).astype(np.float32)

    # --- distributions ---
    def actor_output(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits (Discrete) or means (Box), (..., act_dim)."""
        return self.actor_head(self.actor_body(obs))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic_head(self.critic_body(obs)).squeeze(-1)     # (...)

    def log_prob_entropy(self, output: torch.Tensor, actions: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.discrete:
            log_p = torch.log_softmax(output, dim=-1)                   # (..., K)
            log_prob = log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)  # (...)
            entropy = -(log_p.exp() * log_p).sum(-1)                    # (...)
            return log_prob, entropy
        z = (actions - output) * torch.exp(-self.log_std)               # (..., D)
        log_prob = (-0.5 * z ** 2 - self.log_std - 0.5 * LOG_2PI).sum(-1)  # (...)
        entropy = (0.5 + 0.5 * LOG_2PI + self.log_std).sum().expand(log_prob.shape)  # (...)
        return log_prob, entropy

    def sample(self, output: torch.Tensor, generator: torch.Generator, deterministic: bool
               ) -> torch.Tensor:
        if self.discrete:
            if deterministic:
                return output.argmax(-1)
            probs = torch.softmax(output, dim=-1)                       # (N, K)
            return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (N,)
        if deterministic:
            return output
        noise = torch.randn(output.shape, generator=generator)          # (N, D)
        return output + noise * self.log_std.exp()

    def to_env_actions(self, actions: torch.Tensor) -> np.ndarray:
        """Actions as the env takes them: Gaussian samples are clipped to the Box bounds."""
        if self.discrete:
            return actions.numpy()
        return torch.max(torch.min(actions, self.action_high), self.action_low).numpy()

    # --- the Policy protocol ---
    @torch.no_grad()
    def act(self, obs: np.ndarray, generator: torch.Generator, deterministic: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N, obs_dim) normalised obs -> actions, log_prob (N,), values (N,)."""
        x = torch.from_numpy(obs)
        output = self.actor_output(x)
        actions = self.sample(output, generator, deterministic)
        log_prob, _ = self.log_prob_entropy(output, actions)
        return actions, log_prob, self.value(x)

    def log_prob(self, batch: Batch) -> torch.Tensor:
        """(B, T) log-probability of batch.actions under the current actor."""
        return self.log_prob_entropy(self.actor_output(batch.obs), batch.actions)[0]

    def rows(self, batch: Batch) -> Batch:
        """The view minibatches are cut from: each transition is a row."""
        return batch.flatten_steps()

    def evaluate(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """log_prob, entropy and values of batch.actions in batch.obs, each (B, T)."""
        log_prob, entropy = self.log_prob_entropy(self.actor_output(batch.obs), batch.actions)
        return log_prob, entropy, self.value(batch.obs)

    def kl(self, batch: Batch, old: tuple[torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
        """Mean exact KL(old || new) over the batch; `old` from snapshot_actor before the step."""
        old_output, old_log_std = old
        new_output = self.actor_output(batch.obs)                       # (B, T, A)
        if self.discrete:
            kl = categorical_kl(old_output, new_output)                 # (B, T)
        else:
            kl = gaussian_kl(old_output, old_log_std, new_output, self.log_std)  # (B, T)
        return masked_mean(kl, batch.mask)

    @torch.no_grad()
    def snapshot_actor(self, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The detached actor output on the batch and log-std: the 'old' side of a TRPO KL."""
        log_std = None if self.log_std is None else self.log_std.detach().clone()
        return self.actor_output(batch.obs), log_std
