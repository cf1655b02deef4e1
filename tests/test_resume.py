"""Killed and resumed = never stopped: SIGKILL a training process at random moments, resume it, and
compare with the same run left alone.

Language models (tiny LM, CPU): final weights, value head and every metrics.jsonl value except
wall-clock timings (time/*) must be identical, bit for bit. Control: the environments restart fresh
episodes on resume (documented), so weights differ; counters, the normaliser's count, Adam's step
and the metrics rows (each update exactly once) must match the uninterrupted run.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import policygrad
from policygrad.resolve import RECIPES

KILL_SEED = int(os.environ.get("POLICYGRAD_KILL_SEED", time.time_ns() % 1_000_000))


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "policygrad.cli", *map(str, args)]


def metric_lines(out) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def run_and_kill(cmd: list[str], out, after_lines: int, extra_delay: float) -> bool:
    """Start cmd; once metrics.jsonl has after_lines lines, wait extra_delay s and SIGKILL it.
    True if it was killed (False: it finished first)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while proc.poll() is None and metric_lines(out) < after_lines and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(extra_delay)
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read()
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def rows_without_timings(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def latest_checkpoint(out):
    return out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()


def interrupted_run(cmd: list[str], out, total_lines: int, resume_cmds: list[list[str]]) -> list[str]:
    """Kill cmd at three random moments (each after a random number of logged updates plus a random
    fraction of a step), resuming with resume_cmds in turn, then let the last resume finish."""
    rng = random.Random(KILL_SEED)
    targets = sorted(rng.sample(range(1, total_lines), 3))
    log, command = [], cmd
    for i, target in enumerate(targets):
        delay = rng.uniform(0.0, 0.4)
        killed = run_and_kill(command, out, target, delay)
        log.append(f"kill {i}: after line {target} + {delay:.2f}s -> {'killed' if killed else 'finished'}")
        command = resume_cmds[i % len(resume_cmds)]
    print("\n".join(log))
    assert any(line.endswith("killed") for line in log), log  # at least one kill landed mid-run
    r = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return log


def straight_and_killed(args: list, tmp_path, updates: int, resume_cmds=None) -> tuple:
    """The run of args left alone, and the same run killed three times and resumed (resume_cmds, by
    default `train --resume`): (straight, broken, the kills' log to print on a failure)."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    r = subprocess.run(cli("train", "--out", straight, *args), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    log = interrupted_run(cli("train", "--out", broken, *args), broken, updates,
                          resume_cmds or [cli("train", "--resume", broken, "--no-progress")])
    return straight, broken, f"POLICYGRAD_KILL_SEED={KILL_SEED}: " + "; ".join(log)


@pytest.fixture(scope="module")
def lm_task(tmp_path_factory):
    from lm_helpers import make_tiny_lm, write_task
    folder = tmp_path_factory.mktemp("resume-lm")
    model = make_tiny_lm(folder / "tiny")
    write_task(folder, [{"prompt": f"Say something about {i}."} for i in range(30)],
               "data: prompts.jsonl\nrewards:\n  - vader\n  - {reward: length, target: 6}\n"
               "max_new_tokens: 8\nprompts_per_step: 2\nsamples_per_prompt: 2\n"
               "eval_prompts: 3\n")
    return folder, model


# full fine-tuning in float32; a LoRA adapter (reference: the adapter off) in bfloat16 autocast;
# full fine-tuning as 2 processes (torch.distributed, gloo), each with one of the step's 2 prompts,
# replicated (ddp) or with weights, gradients and Adam moments split between them (fsdp)
LM_VARIANTS = {"full": ([], "policy/model.safetensors", []),
               "lora-bf16": (["lora_r=4", "lr=0.01", "dtype=bfloat16"], "policy/adapter_model.safetensors", []),
               "2-processes": ([], "policy/model.safetensors", ["--nproc", 2]),
               "2-processes-fsdp": (["shard=fsdp"], "policy/model.safetensors", ["--nproc", 2])}


@pytest.mark.parametrize("variant", list(LM_VARIANTS))
def test_lm_run_killed_three_times_ends_identical_to_uninterrupted(lm_task, tmp_path, variant):
    folder, model = lm_task
    steps = 10
    extra, weights, launch = LM_VARIANTS[variant]
    # PPO with a value head, adaptive KL and minibatch shuffling: every piece of state a resume needs
    args = ["--algo", "ppo", "--task", folder / "task.yaml", "--model", model, "--steps", steps, "--seed", 3,
            "--no-progress", "checkpoint_every=2", "eval_every=3", "use_value_head=true", "adaptive_kl=true",
            "batch_size=2", "n_epochs=2", *extra, *launch]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    r = subprocess.run(cli("train", "--out", straight, *args), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    log = interrupted_run(cli("train", "--out", broken, *args), broken, steps,
                          [cli("train", "--resume", broken, "--no-progress", *launch),
                           cli("train", "--out", broken, *args)])
    context = f"POLICYGRAD_KILL_SEED={KILL_SEED}: " + "; ".join(log)
    assert rows_without_timings(broken) == rows_without_timings(straight), context
    for name in (weights, "model.safetensors"):
        a, b = load_file(latest_checkpoint(straight) / name), load_file(latest_checkpoint(broken) / name)
        assert a.keys() == b.keys() and a, context
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs; {context}"
    assert json.loads((broken / "final_eval.json").read_text()) == json.loads((straight / "final_eval.json").read_text())
    # a finished run run again does nothing
    r = subprocess.run(cli("train", "--out", broken, *args), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "already complete" in r.stderr


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_run_killed_once_ends_identical_to_uninterrupted(lm_task, tmp_path, recipe):
    """Every recipe (issue #25) with its own keys, one process: 4 steps, a checkpoint after each, one
    SIGKILL of the command line's run after a random update (drawn per recipe), then the run resumed
    (policygrad.train(resume=...) or, every other recipe, the same call again) and compared with an
    uninterrupted run. One kill, not three: a recipe changes the loss and the advantages, not what a
    checkpoint holds, and the three-kill cases above test the machinery. The uninterrupted run and
    the resume are in this process (a process of its own costs ~7 s of imports; the killed run's
    rows, written by the command line, must still match them bit for bit)."""
    folder, model = lm_task
    steps = 4
    keys = {"recipe": recipe, "task": str(folder / "task.yaml"), "model": str(model), "steps": steps, "seed": 3,
            "checkpoint_every": 1, "eval_every": 2, "torch_threads": 1}
    if RECIPES[recipe]["algo"] != "reinforce":
        keys["batch_size"] = 2  # two minibatches an epoch: their shuffling is state to resume
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    cmd = cli("train", "--out", broken, "--no-progress", *[f"{k}={v}" for k, v in keys.items()])
    rng = random.Random(f"{KILL_SEED}/{recipe}")
    target, delay = rng.randrange(1, steps), rng.uniform(0.0, 0.1)  # a step takes ~0.1 s (or longer)
    context = f"POLICYGRAD_KILL_SEED={KILL_SEED}: kill after line {target} + {delay:.2f}s"
    assert run_and_kill(cmd, broken, target, delay), f"{context}: the run finished first"
    if list(RECIPES).index(recipe) % 2 == 0:
        policygrad.train(resume=broken, progress=False)
    else:
        policygrad.train(out=broken, progress=False, **keys)
    policygrad.train(out=straight, progress=False, **keys)
    torch.set_num_threads(1)  # train() set the run's own
    rows = rows_without_timings(straight)
    assert rows_without_timings(broken) == rows, context
    assert [r["update"] for r in rows] == list(range(1, steps + 1)) and "eval/reward_mean" in rows[1]
    for name in ("policy/model.safetensors", "optimizer.safetensors"):
        a, b = load_file(latest_checkpoint(straight) / name), load_file(latest_checkpoint(broken) / name)
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs; {context}"
    assert json.loads((broken / "final_eval.json").read_text()) == json.loads((straight / "final_eval.json").read_text())


def test_multi_turn_run_killed_three_times_ends_identical_to_uninterrupted(lm_task, tmp_path):
    """Episodes of guess-number (env seeds from the cursor, a sampling seed per turn), GAE over
    turns from a value head: the same bit-for-bit guarantee as single-turn runs."""
    folder, model = lm_task
    steps = 8
    args = ["--algo", "ppo", "--task", "guess-number", "--model", model, "--steps", steps, "--seed", 3,
            "--no-progress", "checkpoint_every=2", "eval_every=3", "use_value_head=true", "adaptive_kl=true",
            "batch_size=2", "n_epochs=2", "prompts_per_step=2", "samples_per_prompt=2", "max_turns=3",
            "max_new_tokens=4", "eval_prompts=3"]
    broken = tmp_path / "broken"
    straight, broken, context = straight_and_killed(args, tmp_path, steps, [cli("train", "--resume", broken, "--no-progress"),
                                                                           cli("train", "--out", broken, *args)])
    rows = rows_without_timings(straight)
    assert rows_without_timings(broken) == rows, context
    assert any("eval/episode/turns_mean" in r for r in rows) and all("episode/turns_mean" in r for r in rows
                                                                     if "train/reward_mean" in r)
    for name in ("policy/model.safetensors", "model.safetensors"):
        a, b = load_file(latest_checkpoint(straight) / name), load_file(latest_checkpoint(broken) / name)
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs; {context}"


def test_textarena_run_killed_three_times_ends_identical_to_uninterrupted(tmp_path_factory, tmp_path):
    """A TextArena game (its own random draws kept per env, lm/arena.py) resumes bit for bit too."""
    from lm_helpers import make_tiny_lm
    model = make_tiny_lm(tmp_path_factory.mktemp("arena") / "tiny", context=2048)
    steps = 6
    args = ["--algo", "reinforce", "--task", "textarena:GuessTheNumber-v0", "--model", model, "--steps", steps,
            "--seed", 4, "--no-progress", "checkpoint_every=2", "eval_every=3", "prompts_per_step=2",
            "samples_per_prompt=2", "max_turns=3", "max_new_tokens=4", "eval_prompts=2"]
    straight, broken, context = straight_and_killed(args, tmp_path, steps)
    rows = rows_without_timings(straight)
    assert rows_without_timings(broken) == rows, context
    assert all("episode/invalid_move_rate" in r for r in rows if "train/reward_mean" in r)
    a = load_file(latest_checkpoint(straight) / "policy/model.safetensors")
    b = load_file(latest_checkpoint(broken) / "policy/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), context


def test_control_run_killed_three_times_keeps_its_counters(tmp_path):
    updates = 16
    args = ["--algo", "ppo", "--env", "CartPole-v1", "--total-steps", updates * 128, "--seed", 2, "--no-progress",
            "num_envs=2", "n_steps=64", "batch_size=64", "n_epochs=2", "eval_every=0", "checkpoint_every=3",
            "normalize_obs=true"]
    straight, broken, context = straight_and_killed(args, tmp_path, updates)
    rows = rows_without_timings(broken)
    assert [r["update"] for r in rows] == list(range(1, updates + 1)), context
    assert [r["env_steps"] for r in rows] == [r["env_steps"] for r in rows_without_timings(straight)]
    episodes = [r["train/episodes"] for r in rows]
    assert episodes == sorted(episodes), context  # nothing already counted is lost
    a_state = json.loads((latest_checkpoint(straight) / "state.json").read_text())
    b_state = json.loads((latest_checkpoint(broken) / "state.json").read_text())
    assert a_state["run"] == b_state["run"], context
    a_model, b_model = load_file(latest_checkpoint(straight) / "model.safetensors"), \
        load_file(latest_checkpoint(broken) / "model.safetensors")
    assert torch.equal(a_model["obs_norm.count"], b_model["obs_norm.count"]), context
    a_opt, b_opt = load_file(latest_checkpoint(straight) / "optimizer.safetensors"), \
        load_file(latest_checkpoint(broken) / "optimizer.safetensors")
    steps = [k for k in a_opt if k.endswith(".step")]
    assert steps and all(torch.equal(a_opt[k], b_opt[k]) for k in steps), context


def test_dynamic_sampling_run_killed_ends_identical_to_uninterrupted(lm_task, tmp_path):
    """Dynamic sampling (issue #25): half the prompts get a reward that is the same for every
    completion, so steps drop groups and draw a second round, with its own seed; the cursor and the
    step count move with the extra draws, so a run killed once at a random moment and resumed draws,
    drops and trains exactly what the uninterrupted one does: with seed 9 every step draws two rounds
    and the second keeps no group at all (no update). Kept cheap: one kill, three steps, a checkpoint
    after each."""
    folder, model = lm_task
    (folder / "parity.py").write_text(
        "import zlib\n"
        "def parity(prompts, completions, answer):\n"
        "    return [1.0 if int(a) % 2 == 0 else zlib.crc32(c.encode()) / 2 ** 32\n"
        "            for c, a in zip(completions, answer)]\n")
    (folder / "parity.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {i}.", "answer": str(i)})
                                                 + "\n" for i in range(30)))
    (folder / "parity.yaml").write_text("data: parity.jsonl\nrewards: ['python:parity.py:parity']\n"
                                        "max_new_tokens: 6\nprompts_per_step: 2\nsamples_per_prompt: 2\n"
                                        "eval_prompts: 3\n")
    steps = 3
    args = ["--algo", "ppo", "--task", folder / "parity.yaml", "--model", model, "--steps", steps, "--seed", 9,
            "--no-progress", "checkpoint_every=1", "eval_every=2", "use_value_head=true", "adaptive_kl=true",
            "batch_size=2", "n_epochs=2", "dynamic_sampling=true", "max_draws=2"]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    r = subprocess.run(cli("train", "--out", straight, *args), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = rows_without_timings(straight)
    assert [(row["train/draws"], row["train/kept_groups"]) for row in rows] == [(2, 2), (2, 0), (2, 2)]
    rng = random.Random(KILL_SEED)
    target, delay = rng.randrange(1, steps), rng.uniform(0.0, 0.4)
    killed = run_and_kill(cli("train", "--out", broken, *args), broken, target, delay)
    context = f"POLICYGRAD_KILL_SEED={KILL_SEED}: after line {target} + {delay:.2f}s"
    assert killed, f"the run finished before the kill; {context}"
    r = subprocess.run(cli("train", "--resume", broken, "--no-progress"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert rows_without_timings(broken) == rows, context
    for name in ("policy/model.safetensors", "model.safetensors"):
        a, b = load_file(latest_checkpoint(straight) / name), load_file(latest_checkpoint(broken) / name)
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs; {context}"
