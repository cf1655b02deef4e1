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
from ..core.losses import batch_mean, categorical_kl, gaussian_kl
from ..core.trpo import categorical_fisher_product, gaussian_fisher_product, linearised

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


class _FusedMLP(torch.autograd.Function):
    """Forward and backward of a Linear/activation stack in one autograd node.

    Profiled on CPU with 64x64 layers and 256 rows, autograd's per-op bookkeeping was as large as the
    matmuls, and torch.tanh ran a scalar kernel 8x slower than sigmoid; this node computes
    tanh(x) = 2 sigmoid(2x) - 1 and hand-written layer gradients (~15% faster per network).
    The naive twin is the nn.Sequential of the same Linear layers (tests/test_control.py).
    Differentiating the backward again (create_graph=True, TRPO's Fisher-vector products) is exact:
    then the backward recomputes the activations with recorded ops (see `_recorded_inputs`).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, relu: bool, *weights: torch.Tensor) -> torch.Tensor:
        inputs, h = [], x                                               # (N, d_in)
        n_layers = len(weights) // 2
        for i in range(n_layers):
            w, b = weights[2 * i], weights[2 * i + 1]
            inputs.append(h)
            h = torch.addmm(b, h, w.t())                                # (N, d_out)
            if i < n_layers - 1:
                h = h.clamp_(min=0.0) if relu else torch.sigmoid(h.mul_(2.0)).mul_(2.0).sub_(1.0)
        ctx.relu, ctx.n_layers = relu, n_layers
        ctx.save_for_backward(*inputs, *weights)
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.n_layers
        saved = ctx.saved_tensors
        inputs, weights = saved[:n], saved[n:]
        if torch.is_grad_enabled():  # create_graph=True: this backward will be differentiated
            inputs = _recorded_inputs(inputs[0], weights, ctx.relu)
        grads: list[Optional[torch.Tensor]] = [None] * (2 * n)
        grad_x = None
        for i in reversed(range(n)):
            grads[2 * i] = grad.t().mm(inputs[i])                       # (d_out, d_in)
            grads[2 * i + 1] = grad.sum(0)                              # (d_out,)
            if i > 0 or ctx.needs_input_grad[0]:
                grad = grad.mm(weights[2 * i])                          # (N, d_in)
                if i > 0:  # through the activation that produced inputs[i]
                    y = inputs[i]
                    grad = grad * (y > 0) if ctx.relu else grad - grad * y * y
                else:
                    grad_x = grad
        return (grad_x, None, *grads)


def _recorded_inputs(x: torch.Tensor, weights: tuple[torch.Tensor, ...], relu: bool) -> list[torch.Tensor]:
    """Each Linear's input, recomputed from x and the weights with ops autograd records.

    The activations saved in forward carry no graph, so a backward built on them treats them as
    constants in the weights; its own derivative then misses those terms. They are multiplied by the
    incoming gradient, which is 0 for the KL at theta_old (so the Fisher-vector product there was
    right) but not elsewhere: off theta_old the KL Hessian was 20-90% wrong. Recomputing costs one
    forward per graph built, and TRPO builds one per update and reuses it for every CG product.
    """
    inputs, h = [], x                                                   # (N, d_in)
    n_layers = len(weights) // 2
    for i in range(n_layers - 1):
        inputs.append(h)
        h = torch.addmm(weights[2 * i + 1], h, weights[2 * i].t())      # (N, d_out)
        h = torch.relu(h) if relu else 2.0 * torch.sigmoid(2.0 * h) - 1.0  # out of place: recorded
    return [*inputs, h]


def fused_mlp(x: torch.Tensor, layers: list[nn.Linear], activation: str) -> torch.Tensor:
    """The stack `layers` with `activation` between them, on (..., d_in) -> (..., d_out)."""
    flat = x.reshape(-1, x.shape[-1])
    weights = [t for layer in layers for t in (layer.weight, layer.bias)]
    out = _FusedMLP.apply(flat, activation == "relu", *weights)
    return out.reshape(*x.shape[:-1], out.shape[-1])


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
        self.activation = cfg.activation
        self._actor_layers = [m for m in self.actor_body if isinstance(m, nn.Linear)] + [self.actor_head]
        self._critic_layers = [m for m in self.critic_body if isinstance(m, nn.Linear)] + [self.critic_head]
        if not self.discrete:
            self.register_buffer("action_low", torch.as_tensor(action_space.low, dtype=torch.float32))
            self.register_buffer("action_high", torch.as_tensor(action_space.high, dtype=torch.float32))

    # --- parameters, as TRPO needs them apart ---
    def actor_parameters(self) -> list[nn.Parameter]:
        extra = [] if self.log_std is None else [self.log_std]
        return [*self.actor_body.parameters(), *self.actor_head.parameters(), *extra]

    def critic_parameters(self) -> list[nn.Parameter]:
        return [*self.critic_body.parameters(), *self.critic_head.parameters()]

    def optimizer_groups(self, cfg) -> list[tuple[list[nn.Parameter], float]]:
        """Actor and critic learn together at cfg.lr (as SB3's PPO and A2C)."""
        return [(list(self.parameters()), cfg.lr)]

    # --- observations ---
    def normalize(self, obs: np.ndarray, update: bool, pooled: Optional[np.ndarray] = None) -> np.ndarray:
        """Flatten and (if enabled) normalise raw observations (N, *shape) -> (N, obs_dim) float32.
        update: first fold `pooled` (every rank's observations of this step; default obs) into the
        running statistics, so that all ranks keep the same normaliser."""
        obs = np.asarray(obs, dtype=np.float32).reshape(len(obs), -1)
        if self.obs_norm is None:
            return obs
        if update:
            pooled = obs if pooled is None else np.asarray(pooled, dtype=np.float32).reshape(len(pooled), -1)
            self.obs_norm.update(pooled)
        mean, std = self.obs_norm.mean.numpy(), np.sqrt(self.obs_norm.var.numpy() + 1e-8)
        return np.clip((obs - mean) / std, -self.clip_obs, self.clip_obs).astype(np.float32)

    # --- distributions ---
    def actor_output(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits (Discrete) or means (Box), (..., act_dim)."""
        return fused_mlp(obs, self._actor_layers, self.activation)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return fused_mlp(obs, self._critic_layers, self.activation).squeeze(-1)  # (...)

    def log_prob_entropy(self, output: torch.Tensor, actions: torch.Tensor,
                         entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """log-probability of actions and entropy; entropy_grad=False computes the entropy as a
        statistic only (no graph), which is what a run with ent_coef = 0 needs."""
        if self.discrete:
            log_p = torch.log_softmax(output, dim=-1)                   # (..., K)
            log_prob = log_p.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)  # (...)
            with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
                entropy = -(log_p.exp() * log_p).sum(-1)                # (...)
            return log_prob, entropy
        z = (actions - output) * torch.exp(-self.log_std)               # (..., D)
        log_prob = (-0.5 * z ** 2 - self.log_std - 0.5 * LOG_2PI).sum(-1)  # (...)
        entropy = (0.5 + 0.5 * LOG_2PI + self.log_std).sum().expand(log_prob.shape)  # (...)
        return log_prob, entropy

    def to_env_actions(self, actions: np.ndarray) -> np.ndarray:
        """Actions as the env takes them: Gaussian samples are clipped to the Box bounds (the batch
        keeps the unclipped sample, whose log-probability the loss needs)."""
        if self.discrete:
            return actions
        return np.clip(actions, self.action_low.numpy(), self.action_high.numpy())

    def numpy_snapshot(self) -> "NumpyActorCritic":
        """A frozen numpy copy for stepping environments (see NumpyActorCritic)."""
        def layers(body: nn.Sequential, head: nn.Linear) -> list[tuple[np.ndarray, np.ndarray]]:
            linears = [m for m in body if isinstance(m, nn.Linear)] + [head]
            return [(m.weight.detach().numpy().T.copy(), m.bias.detach().numpy().copy()) for m in linears]
        log_std = None if self.log_std is None else self.log_std.detach().numpy().copy()
        return NumpyActorCritic(layers(self.actor_body, self.actor_head),
                                layers(self.critic_body, self.critic_head),
                                self.activation, log_std)

    # --- the Policy protocol ---
    def log_prob(self, batch: Batch) -> torch.Tensor:
        """(B, T) log-probability of batch.actions under the current actor."""
        return self.log_prob_entropy(self.actor_output(batch.obs), batch.actions)[0]

    def rows(self, batch: Batch) -> Batch:
        """The view minibatches are cut from: each transition is a row."""
        return batch.flatten_steps()

    def values(self, batch: Batch) -> torch.Tensor:
        return self.value(batch.obs)                                    # (B, T)

    def evaluate(self, batch: Batch, entropy_grad: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """log_prob, entropy and values of batch.actions in batch.obs, each (B, T)."""
        log_prob, entropy = self.log_prob_entropy(self.actor_output(batch.obs), batch.actions,
                                                  entropy_grad)
        return log_prob, entropy, self.value(batch.obs)

    def kl(self, batch: Batch, old: tuple[torch.Tensor, Optional[torch.Tensor]]) -> torch.Tensor:
        """Mean exact KL(old || new) over the batch; `old` from snapshot_actor before the step."""
        old_output, old_log_std = old
        new_output = self.actor_output(batch.obs)                       # (B, T, A)
        if self.discrete:
            kl = categorical_kl(old_output, new_output)                 # (B, T)
        else:
            kl = gaussian_kl(old_output, old_log_std, new_output, self.log_std)  # (B, T)
        return batch_mean(kl, batch)

    def log_prob_and_kl(self, batch: Batch, old: tuple[torch.Tensor, Optional[torch.Tensor]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """log_prob (B, T) and mean KL(old || new) from one actor forward (TRPO's line search)."""
        output = self.actor_output(batch.obs)                           # (B, T, A)
        old_output, old_log_std = old
        if self.discrete:
            kl = categorical_kl(old_output, output)                     # (B, T)
        else:
            kl = gaussian_kl(old_output, old_log_std, output, self.log_std)
        return self.log_prob_entropy(output, batch.actions)[0], batch_mean(kl, batch)

    def fisher_outputs(self, batch: Batch, tangents: list[torch.Tensor]
                       ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """TRPO's Gauss-Newton product (core.trpo.Linearised): the actor's outputs (logits, or
        mean and log-std) with graph, and H J v beside them, H their Fisher weighted as kl's mean.
        Through the nn.Sequential twin: the fused MLP has no forward-mode derivative."""
        def outputs() -> tuple[torch.Tensor, ...]:
            out = self.actor_head(self.actor_body(batch.obs))           # (B, T, A)
            return (out,) if self.discrete else (out, self.log_std)
        z, jv = linearised(self, self.actor_parameters(), tangents, outputs)
        weights = batch.mask / batch.n_valid                            # (B, T)
        if self.discrete:
            return z, (categorical_fisher_product(z[0].detach(), jv[0], weights),)
        return z, gaussian_fisher_product(z[1].detach(), jv[0], jv[1], weights)

    @torch.no_grad()
    def snapshot_actor(self, batch: Batch) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The detached actor output on the batch and log-std: the 'old' side of a TRPO KL."""
        log_std = None if self.log_std is None else self.log_std.detach().clone()
        return self.actor_output(batch.obs), log_std


class NumpyActorCritic:
    """The policy's forward pass in numpy, for acting in environments.

    Acting feeds a handful of observations at a time, where torch's per-op overhead (~5-10 us) is
    most of the cost; numpy does the same matmuls in about a microsecond each. The torch path,
    ControlPolicy.act, is the reference: tests/test_control.py checks that the two agree.
    """

    def __init__(self, actor: list[tuple[np.ndarray, np.ndarray]], critic: list[tuple[np.ndarray, np.ndarray]],
                 activation: str, log_std: Optional[np.ndarray]):
        self.actor, self.critic, self.log_std = actor, critic, log_std
        self.activation = np.tanh if activation == "tanh" else (lambda x: np.maximum(x, 0.0))

    def _forward(self, layers, x: np.ndarray) -> np.ndarray:
        for w, b in layers[:-1]:
            x = self.activation(x @ w + b)
        w, b = layers[-1]
        return x @ w + b

    def value(self, obs: np.ndarray) -> np.ndarray:
        return self._forward(self.critic, obs)[:, 0]                   # (N,)

    def act(self, obs: np.ndarray, rng: np.random.Generator, deterministic: bool = False
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, obs_dim) normalised obs -> actions, log_prob (N,), values (N,)."""
        out = self._forward(self.actor, obs)                            # (N, A)
        if self.log_std is None:
            z = out - out.max(-1, keepdims=True)                        # (N, K) stable logits
            e = np.exp(z)
            total = e.sum(-1)                                           # (N,)
            if deterministic:
                actions = z.argmax(-1)
            else:  # inverse-CDF sampling; u < total, so the count stays below K
                u = rng.random(len(obs)) * total
                actions = (e.cumsum(-1) < u[:, None]).sum(-1)
            log_prob = z[np.arange(len(z)), actions] - np.log(total)
        else:
            actions = out if deterministic else out + rng.standard_normal(out.shape).astype(np.float32) * np.exp(self.log_std)
            z = (actions - out) * np.exp(-self.log_std)
            log_prob = (-0.5 * z ** 2 - self.log_std - 0.5 * LOG_2PI).sum(-1)
        return actions, log_prob.astype(np.float32), self.value(obs).astype(np.float32)
