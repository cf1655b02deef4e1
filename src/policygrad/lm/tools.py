"""Tools in multi-turn episodes: a text env offers Python callables (`env.tools`), the model calls
them in its reply, each call runs under a time limit, and its result comes back as a `tool` message
(environment tokens: masked out of the loss like any env text, lm/episodes.py).

Format. Tools are shown to the model through its chat template's `tools=` (JSON schemas made by
transformers' get_json_schema from each function's type hints and docstring); a template that
ignores `tools=` (SmolLM2's) gets them in a system message instead, in the widespread Hermes / Qwen
convention its calls are then read in: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
A reply with one or more such blocks is a tool call; a block that is not JSON naming a known tool
with an arguments object is malformed, and both that and a tool that raises or overruns its time
are per-turn signals (their text goes back to the model as the tool's answer), never a crash.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import TaskError
from . import timed

CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
SYSTEM = ("You can call these tools:\n<tools>\n{tools}\n</tools>\nTo call one, reply with <tool_call>"
          '{{"name": <tool name>, "arguments": <arguments as JSON>}}</tool_call> and nothing else; its '
          "result comes back to you. Otherwise reply as usual.")


@dataclass
class Call:
    """One tool call read from a reply: a tool and its arguments, or why it is malformed."""
    name: str = ""
    arguments: Optional[dict] = None
    malformed: str = ""


def schemas(tools: list[Callable], where: str) -> list[dict]:
    """Each tool's JSON schema (transformers reads type hints and a Google-style docstring)."""
    from transformers.utils import get_json_schema  # the chat template's own tool format

    out = []
    for tool in tools:
        if not callable(tool):
            raise TaskError(f"{where}: a tool must be a Python function; got {type(tool).__name__}")
        try:
            out.append(get_json_schema(tool))
        except Exception as e:  # a missing docstring or type hint: the user's function to fix
            raise TaskError(f"{where}: tool '{getattr(tool, '__name__', tool)}' has no usable schema ("
                            f"{' '.join(str(e).split())})") from None
    return out


