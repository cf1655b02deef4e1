"""Real data as training signal: the supervised examples (loss only on completion or assistant
tokens, against transformers' own masked loss) and the data loss J_data mixed into RL updates
(ptx_coef x the mean token NLL: its gradient, every algorithm, micro-batches, LoRA, exact resume)."""
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import policygrad
from policygrad import cli
from policygrad.algos import ALGOS, Progress
from policygrad.resolve import resolve
from policygrad.core import advantages
from policygrad.lm import supervised
from policygrad.lm.rollout import LMWorkload, PromptCursor

# a ChatML-like template, as SmolLM2's: markers the tiny byte-level tokenizer spells out
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXT = [{"text": f"The river {i} runs past the old mill and into the sea at dawn."} for i in range(12)]
SUPERVISED = [{"prompt": "Name a colour.", "completion": "Blue."},
              {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                            {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "Sure."}]},
              {"text": "Plain text, every token but the first is learnt."}]


def naive_nll(model, tokenizer, rows, chat: bool) -> float:
    """The mean token NLL the obvious way: each row rendered whole in one string, the learnt
    characters found by searching it (an assistant's reply through its end-of-turn marker),
    tokens labelled by their character offsets, transformers' own shifted cross-entropy."""
    eos = tokenizer.eos_token
    losses, counts = 0.0, 0
    for row in rows:
        if "text" in row:
            full, spans = row["text"], [(1, len(row["text"]))]
        elif "completion" in row:
            prefix = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                                   add_generation_prompt=True, tokenize=False) if chat else row["prompt"]
            full = prefix + row["completion"] + eos
            spans = [(len(prefix), len(full))]
        else:
            full = tokenizer.apply_chat_template(row["messages"], tokenize=False) if chat else "".join(
                m["content"] + "\n" + (eos if m["role"] == "assistant" else "") for m in row["messages"])
            spans, at = [], 0
            for m in row["messages"]:
                at = full.index(m["content"], at)
                if m["role"] == "assistant":  # the reply, (a newline without a template,) its marker
                    end = full.index(eos, at) + len(eos)
                    spans.append((at, end))
                at += len(m["content"])
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [t if any(a <= start < b for a, b in spans) else -100 for t, (start, _) in zip(ids, enc["offset_mapping"])]
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        target = torch.tensor(labels[1:])
        keep = target != -100
        losses += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        counts += int(keep.sum())
    return losses / counts


@pytest.mark.parametrize("chat", [False, True])
def test_only_completion_and_assistant_tokens_carry_loss_as_in_a_naive_twin(tiny_lm, task_file, chat):
    cfg = resolve({}, {"max_new_tokens": 6}, {"task": str(task_file), "model": str(tiny_lm), "algo": "reinforce"})
    work = LMWorkload(cfg, seed=0)
    tokenizer = work.policy.tokenizer
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    rows = SUPERVISED
    examples = supervised.encode_rows(rows, tokenizer, supervised.eos_of(work.policy), 256, "rows")
    # the completion's tokens (and the end-of-turn id) are the loss tokens, the prompt's are not
    completion = tokenizer("Blue.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert examples[0].target == completion and examples[0].loss == [1] * len(completion)
    # a chat: the user's second message sits among the targets with no loss
    assert 0 < sum(examples[1].loss) < len(examples[1].loss)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    with torch.no_grad():
        expected = naive_nll(model, tokenizer, rows, chat)
    assert supervised.mean_nll(work.policy, examples, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_rows_are_cut_to_max_length_and_rows_with_nothing_to_learn_are_refused(tiny_lm, task_file):
    cfg = resolve({}, {"max_new_tokens": 6}, {"task": str(task_file), "model": str(tiny_lm), "algo": "reinforce"})
    policy = LMWorkload(cfg, seed=0).policy
    eos = supervised.eos_of(policy)
    long = supervised.encode({"prompt": "p" * 10, "completion": "c" * 100}, policy.tokenizer, eos, 32)
    assert len(long.context) + len(long.target) == 32 and all(long.loss)
    assert supervised.encode({"prompt": "p" * 40, "completion": "c"}, policy.tokenizer, eos, 32).target  # prompt cut
    with pytest.raises(policygrad.TaskError, match="no usable rows"):
        supervised.encode_rows([{"text": "a"}], policy.tokenizer, eos, 32, "ptx_data 'x'")
    with pytest.raises(policygrad.TaskError, match="needs text 'text'"):
        supervised.check_row({"prompt": "only a prompt"}, "ptx_data:1")


def flat_grad(opts) -> torch.Tensor:
    return torch.cat([f.param.grad.clone() for f in opts.main_params])


def ptx_config(tiny_lm, task_file, ptx_file, coef, **extra):
    algo = extra.pop("algo", "reinforce")
    values = {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 6, "lr": 1e-3, "max_grad_norm": 0.0,
              **({"ptx_data": str(ptx_file), "ptx_coef": coef, "ptx_batch_size": 4} if coef else {}), **extra}
    return resolve({}, values, {"task": str(task_file), "model": str(tiny_lm), "algo": algo})


@pytest.fixture
def ptx_file(tmp_path):
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEXT))
    return path


