"""Fixed-size on-policy rollouts and deterministic evaluation on Gymnasium vector environments."""
from __future__ import annotations

import copy
import hashlib
import re
from collections import deque
from pathlib import Path
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode

from .. import dist
from ..batch import Batch
from ..errors import EnvError
from ..identity import callable_identity
from .policy import ControlPolicy


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


def register_env(env) -> str:
    """A Python environment (a gymnasium.Env instance, a class or a factory) registered with
    Gymnasium as policygrad/<Name>-<8 hex digits>-v0 (the digits from its class, or a factory's
    code), so every part of a run makes it by id as any other: each environment of the vector env,
    and each evaluation, gets a fresh copy of an instance."""
    if isinstance(env, gym.Env):
        spec = env.spec.id if env.spec is not None else ""
        name, make = spec or type(env.unwrapped).__name__, (lambda **kwargs: copy.deepcopy(env))
        identity = f"{type(env.unwrapped).__module__}.{type(env.unwrapped).__qualname__}:{spec}"
    elif callable(env):
        name, make = getattr(env, "__name__", type(env).__name__), (lambda **kwargs: env(**kwargs))
        identity = callable_identity(env)
    else:
        raise EnvError(f"env must be a Gymnasium id, a gymnasium.Env, its class or a function that makes "
                       f"one; got {type(env).__name__}")
    digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
    env_id = f"policygrad/{re.sub(r'[^A-Za-z0-9_.-]', '', name) or 'Env'}-{digest}-v0"

    def checked(**kwargs):
        try:
            made = make(**kwargs)
        except Exception as e:  # the user's code: its error is theirs to fix, in one line
            raise EnvError(f"env '{name}' could not be made: {e.__class__.__name__}: {e}") from None
        if not isinstance(made, gym.Env):
            raise EnvError(f"env factory '{name}' returned a {type(made).__name__}, not a gymnasium.Env")
        return made
    gym.registry.pop(env_id, None)  # the latest object of that name is the run's
    gym.register(env_id, entry_point=checked)
    return env_id


class Collector:
    """Steps a vector env with the policy and packs each rollout into a Batch (B = envs, T = steps).

    Episode returns are tracked on raw rewards, whatever scaling the learner sees.
    """

    def __init__(self, envs: gym.vector.VectorEnv, seed: int, gamma: float):
        self.envs = envs
        self.n = envs.num_envs
        self.gamma = gamma
        self.rng = np.random.default_rng(seed)
        self.recent_returns: deque[float] = deque(maxlen=20)
        self.recent_lengths: deque[int] = deque(maxlen=20)
        self.episodes = 0
        self.restart(seed)

    def restart(self, seed: int) -> None:
        """Fresh episodes in every environment (at the start, and on resume)."""
        self.obs, _ = self.envs.reset(seed=seed)
        self.episode_return = np.zeros(self.n)
        self.episode_length = np.zeros(self.n, dtype=np.int64)
        self.discounted_return = np.zeros(self.n)  # for reward scaling

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
        policy.return_norm.update(dist.gather_rows(self.discounted_return))  # the same on every rank
        self.discounted_return[done] = 0.0
        scale = float(np.sqrt(policy.return_norm.var.item() + 1e-8))
        return np.clip(rewards / scale, -10.0, 10.0)

    @torch.no_grad()
    def collect(self, policy: ControlPolicy, n_steps: int) -> Batch:
        T, N = n_steps, self.n
        actor = policy.numpy_snapshot()
        obs_buf, act_buf, logp_buf, val_buf = [], [], [], []
        rewards, terminated, truncated = (np.zeros((T, N), np.float32) for _ in range(3))
        final_values = np.zeros((T, N), np.float32)
        for t in range(T):
            pooled = dist.gather_rows(self.obs) if policy.obs_norm is not None else None
            obs = policy.normalize(self.obs, update=True, pooled=pooled)  # (N, obs_dim)
            actions, log_prob, values = actor.act(obs, self.rng)
            self.obs, reward, term, trunc, info = self.envs.step(policy.to_env_actions(actions))
            done = term | trunc
            self._track(reward, done)
            rewards[t] = self._scale(policy, reward, done)
            terminated[t] = term
            truncated[t] = trunc & ~term
            cut = np.flatnonzero(trunc & ~term)
            if len(cut):  # bootstrap from the episode's final observation, not the reset one
                final = np.stack([info["final_obs"][i] for i in cut])
                final_values[t, cut] = actor.value(policy.normalize(final, update=False))
            obs_buf.append(obs)
            act_buf.append(actions)
            logp_buf.append(log_prob)
            val_buf.append(values)
        values = np.stack(val_buf)                                      # (T, N)
        last_value = actor.value(policy.normalize(self.obs, update=False))
        following = np.concatenate([values[1:], last_value[None]])      # (T, N) value of obs t+1
        next_values = np.where(terminated + truncated > 0, final_values, following)  # (T, N)
        per_step = lambda x: torch.from_numpy(np.ascontiguousarray(np.swapaxes(np.asarray(x), 0, 1)))
        return Batch(
            obs=per_step(obs_buf), actions=per_step(act_buf), log_prob=per_step(logp_buf),
            rewards=per_step(rewards), terminated=per_step(terminated), truncated=per_step(truncated),
            mask=torch.ones(N, T), values=per_step(values), next_values=per_step(next_values))


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
    actor, rng = policy.numpy_snapshot(), np.random.default_rng(seed)
    try:
        while (done_count < quota).any():
            actions, _, _ = actor.act(policy.normalize(obs, update=False), rng, deterministic=True)
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


