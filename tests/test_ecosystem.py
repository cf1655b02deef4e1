"""Tasks from the ecosystem's libraries: reasoning-gym generators (lm/reasoning_tasks.py), TextArena
games (lm/arena.py), math-verify answers (rewards `math`), and tools in episodes (lm/tools.py)."""
import json
import re
import subprocess
import sys
import time

import pytest
import torch

import policygrad
from policygrad.cli import main
from policygrad.errors import RewardError, TaskError
from policygrad.lm import reasoning_tasks, tasks, tools
from policygrad.lm.rewards import build
from policygrad.lm.rollout import LMWorkload
from policygrad.lm.text_envs import CalculatorArithmetic, calc
from policygrad.resolve import resolve

from test_episodes import CHAT_TEMPLATE, scripted_replies

SMALL = {"train": 60, "validation": 10, "test": 12}


def rg_task(generators="chain_sum", **kw):
    return policygrad.Task.reasoning_gym(generators, sizes=kw.pop("sizes", SMALL), **kw)


def config(model, task, **overrides):
    values = {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 5, "eval_prompts": 2,
              "logprob_chunk": 4, "lr": 1e-3, **overrides}
    return resolve({}, values, {"task": task, "model": str(model), "algo": "reinforce"})


# --- reasoning-gym ----------------------------------------------------------------------------
def questions(task, split):
    return [r["entry"]["question"] for r in task.rows(split)]


