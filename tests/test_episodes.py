"""Multi-turn episodes (lm/episodes.py): conversations kept as sampled token ids, model-token masks,
per-turn rewards, and credit assignment over turns from the core's GAE and returns."""
import json
import math
import sys

import gymnasium as gym
import pytest
import torch

import policygrad
from policygrad.batch import Batch
from policygrad.cli import main
from policygrad.resolve import resolve
from policygrad.core import advantages as adv
from policygrad.lm import tasks
from policygrad.lm.generation import Generated
from policygrad.lm.rollout import LMWorkload
from policygrad.lm.text_envs import Dialogue, GuessNumber

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")

ENV_MODULE = '''
import math, os
import gymnasium as gym

class Three(gym.Env):
    """Three turns: 'one', 'two', then 'bye' and terminated; reward = the turn number."""
    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k, self.seed = 0, seed
        return f"Start {seed % 5}", {}
    def step(self, action):
        self.k += 1
        if os.environ.get("THREE_BOOM_HELD_OUT") and self.seed >= 1_000_000 and self.k == 2:
            raise RuntimeError("the server went away")
        return ["one", "two", "bye"][self.k - 1], float(self.k), self.k == 3, False, {"success": self.k == 3}

class RaisesAtReset(gym.Env):
    def reset(self, *, seed=None, options=None):
        raise ConnectionError("no game server")
    def step(self, action):
        return "", 0.0, True, False, {}

class NumberObs(Three):
    def step(self, action):
        return 42, 0.0, False, False, {}

class NanReward(Three):
    def step(self, action):
        return "again", math.nan, False, False, {}

class Endless(Three):
    def step(self, action):
        return "go on", 0.1, False, False, {}

class Counted(Three):
    """Counts the instances made, as an env that loads a reward model would pay for each."""
    made = 0
    def __init__(self):
        type(self).made += 1
'''


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory):
    """The tiny LM with a chat template (its own turn markers, <eos> ending each turn)."""
    from lm_helpers import make_tiny_lm
    from transformers import AutoTokenizer
    path = make_tiny_lm(tmp_path_factory.mktemp("chat") / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def env_module(tmp_path, monkeypatch):
    (tmp_path / "three_env.py").write_text(ENV_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("three_env", None)
    yield tmp_path
    sys.modules.pop("three_env", None)


def config(model, task, **overrides):
    values = {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 5, "eval_prompts": 2,
              "logprob_chunk": 4, "lr": 1e-3, **overrides}
    return resolve({}, values, {"task": task, "model": str(model), "algo": overrides.get("algo", "reinforce")})


def scripted_replies(work, replies: list[list[int]]):
    """Replace sampling with fixed token ids per turn (the same for every episode), recording what
    each turn's generation returned."""
    given = []

    def generate_ids(seen, attention, cfg, seed, max_new_tokens, samples_per_prompt=1, past=None,
                     model_defaults=False):
        ids = replies[len(given)]
        tokens = torch.tensor([ids] * len(seen))
        mask = work.policy.completion_mask(tokens)
        log_prob = -torch.arange(1, len(ids) + 1, dtype=torch.float32).expand(len(seen), -1) * mask
        given.append(tokens)
        return Generated(tokens=tokens, mask=mask, log_prob=log_prob)
    work.policy.generate_ids = generate_ids
    return given


# --- the conversation as token ids ------------------------------------------------------------
def test_sampled_ids_are_kept_and_the_conversation_is_the_templates(chat_lm, env_module):
    work = LMWorkload(config(chat_lm, "three_env:Three"), seed=0)
    tok = work.policy.tokenizer
    eos = tok.eos_token_id
    # turn 1 ends with the model's own <eos>; turn 2 is cut by max_new_tokens (no <eos>); turn 3 <eos>
    replies = [tok("hi")["input_ids"] + [eos], tok("abcde")["input_ids"], tok("ok")["input_ids"] + [eos]]
    given = scripted_replies(work, replies)
    played, batch = work.episodes.play([{"env_seed": 3}], 1, seed=0)
    e = played[0]
    assert len(e.ends) == 3 and e.terminated and not e.truncated and e.rewards == [1.0, 2.0, 3.0]
    # each turn's sampled ids appear unchanged at that turn's model-token positions, and only there
    for k, tokens in enumerate(given):
        at = [i for i, (m, t) in enumerate(zip(e.model, e.turn)) if m and t == k]
        assert [e.ids[i] for i in at] == tokens[0].tolist()
    # the whole conversation, decoded, is the chat template's rendering of it
    messages = [{"role": "user", "content": "Start 3"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "one"}, {"role": "assistant", "content": "abcde"},
                {"role": "user", "content": "two"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "bye"}]
    assert e.messages == messages
    assert tok.decode(e.prompt_ids + e.ids) == tok.apply_chat_template(messages, tokenize=False)
    # batch layout: mask on the model's tokens only, rewards on each turn's last model token
    assert batch.mask[0].tolist() == [float(m) for m in e.model]
    assert batch.actions[0].tolist() == e.ids
    assert [i for i, r in enumerate(batch.rewards[0].tolist()) if r] == e.ends
    assert batch.rewards[0, e.ends].tolist() == [1.0, 2.0, 3.0]
    assert batch.terminated[0].sum() == 1 and batch.terminated[0, e.ends[-1]] == 1 and batch.truncated.sum() == 0
    assert batch.turn[0].tolist() == e.turn and set(e.turn) == {0, 1, 2}
    # environment tokens carry no log-prob, so no loss, KL or entropy
    assert torch.all(batch.log_prob[0][batch.mask[0] == 0] == 0)


def test_an_episode_that_spends_its_token_budget_is_truncated(chat_lm, env_module):
    work = LMWorkload(config(chat_lm, "three_env:Endless", max_episode_tokens=80, max_turns=20), seed=0)
    played, batch = work.episodes.play([{"env_seed": 1}], 1, seed=0)
    e = played[0]
    assert e.truncated and not e.terminated and len(e.ids) <= 80 + 40  # the env's last answer may pass it
    assert 1 < len(e.ends) < 20 and batch.truncated[0, e.ends[-1]] == 1


def test_a_user_env_with_three_turns_runs_three_turns_and_trains(chat_lm, env_module):
    cfg = config(chat_lm, "three_env:Three", max_turns=8)
    work = LMWorkload(cfg, seed=0)
    batch, metrics = work.collect()
    assert metrics["episode/turns_mean"] == 3.0 and metrics["episode/return_mean"] == 6.0
    assert metrics["episode/success_rate"] == 1.0 and metrics["train/reward_mean"] == 2.0
    assert batch.turn is not None and batch.shape[0] == 4
    result = policygrad.train(algo="reinforce", model=str(chat_lm), task="three_env:Three", total_steps=2,
                              prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4, eval_prompts=2,
                              eval_every=1, progress=False, out=None)
    assert result.history[-1]["update"] == 2 and result.history[-1]["eval/episode/turns_mean"] == 3.0
    test = policygrad.evaluate(result, split="test")
    assert test.n == 100 and test.episode["turns_mean"] == 3.0
    assert test.samples[0]["turns"] == 3 and test.samples[0]["conversation"][-1]["content"] == "bye"


def test_envs_are_made_once_and_reset_for_every_episode(chat_lm, env_module):
    work = LMWorkload(config(chat_lm, "three_env:Counted", max_turns=8), seed=0)
    import three_env
    made = three_env.Counted.made                     # the task's own, for its rows' first messages
    for _ in range(3):
        _, metrics = work.collect()
        assert metrics["episode/turns_mean"] == 3.0 and metrics["episode/return_mean"] == 6.0
    work.evaluate("validation")
    assert three_env.Counted.made - made == 4         # one per episode of a step, reused after


def test_an_env_object_from_python_is_a_task(tiny_lm):
    class Echo(gym.Env):
        def reset(self, *, seed=None, options=None):
            self.left = 2
            return f"Say {seed % 3} twice.", {}

        def step(self, action):
            self.left -= 1
            return "again", float(len(action) > 1), self.left == 0, False, {}
    for env in (Echo, Echo()):  # a class (factory) or an instance (copied once per env of the pool)
        result = policygrad.train(algo="ppo", model=str(tiny_lm), task=env, total_steps=1, prompts_per_step=2,
                                  samples_per_prompt=2, max_new_tokens=3, eval_prompts=2, batch_size=4,
                                  progress=False, out=None)
        assert result.history[0]["episode/turns_mean"] == 2.0


# --- credit assignment over turns -------------------------------------------------------------
def hand_batch(truncated_second: bool = True) -> Batch:
    """Episode 0: 3 turns, terminated; episode 1: 2 turns and a final answer, truncated (bootstrap
    0.5) or terminated. Tokens: m = the model's, e = the environment's. V(s_k) sits at each turn's
    first model token (the value of the context before it)."""
    #            turn: 0  0  0  1  1  1  2  2          0  0  1  1  1  pad pad pad
    model = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1], [1, 0, 1, 1, 0, 0, 0, 0]], dtype=torch.float32)
    turn = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2], [0, 0, 1, 1, 1, -1, -1, -1]])
    rewards = torch.zeros(2, 8)
    rewards[0, [1, 3, 7]] = torch.tensor([0.0, -0.5, 1.0])
    rewards[1, [0, 3]] = torch.tensor([0.2, 0.3])
    values = torch.zeros(2, 8)
    values[0, [0, 3, 6]] = torch.tensor([0.4, 0.6, 0.8])
    values[1, [0, 2]] = torch.tensor([0.1, 0.7])
    values[0, [1, 7]] = 9.0  # a turn's later tokens have seen part of the reply: never read
    values[1, 3] = 9.0
    next_values = torch.zeros(2, 8)
    next_values[1, 3] = 0.5
    terminated, truncated = torch.zeros(2, 8), torch.zeros(2, 8)
    terminated[0, 7] = 1.0
    (truncated if truncated_second else terminated)[1, 3] = 1.0
    return Batch(obs=torch.zeros(2, 8), actions=torch.zeros(2, 8, dtype=torch.long), log_prob=torch.zeros(2, 8),
                 rewards=rewards, terminated=terminated, truncated=truncated, mask=model, values=values * model,
                 next_values=next_values, turn=turn, group=torch.tensor([0, 0]), baseline=torch.zeros(2))