def build_policy(cfg, seed: int) -> ControlPolicy:
    envs = make_envs(cfg.env, 1)
    try:
        with torch.random.fork_rng():  # initialisation draws from a seeded, private stream
            torch.manual_seed(seed)
            return ControlPolicy(envs.single_observation_space, envs.single_action_space, cfg)
    finally:
        envs.close()


class ControlWorkload:
    """What the trainer needs from a Gymnasium run: rollouts, evaluation, tensors to save.

    On resume the environments start fresh episodes; counters, normalisers and optimiser continue.
    Over several ranks (dist.py) each steps its block of the num_envs environments, seeded from its
    own stream, and the statistics it reports are every rank's.
    """
    headline = "train/episode_return_mean"
    eval_headline = "eval/return_mean"
    one_thread = True  # small MLPs run fastest on one torch thread

    def __init__(self, cfg, seed: int, model_path: Optional[Path] = None):
        """seed: of the weights' initialisation, the same on every rank; environments and action
        sampling draw from this rank's own stream (dist.rank_seed). model_path is a language
        model's: a control policy's weights come with load_tensors."""
        self.cfg, self.seed = cfg, dist.rank_seed(seed, dist.rank())
        self.policy = build_policy(cfg, seed)
        lo, hi = dist.share(cfg.num_envs)
        self.collector = Collector(make_envs(cfg.env, hi - lo, cfg.vectorization), self.seed, cfg.gamma)

    @property
    def per_update(self) -> int:
        return self.cfg.rollout_size  # total_steps and eval_every count environment steps

    @property
    def trained_on(self) -> dict[str, str]:
        return {"env": self.cfg.env}

    def _recent(self) -> tuple[np.ndarray, np.ndarray, int]:
        """Every rank's recent episode returns and lengths, and its episode count, summed."""
        c = self.collector
        parts = dist.gather_objects((list(c.recent_returns), list(c.recent_lengths), c.episodes))
        returns = np.asarray([x for p in parts for x in p[0]], dtype=np.float64)
        lengths = np.asarray([x for p in parts for x in p[1]], dtype=np.float64)
        return returns, lengths, sum(p[2] for p in parts)

    def collect(self) -> tuple[Batch, dict]:
        batch = self.collector.collect(self.policy, self.cfg.n_steps)
        returns, lengths, episodes = self._recent()
        self._stop = self._reached(returns)
        return batch, {
            "train/episode_return_mean": float(np.mean(returns)) if len(returns) else None,
            "train/episode_length_mean": float(np.mean(lengths)) if len(returns) else None,
            "train/episodes": episodes}

    def _reached(self, returns: np.ndarray) -> bool:
        """Every rank's last 20 training episodes (each rank's window full) average stop_at_return."""
        full = len(returns) == self.collector.recent_returns.maxlen * dist.world()
        return (self.cfg.stop_at_return is not None and full
                and float(np.mean(returns)) >= self.cfg.stop_at_return)

    def after_update(self, batch: Batch, metrics: dict) -> dict:
        return {}

    def take_warnings(self) -> list[str]:
        """Warnings for the user raised since the last call; control runs have none yet."""
        return []

    def data_term(self) -> None:
        """Control runs have no data loss (J_data is a language model's)."""
        return None

    def stop_early(self) -> bool:
        """Decided on numbers every rank shares (collect's gathered returns): all ranks stop together."""
        return getattr(self, "_stop", False)

    def evaluate(self, split: str, out_dir=None) -> dict:
        """Deterministic episodes on separate environments (control has no data splits); rank 0
        plays them and every rank gets its numbers."""
        result = None
        if dist.is_main():
            returns = evaluate(self.policy, self.cfg.env, self.cfg.eval_episodes, seed=self.cfg.seed + 1_000_003)
            result = {"eval/return_mean": float(returns.mean()), "eval/return_std": float(returns.std())}
        return dist.from_main(result)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Weights and normalisers, copied: the normalisers move while the next rollout is collected,
        which may overlap the checkpoint's write."""
        return {k: v.detach().clone() for k, v in self.policy.state_dict().items()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.policy.load_state_dict(tensors)  # every weight and normaliser is in the checkpoint's tensors

    def model_files(self) -> dict:
        return {}  # control policies live entirely in model.safetensors

    write_model_config = None

    def state(self) -> dict:
        """JSON: the action-sampling RNG and the episode statistics (environments are not saved)."""
        c = self.collector
        return {"rng": c.rng.bit_generator.state, "episodes": c.episodes,
                "recent_returns": list(c.recent_returns), "recent_lengths": list(c.recent_lengths)}

    def load_state(self, state: dict, update: int) -> None:
        """Continue counting where the checkpoint was; the environments start fresh episodes (a
        Gymnasium env has no general way to save its state), seeded from the run seed and update."""
        c = self.collector
        c.rng.bit_generator.state = state["rng"]
        c.episodes = int(state["episodes"])
        c.recent_returns.extend(float(x) for x in state["recent_returns"])
        c.recent_lengths.extend(int(x) for x in state["recent_lengths"])
        c.restart(self.seed + 7_919 * update)