def test_reasoning_gym_splits_are_disjoint_reproducible_and_seeded_apart():
    # one- and two-digit sums of two terms repeat often: the held-out splits must skip the repeats
    options = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}}
    a, b = rg_task(options), rg_task(options)
    assert a.splits == b.splits                                        # the same rows every time
    train, val, test = (set(questions(a, s)) for s in ("train", "validation", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(val) == SMALL["validation"] and len(test) == SMALL["test"]  # no repeats inside a held-out split
    assert {s: len(a.rows(s)) for s in SMALL} == SMALL
    # another seed is another draw; the seeds are recorded
    assert questions(rg_task(options, seed=7), "train") != questions(a, "train")
    assert a.info["splits"]["validation"]["seed"] == reasoning_tasks.SPLIT_SEEDS["validation"]
    assert a.info["generators"] == options and a.info["answer_format"] == "tag"
    # the rows are the library's own items at the split's seed
    import reasoning_gym
    first = reasoning_gym.create_dataset("chain_sum", **options["chain_sum"], seed=0, size=10)[0]
    assert a.rows("train")[0]["entry"]["question"] == first["question"]
    assert a.rows("train")[0]["prompt"].startswith(first["question"])
    assert a.rows("train")[0]["answer"] == first["answer"]


def test_a_generator_that_cannot_fill_a_held_out_split_says_so():
    tiny = {"chain_sum": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}}  # <= 100 sums
    with pytest.raises(TaskError, match="no earlier split asked"):
        rg_task(tiny, sizes={"train": 400, "validation": 50, "test": 50})


@pytest.mark.parametrize("answer_format", ["tag", "plain", "number"])
def test_reasoning_gym_reward_is_the_librarys_score_of_the_extracted_answer(answer_format):
    from reasoning_gym.utils import extract_answer
    task = rg_task({"chain_sum": {}, "leg_counting": {"weight": 2}}, answer_format=answer_format)
    rows = task.rows("test")[:6]
    assert {r["entry"]["metadata"]["source_dataset"] for r in task.rows("train")} == {"chain_sum", "leg_counting"}
    right = {"tag": "<answer>{}</answer>", "plain": "{}.", "number": "so it is {}."}[answer_format]
    right = [right.format(r["answer"]) for r in rows]
    near = {"tag": "I think <answer>{}0</answer>", "plain": "about {}\nok", "number": "{} and 1"}[answer_format]
    near = [near.format(r["answer"]) for r in rows]
    completions = right + near + ["no answer at all"] * 6
    rows3 = rows * 3
    got = task.rewards([r["prompt"] for r in rows3], completions, {"entry": [r["entry"] for r in rows3],
                                                                     "answer": [r["answer"] for r in rows3]})
    # the reference: reasoning-gym's own composite scoring its own extraction (tag) or our documented line
    import reasoning_gym
    from reasoning_gym.composite import DatasetSpec
    composite = reasoning_gym.create_dataset("composite", datasets=[DatasetSpec("chain_sum", 1.0, {}),
                                                                    DatasetSpec("leg_counting", 2.0, {})], seed=0, size=5)

    def plain(text):
        line = next(l.strip() for l in text.splitlines() if l.strip())
        return line[:-1] if line.endswith(".") else line
    def number(text):
        found = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
        return found[-1] if found else None
    extract = {"tag": extract_answer, "plain": plain, "number": number}[answer_format]
    expected = [composite.score_answer(extract(c), r["entry"]) for c, r in zip(completions, rows3)]
    assert got.tolist() == pytest.approx(expected, abs=0)
    assert got[:6].tolist() == [1.0] * 6 and max(got[6:].tolist()) < 1.0


def test_without_partial_credit_a_score_below_one_is_zero():
    # the default score_answer gives len(oracle) / len(answer) to an answer containing the oracle
    kw = dict(answer_format="number", sizes=SMALL)
    scored, strict = (policygrad.Task.reasoning_gym("gcd", partial_credit=p, **kw) for p in (True, False))
    assert strict.info["partial_credit"] is False and scored.info["partial_credit"] is True
    rows = strict.rows("test")[:4]
    completions = [f"it is {r['answer']}" for r in rows] + [f"it is 1{r['answer']}" for r in rows]
    args = ([r["prompt"] for r in rows * 2], completions, {"entry": [r["entry"] for r in rows * 2]})
    partial, exact = scored.rewards(*args).tolist(), strict.rewards(*args).tolist()
    assert partial[:4] == exact[:4] == [1.0] * 4
    assert all(0 < p < 1 for p in partial[4:]) and exact[4:] == [0.0] * 4
    with pytest.raises(TaskError, match="partial_credit must be true or false"):
        policygrad.Task.reasoning_gym("gcd", partial_credit="no")


def test_the_benchmark_reports_what_always_giving_the_commonest_answer_scores(tmp_path, monkeypatch):
    # a skewed generator lets a policy meet the learning bar without reading the question
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).parent.parent / "benchmarks"))
    import ecosystem
    spec = tmp_path / "syllogisms.yaml"
    spec.write_text("reasoning_gym:\n  generators: syllogism\n  answer_format: plain\n"
                    "  sizes: {train: 40, validation: 10, test: 30}\n")
    answers = [r["answer"] for r in policygrad.Task.load(str(spec)).rows("test")]
    top = max(set(answers), key=answers.count)
    assert ecosystem.constant_answer(str(spec)) == (top, answers.count(top) / 30)
    samples = [{"completion": "Yes."}, {"completion": "Yes\nbecause"}, {"completion": "No"}, {"completion": ""}]
    assert ecosystem.answer_spread(str(spec), samples) == {"distinct_answers": 3, "top_answer": "Yes",
                                                         "top_answer_share": 0.5}


def test_answer_extraction_is_explicit():
    assert reasoning_tasks.extract_answer("a <answer> 1 </answer> b <answer>42</answer>", "tag") == "42"
    assert reasoning_tasks.extract_answer("42", "tag") is None
    assert reasoning_tasks.extract_answer("\n  42.\nbecause", "plain") == "42"
    assert reasoning_tasks.extract_answer("", "plain") == ""
    assert reasoning_tasks.extract_answer("3 legs each, so 1,204 in all.", "number") == "1204"
    assert reasoning_tasks.extract_answer("-2.5 or so", "number") == "-2.5"
    assert reasoning_tasks.extract_answer("none", "number") is None


