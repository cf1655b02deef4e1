"""Multi-turn episodes on the default model (CPU), three benchmarks; each prints one JSON line.

- `dialogue`: REINFORCE with the defaults on the dialogue task (a scripted user, three turns, VADER
  on every reply); the mean per-turn test reward must rise by 0.3 or more within 40 steps, with KL
  below 5 nats per episode. Over several --seeds: the worst seed's rise 0.25 or more, the mean's
  0.3 or more, every seed's KL below 5.
- `guess-number`: one run per turn_advantage (outcome, discounted, gae) and seed, same algorithm and
  steps; the test success rate must at least double and rise by 15 points or more for at least one
  choice, on every seed.

The untrained model's evaluation is made once per --out and kept there, so that seeds can train
side by side as separate invocations (--set torch_threads=1 each) into one --out.
- `speed`: a multi-turn training step (dialogue) against the sum of its generation passes plus one
  forward/backward over its conversations; the ratio must stay at or below 1.3.

Usage: .venv/bin/python benchmarks/multi_turn.py dialogue [--steps 40] [--seeds 2 3] [--set kl_coef=0.15]
       .venv/bin/python benchmarks/multi_turn.py guess-number [--steps 80] [--algo reinforce]
                                                 [--turn-advantage outcome discounted gae] [--seeds 1 2 3]
                                                 [--set lr=5e-5]
                                                 [--env-kwargs invalid_cost=0.1]
       .venv/bin/python benchmarks/multi_turn.py speed [--steps 3]
"""
import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from common import cpu_name, run_cli  # benchmarks/common.py

GAIN, WORST_GAIN, KL_LIMIT = 0.3, 0.25, 5.0
SUCCESS_RISE, SPEED_LIMIT = 0.15, 1.3


def base_eval(task: str, model: str, out: Path) -> dict:
    """The untrained model's test evaluation, kept in `out` (it depends on no seed or training
    setting, so invocations that train other seeds into the same --out reuse it)."""
    name = Path(task).stem
    if Path(task).is_file():  # a task file (--env-kwargs): its contents name it
        name += "-" + hashlib.sha256(Path(task).read_bytes()).hexdigest()[:8]
    cached = out / f"base-{name}-{Path(model).name}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    result = run_cli("eval", "--task", task, "--model", model, "--split", "test")
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def train_and_eval(task: str, model: str, out: Path, algo: str, steps: int, *keys: str,
                   resume: bool = False, seed: int = 1) -> tuple[dict, float]:
    """resume: continue a run of the same settings already in `out` (one stopped midway: its
    resumed end is bit-identical to an uninterrupted run's), else start it afresh."""
    start = time.perf_counter()
    run_cli("train", "--algo", algo, "--task", task, "--model", model, "--out", str(out), "--steps", str(steps),
            "--seed", str(seed), "--no-progress", *keys, *([] if resume else ["--overwrite"]))
    wall = time.perf_counter() - start
    return final_eval(out), wall


def final_eval(out: Path) -> dict:
    """The test evaluation a training run ends with (final_eval.json: what `policygrad eval RUN
    --split test` prints, which would sample the same 100 episodes a second time), in eval's keys."""
    d = json.loads((out / "final_eval.json").read_text())
    episode = {k: d[f"test/episode/{k}"] for k in ("return_mean", "turns_mean", "success_rate")
               if f"test/episode/{k}" in d}
    return {"mean_reward": d["test/reward_mean"], "kl_to_reference": d["test/kl_to_reference"],
            **({"episode": episode} if episode else {})}


def seeded(out: Path, seed: int) -> Path:
    """A run's folder: seed 1's is the plain name (the runs of earlier results), others add the seed."""
    return out if seed == 1 else out.with_name(f"{out.name}-seed{seed}")


def dialogue(args) -> dict:
    runs = {}
    for seed in args.seeds:
        trained, wall = train_and_eval("dialogue", args.model, seeded(Path(args.out) / "dialogue", seed), "reinforce",
                                       args.steps, *args.set, resume=args.resume, seed=seed)
        runs[str(seed)] = {"trained_per_turn_reward": trained["mean_reward"], "kl": trained["kl_to_reference"],
                           "trained_episode": trained.get("episode"), "train_wall_s": wall}
    base = base_eval("dialogue", args.model, Path(args.out))
    for run in runs.values():
        run["gain"] = run["trained_per_turn_reward"] - base["mean_reward"]
    gains = [r["gain"] for r in runs.values()]
    worst, mean = min(gains), sum(gains) / len(gains)
    kl_ok = all(r["kl"] < KL_LIMIT for r in runs.values())
    passed = (worst >= WORST_GAIN and mean >= GAIN) if len(gains) > 1 else mean >= GAIN
    return {"benchmark": "multi_turn_dialogue", "steps": args.steps, "algo": "reinforce", "set": args.set,
            "base_per_turn_reward": base["mean_reward"], "base_episode": base.get("episode"), "runs": runs,
            "worst_gain": worst, "mean_gain": mean, "threshold_gain": GAIN, "threshold_worst_gain": WORST_GAIN,
            "kl_limit": KL_LIMIT, "passed": passed and kl_ok}


