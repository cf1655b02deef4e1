"""Reward against KL: each method's held-out reward along its run, against its KL to the reference (issue 25).

    python benchmarks/frontier.py [--methods reinforce,grpo,trl_grpo,...] [--seeds auto | 1,2,3]
                                  [--budget-s S] [--steps 40] [--eval-every 5] [--out runs/bench-frontier]
                                  [--model smollm2-135m] [--trl-lr LR] [--keep-checkpoints] [--resume]
    python benchmarks/frontier.py --tiny       # the whole pipeline on a tiny random model, in minutes

The job is lm.py's: positive-review on the default model, the train split's prompts, 16 completions
per step (4 prompts x 4), <= 32 new tokens, temperature 1, float32 on the CPU. Every run gets the
same wall-clock budget: the seconds policygrad's REINFORCE (its defaults: rloo baseline) takes for
--steps steps, measured first in the same invocation (or --budget-s). The clock counts training
steps (sampling, rewards, reference pass, update), not model loading, checkpoint writing or
evaluation, for both libraries alike; a run stops after the step that spends its budget, or at
--steps. Every --eval-every steps (and at its last step) a run saves its weights; each saved folder
is then scored by policygrad's own evaluator against the base model (`LMWorkload.evaluate("test")`:
the test split, one completion per prompt, fixed sampling seeds, reward and KL to the reference in
nats per completion, sum over tokens of log pi - log pi_ref), the same way for every method, TRL's
included (its checkpoint folders are loaded into the same evaluator). The untrained model is every
curve's first point (step 0).

Methods (names for --methods):
  policygrad: reinforce (algo=reinforce, defaults), grpo, dapo, dr_grpo, gspo (recipes, docs/recipes.md),
              ppo, trpo (defaults); rloo (recipe=rloo) on request, not in the default list.
  TRL 1.16:   trl_grpo (GRPOTrainer at its defaults: loss_type "dapo", beta 0), trl_grpo_kl (beta 0.04),
              trl_grpo_loss_grpo (loss_type "grpo"), trl_grpo_loss_grpo_kl (and beta 0.04),
              trl_rloo (RLOOTrainer at its defaults: beta 0.05), trl_rloo_kl (beta 0.04).
TRL's trainers run the same job (per_device_train_batch_size 16, num_generations 4,
max_completion_length 32, the same temperature, top_p, top_k, seed) at the learning rate policygrad
resolves for their counterpart (GRPOTrainer: algo=ppo's, 1.5e-5; RLOOTrainer: algo=reinforce's,
3e-5; TRL's own default, 1e-6, barely moves in 40 steps; --trl-lr sets another), bf16 off (float32,
as policygrad on a CPU); everything else at TRL's defaults (gradient checkpointing on, one
optimiser step per batch, linear learning-rate decay).

Seeds (--seeds auto): seed 1 for every method, then seeds 2 and 3 for policygrad's best three and
TRL's best two, ranked by seed 1's mean over the KL budgets of the best test reward within each.

Output, in --out: one JSON line per run (printed and appended to runs.jsonl), then a table of the
best test reward reached at KL <= 1, 3 and 5 nats per method (mean and worst over its seeds),
frontier.png (reward against KL, one curve per method and seed, the budgets marked), and one JSON
line last with the summary. Each training run and each scoring pass runs in its own process, one
at a time. TRL's side needs `pip install -e .[bench]` (it pins trl==1.16.0).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from common import cpu_name  # benchmarks/common.py

TASK = "positive-review"
KL_BUDGETS = (1.0, 3.0, 5.0)
SEED_RULE = {"policygrad": 3, "trl": 2}
"""--seeds auto: how many of each side's best methods (by seed 1) also run seeds 2 and 3."""
TINY_METHODS = "reinforce,grpo,trl_grpo,trl_rloo_kl"


@dataclass(frozen=True)
class Method:
    label: str
    side: str
    """policygrad or trl"""
    keys: dict = field(default_factory=dict)
    """policygrad: the run's config keys; TRL: its config's fields beyond the job's."""
    trainer: str = ""
    """TRL's trainer: grpo or rloo."""


