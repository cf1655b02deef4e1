"""The one training loop every algorithm and every policy shares.

Rank-aware: under torchrun each rank collects its own experience with its own seed, gradients are
averaged across ranks (algos.sync_gradients), and only rank 0 logs and checkpoints.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from . import checkpoint
from .algos import ALGOS, Optimizers, Progress
from . import config as config_mod
from .config import Config, to_dict
from .control.policy import ControlPolicy
from .control.rollout import Collector, evaluate, make_envs
from .core import advantages
from .log import RunLogger


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seed(seed: int, rank: int) -> int:
    return seed + 10_007 * rank


def build_policy(cfg: Config, seed: int) -> ControlPolicy:
    envs = make_envs(cfg.env, 1)
    try:
        with torch.random.fork_rng():  # initialisation draws from a seeded, private stream
            torch.manual_seed(seed)
            return ControlPolicy(envs.single_observation_space, envs.single_action_space, cfg)
    finally:
        envs.close()


@dataclass
class RunState:
    """Counters a checkpoint carries."""
    update: int = 0
    env_steps: int = 0
    episodes: int = 0
    best_eval: float = float("-inf")


def evaluation_due(cfg: Config, state: RunState) -> bool:
    if cfg.eval_every <= 0:
        return False
    return state.env_steps // cfg.eval_every > (state.env_steps - cfg.rollout_size) // cfg.eval_every


def save_run(out_dir: Path, cfg: Config, policy: ControlPolicy, opts: Optimizers, state: RunState) -> Path:
    return checkpoint.save(out_dir, f"update-{state.update:06d}", policy, opts.named(),
                           {"config": to_dict(cfg), "run": state.__dict__})


def train(cfg: Config, out_dir: Path, progress: bool = True) -> dict:
    """Train cfg.algo on cfg.env for cfg.total_steps; write metrics and a checkpoint into out_dir."""
    rank, world = rank_and_world()
    seed = rank_seed(cfg.seed, rank)
    torch.set_num_threads(cfg.torch_threads)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    policy = build_policy(cfg, seed)
    algo = ALGOS[cfg.algo]
    opts = algo.make_optimizers(policy, cfg)
    collector = Collector(make_envs(cfg.env, cfg.num_envs, cfg.vectorization), seed, cfg.gamma)
    shuffle = torch.Generator().manual_seed(seed + 1)
    logger = RunLogger(out_dir, cfg.total_updates * cfg.rollout_size * world, "step",
                       enabled=rank == 0, progress=progress)
    state, start = RunState(), time.perf_counter()
    eval_result: dict = {}
    while state.update < cfg.total_updates:
        # 1. collect a rollout with the current policy
        batch = collector.collect(policy, cfg.n_steps)
        remaining = 1.0 - state.env_steps / (cfg.total_updates * cfg.rollout_size)
        state.update += 1
        state.env_steps += cfg.rollout_size * world
        # 2. advantages and value targets
        batch = advantages.compute(batch, cfg)
        # 3. update the policy (and critic)
        metrics = algo.update(policy, opts, batch, cfg, Progress(remaining, shuffle))
        # 4. evaluate on separate environments, deterministic actions
        if evaluation_due(cfg, state) and rank == 0:
            eval_result = evaluate_now(policy, cfg, state)
        # 5. log
        returns = collector.recent_returns
        row = {"update": state.update, "env_steps": state.env_steps,
               "time/elapsed_s": time.perf_counter() - start,
               "train/episode_return_mean": float(np.mean(returns)) if returns else None,
               "train/episode_length_mean": float(np.mean(collector.recent_lengths)) if returns else None,
               "train/episodes": collector.episodes, **metrics, **eval_result}
        logger.log(state.env_steps, row, cfg.rollout_size * world, headline="train/episode_return_mean")
        eval_result = {}
        if cfg.stop_at_return is not None and len(returns) == returns.maxlen \
                and np.mean(returns) >= cfg.stop_at_return:
            break
    # 6. final evaluation and checkpoint
    final = evaluate_now(policy, cfg, state) if rank == 0 else {}
    if rank == 0:
        save_run(out_dir, cfg, policy, opts, state)
    summary = {"algo": cfg.algo, "env": cfg.env, "env_steps": state.env_steps, "updates": state.update,
               "train_return_mean": logger.last.get("train/episode_return_mean", float("nan")),
               "eval_return_mean": final.get("eval/return_mean", float("nan")),
               "wall_s": time.perf_counter() - start}
    logger.close()
    return summary


def evaluate_now(policy: ControlPolicy, cfg: Config, state: RunState) -> dict:
    returns = evaluate(policy, cfg.env, cfg.eval_episodes, seed=cfg.seed + 1_000_003)
    state.best_eval = max(state.best_eval, float(returns.mean()))
    return {"eval/return_mean": float(returns.mean()), "eval/return_std": float(returns.std())}


def load_policy(path: Path) -> tuple[ControlPolicy, Config]:
    """The policy (with its normalisers) and config saved in checkpoint folder `path`."""
    model, _, state = checkpoint.load(path)
    try:
        cfg = config_mod.validate(config_mod.apply(Config(), state["config"]))
    except config_mod.ConfigError as e:
        raise checkpoint.CheckpointError(f"checkpoint '{path}' has an invalid config: {e}") from None
    policy = build_policy(cfg, cfg.seed)
    try:
        policy.load_state_dict(model)
    except RuntimeError:
        raise checkpoint.CheckpointError(
            f"checkpoint '{path}' does not fit the policy its config describes (tensors differ)") from None
    return policy, cfg


def evaluate_run(path: Path, episodes: int, seed: int) -> dict:
    policy, cfg = load_policy(path)
    returns = evaluate(policy, cfg.env, episodes, seed)
    return {"env": cfg.env, "algo": cfg.algo, "checkpoint": path.name, "episodes": len(returns),
            "mean_return": float(returns.mean()), "std_return": float(returns.std()),
            "min_return": float(returns.min()), "max_return": float(returns.max())}
