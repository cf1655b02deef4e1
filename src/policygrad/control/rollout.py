"""Fixed-size on-policy rollouts and deterministic evaluation on Gymnasium vector environments."""
from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from ..batch import Batch
from .policy import ControlPolicy


class EnvError(ValueError):
    """An environment id that Gymnasium cannot make; shown to the user as one line."""


def make_envs(env_id: str, num_envs: int, vectorization: str = "sync") -> gym.vector.VectorEnv:
    # SAME_STEP autoreset hands over the final observation of each finished episode in the same
    # step, which truncation bootstrapping needs (and wastes no step on a reset transition).
    try:
        return gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=vectorization,
                            vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP})
    except gym.error.Error as e:
        near = [i for i in gym.registry if i.lower().startswith(env_id.split("-")[0].lower()[:4])][:5]
        hint = f"; similar ids: {', '.join(near)}" if near else "; see gymnasium.registry for ids"
        raise EnvError(f"unknown Gymnasium environment '{env_id}' ({e.__class__.__name__}){hint}") from None


class Collector:
    """Steps a vector env with the policy and packs each rollout into a Batch (B = envs, T = steps).

    Episode returns are tracked on raw rewards, whatever scaling the learner sees.
    """

    def __init__(self, envs: gym.vector.VectorEnv, seed: int, gamma: float):
        self.envs = envs
        self.n = envs.num_envs
        self.gamma = gamma
        self.generator = torch.Generator().manual_seed(seed)
        self.obs, _ = envs.reset(seed=seed)
        self.episode_return = np.zeros(self.n)
        self.episode_length = np.zeros(self.n, dtype=np.int64)
        self.discounted_return = np.zeros(self.n)  # for reward scaling
        self.recent_returns: deque[float] = deque(maxlen=20)
        self.recent_lengths: deque[int] = deque(maxlen=20)
        self.episodes = 0

    def _track(self, rewards: np.ndarray, done: np.ndarray) -> None:
        self.episode_return += rewards
        self.episode_length += 1
        for i in np.flatnonzero(done):
            self.recent_returns.append(float(self.episode_return[i]))
            self.recent_lengths.append(int(self.episode_length[i]))
            self.episodes += 1
        self.episode_return[done] = 0.0
        self.episode_length[done] = 0

    def _scale(self, policy: ControlPolicy, rewards: np.ndarray, done: np.ndarray) -> np.ndarray:
        if policy.return_norm is None:
            return rewards
        self.discounted_return = self.discounted_return * self.gamma + rewards
        policy.return_norm.update(self.discounted_return)
        self.discounted_return[done] = 0.0
        scale = float(np.sqrt(policy.return_norm.var.item() + 1e-8))
        return np.clip(rewards / scale, -10.0, 10.0)

    @torch.no_grad()
    def collect(self, policy: ControlPolicy, n_steps: int) -> Batch:
        T, N = n_steps, self.n
        obs_buf, act_buf, logp_buf, val_buf = [], [], [], []
        rewards = torch.zeros(T, N)
        terminated = torch.zeros(T, N)
        truncated = torch.zeros(T, N)
        next_values = torch.zeros(T, N)
        for t in range(T):
            obs = policy.normalize(self.obs, update=True)               # (N, obs_dim)
            actions, log_prob, values = policy.act(obs, self.generator)
            self.obs, reward, term, trunc, info = self.envs.step(policy.to_env_actions(actions))
            done = term | trunc
            self._track(reward, done)
            rewards[t] = torch.from_numpy(self._scale(policy, reward, done).astype(np.float32))
            terminated[t] = torch.from_numpy(term.astype(np.float32))
            truncated[t] = torch.from_numpy((trunc & ~term).astype(np.float32))
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):  # bootstrap from the episode's final observation, not the reset one
                final = np.stack([info["final_obs"][i] for i in cut])
                next_values[t, cut] = policy.value(torch.from_numpy(policy.normalize(final, update=False)))
            obs_buf.append(torch.from_numpy(obs))
            act_buf.append(actions)
            logp_buf.append(log_prob)
            val_buf.append(values)
        values = torch.stack(val_buf)                                   # (T, N)
        last_value = policy.value(torch.from_numpy(policy.normalize(self.obs, update=False)))
        following = torch.cat([values[1:], last_value[None]])           # (T, N) value of obs t+1
        boundary = terminated + truncated
        next_values = torch.where(boundary > 0, next_values, following)  # (T, N)
        return Batch(
            obs=torch.stack(obs_buf).transpose(0, 1), actions=torch.stack(act_buf).transpose(0, 1),
            log_prob=torch.stack(logp_buf).T, rewards=rewards.T, terminated=terminated.T,
            truncated=truncated.T, mask=torch.ones(N, T), values=values.T, next_values=next_values.T)


@torch.no_grad()
def evaluate(policy: ControlPolicy, env_id: str, episodes: int, seed: int) -> np.ndarray:
    """Raw returns of `episodes` deterministic episodes, spread evenly over up to 8 envs so that
    short episodes are not over-counted."""
    n = min(episodes, 8)
    quota = np.full(n, episodes // n) + (np.arange(n) < episodes % n)
    envs = make_envs(env_id, n)
    obs, _ = envs.reset(seed=seed)
    running, returns = np.zeros(n), []
    done_count = np.zeros(n, dtype=np.int64)
    generator = torch.Generator().manual_seed(seed)
    try:
        while (done_count < quota).any():
            actions, _, _ = policy.act(policy.normalize(obs, update=False), generator, deterministic=True)
            obs, reward, term, trunc, _ = envs.step(policy.to_env_actions(actions))
            running += reward
            for i in np.flatnonzero(term | trunc):
                if done_count[i] < quota[i]:
                    returns.append(running[i])
                    done_count[i] += 1
                running[i] = 0.0
    finally:
        envs.close()
    return np.asarray(returns)
