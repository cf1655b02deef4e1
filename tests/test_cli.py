"""The command line through a subprocess, with tiny budgets: a run, its evaluation, and bad input."""
import json
import os
import subprocess
import sys

import pytest

TINY = ["num_envs=2", "n_steps=16", "n_epochs=1", "batch_size=32", "eval_every=0", "eval_episodes=2"]


def policygrad(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "policygrad.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cp"
    r = policygrad("train", "--algo", "ppo", "--env", "CartPole-v1", "--total-steps", 96, "--seed", 1,
                   "--out", out, "--no-progress", *TINY)
    assert r.returncode == 0, r.stderr
    return out


def test_train_writes_config_metrics_and_checkpoint(trained_run):
    files = {p.name for p in trained_run.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "tb"} <= files
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["env_steps"] for r in rows] == [32, 64, 96]
    assert all({"time/elapsed_s", "train/episode_return_mean", "policy/loss", "value/loss"} <= r.keys()
               for r in rows)
    ckpt = trained_run / "checkpoints" / (trained_run / "checkpoints" / "latest").read_text().strip()
    # the final evaluation is of the final weights: the same episodes of the checkpoint, loaded
    # on its own, return the same
    from policygrad.control.rollout import evaluate
    from policygrad.trainer import load_workload
    work, cfg = load_workload(ckpt)
    final = json.loads((trained_run / "final_eval.json").read_text())
    again = evaluate(work.policy, "CartPole-v1", cfg.eval_episodes, seed=cfg.seed + 1_000_003)
    assert final["eval/return_mean"] == pytest.approx(float(again.mean()))
    assert final["eval/return_std"] == pytest.approx(float(again.std()))
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}
    assert any((trained_run / "tb").iterdir())


def test_eval_prints_json_last_with_the_returns_of_the_trained_policy(trained_run):
    r = policygrad("eval", trained_run, "--episodes", 5, "--seed", 7)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["episodes"] == 5 and result["checkpoint"] == "update-000003"
    assert list(result)[:3] == ["checkpoint", "env", "algo"] and result["algo"] == "ppo"
    from policygrad import checkpoint
    from policygrad.control.rollout import build_policy, evaluate
    from policygrad.trainer import load_workload
    work, cfg = load_workload(checkpoint.latest(trained_run))
    returns = evaluate(work.policy, "CartPole-v1", 5, seed=7)
    assert result["mean_return"] == pytest.approx(float(returns.mean()))
    assert (result["std_return"], result["min_return"], result["max_return"]) == pytest.approx(
        (float(returns.std()), float(returns.min()), float(returns.max())))
    # the weights eval loads are the trained ones, not a fresh initialisation from the same seed
    untrained = evaluate(build_policy(cfg, cfg.seed), "CartPole-v1", 5, seed=7)
    assert result["mean_return"] != pytest.approx(float(untrained.mean()))


