"""What tests/test_dist.py runs in spawned ranks (gloo, CPU), and the single-process twins it
compares them with: one update of every algorithm on a fixed global batch."""
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from policygrad import config as config_mod
from policygrad import dist
from policygrad import resolve as resolve_mod
from policygrad.algos import ALGOS, Progress
from policygrad.batch import Batch
from policygrad.core import advantages

LM_OVERRIDES = {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 6, "eval_every": 0, "lr": 1e-3}
CASES = {
    # language models: rows are completions; each rank holds whole prompt groups
    "lm-reinforce": ("reinforce", {"micro_batch_size": 2}),
    "lm-ppo": ("ppo", {"use_value_head": True, "batch_size": 4, "n_epochs": 2, "kl_in": "loss",
                       "kl_estimator": "k3"}),
    "lm-trpo": ("trpo", {"fvp_fraction": 0.5, "micro_batch_size": 2}),
    # FSDP2: each rank holds half of every weight, gradient and Adam moment (its training passes run
    # every row in full: share_prompts=false makes the single-process twin do the same sums)
    "lm-fsdp-reinforce": ("reinforce", {"shard": "fsdp", "micro_batch_size": 1, "share_prompts": False}),
    "lm-fsdp-ppo": ("ppo", {"shard": "fsdp", "use_value_head": True, "batch_size": 4, "n_epochs": 2,
                            "share_prompts": False}),
    # TRPO's Gauss-Newton products (issue #25): replicated, and sharded (J v on gathered weights,
    # J^T through fully_shard's reduce-scatter; each rank's products see 1 to 3 rows, so a short
    # rank adds passes that weigh nothing)
    "lm-trpo-gn": ("trpo", {"fvp": "gauss_newton", "fvp_fraction": 0.5, "micro_batch_size": 2}),
    "lm-fsdp-trpo": ("trpo", {"shard": "fsdp", "fvp": "gauss_newton", "fvp_fraction": 0.5, "micro_batch_size": 2,
                              "share_prompts": False}),
    # the data loss (J_data): 5 rows of text per update, 3 on rank 0 and 2 on rank 1 (in micro-batches
    # of 2: two passes against one; with FSDP the short rank adds a pass that weighs nothing)
    "lm-reinforce-ptx": ("reinforce", {"micro_batch_size": 2, "ptx_coef": 0.5, "ptx_batch_size": 5}),
    "lm-trpo-ptx": ("trpo", {"fvp_fraction": 0.5, "micro_batch_size": 2, "ptx_coef": 0.5, "ptx_batch_size": 5}),
    "lm-fsdp-ppo-ptx": ("ppo", {"shard": "fsdp", "batch_size": 4, "n_epochs": 1, "share_prompts": False,
                                "micro_batch_size": 2, "ptx_coef": 0.5, "ptx_batch_size": 5}),
    # every recipe (issue #25) with its own keys: each micro-batch and rank weighed by its sequences
    # (grpo, gspo: seq-mean-token-mean, dr_grpo: seq-mean-token-sum-norm, rloo: seq-mean-token-sum)
    # or by its tokens over the global batch (dapo, cispo, reinforce_pp: token-mean); GSPO's one
    # ratio per completion; REINFORCE++'s returns to go whitened over both ranks. No micro-batches in
    # the PPO cases: the single-process twin is one pass over each minibatch, the definition itself
    # (tests/test_lm.py splits micro-batches)
    "lm-grpo": ("ppo", {"recipe": "grpo", "batch_size": 4, "n_epochs": 2}),
    "lm-dapo": ("ppo", {"recipe": "dapo", "batch_size": 4, "n_epochs": 2}),
    "lm-dr-grpo": ("ppo", {"recipe": "dr_grpo", "batch_size": 4, "n_epochs": 2}),
    "lm-gspo": ("ppo", {"recipe": "gspo", "batch_size": 4, "n_epochs": 2}),
    "lm-cispo": ("ppo", {"recipe": "cispo", "batch_size": 4, "n_epochs": 2}),
    "lm-rloo": ("reinforce", {"recipe": "rloo", "micro_batch_size": 2}),
    "lm-reinforce-pp": ("ppo", {"recipe": "reinforce_pp", "batch_size": 4, "n_epochs": 2}),
    # DAPO's overlong filter (vary_lengths marks every third completion cut): each rank and
    # micro-batch counts its kept completions (a sequence mean over micro-batches of 2), and PPO's
    # minibatches hold parts of cut rows on either rank (dapo: its token mean, and its punishment)
    "lm-reinforce-overlong": ("reinforce", {"overlong_filter": True, "loss_agg": "seq-mean-token-mean",
                                            "micro_batch_size": 2}),
    "lm-dapo-overlong": ("ppo", {"recipe": "dapo", "overlong_filter": True, "batch_size": 4, "n_epochs": 2}),
    # multi-turn episodes (guess-number): GAE over turns from the value head
    "lm-ppo-turns": ("ppo", {"task": "guess-number", "use_value_head": True, "batch_size": 4, "n_epochs": 2,
                             "max_turns": 3, "max_new_tokens": 4}),
    # control: rows are environments, minibatches are drawn from transitions
    "ctl-reinforce": ("reinforce", {}),
    "ctl-ppo": ("ppo", {"batch_size": 16, "n_epochs": 2}),
    # 5 conjugate-gradient steps: by 15 the residual reaches CG's stopping tolerance, and whether it
    # stops one step earlier or later then hangs on rounding (a 1e-3 change of the step)
    "ctl-trpo": ("trpo", {"fvp_fraction": 0.5, "batch_size": 16, "value_epochs": 2, "cg_iters": 5}),
}


