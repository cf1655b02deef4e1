"""The one training loop every algorithm and every policy shares.

A workload (control/rollout.py: Gymnasium; lm/rollout.py: a text task and a language model)
supplies the policy, rollouts, evaluation and what to save; everything else is here and the same.
Rank-aware: under torchrun each rank collects its own experience with its own seed, gradients are
averaged across ranks (algos.sync_gradients), and only rank 0 evaluates, logs and checkpoints.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from . import checkpoint
from . import config as config_mod
from .algos import ALGOS, Optimizers, Progress
from .config import Config, to_dict
from .core import advantages


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_seed(seed: int, rank: int) -> int:
    return seed + 10_007 * rank


def build_workload(cfg: Config, seed: int):
    if cfg.is_lm:
        from .lm.rollout import LMWorkload
        return LMWorkload(cfg, seed)
    from .control.rollout import ControlWorkload
    return ControlWorkload(cfg, seed)


@dataclass
class RunState:
    """Counters a checkpoint carries."""
    update: int = 0
    env_steps: int = 0


def evaluation_due(cfg: Config, state: RunState) -> bool:
    if cfg.eval_every <= 0:
        return False
    if cfg.is_lm:
        return state.update % cfg.eval_every == 0
    return state.env_steps // cfg.eval_every > (state.env_steps - cfg.rollout_size) // cfg.eval_every


def save_run(out_dir: Path, cfg: Config, work, opts: Optimizers, state: RunState) -> Path:
    return checkpoint.save(out_dir, f"update-{state.update:06d}", work.tensors(), opts.named(),
                           {"config": to_dict(cfg), "run": state.__dict__, "workload": work.state()},
                           write_extra=work.write_model)


def train(cfg: Config, out_dir: Path, progress: bool = True) -> dict:
    """Train cfg.algo on cfg.env or cfg.task; write metrics and checkpoints into out_dir."""
    rank, world = rank_and_world()
    seed = rank_seed(cfg.seed, rank)
    torch.set_num_threads(cfg.torch_threads)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    work = build_workload(cfg, seed)
    algo = ALGOS[cfg.algo]
    opts = algo.make_optimizers(work.policy, cfg)
    shuffle = torch.Generator().manual_seed(seed + 1)
    from .log import RunLogger  # tensorboard's import is slow: after the run's own set-up errors
    # the bar counts training steps for language models, environment steps for control
    per_update = 1 if cfg.is_lm else cfg.rollout_size * world
    logger = RunLogger(out_dir, cfg.total_updates * per_update, "step", enabled=rank == 0, progress=progress)
    state, start = RunState(), time.perf_counter()
    while state.update < cfg.total_updates:
        step_start = time.perf_counter()
        # 1. collect experience with the current policy
        batch, collect_metrics = work.collect()
        remaining = 1.0 - state.update / cfg.total_updates
        state.update += 1
        state.env_steps += cfg.rollout_size * world
        # 2. advantages and value targets
        batch = advantages.compute(batch, cfg)
        # 3. update the policy (and critic)
        metrics = algo.update(work.policy, opts, batch, cfg, Progress(remaining, shuffle))
        metrics.update(work.after_update(batch, metrics))
        step_s = time.perf_counter() - step_start
        # 4. evaluate on held-out data or environments
        eval_metrics = work.evaluate("validation", out_dir) if evaluation_due(cfg, state) and rank == 0 else {}
        # 5. log
        row = {"update": state.update, "step": state.update, "env_steps": state.env_steps,
               "time/elapsed_s": time.perf_counter() - start, "time/step_s": step_s,
               **collect_metrics, **metrics, **eval_metrics}
        logger.log(state.env_steps, row, per_update, headline=work.headline)
        if work.stop_early():
            break
    # 6. final evaluation and checkpoint
    final = work.evaluate("test", out_dir) if rank == 0 else {}
    if rank == 0:
        save_run(out_dir, cfg, work, opts, state)
        logger.log_final(state.env_steps, final)
    logger.close()
    return {"algo": cfg.algo, ("task" if cfg.is_lm else "env"): cfg.task if cfg.is_lm else cfg.env,
            "updates": state.update, "env_steps": state.env_steps,
            "train_" + work.headline.split("/")[-1]: logger.last.get(work.headline, float("nan")),
            **{f"final_{k.replace('/', '_')}": v for k, v in final.items() if isinstance(v, (int, float))},
            "wall_s": time.perf_counter() - start}


def load_config(state: dict, path: Path) -> Config:
    try:
        return config_mod.validate(config_mod.apply(Config(), state["config"]))
    except config_mod.ConfigError as e:
        raise checkpoint.CheckpointError(f"checkpoint '{path}' has an invalid config: {e}") from None


def load_workload(path: Path):
    """The workload (policy, normalisers, task) saved in checkpoint folder `path`, and its config."""
    tensors, _, state = checkpoint.load(path)
    cfg = load_config(state, path)
    if cfg.is_lm:
        from .lm.rollout import LMWorkload
        work = LMWorkload(cfg, cfg.seed, model_path=path / "policy")
    else:
        from .control.rollout import ControlWorkload
        work = ControlWorkload(cfg, cfg.seed)
    try:
        work.policy.load_state_dict(tensors, strict=not cfg.is_lm)
    except RuntimeError:
        raise checkpoint.CheckpointError(
            f"checkpoint '{path}' does not fit the policy its config describes (tensors differ)") from None
    return work, cfg