def test_config_file_and_overrides_resolve(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("algo: trpo\nenv: Acrobot-v1\ngamma: 0.9\nmax_kl: 0.02\n")
    out = tmp_path / "run"
    r = policygrad("train", "--config", cfg_file, "--out", out, "--total-steps", 40, "max_kl=0.03", "value_lr=4e-5",
                   "--no-progress", "num_envs=2", "n_steps=20", "value_epochs=1", "eval_episodes=1")
    assert r.returncode == 0, r.stderr
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["algo"] == "trpo" and saved["env"] == "Acrobot-v1"
    assert saved["gamma"] == 0.9 and saved["max_kl"] == 0.03  # the file, then the override
    assert saved["value_lr"] == 4e-5  # PyYAML alone would read 4e-5 as a string
    assert saved["normalize_obs"] is True  # from the shipped Acrobot-v1 TRPO preset


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("policygrad: error:")
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("args, needles", [
    (["--env", "CartPol-v1"], ["CartPol-v1"]),
    (["--algo", "a2c"], ["a2c", "reinforce, trpo, ppo"]),
    (["gama=0.9"], ["gama", "did you mean 'gamma'", "valid keys"]),
    (["gamma=high"], ["gamma", "float"]),
    (["n_steps=2.5"], ["n_steps", "int"]),
    (["n_steps=1e9x"], ["n_steps", "int"]),
    (["gamma"], ["key=value"]),
    (["--total-steps", "0"], ["total_steps", "positive"]),
    (["--total-steps", "-5"], ["total_steps", "positive"]),
    (["hidden_sizes=64"], ["hidden_sizes", "list"]),
    (["--config", "missing.yaml"], ["missing.yaml", "not found"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
    (["--total-steps", "many"], ["--total-steps", "invalid int"]),
])
def test_bad_train_input_is_one_line_exit_2(tmp_path, args, needles):
    # a complete run first; args given after it win (argparse keeps an option's last value)
    r = policygrad("train", "--out", tmp_path / "run", "--algo", "ppo", "--env", "CartPole-v1", *args)
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "run").exists()


def test_out_holding_another_run_is_refused_and_left_alone(trained_run):
    before = {p: p.stat().st_mtime_ns for p in trained_run.rglob("*")}
    r = policygrad("train", "--algo", "trpo", "--env", "CartPole-v1", "--out", trained_run, "--total-steps", 32)
    assert_one_line_error(r, "different run", "--overwrite")
    assert {p: p.stat().st_mtime_ns for p in trained_run.rglob("*")} == before


def test_missing_and_corrupt_checkpoints(tmp_path, trained_run):
    assert_one_line_error(policygrad("eval", tmp_path / "nowhere"), "does not exist")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(policygrad("eval", tmp_path / "empty"), "no checkpoint")
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(trained_run, copy)
    ckpt = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()
    model = ckpt / "model.safetensors"
    model.write_bytes(model.read_bytes()[:50])
    assert_one_line_error(policygrad("eval", copy), "corrupt")
    model.unlink()
    assert_one_line_error(policygrad("eval", copy), "model.safetensors is missing")
    shutil.rmtree(copy)
    shutil.copytree(trained_run, copy)
    (ckpt / "state.json").write_text('{"config": {"gamma": "x"}}')
    assert_one_line_error(policygrad("eval", copy), "invalid config")


# --- language models --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    from lm_helpers import make_tiny_lm, write_task
    folder = tmp_path_factory.mktemp("lmcli")
    model = make_tiny_lm(folder / "tiny")
    write_task(folder, [{"prompt": f"Tell me about number {i}.", "answer": i} for i in range(20)],
               "data: prompts.jsonl\nrewards:\n  - last-number\n  - vader\n"
               "max_new_tokens: 5\nprompts_per_step: 2\nsamples_per_prompt: 2\n"
               "eval_prompts: 2\n")
    return folder, model


@pytest.fixture(scope="module")
def lm_run(lm_setup):
    folder, model = lm_setup
    out = folder / "run"
    r = policygrad("train", "--algo", "ppo", "--task", folder / "task.yaml", "--model", model, "--steps", 2,
                   "--out", out, "--no-progress", "eval_every=1")
    assert r.returncode == 0, r.stderr
    return out


def test_lm_run_writes_metrics_samples_and_a_plain_transformers_model(lm_run):
    rows = [json.loads(line) for line in (lm_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("train/reward_mean", "kl/to_reference", "time/step_s", "policy/clip_fraction",
                "policy/approx_kl", "policy/entropy", "train/completion_length", "time/tokens_per_s",
                "eval/reward_mean", "time/generate_s", "time/reward_s", "time/reference_s"):
        assert key in rows[-1], key
    assert rows[-1]["time/generate_s"] + rows[-1]["time/reference_s"] <= rows[-1]["time/collect_s"]
    samples = sorted((lm_run / "samples").iterdir())
    assert samples and json.loads(samples[0].read_text().splitlines()[0]).keys() == {"prompt", "completion", "reward"}
    from transformers import AutoModelForCausalLM
    ckpt = lm_run / "checkpoints" / (lm_run / "checkpoints" / "latest").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    assert model.config.vocab_size > 0


def test_lm_eval_sample_and_baseline(lm_setup, lm_run):
    folder, model = lm_setup
    r = policygrad("eval", lm_run, "--split", "test")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"mean_reward", "std_reward", "kl_to_reference", "n"} <= result.keys() and result["n"] == 2
    r = policygrad("eval", "--model", model, "--task", folder / "task.yaml", "--split", "validation")
    assert r.returncode == 0, r.stderr
    base = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(base["kl_to_reference"]) < 1e-4  # the untrained model is its own reference
    r = policygrad("eval", lm_run, "--split", "test", "--vs-base")
    assert r.returncode == 0, r.stderr
    assert "before:" in r.stdout and "after:" in r.stdout
    both = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"base_mean_reward", "mean_reward", "kl_to_reference", "n"} <= both.keys()
    r = policygrad("sample", lm_run, "--prompt", "Hello", "-n", "2")
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["prompt"] for line in r.stdout.splitlines()] == ["Hello", "Hello"]
    # truncated sampling is for sampling only: top-k 1 is greedy, the same completion for every seed
    greedy = [policygrad("sample", lm_run, "--prompt", "Hello", "--top-k", 1, "--top-p", 0.5, "--temperature", 0.7,
                         "--seed", seed) for seed in (0, 1)]
    assert all(g.returncode == 0 for g in greedy), greedy[0].stderr
    assert greedy[0].stdout == greedy[1].stdout
    r = policygrad("tasks")
    assert "positive-review" in r.stdout and "vader" in r.stdout


@pytest.mark.parametrize("make_args, needles", [
    (lambda f, m: ["--task", "nope", "--model", m], ["unknown task 'nope'"]),
    (lambda f, m: ["--task", f / "task.yaml", "--model", f / "nowhere"], ["unknown model"]),
    (lambda f, m: ["--task", f / "missing.yaml", "--model", m], ["task file", "not found"]),
    (lambda f, m: ["--task", "positive-review", "--model", m, "baseline=best"], ["baseline", "rloo"]),
    (lambda f, m: ["--task", f / "task.yaml", "--model", m, "advantage=gae"], ["advantage=gae", "use_value_head"]),
    (lambda f, m: ["--task", f / "task.yaml", "--model", m, "use_value_head=false", "advantage=gae"],
     ["advantage=gae", "use_value_head=true"]),
    (lambda f, m: ["--task", f / "task.yaml", "--model", m, "top_p=0.9"], ["top_p=0.9", "--top-p"]),
    (lambda f, m: ["--task", f / "task.yaml", "--model", m, "num_envs=4"], ["num_envs is a control key"]),
])
def test_bad_lm_input_is_one_line_exit_2(lm_setup, tmp_path, make_args, needles):
    folder, model = lm_setup
    r = policygrad("train", "--out", tmp_path / "run", "--algo", "ppo", *make_args(folder, model))
    assert_one_line_error(r, *needles)
    assert not (tmp_path / "run").exists()


def test_reward_that_raises_is_one_line(lm_setup, tmp_path):
    folder, model = lm_setup
    (tmp_path / "r.py").write_text("def bad(prompts, completions, **kw):\n    raise ValueError('boom')\n")
    (tmp_path / "t.yaml").write_text(f"data: {folder / 'prompts.jsonl'}\nrewards:\n  - python:r.py:bad\n"
                                     "max_new_tokens: 3\nprompts_per_step: 1\nsamples_per_prompt: 2\n")
    r = policygrad("train", "--out", tmp_path / "run", "--algo", "reinforce", "--task", tmp_path / "t.yaml",
                   "--model", model, "--steps", 1, "--no-progress")
    assert_one_line_error(r, "reward 'python:r.py:bad' raised ValueError: boom")


def test_help_opens_with_a_whole_sentence_and_version_prints_the_package_version():
    from policygrad import __version__
    r = policygrad("--help")
    assert r.returncode == 0
    description = r.stdout.split("\n\n")[1].replace("\n", " ")
    assert description.startswith("Train policies with REINFORCE, TRPO or PPO") and description.endswith(".")
    r = policygrad("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"policygrad {__version__}"


def test_wandb_logs_offline_into_the_run_folder(tmp_path):
    out = tmp_path / "wb"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    r = subprocess.run([sys.executable, "-m", "policygrad.cli", "train", "--algo", "ppo", "--env", "CartPole-v1",
                        "--total-steps", "64", "--out", str(out), "--no-progress", "--wandb", *TINY],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and (out / "wandb-id").read_text() in runs[0].name
    assert list(runs[0].glob("*.wandb")) and (out / "config.yaml").exists()


def test_plot_of_two_seeds_writes_an_image(trained_run, tmp_path):
    import shutil
    for seed in (1, 2):
        shutil.copytree(trained_run, tmp_path / f"cp-seed{seed}")
    r = policygrad("plot", tmp_path / "cp-seed1", tmp_path / "cp-seed2", "--metric", "train/episode_return_mean",
                   "--out", tmp_path / "curves.png")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["groups"] == {"cp": 2}
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_serve_reward_answers_what_the_reward_computes_locally(tmp_path):
    import socket
    import urllib.request

    from policygrad.lm.rewards import RewardSet, build
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "policygrad.cli", "serve-reward", "--reward", "vader",
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in proc.stderr.readline()
        completions = ["What a wonderful, moving film!", "Dull and far too long."]
        body = json.dumps({"prompts": ["Review it."] * 2, "completions": completions}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as answer:
            remote = json.loads(answer.read())["rewards"]
        local = RewardSet([build("vader")])(["Review it."] * 2, completions, {})
        assert remote == local.tolist() and remote[0] > 0 > remote[1]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