@pytest.mark.parametrize("micro", [0, 2])
def test_the_data_term_adds_gamma_times_the_nll_gradient(tiny_lm, task_file, ptx_file, micro):
    """The update's gradient with ptx_coef = 0.7, minus the one without, is 0.7 x the gradient of
    the data batch's mean token NLL, computed by transformers' own loss."""
    grads, data_rows = [], None
    for coef in (0.0, 0.7):
        cfg = ptx_config(tiny_lm, task_file, ptx_file, coef, micro_batch_size=micro)
        work = LMWorkload(cfg, seed=0)
        opts = ALGOS["reinforce"].make_optimizers(work.policy, cfg)
        batch = advantages.compute(work.collect()[0], cfg)
        data = work.data_term()
        if coef:
            data_rows = [TEXT[i] for i in PromptCursor(len(TEXT), 0).take(4)]  # the workload's seed
            assert len(data.micro_batches) == (2 if micro else 1)
        metrics = ALGOS["reinforce"].update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator(), data=data))
        grads.append(flat_grad(opts))
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    ids = [tokenizer(r["text"])["input_ids"] for r in data_rows]
    nll_sum = sum(torch.nn.functional.cross_entropy(model(input_ids=torch.tensor([x])).logits[0, :-1], torch.tensor(x[1:]),
                                                    reduction="sum") for x in ids)
    nll = nll_sum / sum(len(x) - 1 for x in ids)
    nll.backward()
    naive = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert metrics["ptx/loss"] == pytest.approx(nll.item(), rel=1e-5)
    torch.testing.assert_close(grads[1] - grads[0], 0.7 * naive, atol=1e-6, rtol=1e-4)


def test_trpo_steps_on_the_surrogate_plus_the_data_loss(tiny_lm, task_file, ptx_file, monkeypatch):
    """TRPO's natural-gradient step is taken on the surrogate with J_data added: its gradient is the
    plain surrogate's plus gamma x the NLL gradient, and its line search sees the term."""
    from policygrad import algos
    from policygrad.core.trpo import accumulated_gradient
    seen = {}

    def capture(params, loss_pieces, kl_pieces, loss_and_kl, **kw):
        seen.setdefault("grads", []).append(accumulated_gradient(loss_pieces, params)[1])
        seen.setdefault("losses", []).append(loss_and_kl()[0])
        return {"trpo/accepted": 0.0}
    monkeypatch.setattr(algos, "trpo_step", capture)
    parts = {}
    for coef in (0.0, 0.5):
        cfg = ptx_config(tiny_lm, task_file, ptx_file, coef, algo="trpo")
        work = LMWorkload(cfg, seed=0)
        batch = advantages.compute(work.collect()[0], cfg)
        data = work.data_term()
        metrics = ALGOS["trpo"].update(work.policy, ALGOS["trpo"].make_optimizers(work.policy, cfg), batch, cfg,
                                       Progress(1.0, torch.Generator(), data=data))
        if data is not None:
            parts["nll"] = sum(supervised.nll_sum(work.policy, m) for m in data.micro_batches) / data.tokens
            params = work.policy.actor_parameters()
            parts["grad"] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(parts["nll"], params)])
            assert metrics["ptx/loss"] == pytest.approx(parts["nll"].item(), rel=1e-5)
    torch.testing.assert_close(seen["grads"][1] - seen["grads"][0], 0.5 * parts["grad"], atol=1e-6, rtol=1e-4)
    assert (seen["losses"][1] - seen["losses"][0]).item() == pytest.approx(0.5 * parts["nll"].item(), rel=1e-4)