METHODS = {
    "reinforce": Method("policygrad REINFORCE (rloo baseline)", "policygrad", {"algo": "reinforce"}),
    "grpo": Method("policygrad recipe=grpo", "policygrad", {"recipe": "grpo"}),
    "dapo": Method("policygrad recipe=dapo", "policygrad", {"recipe": "dapo"}),
    "dr_grpo": Method("policygrad recipe=dr_grpo", "policygrad", {"recipe": "dr_grpo"}),
    "gspo": Method("policygrad recipe=gspo", "policygrad", {"recipe": "gspo"}),
    "ppo": Method("policygrad PPO", "policygrad", {"algo": "ppo"}),
    "trpo": Method("policygrad TRPO", "policygrad", {"algo": "trpo"}),
    "rloo": Method("policygrad recipe=rloo", "policygrad", {"recipe": "rloo"}),
    "trl_grpo": Method("TRL GRPOTrainer (defaults: dapo loss, beta 0)", "trl", {}, "grpo"),
    "trl_grpo_kl": Method("TRL GRPOTrainer, beta 0.04", "trl", {"beta": 0.04}, "grpo"),
    "trl_grpo_loss_grpo": Method("TRL GRPOTrainer, loss_type=grpo", "trl", {"loss_type": "grpo"}, "grpo"),
    "trl_grpo_loss_grpo_kl": Method("TRL GRPOTrainer, loss_type=grpo, beta 0.04", "trl",
                                    {"loss_type": "grpo", "beta": 0.04}, "grpo"),
    "trl_rloo": Method("TRL RLOOTrainer (defaults: beta 0.05)", "trl", {}, "rloo"),
    "trl_rloo_kl": Method("TRL RLOOTrainer, beta 0.04", "trl", {"beta": 0.04}, "rloo"),
}
DEFAULT_METHODS = [name for name in METHODS if name != "rloo"]
COUNTERPART = {"grpo": {"algo": "ppo"}, "rloo": {"algo": "reinforce"}}
"""The policygrad run whose learning rate a TRL trainer takes."""


# --- workers (each in its own process) ---------------------------------------------------------
@dataclass
class Clock:
    """Training seconds against a budget: the step that spends it is the run's last."""
    budget_s: Optional[float]
    times: list = field(default_factory=list)

    def add(self, seconds: float) -> bool:
        self.times.append(seconds)
        return self.budget_s is not None and sum(self.times) >= self.budget_s


def job_config(spec: dict, keys: dict):
    """The run's policygrad config: the task's job with `keys` on top."""
    from policygrad.resolve import resolve
    return resolve({}, {**keys, **spec.get("set", {})},
                   {"task": TASK, "model": spec["model"], "seed": spec["seed"], "total_steps": spec["steps"]})


def train_ours(spec: dict) -> dict:
    """A policygrad run that checkpoints every eval_every steps (all kept) and stops at the budget."""
    from policygrad import trainer
    out = Path(spec["run_dir"])
    cfg = job_config(spec, {**METHODS[spec["method"]].keys, "eval_every": 0,
                            "checkpoint_every": spec["eval_every"], "keep_checkpoints": 10_000})
    clock = Clock(spec["budget_s"])

    def stop(row: dict) -> bool:  # a checkpoint still being written is no training time
        return clock.add(row["time/step_s"] - row.get("time/checkpoint_wait_s", 0.0))

    done = trainer.run(cfg, out, progress=False, callbacks=[stop])
    saved = sorted((int(p.name.split("-")[1]), str(p / "policy")) for p in (out / "checkpoints").glob("update-*"))
    return {"steps": done.summary["updates"], "train_s": sum(clock.times), "step_s": clock.times,
            "lr": cfg.lr, "checkpoints": saved}


