"""What checkpointing costs a language-model run: the same REINFORCE run on the default model with a
checkpoint after every update and with none until the end.

    python benchmarks/checkpoint.py [--steps 6] [--repeats 2]

The cost per update is the mean gap between consecutive updates' `time/elapsed_s` in metrics.jsonl,
which covers collecting, learning, logging and the checkpoint written after the previous update. The
two settings alternate, `--repeats` times each, in one process. The last line printed is one JSON
object; the issue's bar is a ratio of at most 1.10.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from policygrad.resolve import resolve
from policygrad.trainer import train


def seconds_per_update(checkpoint_every: int, steps: int) -> tuple[float, dict]:
    cfg = resolve({}, {"eval_every": 0, "checkpoint_every": checkpoint_every},
                  {"algo": "reinforce", "task": "positive-review", "total_steps": steps, "seed": 1})
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp), progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        ckpt = next((Path(tmp) / "checkpoints").glob("update-*"))
        size = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    elapsed = [r["time/elapsed_s"] for r in rows]
    gaps = [b - a for a, b in zip(elapsed, elapsed[1:])]
    return statistics.mean(gaps), {"checkpoint_mb": round(size / 2**20)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    every, never, info = [], [], {}
    for _ in range(args.repeats):
        s, info = seconds_per_update(1, args.steps)
        every.append(s)
        never.append(seconds_per_update(0, args.steps)[0])
        print(f"per update: checkpoint every step {s:.2f} s, none {never[-1]:.2f} s", flush=True)
    ratio = statistics.mean(every) / statistics.mean(never)
    print(json.dumps({"benchmark": "checkpoint_cost", "model": "smollm2-135m", "steps": args.steps,
                      "repeats": args.repeats, "s_per_update_every_step": round(statistics.mean(every), 3),
                      "s_per_update_no_checkpoint": round(statistics.mean(never), 3), "ratio": round(ratio, 3),
                      "pass": ratio <= 1.10, **info}))


if __name__ == "__main__":
    main()