class Cfg:
    gamma, gae_lambda, baseline, turn_advantage, advantage, normalize_advantages = 0.9, 0.8, "none", "gae", "gae", False


def test_turn_view_gathers_each_turns_reward_value_and_end():
    view = adv.turn_view(hand_batch())
    assert view["last"].tolist() == [[1, 3, 7], [0, 3, -1]]
    assert view["first"].tolist() == [[0, 3, 6], [0, 2, -1]]
    assert view["tokens"].tolist() == [[2, 1, 2], [1, 2, 0]]
    assert torch.allclose(view["rewards"], torch.tensor([[0.0, -0.5, 1.0], [0.2, 0.3, 0.0]]))
    assert torch.allclose(view["values"], torch.tensor([[0.4, 0.6, 0.8], [0.1, 0.7, 0.0]]))
    assert torch.allclose(view["next_values"], torch.tensor([[0.6, 0.8, 0.0], [0.7, 0.5, 0.0]]))
    assert view["terminated"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert view["truncated"].tolist() == [[0, 0, 0], [0, 1, 0]]


def one_turn_bandit() -> Batch:
    """The issue's demonstration: one-turn episodes, a first token a in {0, 1} with reward a, then
    EOS; exact values: 0.5 before a (nothing is known), a after it."""
    a = torch.tensor([0.0, 1.0])
    rewards = torch.stack([torch.zeros(2), a], 1)                                 # reward on the last token
    values = torch.stack([torch.full((2,), 0.5), a], 1)                           # (2, 2)
    ones, zeros = torch.ones(2, 2), torch.zeros(2, 2)
    return Batch(obs=torch.zeros(2, 2), actions=torch.zeros(2, 2, dtype=torch.long), log_prob=zeros,
                 rewards=rewards, terminated=torch.tensor([[0.0, 1.0], [0.0, 1.0]]), truncated=zeros, mask=ones,
                 values=values, next_values=zeros, turn=torch.zeros(2, 2, dtype=torch.long),
                 group=torch.tensor([0, 1]), baseline=torch.zeros(2))


def test_turn_gae_judges_a_reply_against_the_value_before_it():
    cfg = Cfg()
    cfg.gamma = cfg.gae_lambda = 1.0
    out = adv.compute(one_turn_bandit(), cfg)
    # read after the action (a, as before this fix) the advantage would be a - a = 0 for both
    assert torch.allclose(out.advantages, torch.tensor([[-0.5, -0.5], [0.5, 0.5]]))
    assert torch.allclose(out.returns, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))


