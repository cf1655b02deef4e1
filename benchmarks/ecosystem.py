"""Tasks from the ecosystem on the default model (CPU); each command prints one JSON line.

- `rg-base`: the untrained model's test accuracy on reasoning-gym generators (the share of test
  questions whose score is 1), to pick ones it can start on (5% to 50%).
- `rg`: REINFORCE on a reasoning-gym generator for --steps (60); held-out accuracy must at least
  double and gain 15 points, on every seed given (the worst counts). Beside it, the accuracy of
  always giving the test split's most common answer, and how many distinct answers the trained
  model gives: a skewed generator lets a policy meet the bar without reading the question.
- `arena`: REINFORCE on textarena:GuessTheNumber-v0 for 80 steps; the test success rate must at
  least double and gain 15 points.
- `calculator`: REINFORCE on calculator-arithmetic; reports the share of turns with a well-formed
  tool call and the accuracy (success rate), base and trained (no threshold).

Usage: .venv/bin/python benchmarks/ecosystem.py rg-base --generators chain_sum leg_counting
       .venv/bin/python benchmarks/ecosystem.py rg --task benchmarks/configs/rg-chain-sum.yaml --seeds 1 2 3
       .venv/bin/python benchmarks/ecosystem.py arena [--steps 80]
       .venv/bin/python benchmarks/ecosystem.py calculator [--steps 40]
"""
import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from common import cpu_name, run_cli  # benchmarks/common.py

RISE, FACTOR = 0.15, 2.0


def accuracy(samples: list[dict]) -> float:
    """The share of completions scored 1 (a generator's partial credit below 1 counts as wrong)."""
    return sum(s["reward"] >= 1.0 for s in samples) / len(samples)


def base_eval(task: str, model: str, out: Path) -> dict:
    """The untrained model on the test split, with its samples, kept in out (seeds share it)."""
    import policygrad
    cached = out / f"base-{Path(task).stem.replace(':', '_')}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    result = policygrad.evaluate(model=model, task=task, split="test")
    record = {"mean_reward": result.mean_reward, "kl": result.kl_to_reference, "samples": result.samples,
              "episode": result.episode}
    out.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(record))
    return record


def trained(task: str, model: str, out: Path, steps: int, seed: int, keys: list[str], resume: bool) -> dict:
    start = time.perf_counter()
    run_cli("train", "--algo", "reinforce", "--task", task, "--model", model, "--out", str(out), "--steps",
            str(steps), "--seed", str(seed), "--no-progress", *keys, *([] if resume else ["--overwrite"]))
    wall = time.perf_counter() - start
    final = json.loads((out / "final_eval.json").read_text())
    samples_file = max((out / "samples").glob("test-step*.jsonl"))
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    return {"final": final, "samples": samples, "train_wall_s": wall}


def rg_base(args) -> dict:
    rows = {}
    for generator in args.generators:
        task = generator if generator.endswith((".yaml", ".yml")) else f"reasoning-gym:{generator}"
        base = base_eval(task, args.model, Path(args.out))
        rows[generator] = {"accuracy": accuracy(base["samples"]), "mean_score": base["mean_reward"],
                           "in_range": 0.05 <= accuracy(base["samples"]) <= 0.5}
    return {"benchmark": "ecosystem_rg_base", "generators": rows}


def constant_answer(task: str) -> tuple[str, float]:
    """The test split's most common right answer and its share: the accuracy of a policy that
    always gives it, without reading the question (a skewed generator rewards that)."""
    import policygrad
    answers = Counter(row["answer"] for row in policygrad.Task.load(task).rows("test"))
    answer, count = answers.most_common(1)[0]
    return answer, count / sum(answers.values())


def answer_spread(task: str, samples: list[dict]) -> dict:
    """What the model answered: how many distinct answers, and the share of the most common one."""
    import policygrad
    from policygrad.lm.reasoning_tasks import extract_answer
    answer_format = policygrad.Task.load(task).info["answer_format"]
    given = Counter(extract_answer(s["completion"], answer_format) for s in samples)
    answer, count = given.most_common(1)[0]
    return {"distinct_answers": len(given), "top_answer": answer, "top_answer_share": count / len(samples)}