def test_a_reasoning_gym_run_records_its_splits_and_trains_every_algorithm(tiny_lm, tmp_path):
    spec = tmp_path / "rg.yaml"
    spec.write_text("reasoning_gym:\n  generators: {chain_sum: {max_terms: 3}}\n  answer_format: plain\n"
                    "  sizes: {train: 40, validation: 6, test: 6}\nmax_new_tokens: 4\nprompts_per_step: 2\n"
                    "samples_per_prompt: 2\neval_prompts: 2\n")
    for algo in ("reinforce", "ppo", "trpo"):
        out = tmp_path / algo
        assert main(["train", "--algo", algo, "--task", str(spec), "--model", str(tiny_lm), "--steps", "2",
                     "--no-progress", "--out", str(out), "eval_every=1"]) == 0
        checkpoint = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
        recorded = json.loads((checkpoint / "task.json").read_text())
        assert recorded["splits"]["test"] == {"seed": 2_000_000, "size": 6}
        assert recorded["generators"] == {"chain_sum": {"max_terms": 3}}
        assert json.loads((out / "final_eval.json").read_text())["test/n"] == 6


# --- math-verify ------------------------------------------------------------------------------
def test_the_math_reward_compares_answers_as_mathematics():
    reward = build("math").fn
    completions = ["so \\boxed{\\frac{1}{2}}", "it is 0.5", "first 3 then 2", "\\boxed{\\{2,1\\}}", "no idea",
                   "$\\frac{6}{8}$"]
    answers = ["1/2", "\\frac{1}{2}", "3", "\\{1,2\\}", "7", "0.75"]
    assert reward([""] * 6, completions, {"answer": answers}) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    with pytest.raises(RewardError, match="column 'answer'"):
        reward([""], ["1"], {})
    with pytest.raises(RewardError, match="only a weight"):
        build({"reward": "math", "strict": True})


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(TaskError, match=r"pip install -e '\.\[tasks\]'"):
        tasks.load("reasoning-gym:chain_sum", set())
    monkeypatch.setitem(sys.modules, "textarena", None)
    with pytest.raises(TaskError, match=r"textarena package: pip install"):
        tasks.load("textarena:GuessTheNumber-v0", set())
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(RewardError, match="math-verify"):
        build("math")


# --- TextArena --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_lm(tmp_path_factory):
    """The tiny LM with room for a game's rules (~500 byte-level tokens) and its turns."""
    from lm_helpers import make_tiny_lm
    return make_tiny_lm(tmp_path_factory.mktemp("long") / "tiny", context=2048)


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory):
    """long_lm's kind with a chat template that ignores tools= (as SmolLM2's does)."""
    from lm_helpers import make_tiny_lm
    from transformers import AutoTokenizer
    path = make_tiny_lm(tmp_path_factory.mktemp("chat") / "tiny", context=2048)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


def test_a_textarena_game_plays_as_the_library_plays_it(long_lm):
    """Scripted replies through our episode path end where the game says, with its reward; the same
    moves made on textarena directly agree."""
    import random

    import textarena as ta
    tiny_lm = long_lm
    # an invalid move is retried without using up one of the game's 10 turns: 12 replies at most
    work = LMWorkload(config(tiny_lm, "textarena:GuessTheNumber-v0", max_turns=12, max_new_tokens=6,
                                max_episode_tokens=1024), seed=0)
    tok = work.policy.tokenizer
    moves = ["[10]", "x", "[5]", "[15]", "[3]", "[18]", "[1]", "[20]", "[2]", "[19]", "[4]", "[6]"]
    scripted_replies(work, [tok(m)["input_ids"] + [tok.eos_token_id] for m in moves])
    seed = 1_000_003
    episode = work.episodes.play([{"env_seed": seed}], 1, seed=0)[0][0]
    # the library, driven by hand with the same moves from the same seed
    env = ta.make("GuessTheNumber-v0")
    outer = random.getstate()
    env.reset(num_players=1, seed=seed)
    done, turns, invalid = False, 0, 0
    while not done:
        done, _ = env.step(moves[turns])
        invalid += env.state.error_count > 0 or bool(done and env.state.game_info[0]["invalid_move"])
        turns += 1
    rewards, _ = env.close()
    random.setstate(outer)
    assert len(episode.ends) == turns and episode.terminated
    assert episode.rewards == [0.0] * (turns - 1) + [rewards[0]]
    assert episode.success == (rewards[0] >= 1) and episode.invalid_moves == invalid >= 1
    assert "[GAME]" not in episode.messages[0]["content"] and "Guess The Number" in episode.messages[0]["content"]


