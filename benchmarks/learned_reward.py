"""RL on a learned reward: REINFORCE on positive-review's prompts with only the reward model that
`benchmarks/reward_model.py` learnt from VADER (`rm:`, normalised with its saved statistics) as
the reward; VADER, the rule (gold), is watched at weight 0. Within 40 steps the *rule's* test
reward must rise by 0.2 or more with KL below 5 nats; the run goes on to 80 steps to see whether
the proxy is over-optimised (Gao et al., 2022): the proxy still rising while the gold falls.

Test rewards (proxy and gold) are measured at the base model and at the checkpoints of steps 20,
40, 60 and 80; validation curves of both go into one figure (`policygrad plot`, two metrics).
Prints one JSON line.

Usage: .venv/bin/python benchmarks/learned_reward.py [--rm runs/bench-rm/rm/reward-model] [--steps 80]
"""
import argparse
import json
import sys
import time
from pathlib import Path

from common import cpu_name, run_cli  # benchmarks/common.py

THRESHOLD_GAIN, KL_LIMIT, AT_STEP = 0.2, 5.0, 40


def test_point(result: dict, proxy: str) -> dict:
    return {"proxy": result["rewards"][proxy], "gold": result["rewards"]["vader"],
            "kl": result["kl_to_reference"]}


def plot_test(points: dict, path: Path) -> Path:
    """The test split's proxy and gold rewards at each evaluated step, in one figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = sorted(points)
    ax.plot(steps, [points[s]["proxy"] for s in steps], marker="o", label="proxy: the learned reward (rm:, normalised)")
    ax.plot(steps, [points[s]["gold"] for s in steps], marker="o", label="gold: the rule it learnt from (VADER)")
    ax.set(title="RL on a learned reward: test split", xlabel="step", ylabel="test reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", default="runs/bench-rm/rm/reward-model")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--model", default="smollm2-135m")
    # positive-review's own 0.1 let KL pass 10 nats by step 15 on the normalised proxy (whose spread
    # over samples is wider than VADER's [-1, 1]): a nat must cost more here
    parser.add_argument("--kl-coef", type=float, default=0.3)
    parser.add_argument("--out", default="runs/bench-learned-reward")
    parser.add_argument("--reuse-run", action="store_true", help="evaluate an earlier complete run again")
    args = parser.parse_args()
    out, rm = Path(args.out), Path(args.rm).resolve()
    if not (rm / "config.json").is_file():
        sys.exit(f"no reward model at {rm}: run benchmarks/reward_model.py first")
    out.mkdir(parents=True, exist_ok=True)
    proxy = f"rm:{rm}"
    task = out / "positive-review-rm.yaml"
    task.write_text(f"extends: positive-review\nrewards:\n  - {proxy}\n  - {{reward: vader, weight: 0}}\n"
                    f"reward_normalize: true\nkl_coef: {args.kl_coef}\n")
    start = time.perf_counter()
    if not (args.reuse_run and (out / "run" / "final_eval.json").is_file()):
        # a checkpoint every 10 steps (a new best validation result writes one too), all kept
        run_cli("train", "--algo", "reinforce", "--task", str(task), "--model", args.model, "--out",
                   str(out / "run"), "--steps", str(args.steps), "--seed", "1", "--overwrite", "--no-progress",
                   "checkpoint_every=10", f"keep_checkpoints={args.steps // 10 + 1}")
    train_s = time.perf_counter() - start
    points = {0: test_point(run_cli("eval", "--task", str(task), "--model", args.model, "--split", "test"), proxy)}
    for folder in sorted((out / "run" / "checkpoints").glob("update-*")):
        step = int(folder.name.split("-")[1])
        if step % 20 == 0 or step == args.steps:  # the test split every 20 steps (those kept)
            points[step] = test_point(run_cli("eval", str(out / "run"), "--checkpoint", folder.name,
                                                 "--split", "test"), proxy)
    test_figure = plot_test(points, out / "proxy-vs-gold-test.png")
    figure = out / "proxy-vs-gold.png"
    run_cli("plot", str(out / "run"), "--metric", f"eval/reward/{proxy}", "--metric", "eval/reward/vader",
               "--smooth", "0", "--out", str(figure))
    at = points[AT_STEP] if AT_STEP in points else points[max(points)]
    gain = at["gold"] - points[0]["gold"]
    best_gold = max(points, key=lambda s: points[s]["gold"])
    last = max(points)
    over = points[last]["gold"] < points[best_gold]["gold"] and points[last]["proxy"] >= points[best_gold]["proxy"]
    print(json.dumps({"benchmark": "learned_reward", "cpu": cpu_name(), "model": args.model, "steps": args.steps,
                      "kl_coef": args.kl_coef,
                      "reward_model": str(rm),
                      "test": {str(s): p for s, p in points.items()},
                      f"gold_gain_at_{AT_STEP}": gain, f"kl_at_{AT_STEP}": at["kl"],
                      "threshold_gain": THRESHOLD_GAIN, "kl_limit": KL_LIMIT,
                      "passed": gain >= THRESHOLD_GAIN and at["kl"] < KL_LIMIT,
                      "gold_best_step": best_gold, "proxy_over_optimised": over, "figure": str(figure),
                      "test_figure": str(test_figure),
                      "train_wall_s": train_s, "wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
