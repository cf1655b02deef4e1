"""The built-in text Gymnasium envs of the multi-turn tasks, deterministic by seed (lm/tasks.py
makes them tasks, as it does a user's env):

- `guess-number`: the env holds a number in 1..n and answers "Higher." or "Lower."; reward 1 when
  guessed, minus turn_cost every turn (a reply without a number is a wasted turn).
- `dialogue`: a scripted user asks for something, then asks two follow-ups built from the model's
  own words; every reply is scored by a reward spec (VADER positivity by default).
- `calculator-arithmetic`: two-digit arithmetic with a `calc` tool (lm/tools.py); reward 1 when
  the final answer's last number is right.
"""
from __future__ import annotations

import ast
import operator
import re
import string
from typing import Any, Optional

import gymnasium as gym
from gymnasium import spaces

from ..errors import TaskError
from .rewards import RewardSet, build


def _text_space() -> spaces.Text:
    return spaces.Text(max_length=100_000, charset=string.printable)


class GuessNumber(gym.Env):
    """Find the hidden number from "Higher."/"Lower." answers."""
    description = ("multi-turn: find a number in 1..32 from 'higher'/'lower' answers; reward 1 when "
                   "guessed, minus 0.05 a turn")
    # The run settings the task starts from (below the user's own). kl_in=loss: most steps have no
    # success, so every episode's return is the same but for its KL penalty; in the reward,
    # whitening blew that noise up to a full-size step (KL 5.2 nats in 26 steps without learning,
    # docs/results.md); as a loss term it only pulls towards the reference.
    run_defaults = {"max_turns": 6, "max_new_tokens": 8, "max_episode_tokens": 256, "prompts_per_step": 4,
                    "samples_per_prompt": 4, "kl_in": "loss", "kl_estimator": "k2", "kl_coef": 0.05}
    metadata: dict = {}

    def __init__(self, n: int = 32, turn_cost: float = 0.05, invalid_cost: float = 0.0):
        """invalid_cost: what a reply without a number costs on top of turn_cost (a format reward,
        dense where success is rare; 0 by default: such a reply is only a wasted turn)."""
        if not isinstance(n, int) or n < 2:
            raise TaskError(f"guess-number: n must be a whole number >= 2; got {n!r}")
        self.n, self.turn_cost, self.invalid_cost = n, float(turn_cost), float(invalid_cost)
        self.observation_space, self.action_space = _text_space(), _text_space()
        self.target = 1

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        self.target = int(self.np_random.integers(1, self.n + 1))
        return (f"I am thinking of a whole number from 1 to {self.n}. Guess it: reply with one number, and I "
                "will tell you if mine is higher or lower."), {}

    def step(self, action: str):
        found = re.search(r"-?\d+", action)
        if found is None:
            # short on purpose: the rules are in the first message, and every token of the env's
            # answers is carried through every forward pass of the episode's training step
            return "Not a number.", -self.turn_cost - self.invalid_cost, False, False, {"success": False}
        guess = int(found.group())
        if guess == self.target:
            return "Correct!", 1.0 - self.turn_cost, True, False, {"success": True}
        answer = "Higher." if self.target > guess else "Lower."
        return answer, -self.turn_cost, False, False, {"success": False}


TOPICS = ["the ocean", "a summer garden", "your favourite city", "a good breakfast", "learning to cook",
          "a rainy afternoon", "an old bookshop", "a mountain walk", "a new puppy", "a birthday party",
          "a long train ride", "the night sky", "a small village", "a friendly neighbour", "a jazz concert",
          "a winter morning", "a picnic by the lake", "your first bicycle", "a quiet library", "a market square"]
OPENERS = ["Tell me about {topic}.", "What do you think of {topic}?", "Describe {topic} for me.",
           "Write a few sentences about {topic}."]
FOLLOW_UPS = ["You mentioned '{word}'. Can you say more about it?", "Why '{word}'? Tell me more.",
              "What comes to mind with '{word}'?"]