@pytest.mark.parametrize("algo, extra", [("reinforce", {"micro_batch_size": 1}), ("ppo", {"lora_r": 4}),
                                         ("trpo", {"max_kl": 0.05})])
def test_every_algorithm_trains_with_the_data_loss_and_logs_it(tmp_path, tiny_lm, task_file, ptx_file, algo, extra):
    result = policygrad.train(algo=algo, task=str(task_file), model=str(tiny_lm), out=tmp_path / algo, progress=False,
                              total_steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, eval_every=0,
                              ptx_data=str(ptx_file), ptx_coef=0.5, ptx_batch_size=3, **extra)
    losses = [row["ptx/loss"] for row in result.history]
    assert len(losses) == 2 and all(math.isfinite(x) and x > 0 for x in losses)
    # the data cursor moved on: the second update read other rows, so another loss
    assert losses[0] != losses[1]


def test_a_killed_run_with_the_data_loss_resumes_exactly(tmp_path, tiny_lm, task_file, ptx_file):
    """The data cursor is in the checkpoint: a run stopped after update 3 (checkpoint at 2) and
    resumed ends as the uninterrupted one, weights, metrics (ptx/loss included) and evaluation."""
    from test_api import assert_same_run

    def crash(metrics):
        if metrics["update"] == 3:
            raise KeyboardInterrupt
    kwargs = dict(algo="reinforce", task=str(task_file), model=str(tiny_lm), progress=False, total_steps=4,
                  prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6, eval_every=2, checkpoint_every=2,
                  ptx_data=str(ptx_file), ptx_coef=0.5, ptx_batch_size=5)
    policygrad.train(out=tmp_path / "whole", **kwargs)
    with pytest.raises(KeyboardInterrupt):
        policygrad.train(out=tmp_path / "cut", callbacks=[crash], **kwargs)
    policygrad.train(resume=tmp_path / "cut", progress=False)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    state = json.loads(max((tmp_path / "cut" / "checkpoints").glob("*/state.json")).read_text())
    assert state["workload"]["ptx_cursor"]["position"] > 0 or state["workload"]["ptx_cursor"]["epoch"] > 0


def test_bad_data_loss_settings_are_one_line_errors(tmp_path, tiny_lm, task_file, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": "a"}) + "\n")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "?"}) + "\n")
    base = ["train", "--algo", "reinforce", "--task", str(task_file), "--model", str(tiny_lm), "--no-progress",
            "total_steps=1", "prompts_per_step=2", "samples_per_prompt=2"]
    cases = [(["ptx_coef=0.5"], "no ptx_data"), ([f"ptx_data={empty}"], "ptx_coef is 0"),
             ([f"ptx_data={empty}", "ptx_coef=0.5"], "no usable rows"),
             ([f"ptx_data={wrong}", "ptx_coef=0.5"], "needs text 'text'"),
             ([f"ptx_data={tmp_path / 'none.jsonl'}", "ptx_coef=0.5"], "not found"),
             (["ptx_batch_size=4"], "data loss, which is off")]
    for i, (extra, message) in enumerate(cases):
        assert cli.main([*base, "--out", str(tmp_path / f"run{i}"), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err