def case_config(name: str, lm_paths: tuple[str, str]):
    algo, extra = CASES[name]
    if name.startswith("lm-"):
        model, task = lm_paths
        ptx = {"ptx_data": str(write_ptx_data(Path(task).parent))} if "ptx_coef" in extra else {}
        extra = dict(extra)
        task = extra.pop("task", task)
        return resolve_mod.resolve({}, {**LM_OVERRIDES, **extra, **ptx}, {"algo": algo, "task": task, "model": model})
    return resolve_mod.resolve({}, {"num_envs": 4, "n_steps": 16, "normalize_obs": True, **extra},
                              {"algo": algo, "env": "CartPole-v1"})


def write_ptx_data(folder: Path) -> Path:
    """Text rows of different lengths for the data loss, beside the task."""
    path = folder / "ptx.jsonl"
    if not path.is_file():
        path.write_text("".join(json.dumps({"text": "Once upon a time " * (1 + i % 4) + f"number {i}."}) + "\n"
                                for i in range(12)))
    return path


def workload(cfg):
    """The run's workload; a control policy in float64, so that its comparisons are exact to
    rounding (a language model's float32 head keeps it in float32)."""
    from policygrad.trainer import build_workload
    work = build_workload(cfg)
    if not cfg.is_lm:
        work.policy.double()
    return work


def in_float64(batch: Batch) -> Batch:
    return batch._map(lambda x: x.double() if x.is_floating_point() else x)


def save_batch(batch: Batch, path: Path) -> None:
    fields = {k: v for k, v in batch.__dict__.items() if torch.is_tensor(v) and k != "n_valid"}
    # copies: a freshly sampled batch's fields share memory (log_prob is behaviour_log_prob), which
    # safetensors refuses
    save_file({k: v.clone().contiguous() for k, v in fields.items()}, str(path),
              metadata={"kl_coef": str(batch.kl_coef)})


def load_batch(path: Path) -> Batch:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        kl_coef = float(f.metadata()["kl_coef"])
    return Batch(**load_file(str(path)), kl_coef=kl_coef)