def hand_turn_gae(rewards, values, boot, terminal, gamma, lam):
    """The textbook loop over one episode's turns: V(s_k) = values[k], a truncated episode's last
    turn bootstraps from boot."""
    advantages, running = [0.0] * len(rewards), 0.0
    for k in reversed(range(len(rewards))):
        after = values[k + 1] if k + 1 < len(rewards) else (0.0 if terminal else boot)
        delta = rewards[k] + gamma * after - values[k]
        running = delta + (gamma * lam * running if k + 1 < len(rewards) else 0.0)
        advantages[k] = running
    return advantages


@pytest.mark.parametrize("truncated", [True, False])
def test_two_turn_gae_equals_a_hand_written_loop(truncated):
    """Two turns of random lengths with random values at every token: only each turn's first
    token's value (and the bootstrap) may matter."""
    torch.manual_seed(3)
    #                      turn 0 (model, model, env, env) | turn 1 (model x3, env)
    turn = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    rewards = torch.zeros(1, 8)
    rewards[0, 1], rewards[0, 6] = 0.3, -0.7
    values = torch.randn(1, 8) * mask
    next_values = torch.zeros(1, 8)
    next_values[0, 6] = 0.45
    ends = torch.zeros(1, 8)
    ends[0, 6] = 1.0
    batch = Batch(obs=torch.zeros(1, 8), actions=torch.zeros(1, 8, dtype=torch.long), log_prob=torch.zeros(1, 8),
                  rewards=rewards, terminated=torch.zeros(1, 8) if truncated else ends,
                  truncated=ends if truncated else torch.zeros(1, 8), mask=mask, values=values,
                  next_values=next_values, turn=turn, group=torch.tensor([0]), baseline=torch.zeros(1))
    cfg = Cfg()
    cfg.gamma, cfg.gae_lambda = 0.95, 0.7
    out = adv.compute(batch, cfg)
    expected = hand_turn_gae([0.3, -0.7], [float(values[0, 0]), float(values[0, 4])], 0.45, not truncated, 0.95, 0.7)
    assert torch.allclose(out.advantages[0, [0, 1]], torch.tensor([expected[0]] * 2), atol=1e-6)
    assert torch.allclose(out.advantages[0, [4, 5, 6]], torch.tensor([expected[1]] * 3), atol=1e-6)
    # the value head is regressed where V(s_k) is read, a turn weighing its model tokens
    assert out.value_weight[0].tolist() == [2, 0, 0, 0, 3, 0, 0, 0]
    assert torch.allclose(out.returns[0, [0, 4]], torch.tensor(expected) + values[0, [0, 4]], atol=1e-6)


