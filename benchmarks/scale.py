"""Scale benchmark: the same training step as 1 and as 2 processes (torch.distributed, gloo).

    python benchmarks/scale.py                  # LM REINFORCE and control PPO (about 6 minutes)
    python benchmarks/scale.py --only control   # or: lm

Each run is `policygrad train --nproc N` in its own processes, one run at a time (two runs side by
side would share the 2 cores and time each other). Throughput is samples per second of training
wall time: completions for the language model (REINFORCE on positive-review, SmolLM2-135M, 16
completions a step), environment steps for control (PPO on CartPole-v1 with its tuned settings).
Three launches of the same global batch:
  1 process x 2 threads (today's default), 1 process x 1 thread, 2 processes x 1 thread.
On a 2-core machine no speed-up is expected for the language model: the two ranks split the same
cores one process already used. What the ratios show is the price of the collectives
(time/collective_s: gradient sums, gathered statistics, waiting for the slower rank). The last line
printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LAUNCHES = [(1, 2), (1, 1), (2, 1)]  # (processes, torch threads per process)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def train(args: list[str], nproc: int, threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "policygrad", "train", "--nproc", str(nproc), "--out", tmp, "--no-progress",
               *args, f"torch_threads={threads}", "eval_every=0", "checkpoint_every=0"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"benchmark run failed ({' '.join(cmd)}):\n{r.stderr[-2000:]}")
        return [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]


def measure(args: list[str], samples_per_update: int, skip: int) -> list[dict]:
    """Samples per second of step time (median over updates after the first `skip`), the share of
    that time spent in collectives, for each launch."""
    results = []
    for nproc, threads in LAUNCHES:
        rows = train(args, nproc, threads)[skip:]
        step_s = statistics.median(r["time/step_s"] for r in rows)
        collective = statistics.median(r.get("time/collective_s", 0.0) / r["time/step_s"] for r in rows)
        results.append({"processes": nproc, "threads_per_process": threads, "updates_timed": len(rows),
                        "step_s": round(step_s, 4), "samples_per_s": round(samples_per_update / step_s, 2),
                        "collective_share": round(collective, 4)})
        print(f"  {nproc} process(es) x {threads} thread(s): {samples_per_update / step_s:9.2f} samples/s, "
              f"step {step_s:.3f} s, collectives {collective:.1%} of it", file=sys.stderr)
    return results


def ratios(results: list[dict]) -> dict:
    by = {(r["processes"], r["threads_per_process"]): r["samples_per_s"] for r in results}
    return {"two_procs_over_one_1thread": round(by[(2, 1)] / by[(1, 1)], 3),
            "two_procs_over_one_2threads": round(by[(2, 1)] / by[(1, 2)], 3)}


def lm(steps: int) -> dict:
    print("language model: REINFORCE, positive-review, SmolLM2-135M, 16 completions a step", file=sys.stderr)
    args = ["--algo", "reinforce", "--task", "positive-review", "--steps", str(steps), "--seed", "1"]
    results = measure(args, samples_per_update=16, skip=1)
    return {"workload": "lm-reinforce", "launches": results, **ratios(results)}


def control(steps: int) -> dict:
    print("control: PPO, CartPole-v1 (8 envs x 32 steps, 20 epochs of 256-step minibatches)", file=sys.stderr)
    args = ["--algo", "ppo", "--env", "CartPole-v1", "--total-steps", str(steps), "--seed", "1"]
    results = measure(args, samples_per_update=256, skip=2)
    return {"workload": "control-ppo", "launches": results, **ratios(results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("lm", "control"))
    parser.add_argument("--lm-steps", type=int, default=6)
    parser.add_argument("--control-steps", type=int, default=25_600)
    args = parser.parse_args()
    out: dict = {"benchmark": "scale", "cpu": cpu_name()}
    if args.only in (None, "control"):
        out["control"] = control(args.control_steps)
    if args.only in (None, "lm"):
        out["lm"] = lm(args.lm_steps)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
