"""Best-of-N rejection-sampling SFT from the base model on positive-review: 8 completions for each
training prompt, the best by VADER kept, then `policygrad sft` on those rows. The fine-tuned
model's test reward (positive-review's test prompts, sampled as `policygrad eval` does) must
rise by 0.15 or more over the base model's, and SFT must lower the held-out NLL (on the held-out
10% of the chosen rows). Prints one JSON line.

Usage: .venv/bin/python benchmarks/sft.py [--best-of 8] [--epochs 2] [--lr 2e-5]
"""
import argparse
import json
import time
from pathlib import Path

from common import cpu_name, run_cli  # benchmarks/common.py

THRESHOLD = 0.15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--best-of", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="runs/bench-sft")
    args = parser.parse_args()
    out = Path(args.out) / f"best-of-{args.best_of}"
    start = time.perf_counter()
    base = run_cli("eval", "--task", "positive-review", "--model", args.model, "--split", "test")
    # the same command again resumes a killed run (the sampled rows are kept in the run folder)
    summary = run_cli("sft", "--task", "positive-review", "--best-of", str(args.best_of), "--model", args.model,
                      "--out", str(out), "--no-progress", "seed=1", f"epochs={args.epochs}", f"lr={args.lr}")
    tuned = run_cli("eval", "--task", "positive-review", "--model", str(out / "model"), "--split", "test")
    gain = tuned["mean_reward"] - base["mean_reward"]
    print(json.dumps({"benchmark": "sft", "cpu": cpu_name(), "model": args.model, "best_of": args.best_of,
                      "epochs": args.epochs, "lr": args.lr, "train_prompts": summary.get("prompts"),
                      "sample_reward_mean": summary.get("sample_reward_mean"),
                      "best_reward_mean": summary.get("best_reward_mean"),
                      "base_test_reward": base["mean_reward"], "sft_test_reward": tuned["mean_reward"],
                      "test_reward_gain": gain, "threshold": THRESHOLD,
                      "held_out_nll_before": summary["test_nll_before"], "held_out_nll_after": summary["test_nll"],
                      "passed": gain >= THRESHOLD and summary["test_nll"] < summary["test_nll_before"],
                      "wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
