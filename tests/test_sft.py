"""`policygrad sft`: held-out NLL falls, the output loads in plain transformers (PEFT with LoRA),
a killed run resumes exactly, best-of-N keeps the best sample by the task's reward, and bad input
is one line. (The loss masking itself is checked against a naive twin in test_ptx.py.)"""
import json

import pytest
import torch
from safetensors.torch import load_file

import policygrad
from policygrad.cli import main
from policygrad.stages import sft as stage

KEYS = {"epochs": 3, "batch_size": 4, "lr": 3e-3, "checkpoint_every": 5, "max_length": 64}


def rows(n: int = 40) -> list[dict]:
    """A pattern a tiny model picks up in a few steps: the completion repeats the prompt's word."""
    words = ["red", "green", "blue", "amber", "violet", "grey"]
    return [{"prompt": f"Say {words[i % 6]} twice ({i}).", "completion": f"{words[i % 6]} {words[i % 6]}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_lm):
    out = tmp_path_factory.mktemp("sft") / "run"
    summary = policygrad.sft(rows(), out=out, model=str(tiny_lm), progress=False, **KEYS)
    return out, summary


def test_sft_lowers_held_out_nll_and_writes_a_transformers_folder(trained, tiny_lm):
    out, summary = trained
    assert summary["test_nll"] < summary["test_nll_before"] - 0.5, summary
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/nll"] for r in logged if "eval/nll" in r]
    assert len(evals) == KEYS["epochs"] and evals[-1] < logged[-1]["eval/nll_before"]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    trained_weights = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.equal(p, trained_weights[n]) for n, p in model.state_dict().items() if n in trained_weights)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    assert any(not torch.equal(p, base.state_dict()[n]) for n, p in model.state_dict().items())


def test_a_killed_sft_run_resumes_exactly(trained, tmp_path, tiny_lm, monkeypatch):
    """Killed during step 8 (checkpoint at 5), run again: the weights and metrics of the run that
    was never stopped, and a third call finds it complete."""
    whole, _ = trained
    real, calls = stage.step_loss, []

    def dies_at_step_8(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(stage, "step_loss", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        policygrad.sft(rows(), out=tmp_path / "cut", model=str(tiny_lm), progress=False, **KEYS)
    monkeypatch.setattr(stage, "step_loss", real)
    assert (tmp_path / "cut" / "checkpoints" / "latest").read_text() == "update-000005"
    policygrad.sft(rows(), out=tmp_path / "cut", model=str(tiny_lm), progress=False, **KEYS)
    strip = lambda folder: [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}  # noqa: E731
                            for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert strip(whole) == strip(tmp_path / "cut")
    a = load_file(str(whole / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert policygrad.sft(rows(), out=tmp_path / "cut", model=str(tiny_lm), progress=False, **KEYS)["already_complete"]


def test_lora_sft_writes_an_adapter_that_peft_loads_and_rl_starts_from(tmp_path, tiny_lm, task_file):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    out = tmp_path / "lora"
    summary = policygrad.sft(rows(), out=out, model=str(tiny_lm), progress=False, lora_r=4, **{**KEYS, "lr": 1e-2})
    assert summary["test_nll"] < summary["test_nll_before"]
    assert (out / "model" / "adapter_config.json").is_file() and not (out / "model" / "model.safetensors").exists()
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), out / "model")
    result = policygrad.train(algo="reinforce", task=str(task_file), model=str(tiny_lm), adapter=str(out / "model"),
                              total_steps=1, prompts_per_step=2, samples_per_prompt=2, eval_every=0, progress=False)
    assert result.summary["updates"] == 1


def test_best_of_n_keeps_each_prompts_best_sample_and_learns_it(tmp_path, tiny_lm, task_file):
    """Every training prompt of the task gets 3 samples; the kept one has the highest reward of
    them (the file keeps its reward), and the run fine-tunes on those rows."""
    out = tmp_path / "best"
    summary = policygrad.sft(out=out, model=str(tiny_lm), task=str(task_file), best_of=3, progress=False,
                             **{**KEYS, "epochs": 1})
    chosen = [json.loads(line) for line in (out / "best-of-3.jsonl").read_text().splitlines()]
    task = policygrad.Task.load(str(task_file))
    assert [r["prompt"] for r in chosen] == [r["prompt"] for r in task.rows("train")]
    assert summary["best_reward_mean"] >= summary["sample_reward_mean"]
    rescored = task.rewards([r["prompt"] for r in chosen], [r["completion"] for r in chosen],
                            {"answer": [r["answer"] for r in task.rows("train")]})
    assert rescored.tolist() == pytest.approx([r["reward"] for r in chosen])
    assert summary["updates"] > 0 and (out / "model" / "config.json").is_file()


@pytest.mark.parametrize("args, words", [
    (["--data", "{bad}"], "needs text 'text', text 'prompt' and 'completion'"),
    (["--best-of", "4"], "best_of needs a task"),
    ([], "needs either data"),
    (["--data", "{good}", "epochs=0"], "epochs must be positive"),
    (["--data", "{good}", "lora=4"], "unknown sft key 'lora'"),
    (["--data", "{good}", "dtype=float16"], "dtype=float16 would need a loss scale"),
    (["--data", "{good}", "--task", "positive-review"], "best-of-N"),
    (["--from-run", "{good}", "--best-of", "2"], "is not a language-model run folder"),
])
def test_bad_sft_input_is_one_line(args, words, tmp_path, capsys):
    bad, good = tmp_path / "bad.jsonl", tmp_path / "good.jsonl"
    bad.write_text(json.dumps({"prompt": "only a prompt"}) + "\n")
    good.write_text("".join(json.dumps(r) + "\n" for r in rows(10)))
    argv = ["sft", "--out", str(tmp_path / "run"), "--no-progress",
            *[a.format(bad=bad, good=good if "--from-run" not in args else tmp_path) for a in args]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "Traceback" not in err, err


def test_nll_reads_a_model_an_sft_run_and_a_training_run(trained, tiny_lm, task_file, tmp_path):
    """policygrad.nll: the SFT run's held-out NLL is its test_nll (the same rows and loss tokens);
    a model folder gives the NLL before; a training run's model is read at its checkpoint."""
    from policygrad.lm import supervised, tasks
    out, summary = trained
    test_rows = tasks.splits_of(rows(), supervised.check_row)["test"]
    assert policygrad.nll(out, test_rows, max_length=64) == pytest.approx(summary["test_nll"], rel=1e-5)
    assert policygrad.nll(str(tiny_lm), test_rows, max_length=64) == pytest.approx(summary["test_nll_before"], rel=1e-5)
    run = policygrad.train(algo="reinforce", task=str(task_file), model=str(tiny_lm), out=tmp_path / "rl",
                           total_steps=1, prompts_per_step=2, samples_per_prompt=2, eval_every=0, lr=1e-2,
                           progress=False)
    moved = policygrad.nll(run, test_rows)
    assert moved != policygrad.nll(str(tiny_lm), test_rows) and moved == policygrad.nll(tmp_path / "rl", test_rows)


def test_nll_of_a_lora_sft_run_and_of_a_model_object(tmp_path, tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from policygrad.lm import supervised, tasks
    out = tmp_path / "lora"
    summary = policygrad.sft(rows(), out=out, model=str(tiny_lm), progress=False, lora_r=4, **{**KEYS, "epochs": 1})
    test_rows = tasks.splits_of(rows(), supervised.check_row)["test"]
    assert policygrad.nll(out, test_rows, max_length=64) == pytest.approx(summary["test_nll"], rel=1e-5)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    assert policygrad.nll(model, test_rows, tokenizer=tokenizer, max_length=64) == \
        pytest.approx(summary["test_nll_before"], rel=1e-5)
    with pytest.raises(policygrad.UsageError, match="needs tokenizer="):
        policygrad.nll(model, test_rows)


def test_a_model_object_is_kept_in_the_sft_run_and_overwrite_keeps_it(tmp_path, tiny_lm):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm), AutoTokenizer.from_pretrained(tiny_lm)
    keys = {**KEYS, "epochs": 1}
    first = policygrad.sft(rows(), out=tmp_path / "obj", model=model, tokenizer=tokenizer, progress=False, **keys)
    assert (tmp_path / "obj" / "base-model" / "config.json").is_file()
    again = policygrad.sft(rows(), out=tmp_path / "obj", model=model, tokenizer=tokenizer, progress=False,
                           overwrite=True, **{**keys, "lr": 1e-3})
    assert (tmp_path / "obj" / "base-model" / "config.json").is_file() and again["test_nll"] != first["test_nll"]
