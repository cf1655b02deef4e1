"""Python API on the default model: a reward closure and an in-memory datasets.Dataset must raise the
held-out test reward of positive-review by 0.3 in 40 REINFORCE steps; the same run through the CLI
(`policygrad train --task positive-review`, same keys and seed) must give the same metrics.

The closure scores with VADER as the built-in reward does, and the DatasetDict holds the built-in
task's own splits, so both paths train one run: the benchmark says whether they match, bit for bit.
It prints one JSON line. Usage: .venv/bin/python benchmarks/api.py [--steps 40] [--skip-cli]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import datasets
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

import policygrad

THRESHOLD = 0.3
# positive-review's own defaults (lm/tasks.py), given as keys: data= and rewards= replace a task's
# rows and rewards, and a run without task= has no task defaults
KEYS = {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 32, "temperature": 1.0, "kl_coef": 0.1}


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def metrics(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="runs/bench-api")
    parser.add_argument("--skip-cli", action="store_true", help="only the Python run")
    args = parser.parse_args()
    out = Path(args.out)

    analyzer = SentimentIntensityAnalyzer()
    calls = []

    def positivity(prompts, completions, **columns):  # a closure: it counts its own calls
        calls.append(len(completions))
        return [analyzer.polarity_scores(c)["compound"] for c in completions]

    splits = policygrad.Task.load("positive-review").splits
    data = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
    start = time.perf_counter()
    result = policygrad.train(algo="reinforce", model="smollm2-135m", data=data, rewards=positivity,
                              total_steps=args.steps, seed=1, out=out / "python", overwrite=True, **KEYS)
    python_s = time.perf_counter() - start
    base = policygrad.evaluate(result, base=True)
    gain = result.final.mean_reward - base.mean_reward
    report = {"benchmark": "api", "cpu": cpu_name(), "steps": args.steps, "base_test_reward": base.mean_reward,
              "test_reward": result.final.mean_reward, "gain": gain, "threshold": THRESHOLD,
              "kl_to_reference": result.final.kl_to_reference, "reward_calls": len(calls),
              "passed": gain >= THRESHOLD, "python_wall_s": python_s}
    if not args.skip_cli:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "policygrad", "train", "--algo", "reinforce", "--task", "positive-review",
                        "--steps", str(args.steps), "--seed", "1", "--out", str(out / "cli"), "--overwrite",
                        "--no-progress"], check=True)
        report["cli_wall_s"] = time.perf_counter() - start
        same = metrics(out / "python") == metrics(out / "cli")
        cli_final = json.loads((out / "cli" / "final_eval.json").read_text())
        report.update(cli_test_reward=cli_final["test/reward_mean"], cli_identical_metrics=same)
        report["passed"] = report["passed"] and same
    print(json.dumps(report))


if __name__ == "__main__":
    main()
