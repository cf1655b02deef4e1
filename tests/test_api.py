"""The Python API: the same runs as the CLI, objects where the CLI takes strings, results, callbacks
and errors a caller can catch."""
import json
import re
import sys

import gymnasium as gym
import pytest
import torch
from safetensors.torch import load_file

import policygrad
from policygrad import cli
from policygrad import config as config_mod
from policygrad import resolve as resolve_mod
from policygrad.runs import check_run_named

SMALL = {"total_steps": 3, "seed": 3, "eval_every": 2, "prompts_per_step": 2, "samples_per_prompt": 2,
         "checkpoint_every": 2}
ROWS = [{"prompt": f"Say something nice about item {i}.", "answer": str(i)} for i in range(30)]


def brevity(prompts, completions, answer):
    """conftest's task_file reward, as a Python function."""
    return [1.0 / (1 + len(c)) for c in completions]


def metrics_of(folder):
    """metrics.jsonl without wall-clock times, each reward's own metrics by position."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [by_position({k: v for k, v in row.items() if not k.startswith("time/")}) for row in rows]


def by_position(row: dict) -> dict:
    """`.../reward/NAME` keys as `.../reward/#i` in the rewards' order: the same reward is named
    `python:rewards.py:brevity` in a task file and `brevity` as a Python function."""
    out, seen = {}, {}
    for k, v in row.items():
        prefix, part, _ = k.partition("/reward/")
        if part:
            seen[prefix] = seen.get(prefix, 0) + 1
            k = f"{prefix}/reward/#{seen[prefix]}"
        out[k] = v
    return out


def final_weights(folder):
    return load_file(str(sorted((folder / "checkpoints").glob("update-*"))[-1] / "policy" / "model.safetensors"))


def assert_same_run(a, b):
    assert metrics_of(a) == metrics_of(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert by_position(json.loads((a / "final_eval.json").read_text())) == \
        by_position(json.loads((b / "final_eval.json").read_text()))


def cli_args(task, model, out):
    return ["train", "--algo", "reinforce", "--task", str(task), "--model", str(model), "--out", str(out),
            "--no-progress", *[f"{k}={v}" for k, v in SMALL.items()]]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, tiny_lm, task_file):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert cli.main(cli_args(task_file, tiny_lm, out)) == 0
    return out


def test_python_and_cli_train_the_same_run_bit_for_bit(cli_run, tmp_path, tiny_lm, task_file):
    """The CLI's run and policygrad.train with the same names, keys and seed: the same metrics,
    weights and final evaluation, bit for bit."""
    result = policygrad.train(algo="reinforce", task=str(task_file), model=str(tiny_lm), out=tmp_path / "py",
                              progress=False, **SMALL)
    assert_same_run(cli_run, tmp_path / "py")
    assert result.out == tmp_path / "py" and len(result.history) == 3
    assert isinstance(result.final, policygrad.LMEvaluation) and result.final.n == 3
    assert result.final.mean_reward == json.loads((cli_run / "final_eval.json").read_text())["test/reward_mean"]
    assert len(result.final.samples) == 3 and {"prompt", "completion", "reward"} <= set(result.final.samples[0])


def test_in_memory_rows_and_a_reward_function_train_as_the_task_file_does(cli_run, tmp_path, tiny_lm):
    """conftest's task_file (a JSONL file, VADER + 0.5 x a python: file reward) given as a list of
    dicts and functions: the same run, bit for bit."""
    result = policygrad.train(algo="reinforce", model=str(tiny_lm), data=ROWS, rewards=["vader", (brevity, 0.5)],
                              max_new_tokens=6, out=tmp_path / "rows", progress=False, **SMALL)
    assert_same_run(cli_run, tmp_path / "rows")
    assert result.config.task.startswith("custom@")


def test_a_dataset_dict_reward_closure_and_no_folder(tmp_path, tiny_lm):
    """A datasets.DatasetDict's splits, a closure over the caller's state, out=None: the result
    holds the trained transformers model, its tokenizer, the history and the test evaluation."""
    datasets = pytest.importorskip("datasets")
    data = datasets.DatasetDict({s: datasets.Dataset.from_list(ROWS[i::3]) for i, s in
                                 enumerate(("train", "validation", "test"))})
    seen = []

    def reward(prompts, completions, answer):
        seen.extend(answer)
        return [float(len(c) > 3) for c in completions]
    result = policygrad.train(algo="ppo", model=str(tiny_lm), data=data, rewards=reward, max_new_tokens=6,
                              progress=False, **{**SMALL, "total_steps": 2})
    from transformers import PreTrainedModel
    assert isinstance(result.policy, PreTrainedModel) and result.tokenizer is not None
    assert result.out is None and [row["update"] for row in result.history] == [1, 2]
    assert result.final.n == 10 and set(seen) <= {r["answer"] for r in ROWS}
    again = policygrad.evaluate(result)  # in memory, on the same prompts and seeds
    assert again.mean_reward == result.final.mean_reward
    samples = policygrad.sample(result, ["Hello", "Hi"], n=2)
    assert [s.prompt for s in samples] == ["Hello", "Hello", "Hi", "Hi"]


def test_a_model_object_is_kept_in_the_run_and_the_same_call_finds_it_complete(tmp_path, tiny_lm, task_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    kwargs = dict(algo="reinforce", task=str(task_file), model=model, tokenizer=tokenizer, out=tmp_path / "obj",
                  progress=False, **SMALL)
    first = policygrad.train(**kwargs)
    assert first.config.model == str((tmp_path / "obj").resolve() / "base-model")  # found from any folder
    assert (tmp_path / "obj" / "base-model" / "config.json").is_file()
    second = policygrad.train(**kwargs)
    assert second.was_complete and second.history == first.history and second.workload is None
    assert second.final.mean_reward == first.final.mean_reward
    trained = {k: v for k, v in first.policy.state_dict().items()}
    assert all(torch.equal(v, trained[k]) for k, v in second.policy.state_dict().items())  # loaded on demand
    # the folder is a run like any other: the CLI evaluates it
    folder = policygrad.evaluate(tmp_path / "obj", split="validation")
    assert folder.mean_reward == policygrad.evaluate(first, split="validation").mean_reward


def test_a_killed_python_run_resumes_exactly_with_its_reward_function(tmp_path, tiny_lm):
    """A callback that raises at update 3 stands for a crash after the checkpoint at update 2; the
    same call again resumes there and ends as the uninterrupted run does."""
    def crash(metrics):
        if metrics["update"] == 3:
            raise KeyboardInterrupt
    kwargs = dict(algo="reinforce", model=str(tiny_lm), data=ROWS, rewards=[brevity], max_new_tokens=6,
                  progress=False, **{**SMALL, "total_steps": 4})
    whole = policygrad.train(out=tmp_path / "whole", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        policygrad.train(out=tmp_path / "cut", callbacks=[crash], **kwargs)
    resumed = policygrad.train(resume=tmp_path / "cut", data=ROWS, rewards=[brevity], progress=False)
    assert not resumed.was_complete
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    assert [r["update"] for r in resumed.history] == [1, 2, 3, 4] == [r["update"] for r in whole.history]
    with pytest.raises(policygrad.UsageError, match="different run"):  # other rewards: another run
        policygrad.train(out=tmp_path / "cut", **{**kwargs, "rewards": ["vader"]})


def test_a_callback_sees_every_update_and_stops_the_run_cleanly(tmp_path, tiny_lm, task_file):
    seen = []

    def stop_at_two(metrics):
        seen.append(metrics["update"])
        return metrics["update"] == 2
    result = policygrad.train(algo="reinforce", task=str(task_file), model=str(tiny_lm), out=tmp_path / "cb",
                              callbacks=[stop_at_two, lambda m: None], progress=False,
                              **{**SMALL, "total_steps": 5})
    assert seen == [1, 2] and result.summary["updates"] == 2
    assert result.final is not None and (tmp_path / "cb" / "final_eval.json").is_file()
    assert policygrad.train(algo="reinforce", task=str(task_file), model=str(tiny_lm), out=tmp_path / "cb",
                            progress=False, **{**SMALL, "total_steps": 5}).was_complete


def test_an_env_factory_or_instance_trains_as_its_gymnasium_id(tmp_path):
    """CartPole by id, by a factory and by an instance: the same run (the instance is copied for
    each environment)."""
    cfg = policygrad.make_config(algo="ppo", env="CartPole-v1", total_steps=256, num_envs=2, n_steps=64,
                                 eval_every=0, eval_episodes=2)
    by_id = policygrad.train(cfg, out=tmp_path / "id", progress=False)
    policygrad.train(cfg, env=lambda: gym.make("CartPole-v1"), out=tmp_path / "factory", progress=False)
    policygrad.train(cfg, env=gym.make("CartPole-v1"), out=tmp_path / "instance", progress=False)
    for other in ("factory", "instance"):
        assert metrics_of(tmp_path / "id") == metrics_of(tmp_path / other)
    assert isinstance(by_id.final, policygrad.ControlEvaluation) and by_id.final.episodes == 2
    assert isinstance(by_id.policy, torch.nn.Module)
    played = policygrad.evaluate(by_id, episodes=3)
    assert played.episodes == 3 and len(played.returns) == 3


def test_the_clis_steps_is_total_steps_from_python_too():
    """`--steps` is the CLI's name for total_steps, and Python takes the CLI's names (#23: it was
    refused with a hint at n_steps, the rollout length); both names at once are one line."""
    small = dict(algo="ppo", env="CartPole-v1", num_envs=2, n_steps=64, eval_every=0, eval_episodes=2)
    assert policygrad.make_config(**small, steps=256) == policygrad.make_config(**small, total_steps=256)
    assert resolve_mod.resolve({"total_steps": 64}, {"steps": 256}, small).total_steps == 256  # layered
    assert policygrad.make_config(policygrad.make_config(**small), steps=256).total_steps == 256
    result = policygrad.train(**small, steps=128, progress=False)
    assert result.config.total_steps == 128 and result.summary["updates"] == 1
    for keys, words in (({"steps": 128, "total_steps": 256}, "'steps' and 'total_steps' both set total_steps"),
                        ({"step": 128}, "did you mean 'total_steps'?")):
        with pytest.raises(policygrad.ConfigError, match=re.escape(words)) as caught:
            policygrad.train(**small, **keys, progress=False)
        assert "\n" not in str(caught.value)


def test_a_text_env_is_a_task(tmp_path, tiny_lm):
    class Echo(gym.Env):
        def reset(self, *, seed=None, options=None):
            return f"Repeat the word {seed % 7}.", {}

        def step(self, action):
            return "", float(len(action) > 2), True, False, {}
    task = policygrad.Task.from_env(Echo)
    assert len(task.rows("train")) == 2000 and task.rows("test")[0]["prompt"].startswith("Repeat")
    result = policygrad.train(algo="reinforce", model=str(tiny_lm), task=Echo, max_new_tokens=4,
                              eval_prompts=4, progress=False, **{**SMALL, "total_steps": 1})
    assert result.config.task.startswith("Echo@") and result.history[0]["update"] == 1


@pytest.mark.parametrize("call, error, words", [
    (dict(algo="reinforce", data=[{"text": "no prompt"}] * 5, rewards=["vader"]), policygrad.TaskError, "'prompt'"),
    (dict(algo="reinforce", data=ROWS, rewards=[42]), policygrad.RewardError, "needs a name"),
    (dict(algo="reinforce", data=ROWS, rewards=[]), policygrad.RewardError, "rewards is empty"),
    (dict(algo="reinforce", data=ROWS), policygrad.TaskError, "data= and rewards="),
    (dict(algo="reinforce", task="positive-review", lrr=1e-3), policygrad.ConfigError, "did you mean 'lr'"),
    (dict(task="positive-review"), policygrad.UsageError, "needs --algo"),
    (dict(algo="ppo", env=42), policygrad.EnvError, "Gymnasium id"),
    (dict(algo="ppo", env=lambda: "not an env"), policygrad.EnvError, "not a gymnasium.Env"),
    (dict(algo="reinforce", task="positive-review", model=object()), policygrad.ModelError, "transformers model"),
    (dict(algo="reinforce", task="no-such-task"), policygrad.TaskError, "unknown task"),
    (dict(config=3), policygrad.UsageError, "policygrad.Config"),
])
def test_user_mistakes_are_typed_errors_with_the_cli_messages(tmp_path, call, error, words):
    with pytest.raises(error, match=re.escape(words)) as caught:
        policygrad.train(out=tmp_path / "run", progress=False, **call)
    assert isinstance(caught.value, policygrad.PolicygradError) and "\n" not in str(caught.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_reward_function_that_raises_is_a_reward_error_naming_it(tmp_path, tiny_lm):
    def broken(prompts, completions, **columns):
        raise ZeroDivisionError("oops")
    with pytest.raises(policygrad.RewardError, match="reward 'broken' raised ZeroDivisionError: oops"):
        policygrad.train(algo="reinforce", model=str(tiny_lm), data=ROWS, rewards=broken, max_new_tokens=4,
                         progress=False, **{**SMALL, "total_steps": 1})


CONTROL = {"algo": "ppo", "env": "Pendulum-v1"}


@pytest.mark.parametrize("key", config_mod.field_names())
def test_every_config_key_reads_the_same_from_python_and_from_the_command_line(key, task_file):
    """Each key at a value of its type, as a Python keyword and as a key=value override, on a
    language-model run and a control run: the same Config, or the same one-line error."""
    import yaml
    value = getattr(config_mod.Config(), key)
    if value is None:
        value = {"torch_threads": 2, "target_kl": 0.05, "clip_value_eps": 0.2, "stop_at_return": 100.0,
                 "adapter": "missing-adapter", "task": str(task_file)}.get(key, 1)
    text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    for named in ({"algo": "reinforce", "task": str(task_file)}, CONTROL):
        def outcome(fn):
            try:
                return fn()
            except policygrad.PolicygradError as e:
                return f"{type(e).__name__}: {e}"
        from_python = outcome(lambda: policygrad.make_config(**{**named, key: value}))
        overrides = resolve_mod.parse_overrides([f"{key}={text}"])
        flags = {k: v for k, v in named.items() if k != key}
        from_cli = outcome(lambda: (check_run_named({**overrides, **flags}),
                                    resolve_mod.resolve({}, overrides, flags))[1])
        assert from_python == from_cli, key



def test_python_objects_under_two_processes_train_the_cli_nproc_run(tmp_path, tiny_lm, task_file):
    """A script calling policygrad.train with rows and a reward function, run as 2 processes (as
    under torchrun), trains the CLI's `--nproc 2` run of the task file, bit for bit."""
    import subprocess

    import dist_workers as w
    r = subprocess.run([sys.executable, "-m", "policygrad", *cli_args(task_file, tiny_lm, tmp_path / "cli"),
                        "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    w.run_ranks(w.api_worker, (str(tmp_path), (str(tiny_lm), str(task_file)), SMALL))
    assert_same_run(tmp_path / "cli", tmp_path / "api")


def test_data_in_every_form_gives_train_validation_and_test(tmp_path):
    """A list and a file are cut 80/10/10 alike; a DatasetDict or dict of splits keeps its own, a
    missing held-out split cut from train; a DataFrame reads as its records."""
    from policygrad.lm import tasks
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    assert tasks.splits_of(ROWS) == tasks.splits_of(str(path)) == tasks.cut_splits(tasks.read_rows(path))
    two = tasks.splits_of({"train": ROWS[:20], "test": ROWS[20:]})
    assert two["test"] == ROWS[20:] and len(two["validation"]) == 2 and len(two["train"]) == 18
    assert not {r["prompt"] for r in two["validation"]} & {r["prompt"] for r in two["train"]}
    pandas = pytest.importorskip("pandas")
    assert tasks.splits_of(pandas.DataFrame(ROWS)) == tasks.splits_of(ROWS)
    with pytest.raises(policygrad.TaskError, match="train \\(required\\)"):
        tasks.splits_of({"training": ROWS})
    with pytest.raises(policygrad.TaskError, match="holds no rows"):
        tasks.splits_of({"train": ROWS, "test": []})


def test_a_task_built_from_objects_is_named_by_its_content():
    """The same rows and rewards give the same config name (a resume finds its run); other rows or
    another weight give another."""
    from policygrad.lm import tasks
    name = tasks.from_python(None, ROWS, ["vader", (brevity, 0.5)])
    assert name == tasks.from_python(None, list(ROWS), ["vader", (brevity, 0.5)])
    assert name != tasks.from_python(None, ROWS[:-1], ["vader", (brevity, 0.5)])
    assert name != tasks.from_python(None, ROWS, ["vader", (brevity, 0.6)])
    assert tasks.from_python("positive-review") == "positive-review"  # a name alone stays a name
    built = policygrad.Task.from_data(ROWS, ["vader", (brevity, 0.5)])
    assert built.splits == tasks.splits_of(ROWS) and [r.weight for r in built.rewards.rewards] == [1.0, 0.5]
    assert tasks.from_python(built) == name  # a Task object is named by its content as well
    replaced = tasks.from_python("positive-review", rewards=[brevity])
    assert replaced.startswith("positive-review@") and tasks.REGISTERED[replaced].defaults["kl_coef"] == 0.1
    with pytest.raises(policygrad.TaskError, match="built in Python"):
        tasks.load("custom@00000000", set())


def test_lora_on_a_model_object_and_merge_from_python(tmp_path, tiny_lm, task_file):
    """LoRA keys work from Python on a model object: the result is the PEFT model, only the adapter
    moved, and policygrad.merge writes a plain transformers folder of the trained weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    result = policygrad.train(algo="reinforce", task=str(task_file), model=model,
                              tokenizer=AutoTokenizer.from_pretrained(tiny_lm), lora_r=4, out=tmp_path / "lora",
                              progress=False, **SMALL)
    assert hasattr(result.policy, "peft_config")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in start.items())  # the caller's object is untouched
    merged = AutoModelForCausalLM.from_pretrained(policygrad.merge(tmp_path / "lora", tmp_path / "merged"))
    moved = [k for k, v in merged.state_dict().items() if not torch.equal(v, start[k])]
    assert moved and all("proj" in k for k in moved)


def test_two_functions_of_one_name_are_two_rewards_and_two_lambdas_two_envs():
    """A run's inputs are named by their code: an edited reward is another run, and two lambda
    env factories are two environments, not the latest one twice."""
    from policygrad.control.rollout import register_env
    from policygrad.lm import tasks
    first = lambda prompts, completions, **c: [1.0] * len(completions)  # noqa: E731
    second = lambda prompts, completions, **c: [2.0] * len(completions)  # noqa: E731
    assert tasks.from_python(None, ROWS, first) != tasks.from_python(None, ROWS, second)
    cart, pendulum = (lambda: gym.make("CartPole-v1")), (lambda: gym.make("Pendulum-v1"))
    ids = register_env(cart), register_env(pendulum)
    assert ids[0] != ids[1] and [gym.spec(i).make().unwrapped.__class__.__name__ for i in ids] == [
        "CartPoleEnv", "PendulumEnv"]
    assert register_env(gym.make("CartPole-v1")).startswith("policygrad/CartPole-v1-")


@pytest.mark.parametrize("call, error, words", [
    (dict(rewards=lambda prompts, completions, **c: 1.0), policygrad.RewardError, "returned a float"),
    (dict(task=brevity), policygrad.TaskError, "is not a text env"),
    (dict(task=lambda: 42), policygrad.TaskError, "not a gymnasium.Env"),
    (dict(callbacks=[42]), policygrad.UsageError, "callbacks must be"),
    (dict(nproc=2), policygrad.UsageError, "torchrun"),
    (dict(tokenizer=object()), policygrad.UsageError, "tokenizer= goes with a model object"),
])
def test_more_mistakes_through_python_are_one_line_errors(tmp_path, tiny_lm, call, error, words):
    kwargs = dict(algo="reinforce", model=str(tiny_lm), data=ROWS, rewards=[brevity], max_new_tokens=4,
                  progress=False, **{**SMALL, "total_steps": 1})
    if "task" in call:
        kwargs.pop("rewards")
        kwargs.pop("data")
    with pytest.raises(error, match=re.escape(words)):
        policygrad.train(out=tmp_path / "run", **{**kwargs, **call})


def test_evaluate_refuses_what_it_would_ignore(tmp_path, tiny_lm, task_file):
    result = policygrad.train(algo="reinforce", task=str(task_file), model=str(tiny_lm), out=tmp_path / "r",
                              callbacks=lambda m: None, progress=False, **{**SMALL, "total_steps": 1})
    with pytest.raises(policygrad.UsageError, match="pick from a run folder"):
        policygrad.evaluate(result, checkpoint="best")
    with pytest.raises(policygrad.UsageError, match="max_new_tokens are for an untrained model"):
        policygrad.evaluate(tmp_path / "r", max_new_tokens=3)
    base = policygrad.evaluate(tmp_path / "r", base=True, split="validation")
    assert base.mean_reward == policygrad.evaluate(model=str(tiny_lm), task=str(task_file), split="validation",
                                                   **{k: v for k, v in SMALL.items() if "steps" not in k}).mean_reward
    from policygrad import dist
    assert issubclass(dist.RankExit, policygrad.PolicygradError)  # what ranks > 0 raise under torchrun


def test_a_reward_function_of_yours_served_over_http():
    """policygrad.serve_reward(rewards=[fn]) answers as `policygrad serve-reward` does, and a
    RemoteReward client reads it."""
    import threading
    import time

    from policygrad.launch import free_port
    from policygrad.lm.rewards import RemoteReward
    port = free_port()
    threading.Thread(target=policygrad.serve_reward, kwargs={"rewards": [(brevity, 2.0)], "port": port},
                     daemon=True).start()  # serves until the test process ends
    client, deadline = RemoteReward(f"http://127.0.0.1:{port}/", backoff=0.05), time.time() + 20
    while True:
        try:
            got = client(["p", "q"], ["abc", ""], {"answer": ["1", "2"]}, timeout=5, retries=0)
            break
        except policygrad.RewardError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
    assert got == [2.0 / 4, 2.0 / 1]


def test_samples_holding_a_unicode_line_separator_are_read_whole(tmp_path):
    """Generated text may hold U+2028 or U+0085, written as they are (ensure_ascii=False);
    str.splitlines() would cut a JSON line there."""
    from policygrad.api import _final
    from policygrad.config import Config
    (tmp_path / "samples").mkdir()
    rows = [{"prompt": "a", "completion": "x\u2028y\x85z", "reward": 1.0},
            {"prompt": "b", "completion": "", "reward": 0.0}]
    (tmp_path / "samples" / "test-step00002.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    final = {"test/reward_mean": 0.5, "test/reward_std": 0.5, "test/kl_to_reference": 0.0, "test/n": 2}
    assert _final(Config(task="positive-review"), final, tmp_path).samples == rows