def test_the_value_loss_of_turns_reads_turn_starts_only():
    from policygrad.core.losses import value_loss
    batch = adv.compute(hand_batch(), Cfg())
    fitted = batch.returns.clone()                     # a critic exactly right at every token
    assert value_loss(fitted, batch) == 0
    later = fitted.clone()
    later[0, [1, 7]] += 5.0                            # a turn's later tokens carry no value target
    assert value_loss(later, batch) == 0
    start = fitted.clone()
    start[0, 0] += 1.0                                 # turn 0 of episode 0 (2 tokens) off by 1
    assert torch.isclose(value_loss(start, batch), torch.tensor(2.0 / 8))


@pytest.mark.parametrize("truncated_second, second", [(True, [0.766, 0.05]), (False, [0.442, -0.4])])
def test_gae_over_turns_equals_the_hand_table_and_control_gae(truncated_second, second):
    batch = hand_batch(truncated_second)
    out = adv.compute(batch, Cfg())
    # hand: gamma 0.9, lambda 0.8. Episode 0 (terminated): deltas 0.14, -0.38, 0.2 -> A = -0.02992,
    # -0.236, 0.2. Episode 1: truncated bootstraps from 0.5 (deltas 0.73, 0.05), terminated does
    # not (0.73, -0.4).
    first = [-0.02992, -0.236, 0.2]
    expected = torch.tensor([[first[0], first[0], 0, first[1], 0, 0, first[2], first[2]],
                             [second[0], 0, second[1], second[1], 0, 0, 0, 0]])
    assert torch.allclose(out.advantages, expected, atol=1e-6)
    # the control estimator on the same numbers, turns as steps (B, K)
    view = adv.turn_view(batch)
    control = Batch(obs=torch.zeros(2, 3), actions=torch.zeros(2, 3), log_prob=torch.zeros(2, 3),
                    rewards=view["rewards"], terminated=view["terminated"], truncated=view["truncated"],
                    mask=view["valid"], values=view["values"], next_values=view["next_values"])
    control_adv, control_ret = adv.ADVANTAGES["gae"](control, Cfg())
    assert torch.allclose(out.advantages, (control_adv * view["valid"]).gather(1, batch.turn.clamp(min=0)) * batch.mask)
    assert torch.allclose(control_adv[0], torch.tensor(first), atol=1e-6)