def vary_lengths(batch: Batch) -> Batch:
    """The batch with completions cut to different lengths (a tiny random model seldom samples
    EOS): the ranks then hold different numbers of valid tokens, which is what per-token weighting
    across ranks must get right (a mean of the ranks' means would not). Every third completion,
    from the second, is marked cut by the length limit (the tiny model's would nearly all be): the
    overlong filter's cases then keep some and drop some on each rank."""
    B, T = batch.shape
    keep = torch.tensor([1 + i * (T - 1) // (B - 1) for i in range(B)])      # (B,) short to long
    mask = (torch.arange(T)[None, :] < keep[:, None]).float() * batch.mask    # (B, T)
    cut = {} if batch.length_truncated is None else {"length_truncated": (torch.arange(B) % 3 == 1).float()}
    return batch.replace(mask=mask, log_prob=batch.log_prob * mask, ref_log_prob=batch.ref_log_prob * mask, **cut)


def block(batch: Batch, rank: int, world: int) -> Batch:
    """Rank `rank`'s block of a global batch, as the rank would have collected it."""
    n = batch.shape[0] // world
    part = batch.select_rows(torch.arange(rank * n, (rank + 1) * n))
    return part if part.group is None else part.replace(group=part.group - part.group.min())


def one_update(cfg, work, batch: Batch) -> dict:
    """Advantages (whitened with global moments), then one update of cfg.algo (with the workload's
    data loss, if it has one)."""
    algo = ALGOS[cfg.algo]
    opts = algo.make_optimizers(work.policy, cfg)
    batch = advantages.compute(batch, cfg, reduce=dist.total)
    return algo.update(work.policy, opts, batch, cfg,
                       Progress(1.0, torch.Generator().manual_seed(cfg.seed + 1), data=work.data_term()))


def weights(policy) -> dict[str, torch.Tensor]:
    """The trainable parameters (normalisers and a frozen reference do not take updates); of a
    sharded model, gathered whole (on rank 0; a collective)."""
    if getattr(policy, "sharded", False):
        whole = {f"model.{k}": v for k, v in dist.full_state_dict(policy.model).items()}
        head = {} if policy.value_head is None else {f"value_head.{k}": v.detach().clone()
                                                     for k, v in policy.value_head.state_dict().items()}
        return {**whole, **head} if dist.is_main() else {}
    return {k: v.detach().clone().contiguous() for k, v in policy.named_parameters() if v.requires_grad}


def join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init("cpu", timeout_s=120)


def equivalence_worker(rank: int, world: int, port: int, folder: str, lm_paths: tuple[str, str],
                       names: list[str]) -> None:
    """Each case named: this rank's block of the saved global batch, one update; weights and metrics out."""
    join(rank, world, port)
    folder = Path(folder)
    for name in names:
        cfg = case_config(name, lm_paths)
        work = workload(cfg)
        batch = block(load_batch(folder / f"{name}.batch"), rank, world)
        metrics = one_update(cfg, work, batch if cfg.is_lm else in_float64(batch))
        save_file(weights(work.policy), str(folder / f"{name}.rank{rank}.safetensors"))
        (folder / f"{name}.rank{rank}.json").write_text(json.dumps(metrics))
    dist.shutdown()


def early_stop_worker(rank: int, world: int, port: int, folder: str) -> None:
    """Ranks whose own data would decide differently: rank 1's half of every rollout is scaled to
    push its approximate KL far past target_kl while rank 0's stays small. A rank deciding alone
    would leave the other in the next minibatch's all-reduce for ever."""
    join(rank, world, port)
    cfg = resolve_mod.resolve({}, {"num_envs": 4, "n_steps": 32, "batch_size": 32, "n_epochs": 8,
                                  "target_kl": 0.001, "lr": 0.05}, {"algo": "ppo", "env": "CartPole-v1"})
    from policygrad.trainer import build_workload
    work = build_workload(cfg)
    algo = ALGOS[cfg.algo]
    opts = algo.make_optimizers(work.policy, cfg)
    stops = []
    for step in range(3):
        batch, _ = work.collect()
        if rank == 1:  # a wildly off-policy block: its ratios move fast
            batch = batch.replace(log_prob=batch.log_prob - 3.0)
        batch = advantages.compute(batch, cfg, reduce=dist.total)
        metrics = algo.update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(step)))
        stops.append(metrics["policy/early_stop"])
    # a loss that is not finite on rank 1 only: both ranks skip the step, weights untouched
    batch, _ = work.collect()
    batch = advantages.compute(batch, cfg, reduce=dist.total)
    if rank == 1:
        batch = batch.replace(advantages=batch.advantages * float("nan"))
    before = weights(work.policy)
    metrics = algo.update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(9)))
    unchanged = all(torch.equal(before[k], v) for k, v in weights(work.policy).items())
    stops += [metrics["update/nonfinite"], float(unchanged)]
    # agree: one rank's flag becomes every rank's decision
    stops += [float(dist.agree(rank == 1)), float(dist.agree(False))]
    (Path(folder) / f"stops.rank{rank}.json").write_text(json.dumps(stops))
    save_file(weights(work.policy), str(Path(folder) / f"early.rank{rank}.safetensors"))
    dist.shutdown()


