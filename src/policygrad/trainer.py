"""The one training loop every algorithm and every policy shares.

A workload (control/rollout.py: Gymnasium; lm/rollout.py: a text task and a language model)
supplies the policy, rollouts, evaluation and what to save; everything else is here and the same.
Over several processes (dist.py) every rank runs this same loop on its block of the global batch;
rank 0 logs and writes checkpoints, which hold every rank's RNG and data state.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import yaml

from . import checkpoint, dist, placement
from . import config as config_mod
from .algos import ALGOS, Optimizers, Progress
from .config import Config, to_dict
from .control.rollout import ControlWorkload
from .core import advantages
from .errors import TrainingError
from .log import RunLogger
from .protocols import Workload


def workload_class(cfg: Config) -> type[Workload]:
    """A language model's workload or a Gymnasium env's: the one place the trainer tells them apart."""
    if cfg.is_lm:
        from .lm.rollout import LMWorkload  # transformers: not for control runs
        return LMWorkload
    return ControlWorkload


def build_workload(cfg: Config, path: Optional[Path] = None) -> Workload:
    """The run's workload (this rank's share of it), fresh or (path: a checkpoint folder) with a
    trained language model. Weights start from cfg.seed on every rank; sampling and environments
    draw from each rank's own seed stream."""
    return workload_class(cfg)(cfg, cfg.seed, model_path=None if path is None else path / "policy")


@dataclass
class RunState:
    """Counters a checkpoint carries."""
    update: int = 0
    env_steps: int = 0
    best_metric: Optional[float] = None
    """Best validation result so far (the workload's eval_headline), and its checkpoint."""
    best_checkpoint: Optional[str] = None
    bad_in_a_row: int = 0
    """Updates in a row skipped for a non-finite loss or gradient."""
    skipped_updates: int = 0
    """Updates skipped: for a non-finite loss or gradient, or with nothing to learn from."""
    finished: bool = False
    """Training is over (the final checkpoint); a resume only redoes the final evaluation."""


def evaluation_due(cfg: Config, state: RunState, per_update: int) -> bool:
    """Whether this update crossed a multiple of eval_every (counted in the workload's steps)."""
    if cfg.eval_every <= 0:
        return False
    done = state.update * per_update
    return done // cfg.eval_every > (done - per_update) // cfg.eval_every


def checkpoint_due(cfg: Config, state: RunState) -> bool:
    return cfg.checkpoint_every > 0 and state.update % cfg.checkpoint_every == 0


def note_best(state: RunState, eval_metrics: dict, key: str) -> bool:
    """True when this evaluation beats every earlier one (its checkpoint becomes the best)."""
    value = eval_metrics.get(key)
    if value is None or (state.best_metric is not None and value <= state.best_metric):
        return False
    state.best_metric, state.best_checkpoint = float(value), checkpoint_name(state)
    return True


def note_bad_update(state: RunState, metrics: dict, cfg: Config, out_dir: Path) -> None:
    """Count updates skipped for a non-finite loss or gradient; stop after max_bad_updates in a row."""
    if not metrics.get("update/nonfinite"):
        state.bad_in_a_row = 0
        return
    state.bad_in_a_row += 1
    state.skipped_updates += 1
    if state.bad_in_a_row >= cfg.max_bad_updates:
        last = checkpoint.latest(out_dir) if (out_dir / "checkpoints").is_dir() else None
        raise TrainingError(
            f"{state.bad_in_a_row} updates in a row (the last: update {state.update}) had a non-finite "
            f"loss or gradient and were skipped; stopping. Last good checkpoint: "
            f"{last if last is not None else 'none yet'}. Try a lower lr or check the rewards/observations")


def checkpoint_name(state: RunState) -> str:
    return f"update-{state.update:06d}"