def rg(args) -> dict:
    out = Path(args.out)
    base = base_eval(args.task, args.model, out)
    base_acc, runs = accuracy(base["samples"]), {}
    constant, constant_acc = constant_answer(args.task)
    for seed in args.seeds:
        run = trained(args.task, args.model, out / f"{Path(args.task).stem.replace(':', '_')}-seed{seed}", args.steps,
                      seed, args.set, args.resume)
        acc = accuracy(run["samples"])
        runs[str(seed)] = {"accuracy": acc, "mean_score": run["final"]["test/reward_mean"],
                           "kl": run["final"]["test/kl_to_reference"], "train_wall_s": run["train_wall_s"],
                           **answer_spread(args.task, run["samples"]), "beats_constant": acc > constant_acc,
                           "passed": acc >= FACTOR * base_acc and acc - base_acc >= RISE}
    return {"benchmark": "ecosystem_rg", "task": args.task, "steps": args.steps, "set": args.set,
            "base_accuracy": base_acc, "base_mean_score": base["mean_reward"],
            "constant_answer": constant, "constant_answer_accuracy": constant_acc, "runs": runs,
            "worst_accuracy": min(r["accuracy"] for r in runs.values()), "threshold": "x2 and +0.15",
            "passed": all(r["passed"] for r in runs.values())}


def episodes_of(samples: list[dict], key: str) -> float:
    """The mean of an episode statistic over samples (success; tool calls per turn)."""
    if key == "success":
        return sum(bool(s.get("success")) for s in samples) / len(samples)
    calls = [s["tool_calls"] / s["turns"] for s in samples if s.get("turns")]
    return sum(calls) / len(calls)


def well_formed(samples: list[dict]) -> float:
    """The share of turns that made a tool call that parsed and ran."""
    turns = sum(s["turns"] for s in samples)
    return sum(s["tool_calls"] - s["bad_tool_calls"] for s in samples) / turns


def game(args, task: str, name: str, threshold: bool) -> dict:
    out = Path(args.out)
    base = base_eval(task, args.model, out)
    runs = {}
    for seed in args.seeds:
        run = trained(task, args.model, out / f"{name}-seed{seed}", args.steps, seed, args.set, args.resume)
        row = {"success_rate": episodes_of(run["samples"], "success"), "kl": run["final"]["test/kl_to_reference"],
               "return_mean": run["final"]["test/episode/return_mean"],
               "turns_mean": run["final"]["test/episode/turns_mean"], "train_wall_s": run["train_wall_s"]}
        if "test/episode/invalid_move_rate" in run["final"]:
            row["invalid_move_rate"] = run["final"]["test/episode/invalid_move_rate"]
        if not threshold:
            row["well_formed_call_share"] = well_formed(run["samples"])
        runs[str(seed)] = row
    base_rate = episodes_of(base["samples"], "success")
    result = {"benchmark": f"ecosystem_{name}", "task": task, "steps": args.steps, "set": args.set,
              "base_success_rate": base_rate, "base_episode": base["episode"], "runs": runs}
    if threshold:
        result["threshold"] = "x2 and +0.15"
        result["passed"] = all(r["success_rate"] >= FACTOR * base_rate and r["success_rate"] - base_rate >= RISE
                               for r in runs.values())
    else:
        result["base_well_formed_call_share"] = well_formed(base["samples"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["rg-base", "rg", "arena", "calculator"])
    parser.add_argument("--generators", nargs="+", default=["chain_sum", "leg_counting"])
    parser.add_argument("--task", default="reasoning-gym:chain_sum", help="rg: a reasoning-gym task name or YAML")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config keys for every training run")
    parser.add_argument("--out", default="runs/bench-ecosystem")
    parser.add_argument("--resume", action="store_true", help="continue the runs already in --out")
    args = parser.parse_args()
    args.steps = args.steps or {"rg-base": 0, "rg": 60, "arena": 80, "calculator": 40}[args.which]
    start = time.perf_counter()
    if args.which == "rg-base":
        result = rg_base(args)
    elif args.which == "rg":
        result = rg(args)
    elif args.which == "arena":
        result = game(args, "textarena:GuessTheNumber-v0", "arena", threshold=True)
    else:
        result = game(args, "calculator-arithmetic", "calculator", threshold=False)
    print(json.dumps({**result, "cpu": cpu_name(), "model": args.model, "wall_s": time.perf_counter() - start}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