def run_ranks(fn, args: tuple, world: int = 2, timeout_s: float = 180.0) -> None:
    """Start `world` spawned ranks of fn(rank, world, port, *args); fail (not hang) past timeout_s."""
    import torch.multiprocessing as mp

    from policygrad.launch import free_port
    port = free_port()
    context = mp.start_processes(fn, args=(world, port, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.time() + timeout_s
    while not context.join(timeout=1.0):
        if time.time() > deadline:
            for p in context.processes:
                p.kill()
            raise AssertionError(f"{fn.__name__} did not finish within {timeout_s} s: the ranks hang")


def evaluation_worker(rank: int, world: int, port: int, folder: str, lm_paths: tuple[str, str]) -> None:
    """The validation evaluation of an untrained model, replicated (ddp) and sharded (fsdp), on the
    prompts task and on a text env's episodes."""
    join(rank, world, port)
    for kind in ("prompts", "episodes"):
        for shard in ("ddp", "fsdp"):
            cfg = eval_config(lm_paths, shard, episodes=kind == "episodes")
            result = workload(cfg).evaluate("validation")
            if rank == 0:
                (Path(folder) / f"eval-{kind}-{shard}.json").write_text(json.dumps(result))
    dist.shutdown()


def eval_config(lm_paths: tuple[str, str], shard: str = "ddp", episodes: bool = False):
    model, task = lm_paths
    turns = {"max_turns": 3, "max_new_tokens": 4} if episodes else {}
    return resolve_mod.resolve({}, {**LM_OVERRIDES, "eval_prompts": 20, "shard": shard, **turns},
                              {"algo": "reinforce", "task": "guess-number" if episodes else task, "model": model})


def api_worker(rank: int, world: int, port: int, folder: str, lm_paths: tuple[str, str], keys: dict) -> None:
    """policygrad.train in each rank, as a user's script under torchrun: in-memory rows and a reward
    function (conftest's task_file as Python objects)."""
    import policygrad
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))  # as torchrun sets them
    rows = [{"prompt": f"Say something nice about item {i}.", "answer": str(i)} for i in range(30)]

    def brevity(prompts, completions, answer):
        return [1.0 / (1 + len(c)) for c in completions]
    policygrad.train(algo="reinforce", model=lm_paths[0], data=rows, rewards=["vader", (brevity, 0.5)],
                     max_new_tokens=6, out=Path(folder) / "api", progress=False, **keys)
    assert not torch.distributed.is_initialized()  # train() leaves no process group behind


