"""Control benchmark: learning thresholds and speed against Stable-Baselines3, in one run.

    python benchmarks/control.py                 # everything (about 6 minutes on 2 cores)
    python benchmarks/control.py --only speed    # or: learning

Learning: the thresholds of issue #2 (deterministic evaluation, 20 episodes, after training).
Speed: PPO with the RL Zoo's CartPole-v1 settings in policygrad and in SB3, same machine, same
seeds, one torch thread each; wall time from the start of training until the mean of the last 20
training episodes first reaches 475, and environment steps per CPU-second over a fixed budget.
TRPO likewise against sb3-contrib's TRPO. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from policygrad.resolve import resolve
from policygrad.trainer import train

SPEED_SEEDS = tuple(range(1, 11))  # time to a threshold varies a lot between seeds
LEARNING = [  # (algo, env, steps, seeds, threshold, seeds that must pass)
    ("ppo", "CartPole-v1", 100_000, (1, 2, 3), 475.0, 3),
    ("trpo", "CartPole-v1", 100_000, (1, 2, 3), 475.0, 3),
    ("reinforce", "CartPole-v1", 300_000, (1, 2, 3), 400.0, 2),
    ("ppo", "Pendulum-v1", 200_000, (1,), -250.0, 1),
    ("trpo", "Pendulum-v1", 200_000, (1,), -250.0, 1),
]


def run_policygrad(algo: str, env: str, steps: int, seed: int, **overrides) -> tuple[dict, list[dict]]:
    cfg = resolve({}, {"eval_episodes": 20, "eval_every": 0, **overrides},
                  {"algo": algo, "env": env, "total_steps": steps, "seed": seed})
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(cfg, Path(tmp), progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def learning() -> list[dict]:
    results = []
    for algo, env, steps, seeds, threshold, need in LEARNING:
        returns = [run_policygrad(algo, env, steps, s)[0]["final_eval_return_mean"] for s in seeds]
        passed = sum(r >= threshold for r in returns)
        results.append({"algo": algo, "env": env, "steps": steps, "eval_returns": returns,
                        "threshold": threshold, "seeds_passed": passed, "ok": passed >= need})
        print(f"learning {algo:9s} {env:12s} {steps:>7d} steps: {returns} "
              f"(>= {threshold} on {passed}/{len(seeds)}, need {need})", file=sys.stderr)
    return results


def first_crossing(rows: list[dict], threshold: float) -> tuple[float, int] | None:
    for row in rows:
        value = row.get("train/episode_return_mean")
        if value is not None and row["train/episodes"] >= 20 and value >= threshold:
            return row["time/elapsed_s"], row["env_steps"]
    return None


def sb3_time_to(model_fn, seed: int, threshold: float, budget: int) -> tuple[float, int] | None:
    from stable_baselines3.common.callbacks import BaseCallback

    class Stop(BaseCallback):
        def _on_training_start(self):
            self.start, self.hit = time.perf_counter(), None

        def _on_step(self):
            buf = list(self.model.ep_info_buffer)[-20:]
            if len(buf) == 20 and np.mean([e["r"] for e in buf]) >= threshold:
                self.hit = (time.perf_counter() - self.start, self.num_timesteps)
                return False
            return True

    stop = Stop()
    model_fn(seed).learn(budget, callback=stop)
    return stop.hit


def sb3_ppo(seed: int):
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    env = make_vec_env("CartPole-v1", n_envs=8, seed=seed)
    return PPO("MlpPolicy", env, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
               ent_coef=0.0, learning_rate=lambda p: p * 1e-3, clip_range=lambda p: p * 0.2,
               seed=seed, device="cpu")


def sb3_trpo(seed: int):
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env
    env = make_vec_env("CartPole-v1", n_envs=2, seed=seed)
    return TRPO("MlpPolicy", env, n_steps=512, batch_size=512, cg_damping=1e-3, gae_lambda=0.98,
                gamma=0.99, learning_rate=1e-3, n_critic_updates=20, seed=seed, device="cpu")


def steps_per_cpu_second(fn, steps: int) -> float:
    start = time.process_time()
    fn()
    return steps / (time.process_time() - start)


def compare(name: str, ours_algo: str, sb3_fn, budget: int) -> dict:
    ours, theirs = [], []
    for seed in SPEED_SEEDS:
        _, rows = run_policygrad(ours_algo, "CartPole-v1", budget, seed, stop_at_return=475.0, eval_episodes=1)
        ours.append(first_crossing(rows, 475.0))
        theirs.append(sb3_time_to(sb3_fn, seed, 475.0, budget))
        print(f"speed {name} seed {seed}: policygrad {ours[-1]}  sb3 {theirs[-1]}  (seconds, steps)",
              file=sys.stderr)
    fixed = 50_000
    ours_sps = steps_per_cpu_second(lambda: run_policygrad(ours_algo, "CartPole-v1", fixed, 1, eval_episodes=1),
                                    fixed)
    sb3_sps = steps_per_cpu_second(lambda: sb3_fn(1).learn(fixed), fixed)
    reached = [(o, t) for o, t in zip(ours, theirs) if o and t]
    mean_ours = statistics.mean(o[0] for o, _ in reached) if reached else float("nan")
    mean_sb3 = statistics.mean(t[0] for _, t in reached) if reached else float("nan")
    return {
        "name": name, "seeds": list(SPEED_SEEDS),
        "policygrad_time_to_475_s": [o and round(o[0], 3) for o in ours],
        "sb3_time_to_475_s": [t and round(t[0], 3) for t in theirs],
        "policygrad_steps_to_475": [o and o[1] for o in ours],
        "sb3_steps_to_475": [t and t[1] for t in theirs],
        "time_ratio_sb3_over_policygrad": round(mean_sb3 / mean_ours, 3),
        "policygrad_steps_per_cpu_s": round(ours_sps), "sb3_steps_per_cpu_s": round(sb3_sps),
        "steps_per_cpu_s_ratio": round(ours_sps / sb3_sps, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("learning", "speed"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    out: dict = {"benchmark": "control", "torch_threads": 1,
                 "cpu": next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), "?")}
    if args.only != "speed":
        out["learning"] = learning()
        out["learning_ok"] = all(r["ok"] for r in out["learning"])
    if args.only != "learning":
        out["speed"] = [compare("ppo_vs_sb3_ppo", "ppo", sb3_ppo, 100_000),
                        compare("trpo_vs_sb3_contrib_trpo", "trpo", sb3_trpo, 100_000)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
