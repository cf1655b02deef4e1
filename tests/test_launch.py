"""Launching several processes: torchrun and `train --nproc` start the same thing."""
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ARGS = ["--algo", "ppo", "--env", "CartPole-v1", "--total-steps", "1024", "--seed", "4", "--no-progress",
        "num_envs=4", "n_steps=64", "batch_size=64", "n_epochs=2", "eval_every=512", "normalize_obs=true"]


def rows_without_timings(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_torchrun_and_nproc_train_the_same_run(tmp_path):
    """`torchrun --nproc-per-node 2 -m policygrad train` and `policygrad train --nproc 2` give the
    same metrics (every non-time value) and the same weights; rank 0 alone writes the run folder."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "policygrad", "train", "--out", str(tmp_path / "torchrun"), *ARGS]
    ours = [sys.executable, "-m", "policygrad", "train", "--nproc", "2", "--out", str(tmp_path / "nproc"), *ARGS]
    for cmd in (torchrun, ours):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    a, b = tmp_path / "torchrun", tmp_path / "nproc"
    assert rows_without_timings(a) == rows_without_timings(b)
    assert len(rows_without_timings(a)) == 4 and "eval/return_mean" in rows_without_timings(a)[1]
    assert all("time/collective_s" in json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines())
    wa, wb = (load_file(str(x / "checkpoints" / "update-000004" / "model.safetensors")) for x in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    state = json.loads((b / "checkpoints" / "update-000004" / "state.json").read_text())
    assert state["world"] == 2 and len(state["other_ranks"]) == 1
    assert state["other_ranks"][0]["rng"] != state["rng"]  # each rank its own streams


def test_the_global_batch_is_the_same_at_one_process_and_at_two(tmp_path):
    """num_envs is the global count: 2 processes step 2 environments each, and each update counts
    the same 256 environment steps as one process stepping 4."""
    for n in (1, 2):
        r = subprocess.run([sys.executable, "-m", "policygrad", "train", "--nproc", str(n), "--out",
                            str(tmp_path / str(n)), *ARGS], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert [x["env_steps"] for x in rows_without_timings(tmp_path / str(n))] == [256, 512, 768, 1024]
        state = json.loads((tmp_path / str(n) / "checkpoints" / "update-000004" / "state.json").read_text())
        assert state["world"] == n


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_a_rank_that_fails_alone_says_so_in_one_line_and_the_run_stops(tmp_path, tiny_lm, shard):
    """A reward that raises on rank 1 only: rank 1 reports it with its rank, rank 0 (waiting in a
    collective: ours, or FSDP's gather) says it lost it, and the command ends with exit code 2, no
    traceback."""
    from lm_helpers import write_task
    (tmp_path / "rewards.py").write_text(
        "import os\n"
        "def picky(prompts, completions):\n"
        "    if os.environ.get('RANK') == '1':\n"
        "        raise ValueError('rank-one trouble')\n"
        "    return [0.0 for _ in completions]\n")
    task = write_task(tmp_path, [{"prompt": f"Say {i}."} for i in range(12)],
                      "data: prompts.jsonl\nrewards: ['python:rewards.py:picky']\nmax_new_tokens: 4\n")
    r = subprocess.run([sys.executable, "-m", "policygrad", "train", "--nproc", "2", "--algo", "reinforce",
                        "--task", str(task), "--model", str(tiny_lm), "--steps", "2", "--no-progress",
                        "--out", str(tmp_path / "run"), f"shard={shard}"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("policygrad: error:")]
    assert any(line.startswith("policygrad: error: rank 1:") and "rank-one trouble" in line for line in lines), r.stderr


def test_stop_at_return_stops_every_rank_together(tmp_path):
    """stop_at_return reads every rank's last 20 episodes: both ranks stop after the same update,
    long before the budget, and the run ends normally."""
    r = subprocess.run([sys.executable, "-m", "policygrad", "train", "--nproc", "2", "--out", str(tmp_path / "run"),
                        *ARGS[:5], "100000", *ARGS[6:], "stop_at_return=15"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    rows = rows_without_timings(tmp_path / "run")
    assert rows[-1]["env_steps"] < 100_000 and rows[-1]["train/episode_return_mean"] >= 15
    assert (tmp_path / "run" / "final_eval.json").is_file()