# --- dynamic sampling (issue #25): the rounds' groups flat (F: both rewards 1) or spread (S), by hand,
# on sampled completions: one process's rounds, each rank given its block of every round -------------
F, S = [1.0, 1.0], [0.0, 1.0]
DYNAMIC_CASES = {
    # round 0 keeps its group 1, round 1 its groups 0-2 (its group 3 is cut): rank 1's block holds
    # round 1's group 1, which rank 0 sampled
    "lm-dynamic-ppo": ("ppo", {"batch_size": 2, "n_epochs": 2, "max_draws": 3}, [[F, S, F, F], [S, S, S, S]]),
    # max_draws=2 rounds keep one group each, one per rank: rank 0 holds both, rank 1 padding alone
    # (copies of rank 0's group). TRPO's Fisher sub-sample may draw padding rows; with sharded
    # weights the rank holding padding alone still makes every pass the other makes, and PPO's
    # minibatches of one group include padding-only ones, whose step both ranks skip together
    "lm-dynamic-trpo-short": ("trpo", {"fvp_fraction": 0.5, "micro_batch_size": 2, "max_draws": 2},
                              [[F, S, F, F], [F, F, F, S]]),
    "lm-dynamic-fsdp-ppo-short": ("ppo", {"shard": "fsdp", "batch_size": 2, "n_epochs": 2, "share_prompts": False,
                                          "max_draws": 2}, [[F, S, F, F], [F, F, F, S]]),
}


def dynamic_config(name: str, lm_paths: tuple[str, str]):
    model, task = lm_paths
    algo, extra, _ = DYNAMIC_CASES[name]
    return resolve_mod.resolve({}, {**LM_OVERRIDES, "dynamic_sampling": True, **extra},
                               {"algo": algo, "task": task, "model": model})


def record_rounds(work, script: list[list[list[float]]]) -> tuple[list[Batch], list[list[float]]]:
    """work.sample made to return its own samples with the script's task rewards; the rounds it
    samples (every prompt of each: one process) and their rewards, filled in as it runs."""
    rounds, rewards = [], []
    sample = work.sample

    def scripted(rows, n, seed, reference=True):
        batch, completions, _ = sample(rows, n, seed, reference)
        rounds.append(batch)
        rewards.append([x for group in script[len(rewards)] for x in group])
        work.reward_parts = {}
        return batch, completions, np.array(rewards[-1])
    work.sample = scripted
    return rounds, rewards


def replay_rounds(work, rounds: list[Batch], rewards: list[list[float]], rank: int, world: int) -> None:
    """work.sample made to hand this rank its block of each recorded round, as it would have sampled it."""
    def replayed(rows, n, seed, reference=True):
        i = replayed.calls
        replayed.calls += 1
        per_rank = len(rewards[i]) // world
        work.reward_parts = {}
        work.sample_times = {"time/generate_s": 0.0, "time/reward_s": 0.0, "time/reference_s": 0.0}
        return block(rounds[i], rank, world), [], np.array(rewards[i][rank * per_rank:(rank + 1) * per_rank])
    replayed.calls = 0
    work.sample = replayed


def dynamic_worker(rank: int, world: int, port: int, folder: str, lm_paths: tuple[str, str],
                   names: list[str]) -> None:
    """Each case: this rank's blocks of the recorded rounds through dynamic sampling's collect, one
    update; the rank's batch, weights and metrics out."""
    join(rank, world, port)
    folder = Path(folder)
    for name in names:
        cfg = dynamic_config(name, lm_paths)
        work = workload(cfg)
        rewards = json.loads((folder / f"{name}.rewards.json").read_text())
        replay_rounds(work, [load_batch(folder / f"{name}.round{i}.batch") for i in range(len(rewards))],
                      rewards, rank, world)
        batch, collected = work.collect()
        save_file({k: getattr(batch, k).contiguous() for k in ("obs", "mask", "log_prob", "ref_log_prob")},
                  str(folder / f"{name}.rank{rank}.batch"))
        metrics = one_update(cfg, work, batch)
        save_file(weights(work.policy), str(folder / f"{name}.rank{rank}.safetensors"))
        (folder / f"{name}.rank{rank}.json").write_text(json.dumps({**collected, **metrics}))
    dist.shutdown()