def save_run(out_dir: Path, cfg: Config, work, opts: Optimizers, state: RunState,
             generators: dict[str, torch.Generator], writer: Optional[checkpoint.CheckpointWriter] = None) -> Path:
    """Checkpoint the run. Every rank calls it: each hands rank 0 its RNG and data state (and, with
    FSDP, its shard of the optimiser state; the weights are gathered whole), and rank 0 writes.
    With a background writer, writer.wait() must come before the next update."""
    files, tensors = work.model_files(), work.tensors()
    mine = {"rng": checkpoint.rng_state(generators), "workload": work.state()}
    if opts.sharded and dist.rank() > 0:  # this rank's Adam shard, a host copy for rank 0 to write
        mine["optimizer"] = {f"{key}.{k}": v.detach().to("cpu", copy=True) for key, opt in opts.named().items()
                             for k, v in checkpoint.optimizer_to_flat(opt)[0].items()}
    per_rank = dist.gather_to_main(mine)
    if not dist.is_main():
        return out_dir / "checkpoints" / checkpoint_name(state)
    shards = [part.pop("optimizer") for part in per_rank[1:]] if opts.sharded else None
    checkpoint.save(out_dir, checkpoint_name(state), tensors, opts.named(),
                    {"config": to_dict(cfg), "run": dict(state.__dict__), "world": len(per_rank),
                     "workload": per_rank[0]["workload"], "rng": per_rank[0]["rng"],
                     "other_ranks": per_rank[1:],
                     "loss_scale": opts.scaler.state_dict() if opts.scaler is not None else None},
                    extra_files=files, write_small=work.write_model_config,
                    keep=cfg.keep_checkpoints, protect=state.best_checkpoint, writer=writer, rank_shards=shards)
    return out_dir / "checkpoints" / checkpoint_name(state)


def saved_world(saved: dict) -> int:
    """How many processes wrote a checkpoint's state (older checkpoints: one)."""
    return int(saved.get("world", 1))


def check_resume_world(saved: dict, path: Path, world: int) -> None:
    """A checkpoint resumes at the number of processes that wrote it: each rank's data cursor,
    environments and RNG streams are its own."""
    if saved_world(saved) != world:
        raise checkpoint.CheckpointError(
            f"checkpoint '{path}' was written by {saved_world(saved)} process(es) and this run has {world}: "
            f"resume it with --nproc {saved_world(saved)} (or that many torchrun processes)")


def rank_part(saved: dict, rank: int) -> dict:
    """One rank's RNG and data state in a checkpoint's state.json."""
    return saved if rank == 0 else saved["other_ranks"][rank - 1]


def restore(path: Path, cfg: Config, work, opts: Optimizers, generators: dict[str, torch.Generator]) -> RunState:
    """Load checkpoint `path` into a freshly built workload and optimisers; the run's counters."""
    tensors, opt_tensors, saved = checkpoint.load(path)
    check_resume_world(saved, path, dist.world())
    part = "weights"
    try:
        work.load_tensors(tensors)
        part = "optimizer state"
        for key, opt in opts.named().items():
            checkpoint.optimizer_from_flat(opt, checkpoint.split_optimizer_tensors(opt_tensors, key, dist.rank()),
                                           saved["optimizers"][key])
        if opts.scaler is not None and saved.get("loss_scale"):
            opts.scaler.load_state_dict(saved["loss_scale"])
        part = "run state"
        state = RunState(**saved["run"])
        mine = rank_part(saved, dist.rank())
        work.load_state(mine["workload"], state.update)
        checkpoint.set_rng_state(mine["rng"], generators)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        raise checkpoint.CheckpointError(
            f"checkpoint '{path}' cannot be resumed: its {part} does not fit this run "
            f"({e.__class__.__name__}); resume from an earlier checkpoint or start over with --overwrite") from None
    return state