def framed(tokenizer, messages: list[dict], tool_schemas: list[dict]) -> tuple[list[dict], dict]:
    """(messages, apply_chat_template kwargs) that show the tools: the template's own tools=, or,
    when it ignores them, a system message listing them (module docstring)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TaskError("a text env with tools needs a model with a chat template (tools are shown and "
                        "answered through it)")
    plain = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    shown = tokenizer.apply_chat_template(messages, tools=tool_schemas, add_generation_prompt=True, tokenize=False)
    if shown != plain:
        return messages, {"tools": tool_schemas}
    listing = "\n".join(json.dumps(s, sort_keys=True) for s in tool_schemas)
    if messages and messages[0]["role"] == "system":
        head = {"role": "system", "content": messages[0]["content"] + "\n\n" + SYSTEM.format(tools=listing)}
        return [head] + messages[1:], {}
    return [{"role": "system", "content": SYSTEM.format(tools=listing)}] + messages, {}


def parse_calls(reply: str, names: set[str]) -> list[Call]:
    """The tool calls of a reply (none: an ordinary reply)."""
    calls = []
    for block in CALL.findall(reply):
        try:
            body = json.loads(block)
        except json.JSONDecodeError:
            calls.append(Call(malformed="the call is not JSON"))
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            calls.append(Call(malformed='the call needs "name" and "arguments"'))
            continue
        arguments = body.get("arguments", {})
        if body["name"] not in names:
            calls.append(Call(body["name"], malformed=f"no tool is called {body['name']!r} ("
                                                      f"tools: {', '.join(sorted(names))})"))
        elif not isinstance(arguments, dict):
            calls.append(Call(body["name"], malformed='"arguments" must be a JSON object'))
        else:
            calls.append(Call(body["name"], arguments))
    return calls


def run(tool: Callable, arguments: dict, timeout: float) -> tuple[str, bool]:
    """(the tool's answer as text, whether it ran fine): a bad argument, an exception or no answer
    within `timeout` seconds (timed.in_thread) is an error text for the model, and the episode goes on."""
    finished, value, error = timed.in_thread(lambda: tool(**arguments), timeout, f"tool {getattr(tool, '__name__', '')}")
    if not finished:
        return f"error: the tool gave no answer within {timeout:g} s", False
    if error is not None:
        return f"error: {error.__class__.__name__}: {' '.join(str(error).split())[:200]}", False
    return (value if isinstance(value, str) else json.dumps(value, default=str)), True


def answers(calls: list[Call], tools: dict[str, Callable], timeout: float) -> tuple[list[str], int]:
    """Each call's answer, and how many calls failed (malformed, raised or overran)."""
    texts, failed = [], 0
    for call in calls:
        if call.malformed:
            texts.append(f"error: malformed tool call: {call.malformed}")
            failed += 1
            continue
        text, ok = run(tools[call.name], call.arguments, timeout)
        texts.append(text)
        failed += not ok
    return texts, failed


# --- the template's side: token-in, token-out holds only if rendering keeps history as it was --------
def check_prefix_preserving(tokenizer, roles: tuple[str, ...], where: str) -> None:
    """Rendering turns 1..k must be a prefix of rendering 1..k+1 for the roles an episode uses, or the
    ids appended turn by turn would not be the conversation the template makes (a template that
    rewrites earlier turns, as one that drops past reasoning does). Refused in one line."""
    if not getattr(tokenizer, "chat_template", None):
        return
    answer_roles = [r for r in roles if r != "assistant"] or ["user"]
    conversation = [{"role": "user", "content": "first question"}]
    for k, role in enumerate(answer_roles * 2):
        conversation += [{"role": "assistant", "content": f"reply number {k}"},
                         {"role": role, "content": f"answer number {k}"}]
    conversation.append({"role": "assistant", "content": "last reply"})
    try:
        renders = [tokenizer.apply_chat_template(conversation[:k], tokenize=False) for k in range(1, len(conversation) + 1)]
        prompts = [tokenizer.apply_chat_template(conversation[:k], add_generation_prompt=True, tokenize=False)
                   for k in range(1, len(conversation)) if conversation[k]["role"] == "assistant"]
    except Exception as e:  # a template that cannot render these roles at all
        raise TaskError(f"{where}: the chat template cannot render a conversation of {', '.join(roles)} "
                        f"messages ({e.__class__.__name__}: {' '.join(str(e).split())[:120]})") from None
    for k in range(len(renders) - 1):
        if not renders[k + 1].startswith(renders[k]):
            raise TaskError(f"{where}: the model's chat template rewrites earlier turns (rendering messages "
                            f"1..{k + 1} is not a prefix of rendering 1..{k + 2}, a {conversation[k + 1]['role']} "
                            "message); multi-turn episodes keep sampled ids as they are, so they need a "
                            "prefix-preserving template")
    full = renders[-1]
    for prompt in prompts:
        if not full.startswith(prompt):
            raise TaskError(f"{where}: the model's chat template renders a reply's header differently from "
                            "the reply it then holds; multi-turn episodes need a prefix-preserving template")


@dataclass
class Toolbox:
    """A text env's tools for one batch of episodes: by name, their schemas, how the template shows
    them (framed), and each call's time limit."""
    tools: dict[str, Callable]
    schemas: list[dict]
    timeout: float

    @classmethod
    def of(cls, env: Any, where: str, timeout: float) -> Optional["Toolbox"]:
        """The env's `tools` (a list of functions), or None for an env without."""
        tools = getattr(env, "tools", None)
        if not tools:
            return None
        if not isinstance(tools, (list, tuple)):
            raise TaskError(f"{where}: env.tools must be a list of Python functions; got {type(tools).__name__}")
        found = schemas(list(tools), where)
        return cls({s["function"]["name"]: t for s, t in zip(found, tools)}, found, float(timeout))
