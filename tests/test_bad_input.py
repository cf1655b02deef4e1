"""Every bad input answered: exit code 2, one line naming the problem, no traceback, and any run
folder the command was pointed at left exactly as it was.

The CLI's entry point `policygrad.cli.main` runs in this process (an uncaught exception fails the
test just as a traceback would); test_cli.py runs the same entry point through subprocesses.
"""
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from policygrad.cli import main
from policygrad.runs import check_run_named

RUN_YAML = "algo: ppo\nenv: CartPole-v1\n"
CONTROL = ["--algo", "ppo", "--env", "CartPole-v1", "--total-steps", "64", "--no-progress", "num_envs=2",
           "n_steps=16", "batch_size=32", "n_epochs=1", "eval_every=0", "checkpoint_every=1"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: list, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished control run, a finished tiny-LM run, a task folder with good and bad rewards."""
    from lm_helpers import make_tiny_lm
    root = tmp_path_factory.mktemp("bad-input")
    assert main(["train", *CONTROL, "--out", str(root / "control")]) == 0
    model = make_tiny_lm(root / "tiny")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(12):
            f.write(json.dumps({"prompt": f"Count to {i}."}) + "\n")
    (root / "bad.jsonl").write_text('{"prompt": "fine"}\n{"prompt": "cut\n')
    (root / "noprompt.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    (root / "long.jsonl").write_text("".join(json.dumps({"prompt": "word " * 200 + str(i)}) + "\n" for i in range(3)))
    (root / "r.py").write_text(
        "import time\n"
        "def raises(prompts, completions, **kw):\n    raise ValueError('boom')\n"
        "def short(prompts, completions, **kw):\n    return [0.0]\n"
        "def nan(prompts, completions, **kw):\n    return [float('nan')] * len(completions)\n"
        "def hangs(prompts, completions, **kw):\n    time.sleep(60)\n"
        "def huge(prompts, completions, **kw):\n    return [1e300 * (i % 2 + 1) for i in range(len(completions))]\n")
    assert main(["train", "--algo", "reinforce", "--task", str(task(root, "vader")), "--model", str(model),
                 "--steps", "2", "--no-progress", "--out", str(root / "lm"), "eval_every=1"]) == 0
    return root, model


def task(root: Path, reward: str, data: str = "prompts.jsonl", extra: str = "") -> Path:
    name = "".join(c if c.isalnum() else "_" for c in reward + data + extra)[:80]
    path = root / f"task_{name}.yaml"
    path.write_text(f"data: {data}\nrewards:\n  - \"{reward}\"\nmax_new_tokens: 4\nprompts_per_step: 2\n"
                    f"samples_per_prompt: 2\neval_prompts: 2\n{extra}")
    return path


def lm_train(root, model, reward="vader", data="prompts.jsonl", extra="", *more):
    return ["train", "--algo", "reinforce", "--task", task(root, reward, data, extra), "--model", model,
            "--steps", 2, "--no-progress", *more]


def latest(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(8, path.stat().st_size // 3)])


def edit_state(run: Path, change) -> None:
    path = latest(run) / "state.json"
    state = json.loads(path.read_text())
    change(state)
    path.write_text(json.dumps(state))


# Each case: (argv from (root, model, fresh_out, existing_run_copy), text the line must contain,
#             a change to make to the run copy first or None, whether the command targets the copy).
CASES = {
    # config keys and values
    "unknown key": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "gama=0.9"], "did you mean 'gamma'"),
    "wrong type": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "lr=fast"], "'lr' must be float"),
    "not positive": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "lr=-1"], "lr"),
    "outside [0, 1]": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "gamma=1.5"], "gamma"),
    "bad choice": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "advantage=td"], "advantage"),
    "list expected": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "hidden_sizes=64"], "list"),
    "negative checkpoint_every": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "checkpoint_every=-1"],
                                  "checkpoint_every"),
    "override without =": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "gamma"], "key=value"),
    "unknown algo": (lambda r, m, o, c: ["train", "--algo", "a2c", "--env", "CartPole-v1", "--out", o], "a2c"),
    "unknown env": (lambda r, m, o, c: ["train", "--algo", "ppo", "--env", "CartPol-v1", "--out", o], "CartPol-v1"),
    "unknown flag": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "--bogus"], "--bogus"),
    "config file missing": (lambda r, m, o, c: ["train", "--config", r / "nope.yaml", "--out", o], "not found"),
    "config file not YAML": (lambda r, m, o, c: ["train", "--config", write(r / "bad.yaml", "a: [1,\n"),
                                                 "--out", o], "bad.yaml"),
    "config file not a mapping": (lambda r, m, o, c: ["train", "--config", write(r / "list.yaml", "- 1\n"),
                                                      "--out", o], "list.yaml"),
    "config file unknown key": (lambda r, m, o, c: ["train", "--config", write(r / "k.yaml", RUN_YAML + "lrate: 1\n"),
                                                    "--out", o], "lrate"),
    "no --out": (lambda r, m, o, c: ["train", *CONTROL], "--out"),
    "--out is a file": (lambda r, m, o, c: ["train", *CONTROL, "--out", write(r / "afile", "x")], "is a file"),
    # a run named in full: an algorithm and one of env or task, from flags, --config or overrides
    "train names no run": (lambda r, m, o, c: ["train", "--out", o], "--env ENV"),
    "train names an algo only": (lambda r, m, o, c: ["train", "--algo", "ppo", "--out", o], "--task TASK"),
    "train env without algo": (lambda r, m, o, c: ["train", "--env", "CartPole-v1", "--out", o], "needs --algo"),
    "train task without algo": (lambda r, m, o, c: ["train", "--task", "positive-review", "--model", m, "--out", o],
                                "needs --algo"),
    "train overrides without algo": (lambda r, m, o, c: ["train", "env=CartPole-v1", "--out", o], "needs --algo"),
    "train --env and --task": (lambda r, m, o, c: ["train", "--algo", "ppo", "--env", "CartPole-v1", "--task",
                                                   "positive-review", "--out", o], "not both"),
    "train --env, --task and --model": (lambda r, m, o, c: ["train", "--algo", "ppo", "--env", "CartPole-v1",
                                                            "--task", "positive-review", "--model", m, "--out", o],
                                        "not both"),
    "train --model with --env": (lambda r, m, o, c: ["train", "--algo", "ppo", "--env", "CartPole-v1", "--model", m,
                                                     "--out", o], "drop --model"),
    "train --model alone": (lambda r, m, o, c: ["train", "--algo", "ppo", "--model", m, "--out", o], "--env ENV"),
    "train env in file, --task": (lambda r, m, o, c: ["train", "--config", write(r / "e.yaml", RUN_YAML),
                                                      "--task", "positive-review", "--out", o], "not both"),
    "train task override, --env": (lambda r, m, o, c: ["train", "--algo", "ppo", "--env", "CartPole-v1",
                                                       "task=positive-review", "--out", o], "not both"),
    "train model override, env": (lambda r, m, o, c: ["train", "--algo", "ppo", "--env", "CartPole-v1",
                                                      f"model={m}", "--out", o], "drop --model"),
    "--resume with --algo": (lambda r, m, o, c: ["train", "--resume", c, "--algo", "trpo"], "drop --algo"),
    "--resume with --env": (lambda r, m, o, c: ["train", "--resume", c, "--env", "Acrobot-v1"], "drop --env"),
    "--resume with --task and --model": (lambda r, m, o, c: ["train", "--resume", c, "--task", "positive-review",
                                                             "--model", m], "drop --task --model"),
    "--resume with --config and override": (lambda r, m, o, c: ["train", "--resume", c, "--config",
                                                                write(r / "e.yaml", RUN_YAML), "lr=0.1"],
                                            "drop --config lr=0.1"),
    # keys that do not fit together (tests/test_config.py has every rule)
    "sequence advantage on control": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "advantage=sequence"],
                                      "advantage=sequence"),
    "LM key on control": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "kl_coef=0.1"],
                          "kl_coef is a language-model key; this is a control run (env CartPole-v1)"),
    "PPO key with TRPO": (lambda r, m, o, c: ["train", "--algo", "trpo", "--env", "CartPole-v1", "target_kl=0.01",
                                              "--out", o], "target_kl"),
    "LM gae without value head": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "advantage=gae",
                                                      "use_value_head=false"], "use_value_head=true"),
    "LM rloo with one sample": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "samples_per_prompt=1"],
                                "samples_per_prompt >= 2"),
    "LM trains with top_k": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "top_k=5"], "--top-k"),
    "LM dynamic sampling with one sample": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "dynamic_sampling=true",
                                                                "samples_per_prompt=1"], "dynamic_sampling=true"),
    "LM max_draws 0": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "dynamic_sampling=true", "max_draws=0"],
                       "max_draws must be positive"),
    "LM dynamic sampling on a text env": (lambda r, m, o, c: ["train", "--algo", "ppo", "--task", "guess-number",
                                                              "--model", m, "--steps", 1, "--no-progress", "--out", o,
                                                              "dynamic_sampling=true"],
                                          "dynamic_sampling=true drops prompt groups"),
    "LM adaptive KL from 0": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "adaptive_kl=true", "kl_coef=0"],
                              "kl_coef > 0"),
    # run folders and checkpoints
    "--out holds another run": (lambda r, m, o, c: ["train", *CONTROL, "--out", c, "lr=0.01"], "different run"),
    "--resume not a run": (lambda r, m, o, c: ["train", "--resume", r], "no config.yaml"),
    "--resume with flags": (lambda r, m, o, c: ["train", "--resume", c, "--seed", 4], "drop --seed"),
    "--resume config.yaml corrupt": (lambda r, m, o, c: ["train", "--resume", c], "config.yaml",
                                     lambda c: write(c / "config.yaml", "algo: [ppo\n")),
    "eval missing folder": (lambda r, m, o, c: ["eval", r / "nowhere"], "does not exist"),
    "eval no checkpoint": (lambda r, m, o, c: ["eval", mkdir(r / "empty")], "no checkpoint"),
    "eval unknown checkpoint": (lambda r, m, o, c: ["eval", c, "--checkpoint", "update-999"], "update-999"),
    "eval truncated weights": (lambda r, m, o, c: ["eval", c], "corrupt",
                               lambda c: truncate(latest(c) / "model.safetensors")),
    "eval missing weights": (lambda r, m, o, c: ["eval", c], "model.safetensors is missing",
                             lambda c: (latest(c) / "model.safetensors").unlink()),
    "eval state.json not JSON": (lambda r, m, o, c: ["eval", c], "corrupt",
                                 lambda c: truncate(latest(c) / "state.json")),
    "eval tampered config": (lambda r, m, o, c: ["eval", c], "invalid config",
                             lambda c: edit_state(c, lambda s: s["config"].update(gamma="x"))),
    "eval latest pointer tampered": (lambda r, m, o, c: ["eval", c], "does not name a checkpoint",
                                     lambda c: write(c / "checkpoints" / "latest", "../../etc")),
    "eval zero episodes": (lambda r, m, o, c: ["eval", c, "--episodes", 0], "--episodes"),
    "eval a run with --task": (lambda r, m, o, c: ["eval", c, "--task", "positive-review"], "drop the run or --task"),
    "eval a run with --model": (lambda r, m, o, c: ["eval", c, "--model", m], "drop the run or --model"),
    "eval --vs-base without a run": (lambda r, m, o, c: ["eval", "--task", "positive-review", "--vs-base"],
                                     "give the run folder"),
    "resume truncated optimizer": (lambda r, m, o, c: ["train", "--resume", c], "corrupt",
                                   lambda c: truncate(latest(c) / "optimizer.safetensors")),
    "resume tampered counters": (lambda r, m, o, c: ["train", "--resume", c], "cannot be resumed",
                                 lambda c: (edit_state(c, lambda s: s["run"].update(update="ten")),
                                            (c / "final_eval.json").unlink())),
    "resume tampered optimizer state": (lambda r, m, o, c: ["train", "--resume", c], "cannot be resumed",
                                        lambda c: (edit_state(c, lambda s: s["optimizers"].clear()),
                                                   (c / "final_eval.json").unlink())),
    "sample on a control run": (lambda r, m, o, c: ["sample", c, "--prompt", "hi"], "control policy"),
    "sample -n 0": (lambda r, m, o, c: ["sample", r / "lm", "--prompt", "hi", "-n", 0], "(-n) must be positive"),
    "sample --top-p 0": (lambda r, m, o, c: ["sample", r / "lm", "--prompt", "hi", "--top-p", 0], "--top-p"),
    "sample --top-p above 1": (lambda r, m, o, c: ["sample", r / "lm", "--prompt", "hi", "--top-p", 1.5], "(0, 1]"),
    "sample --top-k negative": (lambda r, m, o, c: ["sample", r / "lm", "--prompt", "hi", "--top-k", -1], "--top-k"),
    "sample --temperature 0": (lambda r, m, o, c: ["sample", r / "lm", "--prompt", "hi", "--temperature", 0],
                               "--temperature"),
    # text tasks, data and models
    "unknown task": (lambda r, m, o, c: ["train", "--algo", "ppo", "--task", "nope", "--model", m, "--out", o],
                     "unknown task"),
    "unknown model": (lambda r, m, o, c: ["train", "--algo", "ppo", "--task", "positive-review", "--model",
                                          r / "nomodel", "--out", o], "unknown model"),
    "task file missing": (lambda r, m, o, c: ["train", "--algo", "ppo", "--task", r / "none.yaml", "--model", m,
                                              "--out", o], "not found"),
    "data file missing": (lambda r, m, o, c: [*lm_train(r, m, data="absent.jsonl"), "--out", o], "absent.jsonl"),
    "data line malformed": (lambda r, m, o, c: [*lm_train(r, m, data="bad.jsonl"), "--out", o], "bad.jsonl:2"),
    "no prompt column": (lambda r, m, o, c: [*lm_train(r, m, data="noprompt.jsonl"), "--out", o], "'prompt'"),
    "prompt longer than context": (lambda r, m, o, c: [*lm_train(r, m, data="long.jsonl"), "--out", o],
                                   "context"),
    "unknown reward": (lambda r, m, o, c: [*lm_train(r, m, reward="sentiment"), "--out", o], "unknown reward"),
    "reward file missing": (lambda r, m, o, c: [*lm_train(r, m, reward="python:none.py:f"), "--out", o],
                            "not found"),
    "reward function missing": (lambda r, m, o, c: [*lm_train(r, m, reward="python:r.py:absent"), "--out", o],
                                "'absent' not found"),
    "reward model not a classifier": (lambda r, m, o, c: [*lm_train(r, m, reward=f"rm:{m}"), "--out", o],
                                      "not a sequence-classification model"),
    "reward model folder missing": (lambda r, m, o, c: [*lm_train(r, m, reward="rm:no-such-folder"), "--out", o],
                                    "not a model folder"),
    "reward raises": (lambda r, m, o, c: [*lm_train(r, m, reward="python:r.py:raises"), "--out", o],
                      "raised ValueError: boom"),
    "reward wrong count": (lambda r, m, o, c: [*lm_train(r, m, reward="python:r.py:short"), "--out", o],
                           "returned 1 values"),
    "reward NaN": (lambda r, m, o, c: [*lm_train(r, m, reward="python:r.py:nan"), "--out", o], "nan"),
    "reward hangs": (lambda r, m, o, c: [*lm_train(r, m, reward="python:r.py:hangs", extra="reward_timeout: 1\n"),
                                         "--out", o], "did not answer within"),
    "reward server unreachable": (lambda r, m, o, c: [*lm_train(r, m, reward="http://127.0.0.1:9/score",
                                                                extra="reward_retries: 1\n"), "--out", o],
                                  "127.0.0.1:9"),
    "updates keep going non-finite": (lambda r, m, o, c: [*lm_train(r, m, reward="python:r.py:huge",
                                                                    extra="max_bad_updates: 2\n"), "--out", o],
                                      "non-finite"),
    # other commands
    "plot unknown metric": (lambda r, m, o, c: ["plot", c, "--metric", "eval/nothing", "--out", o / "c.png"],
                            "eval/nothing"),
    "plot bad format": (lambda r, m, o, c: ["plot", c, "--out", o / "c.xyz"], ".xyz"),
    "serve-reward without reward": (lambda r, m, o, c: ["serve-reward", "--port", 8123], "--task"),
    "serve-reward unknown reward": (lambda r, m, o, c: ["serve-reward", "--reward", "nope"], "unknown reward"),
    # processes (checked before any process starts)
    "--nproc beyond the batch": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "--nproc", 4],
                                 "4 processes need at least 4 num_envs"),
    "--nproc not dividing the batch": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "--nproc", 2, "num_envs=3"],
                                       "num_envs=3 does not split evenly over 2 processes"),
    "--nproc 0": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "--nproc", 0], "--nproc must be at least 1"),
    "shard=fsdp on control": (lambda r, m, o, c: ["train", *CONTROL, "--out", o, "shard=fsdp"],
                              "shard=fsdp splits a language model"),
    "shard=fsdp in one process": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "shard=fsdp"],
                                  "this run is one process"),
    "shard=fsdp with TRPO": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "--algo", "trpo", "shard=fsdp",
                                                 "--nproc", 2], "shard=fsdp with TRPO's fvp=exact"),
    "shard=fsdp with float16": (lambda r, m, o, c: [*lm_train(r, m), "--out", o, "shard=fsdp", "dtype=float16",
                                                    "--nproc", 2], "shard=fsdp with dtype=float16"),
    "resume at another process count": (lambda r, m, o, c: ["train", "--resume", c, "--nproc", 2],
                                        "written by 1 process(es)"),
    # tasks from the ecosystem (the tasks extra)
    "unknown reasoning-gym generator": (lambda r, m, o, c: [*eco_train("reasoning-gym:chain_summ", m), "--out", o],
                                        "no generator 'chain_summ'; did you mean chain_sum"),
    "bad reasoning-gym options": (lambda r, m, o, c: [*eco_train(write(r / "rg.yaml", "reasoning_gym:\n  chain_sum: "
                                                                       "{min_terms: 0}\n"), m), "--out", o],
                                  "bad generator options"),
    "unknown reasoning-gym option": (lambda r, m, o, c: [*eco_train(write(r / "rg2.yaml", "reasoning_gym:\n  "
                                                                          "chain_sum: {terms: 3}\n"), m), "--out", o],
                                     "unexpected keyword argument 'terms'"),
    "unknown TextArena game": (lambda r, m, o, c: [*eco_train("textarena:GuessTheNumbr-v0", m), "--out", o],
                               "did you mean GuessTheNumber-v0"),
    "TextArena game without its NLTK data": (lambda r, m, o, c: [*eco_train("textarena:Wordle-v0", m), "--out", o],
                                             "needs NLTK data 'words'"),
    "two-player TextArena game without an opponent": (
        lambda r, m, o, c: [*eco_train("textarena:IteratedRockPaperScissors-v0", m), "--out", o], "game for two"),
}


def eco_train(task, model) -> list:
    return ["train", "--algo", "reinforce", "--task", task, "--model", model, "--steps", 2, "--no-progress"]


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def mkdir(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    return path


def test_there_are_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_runs_alone(name, world, tmp_path, capsys):
    root, model = world
    make_argv, needle, *change = CASES[name]
    copy = tmp_path / "existing-run"
    shutil.copytree(root / "control", copy)
    if change:
        change[0](copy)
    before, before_lm = digest(copy), digest(root / "lm")
    out = tmp_path / "new-run"
    code, err = run_cli(make_argv(root, model, out, copy), capsys)
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("policygrad: error:"), err
    assert "Traceback" not in err
    assert needle in lines[0], lines[0]
    assert digest(copy) == before, "the existing run was changed"
    assert digest(root / "lm") == before_lm


@pytest.mark.parametrize("named", [
    {"algo": "ppo", "env": "CartPole-v1"},
    {"algo": "trpo", "task": "positive-review"},
    {"algo": "reinforce", "task": "positive-review", "model": "smollm2-135m"},
    {"algo": "ppo", "env": "CartPole-v1", "task": None, "model": None},  # flags not given
])
def test_a_run_named_in_full_is_accepted(named):
    check_run_named(named)