def guess_task(args) -> str:
    """guess-number, or a task file of it with --env-kwargs (the env's own arguments)."""
    if not args.env_kwargs:
        return "guess-number"
    import yaml
    kwargs = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.env_kwargs)}
    path = Path(args.out) / "guess-number.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"env": "guess-number", "env_kwargs": kwargs}))
    return str(path)


def guess_number(args) -> dict:
    task = guess_task(args)
    runs, passed = {}, {seed: [] for seed in args.seeds}
    for choice in args.turn_advantage:
        critic = ["use_value_head=true", "advantage=gae"] if choice == "gae" else []
        for seed in args.seeds:
            # validation every 20 steps on 16 seeds: six turns an episode make evaluation dear
            out = seeded(Path(args.out) / f"guess-{args.algo}-{choice}", seed)
            trained, wall = train_and_eval(task, args.model, out, args.algo, args.steps, f"turn_advantage={choice}",
                                           "eval_every=20", "eval_prompts=16", *critic, *args.set,
                                           resume=args.resume, seed=seed)
            runs[choice if seed == 1 and len(args.seeds) == 1 else f"{choice}-seed{seed}"] = {
                "seed": seed, "success_rate": trained["episode"]["success_rate"],
                "return_mean": trained["episode"]["return_mean"], "turns_mean": trained["episode"]["turns_mean"],
                "kl": trained["kl_to_reference"], "train_wall_s": wall}
    base = base_eval(task, args.model, Path(args.out))["episode"]
    for run in runs.values():
        rate = run["success_rate"]
        run["passed"] = rate >= 2 * base["success_rate"] and rate - base["success_rate"] >= SUCCESS_RISE
        passed[run.pop("seed")].append(run["passed"])
    return {"benchmark": "multi_turn_guess_number", "steps": args.steps, "algo": args.algo, "set": args.set,
            "env_kwargs": args.env_kwargs,
            "base_success_rate": base["success_rate"], "base_return_mean": base["return_mean"],
            "base_turns_mean": base["turns_mean"], "runs": runs, "threshold": "x2 and +0.15",
            "seeds": args.seeds, "passed": all(any(ok) for ok in passed.values())}


def speed(args) -> dict:
    """Steps of dialogue timed whole (collect, advantages, update) and in parts: the generation
    passes (policy.generate_ids) and one forward/backward over the step's conversations."""
    import torch
    from policygrad.algos import ALGOS, Progress
    from policygrad.resolve import resolve
    from policygrad.core import advantages
    from policygrad.lm.rollout import LMWorkload
    cfg = resolve({}, {}, {"algo": "reinforce", "task": "dialogue", "model": args.model})
    work = LMWorkload(cfg, cfg.seed)
    opts = ALGOS[cfg.algo].make_optimizers(work.policy, cfg)
    generating = work.policy.generate_ids
    spent = {"generate": 0.0}

    def timed_generate(*a, **k):
        start = time.perf_counter()
        try:
            return generating(*a, **k)
        finally:
            spent["generate"] += time.perf_counter() - start
    work.policy.generate_ids = timed_generate
    rows = []
    for step in range(args.steps + 1):  # the first step warms up (allocator, kernels), not counted
        spent["generate"] = 0.0
        start = time.perf_counter()
        batch, _ = work.collect()
        batch = advantages.compute(batch, cfg)
        ALGOS[cfg.algo].update(work.policy, opts, batch, cfg, Progress(step / args.steps, torch.Generator()))
        step_s = time.perf_counter() - start
        start = time.perf_counter()
        log_prob, _, _ = work.policy.evaluate(batch, entropy_grad=False)
        (log_prob * batch.advantages).sum().backward()
        fwd_bwd_s = time.perf_counter() - start
        work.policy.zero_grad(set_to_none=True)
        if step:
            rows.append({"step_s": step_s, "generate_s": spent["generate"], "forward_backward_s": fwd_bwd_s,
                         "tokens": int(batch.obs_mask.sum()), "model_tokens": int(batch.mask.sum())})
    step_s = sum(r["step_s"] for r in rows)
    parts = sum(r["generate_s"] + r["forward_backward_s"] for r in rows)
    return {"benchmark": "multi_turn_speed", "task": "dialogue", "steps": args.steps, "per_step": rows,
            "ratio": step_s / parts, "limit": SPEED_LIMIT, "passed": step_s / parts <= SPEED_LIMIT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["dialogue", "guess-number", "speed"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--algo", default="reinforce")
    parser.add_argument("--turn-advantage", nargs="+", default=["outcome", "discounted", "gae"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1], help="a training run per seed")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys for every training run")
    parser.add_argument("--env-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                        help="guess-number: the env's arguments (n, turn_cost, invalid_cost)")
    parser.add_argument("--out", default="runs/bench-multi-turn")
    parser.add_argument("--resume", action="store_true", help="continue the runs already in --out")
    args = parser.parse_args()
    args.steps = args.steps or {"dialogue": 40, "guess-number": 80, "speed": 3}[args.which]
    start = time.perf_counter()
    result = {"dialogue": dialogue, "guess-number": guess_number, "speed": speed}[args.which](args)
    print(json.dumps({**result, "cpu": cpu_name(), "model": args.model, "wall_s": time.perf_counter() - start}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
