"""Stages around RL: the Bradley-Terry loss, pairs from a rule reward, and the `rm` stage (learning,
its output as an `rm:` reward, exact resume)."""
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import policygrad
from policygrad.cli import main
from policygrad.core.losses import bradley_terry_loss
from policygrad.stages import reward_model as stage
from policygrad.stages.pairs import ranked_pairs


def test_bradley_terry_loss_on_hand_computed_pairs():
    """gaps 1 and -1: loss = (log(1+e^-1) + log(1+e^1)) / 2, accuracy 1/2; a margin of 0.5 on the
    first pair asks for a gap of 0.5 more; d loss / d chosen = -sigmoid(-(gap - margin)) / P."""
    chosen = torch.tensor([2.0, 0.0], requires_grad=True)
    rejected = torch.tensor([1.0, 1.0])
    loss, metrics = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2)
    assert metrics["rm/accuracy"] == 0.5 and metrics["rm/gap_mean"] == 0.0
    loss, _ = bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 0.0]))
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1))) / 2)
    loss.backward()
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert chosen.grad.tolist() == pytest.approx([-sigmoid(-0.5) / 2, -sigmoid(1.0) / 2])


def test_pairs_take_the_best_against_the_worst_past_the_gap():
    """Rewards 0.1, 0.9, 0.5, 0.45: best (0.9) against worst (0.1) is kept; 0.5 against 0.45 is a
    near tie under a gap of 0.3."""
    found = ranked_pairs("p", ["a", "b", "c", "d"], np.array([0.1, 0.9, 0.5, 0.45]), 0.3)
    assert found == [{"prompt": "p", "chosen": "b", "rejected": "a", "chosen_reward": 0.9, "rejected_reward": 0.1}]
    assert len(ranked_pairs("p", ["a", "b", "c", "d"], np.array([0.1, 0.9, 0.5, 0.45]), 0.0)) == 2