def run_update(cfg: Config, work, algo, opts: Optimizers, state: RunState, generators: dict,
               logger, writer: checkpoint.CheckpointWriter, out_dir: Path, start: float) -> dict:
    """One iteration of the loop, its phases numbered; every rank runs it on its part of the batch.
    Its metrics (the global batch's, the same on every rank)."""
    step_start = time.perf_counter()
    dist.take_collective_s()
    # 1. collect experience with the current policy (while the last checkpoint is still being written)
    batch, collect_metrics = work.collect()
    remaining = 1.0 - state.update / cfg.total_updates
    state.update += 1
    state.env_steps += cfg.rollout_size
    if batch.shape[0] == 0:
        # nothing to learn from (dynamic sampling kept no prompt group; every rank alike): no
        # update, counted with the skipped ones (not as a bad update: the data, not the weights)
        state.skipped_updates += 1
        metrics = {"update/empty": 1.0}
    else:
        # 2. advantages and value targets
        batch = advantages.compute(batch, cfg, reduce=dist.total)
        # 3. update the policy (and critic), with the data loss if there is one; a non-finite step is
        #    skipped, not taken. A checkpoint still being written reads the weights and optimiser
        #    state: the first step waits for it.
        progress = Progress(remaining, generators["shuffle"], before_step=writer.wait, data=work.data_term())
        metrics = algo.update(work.policy, opts, batch, cfg, progress)
        metrics.update(work.after_update(batch, metrics))
        note_bad_update(state, metrics, cfg, out_dir)
    step_s = time.perf_counter() - step_start
    # 4. evaluate on held-out data or environments (every rank gets the same numbers)
    eval_metrics = work.evaluate("validation", out_dir) if evaluation_due(cfg, state, work.per_update) else {}
    # 5. log (rank 0); the metrics are the global batch's
    row = {"update": state.update, "step": state.update, "env_steps": state.env_steps,
           "time/elapsed_s": time.perf_counter() - start, "time/step_s": step_s,
           "time/checkpoint_wait_s": writer.take_waited_s(),
           **({"time/collective_s": dist.take_collective_s()} if dist.world() > 1 else {}),
           "update/skipped_total": state.skipped_updates, **collect_metrics, **metrics, **eval_metrics}
    logger.log(state.env_steps, row, work.per_update, headline=work.headline)
    for message in work.take_warnings():
        logger.warn(message)
    # 6. checkpoint: periodically, and whenever validation reaches a new best (all ranks agree:
    #    they share the evaluation's numbers)
    new_best = note_best(state, eval_metrics, work.eval_headline)
    if new_best or checkpoint_due(cfg, state):
        save_run(out_dir, cfg, work, opts, state, generators, writer)
    return row


Callback = Callable[[dict], Optional[bool]]
"""Called with each update's metrics (every rank alike); returning True stops the run after that
update, with its final evaluation and checkpoint."""


@dataclass
class Run:
    summary: dict
    """The closing numbers the CLI prints."""
    work: Any
    """The trained workload: its policy, task or environment."""
    final: dict
    """The closing evaluation's numbers (the test split, or control's evaluation episodes)."""


def train(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False) -> dict:
    """Train cfg.algo on cfg.env or cfg.task; write metrics and checkpoints into out_dir; the
    closing numbers (see run)."""
    return run(cfg, out_dir, progress, resume).summary