def test_discounted_and_outcome_over_turns_equal_the_hand_table():
    batch = hand_batch()
    cfg = Cfg()
    cfg.turn_advantage = "discounted"
    out = adv.compute(batch, cfg)
    # G: episode 0: 0.36, 0.4, 1.0; episode 1 (truncated, no critic: bootstrap 0): 0.47, 0.3
    assert torch.allclose(out.advantages[0, [1, 3, 7]], torch.tensor([0.36, 0.4, 1.0]))
    assert torch.allclose(out.advantages[1, [0, 3]], torch.tensor([0.47, 0.3]))
    cfg.baseline = "rloo"  # each turn against the same turn of the other episode from the same seed
    out = adv.compute(batch, cfg)
    # episode 1 has no third turn: episode 0's third is alone in its cell, baseline 0
    assert torch.allclose(out.advantages[0, [1, 3, 7]], torch.tensor([0.36 - 0.47, 0.4 - 0.3, 1.0]))
    assert torch.allclose(out.advantages[1, [0, 3]], torch.tensor([0.47 - 0.36, 0.3 - 0.4]))
    cfg.baseline = "group"  # two per cell: +-(difference / 2) / (|difference| / sqrt 2) = +-1/sqrt 2
    out = adv.compute(batch, cfg)
    half = 2 ** -0.5
    assert torch.allclose(out.advantages[0, [1, 3, 7]], torch.tensor([-half, half, 0.0]), atol=1e-4)
    assert torch.allclose(out.advantages[1, [0, 3]], torch.tensor([half, -half]), atol=1e-4)
    cfg.turn_advantage, cfg.baseline = "outcome", "none"
    out = adv.compute(batch, cfg)
    assert torch.allclose(out.advantages[0][batch.mask[0] > 0], torch.full((5,), 0.5))
    assert torch.allclose(out.advantages[1][batch.mask[1] > 0], torch.full((3,), 0.5))
    assert torch.all(out.advantages[batch.mask == 0] == 0)


def test_one_turn_outcome_equals_the_single_turn_sequence_advantage():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    rewards = torch.randn(4, 4) * mask
    single = Batch(obs=torch.zeros(4, 4), actions=torch.zeros(4, 4), log_prob=torch.zeros(4, 4), rewards=rewards,
                   terminated=torch.zeros(4, 4), truncated=torch.zeros(4, 4), mask=mask,
                   group=torch.tensor([0, 0, 1, 1]), baseline=torch.zeros(4))
    episodic = single.replace(turn=torch.where(mask > 0, 0, -1))
    for baseline in ("none", "rloo", "group"):
        cfg = Cfg()
        cfg.turn_advantage, cfg.advantage, cfg.baseline = "outcome", "sequence", baseline
        cfg.normalize_advantages = True
        assert torch.allclose(adv.compute(episodic, cfg).advantages, adv.compute(single, cfg).advantages, atol=1e-6)


# --- built-in tasks ---------------------------------------------------------------------------
def test_dialogue_defaults_and_kl_in_reward_taking_k1():
    flags = {"algo": "reinforce", "task": "dialogue", "model": "any"}
    cfg = resolve({}, {}, flags)
    assert (cfg.turn_advantage, cfg.kl_in, cfg.kl_estimator) == ("discounted", "loss", "k2")
    cfg = resolve({}, {"kl_in": "reward"}, flags)  # k2 is refused in reward mode: its default is k1
    assert (cfg.kl_in, cfg.kl_estimator) == ("reward", "k1")


