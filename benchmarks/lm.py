"""Language-model benchmark: learning on the default model, and step speed against its floor and TRL.

    python benchmarks/lm.py --only learning [--algos reinforce,ppo,trpo] [--seeds 1,2,3] [--arithmetic]
    python benchmarks/lm.py --only speed [--steps 4]       # needs `pip install trl` for the TRL side
    python benchmarks/lm.py --only memory [--steps 3]      # peak RSS with and without gradient checkpointing
    python benchmarks/lm.py --only learning --algos reinforce,ppo,trpo --lora 16   # LoRA adapters, rank 16

Learning: on positive-review with SmolLM2-135M-Instruct (16 completions per step, <= 32 new tokens),
the test-split mean reward of the untrained model and of each algorithm after 40 steps, and the
trained policy's mean KL to the reference (nats per completion). On arithmetic (easy), REINFORCE's
test accuracy before and after 60 steps.

Speed: each measurement runs in its own process (so peak RSS is its own): policygrad's REINFORCE
step; the floor, one batched generate of the same 16 completions plus one forward/backward over
them, every row in full (share_prompts=false); the same floor with the shared-prompt passes a step
uses (so the gap to it is what a step adds: reference pass, rewards, optimiser); and TRL's
GRPOTrainer on the same job (gradient checkpointing on, bf16 off); the same step with LoRA
(rank 16) and under bfloat16 autocast beside the full fine-tune's (step time and peak RSS); and
our sampling against plain transformers `generate` of the same completions, forced to full
length. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from policygrad.resolve import resolve
from policygrad.dist import threads_per_rank
from policygrad.trainer import train

TASK_STEPS = {"positive-review": 40, "arithmetic": 60}


def run(algo: str, task: str, steps: int, seed: int = 1, **overrides) -> tuple[dict, list[dict]]:
    cfg = resolve({}, {"eval_every": 0, **overrides}, {"algo": algo, "task": task, "total_steps": steps,
                                                       "seed": seed})
    with tempfile.TemporaryDirectory() as tmp:
        summary = train(cfg, Path(tmp), progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def baseline(task: str) -> dict:
    from policygrad.lm.rollout import LMWorkload
    cfg = resolve({}, {}, {"task": task})
    return LMWorkload(cfg, cfg.seed).evaluate("test")


def learning(algos: list[str], arithmetic: bool, seeds: list[int], lora_r: int = 0, dtype: str = "auto") -> list[dict]:
    """Each algorithm on positive-review over `seeds`: every seed's gain, their mean and the worst.
    Passing: the mean gain >= 0.3, the worst seed's >= 0.25 (one seed alone: >= 0.3), KL < 5.
    lora_r > 0: LoRA adapters of that rank instead of full fine-tuning (passing: every gain >= 0.25)."""
    lora = {"lora_r": lora_r} if lora_r else {}
    if dtype != "auto":
        lora["dtype"] = dtype
    results = []
    tasks = [("positive-review", a) for a in algos] + ([("arithmetic", "reinforce")] if arithmetic else [])
    bases = {}
    for task, algo in tasks:
        if task not in bases:
            bases[task] = baseline(task)["test/reward_mean"]
        runs = []
        for seed in (seeds if task == "positive-review" else seeds[:1]):
            summary, rows = run(algo, task, TASK_STEPS[task], seed=seed, **lora)
            runs.append({"seed": seed, "trained_test_reward": summary["final_test_reward_mean"],
                         "gain": summary["final_test_reward_mean"] - bases[task],
                         "kl_to_reference": summary["final_test_kl_to_reference"],
                         "flat_group_share": summary.get("flat_group_share"),
                         "median_step_s": statistics.median(r["time/step_s"] for r in rows)})
            print(f"learning {task} {algo} seed {seed}: {runs[-1]}", file=sys.stderr)
        gains = [r["gain"] for r in runs]
        need = (0.25 if lora_r else 0.3) if task == "positive-review" else 0.10
        worst_need = 0.25 if len(runs) > 1 and task == "positive-review" else need
        result = {"task": task, "algo": algo, "lora_r": lora_r, "dtype": dtype, "steps": TASK_STEPS[task], "base_test_reward": bases[task],
                  "seeds": runs, "mean_gain": statistics.mean(gains), "worst_gain": min(gains),
                  "max_kl_to_reference": max(r["kl_to_reference"] for r in runs),
                  "ok": (statistics.mean(gains) >= need and min(gains) >= worst_need
                         and all(r["kl_to_reference"] < 5.0 for r in runs))}
        results.append(result)
        print(f"learning {task} {algo}: mean gain {result['mean_gain']:.3f}, worst {result['worst_gain']:.3f}, "
              f"ok={result['ok']}", file=sys.stderr)
    return results


# --- speed workers (each in its own process) ---------------------------------------------------
def worker_ours(steps: int, **overrides) -> dict:
    _, rows = run("reinforce", "positive-review", steps + 1, **overrides)
    times = [r["time/step_s"] for r in rows[1:]]  # the first step warms caches up
    return {"step_s": statistics.median(times), "steps": times}


def worker_ours_lora(steps: int) -> dict:
    """The same step with LoRA adapters of rank 16 (the reference is the adapter switched off)."""
    return worker_ours(steps, lora_r=16)


def worker_ours_bf16(steps: int) -> dict:
    """The same step under bfloat16 autocast (dtype=bfloat16): fast where the CPU has AVX-512-BF16
    or AMX, slow where bfloat16 is emulated."""
    return worker_ours(steps, dtype="bfloat16")


def worker_sampling(steps: int) -> dict:
    """Our sampling (policy.generate: shared prefill, old log-probs from the sampling pass) against
    plain transformers `generate` of the same 16 completions (4 prompts x 4, every row prefilled),
    both forced to the full 32 tokens, alternating in one process; median seconds of each."""
    from policygrad.lm.rollout import LMWorkload
    cfg = resolve({}, {}, {"task": "positive-review"})
    torch.set_num_threads(threads_per_rank(cfg.torch_threads, one_thread=False))
    work = LMWorkload(cfg, 1)
    policy, rows = work.policy, work.task.rows("train")
    ours, plain = [], []
    for i in range(steps + 1):
        texts = [policy.render(rows[(4 * i + j // 4) % len(rows)]) for j in range(16)]
        t0 = time.perf_counter()
        policy.generate(texts, cfg, seed=i, samples_per_prompt=4, min_new_tokens=cfg.max_new_tokens)
        t1 = time.perf_counter()
        enc = policy.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=policy.add_special_tokens)
        with torch.no_grad():
            policy.model.generate(**enc, do_sample=True, temperature=cfg.temperature, top_k=0,
                                  max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens,
                                  pad_token_id=policy.tokenizer.pad_token_id)
        t2 = time.perf_counter()
        if i:
            ours.append(t1 - t0)
            plain.append(t2 - t1)
    return {"ours_s": statistics.median(ours), "plain_generate_s": statistics.median(plain),
            "plain_over_ours": round(statistics.median(plain) / statistics.median(ours), 3)}


def worker_ours_checkpointing(steps: int) -> dict:
    """The same step with gradient_checkpointing=true (every training pass plain, checkpointed)."""
    return worker_ours(steps, gradient_checkpointing=True)


def floor_times(share_prompts: bool, steps: int) -> dict:
    """Median seconds of one batched generate of 16 completions (4 prompts x 4) plus one
    forward/backward over them: no reference model, no rewards, no optimiser step."""
    from policygrad.lm.rollout import LMWorkload
    cfg = resolve({}, {"share_prompts": share_prompts}, {"task": "positive-review"})
    torch.set_num_threads(threads_per_rank(cfg.torch_threads, one_thread=False))
    work = LMWorkload(cfg, 1)
    rows = work.task.rows("train")
    gen, fb = [], []
    for i in range(steps + 1):
        texts = [work.policy.render(rows[(4 * i + j // 4) % len(rows)]) for j in range(16)]
        t0 = time.perf_counter()
        batch = work.policy.generate(texts, cfg, seed=i, samples_per_prompt=4)
        t1 = time.perf_counter()
        log_prob, _, _ = work.policy.evaluate(batch, entropy_grad=False)
        (-(log_prob.sum())).backward()
        work.policy.model.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if i:
            gen.append(t1 - t0)
            fb.append(t2 - t1)
    return {"step_s": statistics.median(g + f for g, f in zip(gen, fb)),
            "generate_s": statistics.median(gen), "forward_backward_s": statistics.median(fb)}


def worker_floor(steps: int) -> dict:
    """The floor: every row's generate and forward/backward in full (share_prompts=false, as
    anyone would write it; no gradient checkpointing, the default)."""
    return floor_times(False, steps)


def worker_floor_shared(steps: int) -> dict:
    """The same work with the shared-prompt passes a training step uses: what a step adds on top
    of it is the reference pass, the rewards and the optimiser."""
    return floor_times(True, steps)


def worker_trl(steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from policygrad.lm import models, tasks
    torch.set_num_threads(2)
    path = models.resolve("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = tasks.builtin("positive-review").rows("train")
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])
    analyzer = SentimentIntensityAnalyzer()

    def vader(completions, **kwargs):
        return [analyzer.polarity_scores(c[0]["content"] if isinstance(c, list) else c)["compound"]
                for c in completions]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, per_device_train_batch_size=16, num_generations=4,
                          max_completion_length=32, learning_rate=1e-5, max_steps=steps + 1,
                          gradient_checkpointing=True, bf16=False, use_cpu=True, report_to=[],
                          logging_steps=1000, save_strategy="no", temperature=1.0, beta=0.05)
        trainer = GRPOTrainer(model=model, reward_funcs=vader, args=args, train_dataset=data,
                              processing_class=tokenizer, callbacks=[timer])
        trainer.train()
    return {"step_s": statistics.median(timer.times[1:]), "steps": timer.times}


WORKERS = {"ours": worker_ours, "floor": worker_floor, "floor_shared": worker_floor_shared, "trl": worker_trl,
           "ours_checkpointing": worker_ours_checkpointing, "ours_lora": worker_ours_lora,
           "sampling": worker_sampling, "ours_bf16": worker_ours_bf16}


def spawn(name: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(steps)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def speed(steps: int) -> dict:
    names = ("ours", "ours_lora", "ours_bf16", "floor", "floor_shared", "trl", "sampling")
    ours, lora, bf16, floor, shared, trl, sampling = (spawn(n, steps) for n in names)
    result = {"ours": ours, "ours_lora": lora, "ours_bf16": bf16, "floor": floor, "floor_shared": shared,
              "trl": trl, "sampling": sampling}
    if "step_s" in ours and "step_s" in lora:
        result["lora_over_full_step"] = round(lora["step_s"] / ours["step_s"], 3)
        result["lora_over_full_peak_rss"] = round(lora["peak_rss_mb"] / ours["peak_rss_mb"], 3)
    if "step_s" in ours and "step_s" in floor:
        result["ours_over_floor"] = round(ours["step_s"] / floor["step_s"], 3)
    if "step_s" in ours and "step_s" in shared:
        result["ours_over_shared_floor"] = round(ours["step_s"] / shared["step_s"], 3)
    if "step_s" in ours and "step_s" in trl:
        result["trl_over_ours"] = round(trl["step_s"] / ours["step_s"], 3)
    return result


def cpu_name() -> str:
    """The processor the numbers come from (timings differ between machines of one kind)."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("learning", "speed", "memory"))
    parser.add_argument("--algos", default="reinforce,ppo,trpo")
    parser.add_argument("--seeds", default="1", help="learning: comma-separated seeds, e.g. 1,2,3")
    parser.add_argument("--arithmetic", action="store_true", help="also the arithmetic threshold")
    parser.add_argument("--steps", type=int, default=4, help="speed: timed steps per side")
    parser.add_argument("--lora", type=int, default=0, metavar="R", help="learning: LoRA adapters of rank R")
    parser.add_argument("--dtype", default="auto", help="learning: the runs' dtype (e.g. bfloat16)")
    parser.add_argument("--worker", choices=tuple(WORKERS))
    args = parser.parse_args()
    if args.worker:
        result = WORKERS[args.worker](args.steps)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    out: dict = {"benchmark": "lm", "cpu": cpu_name()}
    if args.only in (None, "learning"):
        out["learning"] = learning(args.algos.split(","), args.arithmetic, [int(s) for s in args.seeds.split(",")],
                                   args.lora, args.dtype)
    if args.only in (None, "speed"):
        out["speed"] = speed(args.steps)
    if args.only == "memory":
        out["memory"] = {name: spawn(name, args.steps) for name in ("ours", "ours_checkpointing")}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