def run(cfg: Config, out_dir: Path, progress: bool = True, resume: bool = False,
        callbacks: Sequence[Callback] = ()) -> Run:
    """Train cfg.algo on cfg.env or cfg.task; write metrics and checkpoints into out_dir.

    resume: continue from out_dir's newest checkpoint (metrics.jsonl is cut back to it).
    callbacks: see Callback.
    Under torchrun (or --nproc) every rank calls this; out_dir must be a folder they all see."""
    ranks = dist.init(placement.resolve(cfg).device.type)
    config_mod.check_world(cfg, ranks.world)
    torch.set_num_threads(dist.threads_per_rank(cfg.torch_threads, one_thread=workload_class(cfg).one_thread))
    path = checkpoint.latest(out_dir) if resume else None
    if ranks.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if path is not None:  # a corrupt or misfit checkpoint fails here, before minutes of model loading
        check_resume_world(checkpoint.load(path)[2], path, ranks.world)
    work = build_workload(cfg, path)
    algo = ALGOS[cfg.algo]
    opts = algo.make_optimizers(work.policy, cfg)
    # the same on every rank: minibatches and TRPO's sub-sample are drawn over the global batch
    generators = {"shuffle": torch.Generator().manual_seed(cfg.seed + 1)}
    state = restore(path, cfg, work, opts, generators) if path is not None else RunState()
    if ranks.rank == 0:
        checkpoint.cut_metrics(out_dir / "metrics.jsonl", state.update)
    # the bar counts training steps for language models, environment steps for control
    per_update = work.per_update
    logger = RunLogger(out_dir, cfg.total_updates * per_update, "step", enabled=ranks.rank == 0, progress=progress,
                       done=state.update * per_update, purge_step=state.env_steps + 1 if path else None,
                       wandb_config=to_dict(cfg) if cfg.wandb else None)
    writer = checkpoint.CheckpointWriter()
    start = time.perf_counter()
    try:
        while not state.finished and state.update < cfg.total_updates:
            row = run_update(cfg, work, algo, opts, state, generators, logger, writer, out_dir, start)
            asked = [bool(callback(dict(row))) for callback in callbacks]  # each sees every update
            if dist.agree(work.stop_early() or any(asked)):  # one rank stopping alone would hang the others
                break
        # 7. final evaluation and checkpoint
        state.finished = True
        final = work.evaluate("test", out_dir)
        save_run(out_dir, cfg, work, opts, state, generators, writer)
        writer.wait()
        logger.log_final(state.env_steps, final)
        flat = logger.run_mean("train/flat_group_share")  # batches that gave nothing to learn from
    finally:
        writer.wait()  # a checkpoint being written is finished, whatever stopped the run
        logger.close()
    return Run(summary(cfg, work, state, logger, final, flat, start), work, final)


def summary(cfg: Config, work, state: RunState, logger, final: dict, flat: Optional[float], start: float) -> dict:
    return {"algo": cfg.algo, **work.trained_on,
            "updates": state.update, "env_steps": state.env_steps, "skipped_updates": state.skipped_updates,
            "train_" + work.headline.split("/")[-1]: logger.last.get(work.headline, float("nan")),
            **({"best_" + work.eval_headline.replace("/", "_"): state.best_metric}
               if state.best_metric is not None else {}),
            **{f"final_{k.replace('/', '_')}": v for k, v in final.items() if isinstance(v, (int, float))},
            **({"flat_group_share": flat} if flat is not None else {}),
            "wall_s": time.perf_counter() - start}


def is_complete(out_dir: Path) -> bool:
    """The run in out_dir finished: its final checkpoint and final evaluation are both written."""
    path = checkpoint.latest(out_dir)
    if path is None or not (out_dir / "final_eval.json").is_file():
        return False
    return bool(checkpoint.load(path)[2].get("run", {}).get("finished"))


def load_config(state: dict, path: Path) -> Config:
    try:
        return config_mod.validate(config_mod.apply(Config(), state["config"]))
    except config_mod.ConfigError as e:
        raise checkpoint.CheckpointError(f"checkpoint '{path}' has an invalid config: {e}") from None


def load_workload(path: Path, device: Optional[str] = None):
    """The workload (policy, normalisers, task) saved in checkpoint folder `path`, and its config;
    device: where to load it, instead of the run's own device key."""
    tensors, _, state = checkpoint.load(path)
    cfg = load_config(state, path)
    if device is not None:
        cfg = dataclasses.replace(cfg, device=device)
        placement.resolve(cfg)  # one line if this machine lacks it
    work = build_workload(cfg, path)
    try:
        work.load_tensors(tensors)
    except RuntimeError:
        raise checkpoint.CheckpointError(
            f"checkpoint '{path}' does not fit the policy its config describes (tensors differ)") from None
    return work, cfg