def test_textarena_seeds_give_the_same_games_whatever_else_uses_random():
    import random
    from policygrad.lm.arena import ArenaEnv
    a, b = ArenaEnv("GuessTheNumber-v0"), ArenaEnv("GuessTheNumber-v0")
    a.reset(seed=5)
    random.seed(123)
    b.reset(seed=5)
    state = random.getstate()
    assert a.env.state.game_state["game_number"] == b.env.state.game_state["game_number"]
    a.step("[7]")
    assert random.getstate() == state  # the game's draws stay out of everyone else's stream


def test_a_two_player_game_needs_an_opponent_and_plays_against_it(tmp_path, monkeypatch):
    from policygrad.lm.arena import ArenaEnv
    (tmp_path / "rps_bot.py").write_text("def rock(observation):\n    return '[rock]'\n"
                                         "def boom(observation):\n    raise ValueError('no move')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskError, match="game for two"):
        ArenaEnv("IteratedRockPaperScissors-v0").reset(seed=0)
    env = ArenaEnv("IteratedRockPaperScissors-v0", opponent="rps_bot:rock", env_kwargs={"num_rounds": 2})
    env.reset(seed=0)
    _, reward, done, _, _ = env.step("[paper]")
    assert not done and reward == 0.0
    _, reward, done, _, info = env.step("[paper]")
    assert done and reward == 1.0 and info["success"]          # paper beats rock twice
    with pytest.raises(TaskError, match="opponent raised ValueError"):
        boom = ArenaEnv("IteratedRockPaperScissors-v0", opponent="rps_bot:boom")
        boom.reset(seed=0)
        boom.step("[paper]")
    with pytest.raises(TaskError, match="name the frozen model as model:NAME"):
        ArenaEnv("IteratedRockPaperScissors-v0", opponent="reference")


def test_python_makes_a_game_for_two_with_a_function_as_the_other_player():
    task = policygrad.Task.textarena("IteratedRockPaperScissors-v0", opponent=lambda observation: "[rock]",
                                     num_rounds=2)
    env = task.env()
    env.reset(seed=0)
    env.step("[paper]")
    _, reward, done, _, info = env.step("[paper]")
    assert done and reward == 1.0 and info["success"]
    assert len(task.rows("test")) > 0 and task.defaults["max_turns"] == 10
    with pytest.raises(TaskError, match="opponent must be module:function, model:NAME"):
        policygrad.Task.textarena("IteratedRockPaperScissors-v0", opponent=3)


def test_a_frozen_model_plays_the_other_seat_greedily(chat_lm, tmp_path, monkeypatch):
    from policygrad.lm.arena import ArenaEnv, ModelOpponent
    seat = ArenaEnv("IteratedRockPaperScissors-v0", opponent=f"model:{chat_lm}", env_kwargs={"num_rounds": 3})
    again = ArenaEnv("IteratedRockPaperScissors-v0", opponent=f"model:{chat_lm}", env_kwargs={"num_rounds": 3})
    assert seat.opponent.model is again.opponent.model          # one copy per process
    calls, replies = [], ModelOpponent.__call__
    monkeypatch.setattr(ModelOpponent, "__call__", lambda self, observation: calls.append(observation) or
                        replies(self, observation))
    games = []
    for env in (seat, again):
        transcript = [env.reset(seed=3)[0]]
        for move in ("[rock]", "[paper]", "[scissors]"):
            observation, reward, done, _, _ = env.step(move)
            transcript.append((observation, reward, done))
            if done:
                break
        games.append(transcript)
    monkeypatch.undo()
    assert calls and games[0] == games[1]                          # greedy: the same game twice
    # its move is the model's greedy reply to the game's messages under its chat template
    model, tokenizer = ModelOpponent.loaded[str(chat_lm)]
    text = tokenizer.apply_chat_template([{"role": "user", "content": calls[0]}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    greedy = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                            pad_token_id=tokenizer.pad_token_id)
    assert seat.opponent(calls[0]) == tokenizer.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True).strip()
    with pytest.raises(TaskError, match="opponent 'model:.*no-such-model'"):
        ArenaEnv("IteratedRockPaperScissors-v0", opponent=f"model:{tmp_path / 'no-such-model'}")


# --- tools ------------------------------------------------------------------------------------
def test_calc_does_arithmetic_and_nothing_else():
    assert calc("37 * (12 + 5)") == "629" and calc("7 / 2") == "3.5" and calc("-3 ** 2") == "-9"
    for bad in ("__import__('os').system('true')", "2 ** 1000", "x + 1", "1; 2"):
        with pytest.raises((ValueError, SyntaxError)):
            calc(bad)


def test_tool_calls_are_parsed_run_and_failures_are_signals():
    names = {"calc"}
    assert tools.parse_calls("plain reply", names) == []
    (good,) = tools.parse_calls('<tool_call>{"name": "calc", "arguments": {"expression": "2+2"}}</tool_call>', names)
    assert good.name == "calc" and good.arguments == {"expression": "2+2"} and not good.malformed
    bad = tools.parse_calls('<tool_call>{"name": calc}</tool_call> <tool_call>{"name": "sql", "arguments": {}}'
                            '</tool_call><tool_call>{"name": "calc", "arguments": "2+2"}', names)
    assert [c.malformed != "" for c in bad] == [True, True, True]

    def hangs(seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long
        """
        time.sleep(seconds)
        return "woke"
    box = {"calc": calc, "hangs": hangs}
    calls = tools.parse_calls('<tool_call>{"name": "calc", "arguments": {"expression": "6*7"}}</tool_call>'
                              '<tool_call>{"name": "calc", "arguments": {"expr": "1"}}</tool_call>'
                              '<tool_call>{"name": "calc", "arguments": {"expression": "1/0"}}</tool_call>'
                              '<tool_call>{"name": "hangs", "arguments": {"seconds": 30}}</tool_call>'
                              '<tool_call>not json</tool_call>', set(box))
    start = time.perf_counter()
    texts, failed = tools.answers(calls, box, timeout=0.3)
    assert time.perf_counter() - start < 5
    assert texts[0] == "42" and failed == 4
    assert "TypeError" in texts[1] and "ZeroDivisionError" in texts[2] and "within 0.3 s" in texts[3]
    assert texts[4].startswith("error: malformed tool call")


def test_a_tool_without_a_usable_schema_is_refused():
    def no_doc(x: int) -> int:
        return x
    with pytest.raises(TaskError, match="no usable schema"):
        tools.schemas([no_doc], "text env 'e'")


def test_tool_results_are_env_tokens_and_the_episode_ends_on_the_answer(chat_lm):
    work = LMWorkload(config(chat_lm, "calculator-arithmetic", max_new_tokens=80, max_episode_tokens=1024),
                      seed=0)
    tok = work.policy.tokenizer
    env = CalculatorArithmetic()
    seed = 2_000_001
    env.reset(seed=seed)
    question = env.reset(seed=seed)[0]
    expression = question.split("What is ")[1].split("?")[0]
    call = f'<tool_call>{{"name": "calc", "arguments": {{"expression": "{expression}"}}}}</tool_call>'
    replies = [call, "<tool_call>{oops</tool_call>", f"It is {env.answer}"]
    scripted_replies(work, [tok(r)["input_ids"] + [tok.eos_token_id] for r in replies])
    (episode,), batch = work.episodes.play([{"env_seed": seed}], 1, seed=0)
    assert [m["role"] for m in episode.messages] == ["system", "user", "assistant", "tool", "assistant", "tool",
                                                     "assistant"]
    assert "calc" in episode.messages[0]["content"]                     # SmolLM2-like template: tools in a system message
    assert episode.messages[3]["content"] == str(env.answer)
    assert episode.messages[5]["content"].startswith("error: malformed tool call")
    assert episode.rewards == [0.0, 0.0, 1.0] and episode.success and episode.terminated
    assert episode.tool_calls == 2 and episode.bad_tool_calls == 1
    # the tool's answer is environment text: no loss, no log-prob; the decoded whole is the template's
    tool_tokens = tok(str(env.answer), add_special_tokens=False)["input_ids"]
    model = batch.mask[0].tolist()
    ids = episode.ids
    at = next(i for i in range(len(ids)) if ids[i:i + len(tool_tokens)] == tool_tokens and not model[i])
    assert all(m == 0.0 for m in model[at:at + len(tool_tokens)])
    rendered = tok.apply_chat_template(episode.messages, tokenize=False)
    assert tok.decode(episode.prompt_ids + episode.ids) == rendered.removesuffix("\n")  # the template's last newline comes after the end
    from policygrad.lm.episodes import episode_metrics, episode_stats
    metrics = episode_metrics(episode_stats([episode], torch.zeros(1)), "test")
    assert metrics["test/episode/tool_call_rate"] == 2 / 3 and metrics["test/episode/bad_tool_call_rate"] == 1 / 2


def test_a_template_that_rewrites_history_is_refused(tiny_lm, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    tok.chat_template = CHAT_TEMPLATE
    tools.check_prefix_preserving(tok, ("user", "assistant", "tool"), "task 't'")   # ours keeps history
    # drops every assistant reply but the last, as templates that strip past reasoning do
    tok.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}<|{{ m['role'] }}|>"
                         "{{ m['content'] }}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>"
                         "{% endif %}")
    with pytest.raises(TaskError, match="rewrites earlier turns"):
        tools.check_prefix_preserving(tok, ("user", "assistant"), "task 't'")
    model = tmp_path / "rewrites"
    tok.save_pretrained(model)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (model / name).write_bytes((tiny_lm / name).read_bytes())
    work = LMWorkload(config(model, "guess-number"), seed=0)
    with pytest.raises(TaskError, match="prefix-preserving"):
        work.collect()


# --- crossed with what exists: ranks, FSDP, LoRA in bfloat16, PPO with a critic -------------------
CROSSINGS = {
    "reasoning-gym, 2 processes": ("rg", ["--nproc", "2"]),
    "textarena, 2 processes, fsdp": ("textarena:GuessTheNumber-v0", ["--nproc", "2", "shard=fsdp", "max_turns=2"]),
    "textarena, ppo with a critic": ("textarena:GuessTheNumber-v0", ["--algo", "ppo", "use_value_head=true",
                                                                     "advantage=gae", "max_turns=2"]),
    "tools, lora in bfloat16": ("calculator-arithmetic", ["lora_r=4", "dtype=bfloat16", "max_new_tokens=8"]),
    "tools, 2 processes": ("calculator-arithmetic", ["--nproc", "2", "max_new_tokens=8"]),
    "textarena for two against a frozen model, 2 processes": ("rps", ["--nproc", "2", "max_turns=2"]),
}


@pytest.mark.parametrize("crossing", list(CROSSINGS))
def test_ecosystem_tasks_cross_the_run_options(crossing, chat_lm, tmp_path):
    task, extra = CROSSINGS[crossing]
    if task == "rg":
        task = str(tmp_path / "rg.yaml")
        (tmp_path / "rg.yaml").write_text("reasoning_gym:\n  generators: chain_sum\n  sizes: {train: 40, validation: 6, "
                                          "test: 6}\nmax_new_tokens: 4\n")
    if task == "rps":
        task = str(tmp_path / "rps.yaml")
        (tmp_path / "rps.yaml").write_text(f"env: textarena:IteratedRockPaperScissors-v0\nenv_kwargs: "
                                           f"{{opponent: 'model:{chat_lm}', num_rounds: 2}}\n")
    algo = [] if "--algo" in extra else ["--algo", "reinforce"]
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "policygrad", "train", *algo, "--task", task, "--model", str(chat_lm),
                        "--steps", "2", "--no-progress", "--out", str(out), "prompts_per_step=2",
                        "samples_per_prompt=2", "eval_prompts=2", "eval_every=1", "max_episode_tokens=1024",
                        "max_new_tokens=6", *extra], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    final = json.loads((out / "final_eval.json").read_text())
    assert final["test/n"] >= 6 and all(json.loads(line)["update"] for line in
                                        (out / "metrics.jsonl").read_text().splitlines())