def trl_data(task, chat: bool):
    """The train split as TRL reads it: conversational prompts where the model has a chat template
    (policygrad renders those with it too), else the plain prompt; `row` finds the row again."""
    from datasets import Dataset
    rows = task.rows("train")

    def prompt(r: dict):
        messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
        return messages if chat else (r.get("prompt") or "\n".join(m["content"] for m in messages))

    return Dataset.from_list([{"prompt": prompt(r), "row": i} for i, r in enumerate(rows)]), rows


def train_trl(spec: dict) -> dict:
    """TRL's trainer on the same job; it saves the model every eval_every steps and at its last."""
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from policygrad.config import field_names
    from policygrad.dist import threads_per_rank
    from policygrad.lm import models, tasks
    from policygrad.lm.rollout import extras_of
    method, out = METHODS[spec["method"]], Path(spec["run_dir"])
    cfg = job_config(spec, COUNTERPART[method.trainer])
    torch.set_num_threads(threads_per_rank(cfg.torch_threads, one_thread=False))
    path = models.resolve(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    task = tasks.load(cfg.task, set(field_names()))
    task.rewards.configure(timeout=cfg.reward_timeout, retries=cfg.reward_retries, normalize=cfg.reward_normalize)
    data, rows = trl_data(task, bool(getattr(tokenizer, "chat_template", None)))

    def reward(completions, row, **kwargs):  # the task's own rewards, as policygrad's runs see them
        chosen = [rows[i] for i in row]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return task.rewards([tasks.prompt_text(r) for r in chosen], texts, extras_of(chosen)).tolist()

    clock = Clock(spec["budget_s"])

    class Budget(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):  # before the step's logging and saving
            if clock.add(time.perf_counter() - self.start) or state.global_step >= args.max_steps:
                control.should_training_stop = control.should_save = True

    Config, Trainer = {"grpo": (trl.GRPOConfig, trl.GRPOTrainer), "rloo": (trl.RLOOConfig, trl.RLOOTrainer)}[method.trainer]
    lr = spec.get("trl_lr") or cfg.lr
    args = Config(output_dir=str(out), per_device_train_batch_size=cfg.completions_per_step,
                  num_generations=cfg.samples_per_prompt, max_completion_length=cfg.max_new_tokens,
                  temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, learning_rate=lr,
                  max_steps=spec["steps"], seed=spec["seed"], bf16=False, use_cpu=True, report_to=[],
                  logging_steps=1, save_strategy="steps", save_steps=spec["eval_every"], save_only_model=True,
                  **method.keys)
    run = Trainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tokenizer,
                  callbacks=[Budget()])
    run.train()
    saved = sorted((int(p.name.split("-")[1]), str(p)) for p in out.glob("checkpoint-*"))
    return {"steps": run.state.global_step, "train_s": sum(clock.times), "step_s": clock.times, "lr": lr,
            "trl": trl.__version__, "checkpoints": saved}


def score(spec: dict) -> dict:
    """Test reward and KL to the base model of each saved folder (and, with base, of the base
    model itself): policygrad's evaluator, one model loaded, each folder's weights copied in."""
    import torch
    from transformers import AutoModelForCausalLM

    from policygrad.dist import threads_per_rank
    from policygrad.lm.rollout import LMWorkload
    from policygrad.resolve import resolve
    cfg = resolve({}, {}, {"task": TASK, "model": spec["model"]})
    torch.set_num_threads(threads_per_rank(cfg.torch_threads, one_thread=False))
    work = LMWorkload(cfg, cfg.seed)  # the reference: a frozen copy of the base model, as in training

    def measure(step: int) -> dict:
        result = work.evaluate("test")
        return {"step": step, "reward": result["test/reward_mean"], "kl": result["test/kl_to_reference"]}

    points = [measure(0)] if spec.get("base") else []
    for step, folder in spec["checkpoints"]:
        trained = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        work.policy.model.load_state_dict(trained.state_dict())
        del trained
        points.append(measure(step))
    return {"points": points}


WORKERS = {"train_policygrad": train_ours, "train_trl": train_trl, "score": score}