class Dialogue(gym.Env):
    """A scripted user: a request about a topic, then follow-ups on a word of the model's reply."""
    description = ("multi-turn: a scripted user asks for something, then two follow-ups on the reply; "
                   "reward per turn = VADER of the reply")
    # The run settings the task starts from (below the user's own). An episode has three replies'
    # tokens, so its KL grows ~3x as fast as a single reply's: at positive-review's kl_coef 0.1 (in
    # the reward) it passed 6 nats by step 9. Per-turn rewards make the return-to-go (`discounted`)
    # the credit of a reply, and the KL a per-token loss (k2: its gradient is the per-token KL's,
    # without the whole episode's KL as noise in every reply's score); docs/results.md, "Multi-turn
    # episodes", has the runs behind each choice.
    run_defaults = {"max_turns": 3, "max_new_tokens": 32, "max_episode_tokens": 512, "prompts_per_step": 4,
                    "samples_per_prompt": 4, "turn_advantage": "discounted", "kl_in": "loss", "kl_estimator": "k2",
                    "kl_coef": 0.4}
    metadata: dict = {}

    def __init__(self, reward: Any = "vader", turns: int = 3):
        if not isinstance(turns, int) or turns < 1:
            raise TaskError(f"dialogue: turns must be a whole number >= 1; got {turns!r}")
        self.rewards = RewardSet([build(reward)])
        self.turns = turns
        self.observation_space, self.action_space = _text_space(), _text_space()
        self.asked, self.turn = "", 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        topic = TOPICS[int(self.np_random.integers(len(TOPICS)))]
        self.asked = OPENERS[int(self.np_random.integers(len(OPENERS)))].format(topic=topic)
        self.turn = 0
        return self.asked, {}

    def step(self, action: str):
        reward = float(self.rewards([self.asked], [action], {})[0])
        self.turn += 1
        if self.turn >= self.turns:
            return "", reward, True, False, {}
        words = sorted({w.lower() for w in re.findall(r"[A-Za-z]{4,}", action)})
        if words:  # a word of the reply, picked by the env's seeded stream: the next question depends on it
            word = words[int(self.np_random.integers(len(words)))]
            self.asked = FOLLOW_UPS[int(self.np_random.integers(len(FOLLOW_UPS)))].format(word=word)
        else:
            self.asked = "I did not follow. Can you say that again in other words?"
        return self.asked, reward, False, False, {}


_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _evaluate(node: ast.AST) -> float:
    """Numbers and + - * / // % ** only: what a calculator does, nothing Python could run besides."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPERATORS[type(node.op)](left, right)
    raise ValueError("only numbers, parentheses and + - * / // % ** are allowed")


def calc(expression: str) -> str:
    """Evaluate an arithmetic expression.

    Args:
        expression: numbers, parentheses and the operators + - * / // % **, e.g. "37 * (12 + 5)"
    """
    if not isinstance(expression, str) or len(expression) > 200:
        raise ValueError("expression must be a text of at most 200 characters")
    value = _evaluate(ast.parse(expression.strip(), mode="eval"))
    return str(int(value)) if float(value).is_integer() else f"{value:.6g}"


class CalculatorArithmetic(gym.Env):
    """Arithmetic the model may hand to a `calc` tool, then answer."""
    description = ("multi-turn with a tool: two-digit arithmetic with a calc tool; reward 1 when the final "
                   "answer's last number is right")
    # A call, its answer, the final reply: three turns. A tool call's JSON is ~25 tokens.
    run_defaults = {"max_turns": 3, "max_new_tokens": 40, "max_episode_tokens": 192, "prompts_per_step": 4,
                    "samples_per_prompt": 4, "kl_in": "loss", "kl_estimator": "k2", "kl_coef": 0.05}
    metadata: dict = {}
    tools = [calc]

    def __init__(self, top: int = 99):
        if not isinstance(top, int) or top < 10:
            raise TaskError(f"calculator-arithmetic: top must be a whole number >= 10; got {top!r}")
        self.top = top
        self.observation_space, self.action_space = _text_space(), _text_space()
        self.answer = 0

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        a, b = (int(self.np_random.integers(10, self.top + 1)) for _ in range(2))
        op = "+-*"[int(self.np_random.integers(3))]
        self.answer = a + b if op == "+" else a - b if op == "-" else a * b
        return f"What is {a} {op} {b}? You may use the calc tool. Give the final answer as just the number.", {}

    def step(self, action: str):
        found = re.findall(r"-?\d+(?:\.\d+)?", action.replace(",", ""))
        right = bool(found) and float(found[-1]) == self.answer
        return "", float(right), True, False, {"success": right}


ENVS: dict[str, type] = {"guess-number": GuessNumber, "dialogue": Dialogue, "calculator-arithmetic": CalculatorArithmetic}
"""The built-in multi-turn tasks by name: each class says what it is (`description`) and the run
settings its task starts from (`run_defaults`)."""