def test_pairs_from_a_task_are_ranked_by_its_reward(tmp_path, tiny_lm, task_file):
    out = tmp_path / "pairs.jsonl"
    assert main(["pairs", "--task", str(task_file), "--model", str(tiny_lm), "--samples", "4", "--min-gap", "0.0",
                 "--out", str(out), "max_new_tokens=4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    train_prompts = {r["prompt"] for r in policygrad.Task.load(str(task_file)).rows("train")}
    assert len(rows) == 2 * len(train_prompts) and {r["prompt"] for r in rows} == train_prompts
    assert all(r["chosen_reward"] >= r["rejected_reward"] for r in rows)


def synthetic_pairs(n: int) -> list[dict]:
    """The preferred answer ends in '!!!!', the other in '....': learnable by a tiny model."""
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    return [{"prompt": f"Answer {i}: {words[i % 8]}?", "chosen": f"{words[(i * 3) % 8]} {i} !!!!",
             "rejected": f"{words[(i * 5) % 8]} {i} ...."} for i in range(n)]


KEYS = {"epochs": 3, "batch_size": 4, "lr": 3e-3, "checkpoint_every": 5, "max_length": 64}


@pytest.fixture(scope="module")
def trained_rm(tmp_path_factory, tiny_lm):
    out = tmp_path_factory.mktemp("rm") / "run"
    summary = policygrad.reward_model(synthetic_pairs(60), out=out, model=str(tiny_lm), progress=False, **KEYS)
    return out, summary


def test_a_reward_model_learns_held_out_preferences_and_is_an_rm_reward(trained_rm):
    """Held-out pairwise accuracy per epoch and on the test pairs; the output folder loads as a
    reward (`rm:`) that prefers the held-out chosen answers, with its reward statistics beside it."""
    out, summary = trained_rm
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert len(evals) == KEYS["epochs"] and summary["test_n"] == 6
    assert summary["test_accuracy"] >= 0.9 and evals[-1] >= 0.9, (evals, summary)
    stats = json.loads((out / "reward-model" / "reward_stats.json").read_text())
    assert stats["n"] == 2 * 48 and stats["std"] > 0
    held_out = stage.pair_splits(synthetic_pairs(60))["test"]
    reward = policygrad.lm.rewards.build(f"rm:{out / 'reward-model'}")
    prompts = [r["prompt"] for r in held_out]
    chosen = reward.fn(prompts, [r["chosen"] for r in held_out], {})
    rejected = reward.fn(prompts, [r["rejected"] for r in held_out], {})
    assert np.mean(np.array(chosen) > np.array(rejected)) == summary["test_accuracy"]


def test_a_text_longer_than_max_length_scores_in_rl_as_training_read_it(trained_rm, tiny_lm):
    """The rm: reward cuts a long text where `policygrad rm` cut it (#23): the cut is saved in
    reward_stats.json, and a text past max_length tokens scores as its first max_length tokens do,
    as the training-time pass scores it."""
    out, _ = trained_rm
    folder = out / "reward-model"
    stats = json.loads((folder / "reward_stats.json").read_text())
    assert stats["truncation"] == {"max_length": KEYS["max_length"], "side": "right"}
    model, tokenizer = stage.load_scorer(str(tiny_lm), 0, torch.device("cpu"), weights=folder)
    prompt = "Answer 3: delta?"
    short = ("gamma 3 !!!! " * 10)[:KEYS["max_length"] - len(prompt) - 1]
    assert len(tokenizer(f"{prompt}\n{short}")["input_ids"]) == KEYS["max_length"]  # read whole
    long = short + " .... .... ...." * 5  # the tail the model learnt to dislike, past the cut
    got = policygrad.lm.rewards.build(f"rm:{folder}").fn([prompt] * 2, [short, long], {})
    with torch.no_grad():
        trained = stage.scores(model.eval(), tokenizer, [(prompt, short), (prompt, long)], KEYS["max_length"])
    assert got == pytest.approx(trained.tolist(), abs=1e-5)
    assert got[1] == pytest.approx(got[0], abs=1e-5)


def test_a_killed_reward_model_run_resumes_exactly(trained_rm, tmp_path, tiny_lm, monkeypatch):
    """Killed after the checkpoint at step 10 (of 36), run again: the same weights and metrics as
    the run that was never stopped."""
    whole, _ = trained_rm
    real, calls = stage.pair_loss, []

    def dies_at_step_13(*args, **kwargs):
        calls.append(1)
        if len(calls) == 13:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(stage, "pair_loss", dies_at_step_13)
    with pytest.raises(KeyboardInterrupt):
        policygrad.reward_model(synthetic_pairs(60), out=tmp_path / "cut", model=str(tiny_lm), progress=False, **KEYS)
    monkeypatch.setattr(stage, "pair_loss", real)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "update-000010"
    policygrad.reward_model(synthetic_pairs(60), out=tmp_path / "cut", model=str(tiny_lm), progress=False, **KEYS)
    strip = lambda folder: [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
                            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert strip(whole) == strip(tmp_path / "cut")
    a = load_file(str(whole / "reward-model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "reward-model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = policygrad.reward_model(synthetic_pairs(60), out=tmp_path / "cut", model=str(tiny_lm), progress=False,
                                    **KEYS)
    assert again["already_complete"]


@pytest.mark.parametrize("rows, words", [
    ([{"prompt": "p", "chosen": "a"}] * 5, "needs text 'rejected'"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}] * 5, "'margin' must be a number"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 5, "at least 3 prompts; got 1"),  # cut by prompt
])
def test_pairs_that_cannot_be_used_are_one_line_errors(rows, words, tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["rm", "--data", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_task_file_extends_a_built_in_task_with_its_own_rewards(tmp_path):
    from policygrad.lm import tasks
    path = tmp_path / "watched.yaml"
    path.write_text("extends: positive-review\nrewards:\n  - {reward: vader, weight: 0}\n  - chrf\nkl_coef: 0.2\n")
    task = tasks.from_yaml(path, {"kl_coef", "reward_normalize"})
    parent = tasks.builtin("positive-review")
    assert task.splits == parent.splits and task.rewards.names == ["vader", "chrf"]
    assert task.defaults == {**parent.defaults, "kl_coef": 0.2}
    path.write_text("extends: nowhere\nrewards: [vader]\n")
    with pytest.raises(policygrad.TaskError, match="not a built-in task"):
        tasks.from_yaml(path, set())


def test_the_stage_configs_share_one_base_and_keep_their_own_defaults_and_rules():
    import dataclasses

    from policygrad.stages import StageConfig
    from policygrad.stages import sft
    base = [f.name for f in dataclasses.fields(StageConfig)]
    for cls in (sft.SFTConfig, stage.RewardModelConfig):
        assert issubclass(cls, StageConfig) and [f.name for f in dataclasses.fields(cls)][:len(base)] == base
    assert (sft.SFTConfig().max_length, stage.RewardModelConfig().max_length) == (512, 256)
    for make in (sft.make_config, stage.make_config):  # the base's rules, in both stages
        with pytest.raises(policygrad.ConfigError, match="epochs must be positive; got 0"):
            make({"epochs": 0})
        with pytest.raises(policygrad.ConfigError, match="max_grad_norm must be >= 0; got -1"):
            make({"max_grad_norm": -1})
    with pytest.raises(policygrad.ConfigError, match="device 'mps' is not one of: auto, cpu, cuda"):
        stage.make_config({"device": "mps"})
    assert sft.make_config({"device": "mps"}).device == "mps"  # sft places its policy as RL does
    with pytest.raises(policygrad.ConfigError, match="keep_checkpoints must be positive"):
        sft.make_config({"keep_checkpoints": 0})