def spawn(worker: str, spec: dict, result: Path) -> dict:
    """Run a worker in its own process; its result (it writes it to `result`), or {"error": ...}."""
    env = {**os.environ, **({"HF_HUB_OFFLINE": "1"} if worker == "train_trl" else {})}
    done = subprocess.run([sys.executable, __file__, "--worker", worker, "--spec", json.dumps(spec),
                           "--result", str(result)], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not result.exists():
        lines = done.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"{worker} exited {done.returncode}"}
    return json.loads(result.read_text())


# --- the frontier ------------------------------------------------------------------------------
def best_within(points: list[dict], budget: float) -> Optional[float]:
    """The best test reward among a run's points whose KL is within `budget` nats."""
    inside = [p["reward"] for p in points if p["kl"] <= budget]
    return max(inside) if inside else None


def rank_score(line: dict) -> float:
    """One number per run for --seeds auto: the mean over the budgets of its best reward within each."""
    values = [v for v in line.get("best_at_kl", {}).values() if v is not None]
    return statistics.mean(values) if values else float("-inf")


@dataclass
class Bench:
    args: argparse.Namespace
    out: Path
    model: str
    budget_s: Optional[float] = None
    lines: dict = field(default_factory=dict)
    """(method, seed) -> its JSON line."""

    def base_point(self) -> dict:
        """The untrained model's test evaluation (every curve's step 0), made once per --out and model."""
        cached = self.out / f"base-{Path(self.model).name}.json"
        if not cached.exists():
            scored = spawn("score", {"model": self.model, "base": True, "checkpoints": []}, self.out / "base-result.json")
            if "error" in scored:
                sys.exit(f"frontier: evaluating the base model failed: {scored['error']}")
            cached.write_text(json.dumps(scored["points"][0]))
        return json.loads(cached.read_text())

    def run(self, name: str, seed: int) -> dict:
        """Train one method on one seed, score its saved folders, print and keep its JSON line."""
        done = self.lines.get((name, seed))
        if done is not None and self.budget_s in (done["budget_s"], done.get("yardstick_s")):
            return done  # run before at this budget (--resume), or the run that measured it
        method, run_dir = METHODS[name], self.out / f"{name}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        spec = {"method": name, "seed": seed, "model": self.model, "steps": self.args.steps,
                "eval_every": self.args.eval_every, "budget_s": self.budget_s, "run_dir": str(run_dir),
                "set": overrides(self.args.set) if method.side == "policygrad" else {},
                "trl_lr": self.args.trl_lr}
        start = time.perf_counter()
        trained = spawn(f"train_{method.side}", spec, run_dir / "train.json")
        line = {"benchmark": "frontier", "method": name, "label": method.label, "side": method.side, "seed": seed,
                "model": self.model, "max_steps": self.args.steps, "eval_every": self.args.eval_every,
                "budget_s": self.budget_s}
        if "error" in trained:
            line["error"] = trained["error"]
        else:
            scored = spawn("score", {"model": self.model, "checkpoints": trained["checkpoints"]}, run_dir / "score.json")
            line.update({k: trained[k] for k in ("steps", "train_s", "lr") if k in trained})
            line["median_step_s"] = statistics.median(trained["step_s"]) if trained["step_s"] else None
            if "error" in scored:
                line["error"] = "scoring: " + scored["error"]
            else:
                points = [self.base_point(), *scored["points"]]
                line.update({"points": points, "final": points[-1],
                             "best_at_kl": {f"{b:g}": best_within(points, b) for b in KL_BUDGETS}})
        line["wall_s"] = time.perf_counter() - start
        if not self.args.keep_checkpoints:
            for folder in [run_dir / "checkpoints", *run_dir.glob("checkpoint-*")]:
                shutil.rmtree(folder, ignore_errors=True)
        print(json.dumps(line), flush=True)
        with open(self.out / "runs.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        self.lines[(name, seed)] = line
        return line

    def resume(self) -> None:
        """Keep the lines of runs.jsonl made with this invocation's settings (and their budget)."""
        path = self.out / "runs.jsonl"
        if not path.exists():
            return
        for raw in path.read_text().splitlines():
            line = json.loads(raw)
            same = (line["model"], line["max_steps"], line["eval_every"]) == (self.model, self.args.steps,
                                                                             self.args.eval_every)
            if same and "error" not in line:
                self.lines[(line["method"], line["seed"])] = line

    def measure_budget(self) -> None:
        """policygrad's REINFORCE, seed 1, --steps steps, no budget: its training seconds are everyone's."""
        if self.budget_s is None:
            yardstick = self.run("reinforce", 1)
            if "error" in yardstick:
                sys.exit(f"frontier: the budget run (reinforce, seed 1) failed: {yardstick['error']}")
            self.budget_s = yardstick["yardstick_s"] = yardstick["train_s"]
            print(f"frontier: budget {self.budget_s:.1f} s of training per run", file=sys.stderr)


def chosen_seeds(bench: Bench, methods: list[str], seeds: str) -> None:
    """Run every method on its seeds: explicit ones, or the issue's rule (--seeds auto)."""
    if seeds != "auto":
        for seed in (int(s) for s in seeds.split(",")):
            for name in methods:
                bench.run(name, seed)
        return
    for name in methods:
        bench.run(name, 1)
    for side, best in SEED_RULE.items():
        ranked = sorted((m for m in methods if METHODS[m].side == side),
                        key=lambda m: rank_score(bench.lines[(m, 1)]), reverse=True)
        for name in ranked[:best]:
            for seed in (2, 3):
                bench.run(name, seed)


def summarise(lines: list[dict], methods: list[str]) -> dict:
    """Per method: its seeds, steps reached, and at each KL budget the mean and worst best reward."""
    summary = {}
    for name in methods:
        runs = [line for line in lines if line["method"] == name and "points" in line]
        if not runs:
            continue
        at_kl = {}
        for b in KL_BUDGETS:
            values = [r["best_at_kl"][f"{b:g}"] for r in runs]
            values = [v for v in values if v is not None]
            at_kl[f"{b:g}"] = {"mean": statistics.mean(values), "worst": min(values)} if values else None
        summary[name] = {"label": METHODS[name].label, "seeds": [r["seed"] for r in runs],
                         "steps": [r["steps"] for r in runs], "final_kl": [r["final"]["kl"] for r in runs],
                         "at_kl": at_kl}
    return summary


def table(summary: dict) -> str:
    head = " | ".join(f"best test reward, KL <= {b:g}" for b in KL_BUDGETS)
    rows = [f"| method | seeds | steps reached | {head} | final KL |", "|" + " --- |" * (4 + len(KL_BUDGETS))]

    def cell(v: Optional[dict]) -> str:
        if v is None:
            return "-"
        return f"{v['mean']:.3f}" + (f" ({v['worst']:.3f})" if v["worst"] != v["mean"] else "")

    for name, s in summary.items():
        rows.append(f"| {s['label']} | {','.join(map(str, s['seeds']))} | {'/'.join(map(str, s['steps']))} | "
                    + " | ".join(cell(s["at_kl"][f"{b:g}"]) for b in KL_BUDGETS)
                    + f" | {'/'.join(f'{k:.2f}' for k in s['final_kl'])} |")
    return "\n".join(rows)


def plot(lines: list[dict], methods: list[str], path: Path) -> None:
    """Test reward against KL, one curve per method and seed (seeds past the first fainter), budgets marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 6))
    tab20 = plt.get_cmap("tab20")
    colours = [tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))]  # the dark ten, then their light pairs
    for i, name in enumerate(methods):
        runs = [line for line in lines if line["method"] == name and "points" in line]
        for j, run in enumerate(runs):
            ax.plot([p["kl"] for p in run["points"]], [p["reward"] for p in run["points"]], marker="o", markersize=3,
                    linestyle="-" if METHODS[name].side == "policygrad" else "--", color=colours[i % 20],
                    alpha=1.0 if j == 0 else 0.45, label=METHODS[name].label if j == 0 else None)
    for b in KL_BUDGETS:
        ax.axvline(b, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"KL {b:g}", (b, 1), xycoords=("data", "axes fraction"), fontsize=8, color="grey",
                    xytext=(2, -10), textcoords="offset points")
    ax.set_xlabel("KL to the reference (nats per completion, test split)")
    ax.set_ylabel(f"test reward ({TASK})")
    ax.set_title("Reward against KL at equal wall-clock budgets (solid: policygrad, dashed: TRL)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def overrides(items: list[str]) -> dict:
    """--set KEY=VALUE items, each value read as YAML (as the command line reads them)."""
    import yaml
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def tiny_model(out: Path) -> str:
    """A tiny random causal LM (the tests' helper), built in seconds, no download."""
    folder = out / "tiny-model"
    if not (folder / "config.json").exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from lm_helpers import make_tiny_lm  # tests/lm_helpers.py
        make_tiny_lm(folder)
    return str(folder)


def refuse(message: str) -> None:
    """Bad input: one line, exit 2, before any run starts."""
    print(f"frontier: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=None, help=f"comma list of {', '.join(METHODS)} (default: all but rloo)")
    parser.add_argument("--seeds", default=None, help="auto (the issue's rule; default) or a comma list for every method")
    parser.add_argument("--budget-s", type=float, default=None, help="training seconds per run (default: measured)")
    parser.add_argument("--steps", type=int, default=None, help="the most steps a run takes (default 40)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between saved points (default 5)")
    parser.add_argument("--out", default="runs/bench-frontier")
    parser.add_argument("--model", default=None, help="default: policygrad's default model")
    parser.add_argument("--trl-lr", type=float, default=None, help="TRL's learning rate (default: its counterpart's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more keys for policygrad's runs")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the saved folders once scored")
    parser.add_argument("--resume", action="store_true", help="reuse the runs of runs.jsonl made with these settings")
    parser.add_argument("--tiny", action="store_true", help=f"a tiny random model, 3 steps, methods {TINY_METHODS}")
    parser.add_argument("--worker", choices=tuple(WORKERS))
    parser.add_argument("--spec")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.spec))
        Path(args.result).write_text(json.dumps(result))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.steps = args.steps or (3 if args.tiny else 40)
    args.eval_every = args.eval_every or (1 if args.tiny else 5)
    args.seeds = args.seeds or ("1" if args.tiny else "auto")
    methods = (args.methods or (TINY_METHODS if args.tiny else ",".join(DEFAULT_METHODS))).split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        refuse(f"unknown method '{unknown[0]}' (choose from {', '.join(METHODS)})")
    if any(METHODS[m].side == "trl" for m in methods) and importlib.util.find_spec("trl") is None:
        refuse(f"method '{next(m for m in methods if METHODS[m].side == 'trl')}' needs TRL: "
               "pip install -e '.[bench]' (it pins trl==1.16.0), or leave the trl_* methods out")
    if args.model is None:
        from policygrad.config import Config
        args.model = tiny_model(out) if args.tiny else Config().model
    start = time.perf_counter()
    bench = Bench(args, out, args.model, args.budget_s)
    if args.resume:
        bench.resume()
    bench.measure_budget()
    chosen_seeds(bench, methods, args.seeds)
    lines = list(bench.lines.values())
    summary = summarise(lines, methods)
    print(table(summary))
    plot(lines, methods, out / "frontier.png")
    print(json.dumps({"benchmark": "frontier", "cpu": cpu_name(), "model": args.model, "task": TASK,
                      "steps": args.steps, "eval_every": args.eval_every, "budget_s": bench.budget_s,
                      "kl_budgets": list(KL_BUDGETS), "methods": summary, "figure": str(out / "frontier.png"),
                      "failed": {f"{m}-seed{s}": line["error"] for (m, s), line in bench.lines.items() if "error" in line},
                      "wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