def test_guess_number_answers_higher_lower_and_ends_when_guessed():
    env = GuessNumber(n=32)
    env.reset(seed=5)
    target = env.target
    assert env.reset(seed=5)[0] and env.target == target  # deterministic by seed
    assert env.step("I think 0")[:4] == ("Higher.", -0.05, False, False)
    assert env.step("hmm")[1] == -0.05 and "not a number" in env.step("hmm")[0].lower()
    obs, reward, terminated, _, info = env.step(f"It is {target}.")
    assert (obs, reward, terminated, info["success"]) == ("Correct!", 0.95, True, True)
    shaped = GuessNumber(invalid_cost=0.1)
    shaped.reset(seed=5)
    assert shaped.step("hmm")[1] == pytest.approx(-0.15) and shaped.step("I think 0")[1] == -0.05


def test_dialogue_asks_about_a_word_of_the_reply_and_scores_each_turn():
    env = Dialogue()
    first, _ = env.reset(seed=2)
    assert first == Dialogue().reset(seed=2)[0]
    obs, reward, terminated, _, _ = env.step("I love wonderful gardens")
    assert reward > 0.5 and not terminated and any(w in obs for w in ("love", "wonderful", "gardens"))
    env.step("It is terrible and sad.")
    assert env.step("ok")[2] is True  # three turns
    task = tasks.load("dialogue", set())
    assert task.env is not None and task.defaults["max_turns"] == 3
    assert {r["env_seed"] for r in task.rows("train")}.isdisjoint(r["env_seed"] for r in task.rows("test"))


def test_a_task_yaml_names_an_env_with_its_arguments(tmp_path):
    (tmp_path / "t.yaml").write_text("env: dialogue\nenv_kwargs: {reward: length, turns: 2}\nmax_new_tokens: 9\n")
    task = tasks.load(str(tmp_path / "t.yaml"), {"max_new_tokens"})
    assert task.defaults["max_new_tokens"] == 9 and task.env().turns == 2
    (tmp_path / "bad.yaml").write_text("env: dialogue\nenv_kwargs: {colour: red}\n")
    with pytest.raises(tasks.TaskError, match="bad env_kwargs"):
        tasks.load(str(tmp_path / "bad.yaml"), set())
    (tmp_path / "cost.yaml").write_text("env: guess-number\nenv_kwargs: {invalid_cost: lots}\n")
    with pytest.raises(tasks.TaskError, match="bad env_kwargs .*'lots'"):
        tasks.load(str(tmp_path / "cost.yaml"), set())


