"""Integration on the real default model (SmolLM2-135M-Instruct) and a learning check on CartPole.
Marked slow; `make test` still runs them."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "trpo"])
def test_two_steps_of_each_algorithm_on_the_default_model(tmp_path, algo):
    out = tmp_path / algo
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "policygrad.cli", "train", "--algo", algo, "--task",
                        "positive-review", "--steps", "2", "--out", str(out), "--no-progress",
                        "prompts_per_step=2", "samples_per_prompt=2", "max_new_tokens=8", "eval_every=0",
                        "--seed", "1"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["train/completion_length"] > 0 for r in rows)
    final = json.loads((out / "final_eval.json").read_text())
    assert final["test/n"] == 32 and -1.0 <= final["test/reward_mean"] <= 1.0


def test_ppo_learns_cartpole(tmp_path):
    from policygrad.config import resolve
    from policygrad.trainer import train
    cfg = resolve({}, {"eval_episodes": 10, "eval_every": 0}, {"algo": "ppo", "env": "CartPole-v1",
                                                               "total_steps": 60_000, "seed": 1})
    summary = train(cfg, tmp_path, progress=False)
    assert summary["final_eval_return_mean"] >= 400