# --- bad input: one line naming the env and the turn, exit 2, nothing lost ----------------------
@pytest.mark.parametrize("env, words", [
    ("RaisesAtReset", "reset(seed=0) raised ConnectionError: no game server"),
    ("NumberObs", "step at turn 1 returned an observation of type int"),
    ("NanReward", "step at turn 1 returned the reward nan"),
    ("Missing", "not found"),
])
def test_a_misbehaving_env_is_one_line_and_exit_2(env, words, chat_lm, env_module, capsys):
    code = main(["train", "--algo", "reinforce", "--task", f"three_env:{env}", "--model", str(chat_lm),
                 "--steps", "1", "--no-progress", "--out", str(env_module / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("policygrad: error:") and words in err[0], err
    assert f"three_env:{env}" in err[0]


@pytest.mark.parametrize("truncates", [False, True])
def test_an_env_that_never_ends_is_cut_at_max_turns(truncates, chat_lm, env_module):
    """max_turns is the game's horizon, a terminal state, unless max_turns_truncates says the env is
    really endless."""
    work = LMWorkload(config(chat_lm, "three_env:Endless", max_turns=4, max_turns_truncates=truncates), seed=0)
    batch, metrics = work.collect()
    assert metrics["episode/turns_mean"] == 4.0
    assert (batch.truncated.sum(), batch.terminated.sum()) == ((4, 0) if truncates else (0, 4))


def test_an_env_raising_mid_run_keeps_the_steps_done(chat_lm, env_module, monkeypatch, capsys):
    out = env_module / "run"
    args = ["train", "--algo", "reinforce", "--task", "three_env:Three", "--model", str(chat_lm), "--steps", "3",
            "--no-progress", "--out", str(out), "max_new_tokens=3", "checkpoint_every=1", "eval_every=2"]
    monkeypatch.setenv("THREE_BOOM_HELD_OUT", "1")  # validation episodes fail at their second turn
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "step at turn 2 raised RuntimeError: the server went away" in err[0], err
    done = [json.loads(line)["update"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert done and max(done) >= 1
    monkeypatch.delenv("THREE_BOOM_HELD_OUT")
    assert main(args) == 0  # the same command resumes from the last checkpoint and finishes
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["update"] for r in rows if "train/reward_mean" in r] == [1, 2, 3]
    assert json.loads((out / "final_eval.json").read_text())["test/episode/turns_mean"] == 3.0


@pytest.mark.parametrize("algo", ["reinforce", "ppo", "trpo"])
@pytest.mark.parametrize("turn_advantage", ["outcome", "discounted", "gae"])
def test_every_algorithm_trains_on_episodes_with_every_credit_assignment(algo, turn_advantage, tiny_lm):
    critic = {"use_value_head": True, "advantage": "gae"} if turn_advantage == "gae" else {}
    extra = {"batch_size": 4} if algo == "ppo" else {}
    # kl_in=reward: a tiny random model never guesses, and only the KL penalty makes returns differ
    cfg = resolve({}, {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 3, "max_turns": 3,
                       "eval_prompts": 2, "turn_advantage": turn_advantage, "lr": 1e-3, "kl_in": "reward",
                       **critic, **extra},
                  {"task": "guess-number", "model": str(tiny_lm), "algo": algo})
    from policygrad.algos import ALGOS, Progress
    work = LMWorkload(cfg, seed=0)
    batch, metrics = work.collect()
    assert metrics["episode/turns_mean"] == 3.0  # a tiny random model does not guess
    batch = adv.compute(batch, cfg)
    assert torch.all(batch.advantages[batch.mask == 0] == 0) and batch.advantages.abs().sum() > 0
    before = {k: v.detach().clone() for k, v in work.policy.named_parameters() if v.requires_grad}
    opts = ALGOS[algo].make_optimizers(work.policy, cfg)
    out = ALGOS[algo].update(work.policy, opts, batch, cfg, Progress(1.0, torch.Generator().manual_seed(0)))
    assert all(math.isfinite(v) for v in out.values() if isinstance(v, float))
    moved = [k for k, v in work.policy.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert any(k.startswith("model.") for k in moved)
    assert ("value_head.weight" in moved) == (turn_advantage == "gae")


def test_sample_and_eval_vs_base_show_whole_conversations(chat_lm, env_module, capsys):
    out = env_module / "run"
    assert main(["train", "--algo", "reinforce", "--task", "three_env:Three", "--model", str(chat_lm), "--steps", "1",
                 "--no-progress", "--out", str(out), "max_new_tokens=3", "eval_every=0"]) == 0
    capsys.readouterr()
    assert main(["sample", str(out), "--env-seed", "7", "--env-seed", "8", "-n", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4 and lines[0]["rewards"] == [1.0, 2.0, 3.0]
    assert [m["role"] for m in lines[0]["conversation"]] == ["user", "assistant"] * 3 + ["user"]
    assert lines[0]["conversation"][0]["content"] == "Start 2"
    assert main(["sample", str(out), "--prompt", "hello"]) == 2
    assert "give env seeds (--env-seed N)" in capsys.readouterr().err
    assert main(["eval", str(out), "--vs-base", "--split", "validation"]) == 0
    printed = capsys.readouterr().out
    assert "turns_mean" in printed and "[assistant]" in printed and "[user] one" in printed
    assert json.loads(printed.splitlines()[-1])["episode"]["success_rate"] == 1.0


def test_whiten_rewards_standardises_the_turn_rewards(chat_lm, env_module):
    work = LMWorkload(config(chat_lm, "three_env:Three", whiten_rewards=True, kl_coef=0.0), seed=0)
    batch, _ = work.collect()
    ends = adv.turn_view(batch)["last"]                                          # (4 episodes, 3 turns)
    std = torch.tensor([1.0, 2.0, 3.0] * 4).std()
    assert torch.allclose(batch.rewards.gather(1, ends), (torch.tensor([[1.0, 2.0, 3.0]] * 4) - 2.0) / std)
    assert batch.rewards.abs().sum() == batch.rewards.gather(1, ends).abs().sum()  # nothing elsewhere


def test_env_given_a_text_env_is_a_multi_turn_task(tiny_lm):
    """policygrad.train(env=MyTextEnv): a Text observation space marks an env as a text env."""
    result = policygrad.train(algo="reinforce", env=Dialogue, model=str(tiny_lm), total_steps=1, prompts_per_step=2,
                              samples_per_prompt=2, max_new_tokens=3, max_turns=2, eval_prompts=2, progress=False,
                              out=None)
    assert result.config.task.startswith("Dialogue@") and result.history[0]["episode/turns_mean"] == 2.0
    with pytest.raises(policygrad.UsageError, match="itself the task"):
        policygrad.train(algo="reinforce", env=Dialogue(), task="dialogue", model=str(tiny_lm), total_steps=1)


def test_the_sampled_log_probs_are_the_training_pass_ones(chat_lm, env_module):
    """Each turn's old log-probs come from its sampling pass (a left-padded context, a KV cache);
    the training pass over the whole conversation gives the same numbers, so a ratio starts at 1."""
    work = LMWorkload(config(chat_lm, "three_env:Three", max_new_tokens=6), seed=0)
    _, batch = work.episodes.play([{"env_seed": 1}, {"env_seed": 2}], 2, seed=5)
    with torch.no_grad():
        again = work.policy.log_prob(batch)
    assert batch.mask.sum() > 20 and torch.allclose(again, batch.log_prob, atol=1e-4)


def test_turns_reuse_the_kv_cache_and_sample_what_a_full_prefill_samples(chat_lm, env_module):
    """Fast path and naive twin: each turn runs only its new positions on the previous turn's KV
    cache (padding between turns masked), or the whole conversation again; same seeds, same episodes."""
    work = LMWorkload(config(chat_lm, "three_env:Three", max_new_tokens=6), seed=0)
    rows = [{"env_seed": 1}, {"env_seed": 2}]
    generate, calls = work.policy.generate_ids, []

    def spy(*args, past=None, **kwargs):
        calls.append(past is not None)
        return generate(*args, past=past, **kwargs)
    work.policy.generate_ids = spy
    cached, _ = work.episodes.play(rows, 2, seed=5)
    assert calls == [False, True, True]
    work.policy.generate_ids = lambda *args, past=None, **kwargs: generate(*args, past=None, **kwargs)
    full, _ = work.episodes.play(rows, 2, seed=5)
    assert [e.ids for e in cached] == [e.ids for e in full] and sum(len(e.ids) for e in full) > 40
    for a, b in zip(cached, full):
        assert torch.allclose(torch.tensor(a.log_prob), torch.tensor(b.log_prob), atol=1e-4)


def test_values_are_read_before_each_reply_and_a_truncated_episode_bootstraps_after_the_last_answer(
        chat_lm, env_module):
    """V(s_k) at each turn's first model token is the value head on the conversation up to, not
    including, the reply (a separate forward pass of that prefix); a truncated episode bootstraps
    from the value of the whole conversation, its final answer ending with the next reply's header."""
    cfg = config(chat_lm, "three_env:Endless", max_turns=2, max_turns_truncates=True, use_value_head=True,
                 advantage="gae")
    work = LMWorkload(cfg, seed=0)
    torch.nn.init.normal_(work.policy.value_head.weight)  # a zero head would make every value 0
    batch, _ = work.collect()
    policy = work.policy
    P = batch.obs.shape[1] - batch.actions.shape[1]
    length = batch.obs_mask[:, P:].sum(1).long()                          # real tokens after the prompt
    view = adv.turn_view(batch)
    header = policy.tokenizer("<|assistant|>", add_special_tokens=False)["input_ids"]

    def value_of_prefix(b: int, n: int) -> torch.Tensor:
        """The value head on row b's real tokens up to obs position P + n (exclusive)."""
        keep = batch.obs_mask[b, :P + n] > 0
        ids = batch.obs[b, :P + n][keep][None]
        with torch.no_grad():
            hidden = policy.model.base_model(input_ids=ids).last_hidden_state[:, -1]
            return policy.value_head(hidden).squeeze()

    for b in range(batch.shape[0]):
        final = view["last"][b, -1]
        assert batch.truncated[b, final] == 1 and length[b] - 1 > final    # an answer follows
        assert batch.actions[b, length[b] - len(header):length[b]].tolist() == header
        assert torch.isclose(batch.next_values[b, final], value_of_prefix(b, int(length[b])), atol=1e-5)
        assert batch.next_values[b].abs().sum() == batch.next_values[b, final].abs()
        for k in range(2):
            start = int(view["first"][b, k])
            assert torch.isclose(view["values"][b, k], value_of_prefix(b, start), atol=1e-5)
