"""Real data as a language model's training signal: the examples of `policygrad sft` and of the
data loss mixed into RL (J_data, InstructGPT's "PTX" term).

A row is one of
- `{"text": ...}`: plain text; every token after the first carries loss;
- `{"prompt": ..., "completion": ...}`: the prompt rendered as the policy renders it for sampling
  (the chat template with its generation prompt), then the completion's tokens and the
  end-of-turn token, which alone carry loss;
- `{"messages": [...]}`: a chat; each assistant message's tokens and its end-of-turn marker carry
  loss, every other token is context.

Each row becomes an Example (context ids, target ids, a loss mask over the targets); a list of
them becomes a Batch in the policy's own layout (obs = left-padded context then right-padded
targets, actions = targets, mask = the loss mask), so the policy's log-prob pass (LoRA, FSDP,
autocast and micro-batches as in RL) computes the likelihood.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..batch import Batch
from ..errors import TaskError


@dataclass(frozen=True)
class Example:
    context: list[int]
    """Token ids the targets are predicted from; no loss (at least one id)."""
    target: list[int]
    """Token ids after the context."""
    loss: list[int]
    """1 where a target id carries loss (an assistant's or completion's token), else 0."""


def check_row(row: Any, where: str) -> dict:
    """A supervised row: text, prompt and completion, or chat messages with an assistant turn."""
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected an object with 'text', 'prompt' and 'completion', or 'messages'")
    if isinstance(row.get("text"), str):
        return row
    if isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
        return row
    messages = row.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                          and "role" in m for m in messages):
        if not any(m["role"] == "assistant" for m in messages):
            raise TaskError(f"{where}: the chat has no assistant message to learn from")
        return row
    raise TaskError(f"{where}: a supervised row needs text 'text', text 'prompt' and 'completion', or "
                    f"'messages' (a list of {{role, content}}); columns: {', '.join(map(str, row)) or 'none'}")


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _ids(tokenizer, text: str, special: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    except Exception as e:  # jinja's own errors: roles that must alternate, a missing system turn
        raise TaskError(f"the tokenizer's chat template refuses this chat ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else 'no message'})") from None


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """The conversation's text in pieces, each marked whether it is an assistant's (loss).

    Each assistant piece is what the template adds for that message after the generation prompt:
    the reply and its end-of-turn marker, the tokens the model itself would sample."""
    render = lambda ms, gen: _render(tokenizer, ms, gen)  # noqa: E731
    pieces, done = [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], True), render(messages[:i + 1], False)
        if not (before.startswith(done) and through.startswith(before)):
            raise TaskError("the tokenizer's chat template does not render a chat as a prefix of its "
                            "continuation; give prompt/completion rows instead")
        pieces += [(before[len(done):], False), (through[len(before):], True)]
        done = through
    return pieces


def _plain_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    """A chat without a template: the messages' texts, one per line; assistants' carry loss."""
    return [(m["content"] + "\n", m["role"] == "assistant") for m in messages]


def encode(row: dict, tokenizer, eos_id: int, max_length: int) -> Optional[Example]:
    """The row's Example, cut to max_length tokens (the context's start and the target's end are
    cut); None when no loss token is left."""
    template = _has_template(tokenizer)
    if "text" in row and isinstance(row["text"], str):
        ids = _ids(tokenizer, row["text"], special=not template)
        context, target, loss = ids[:1], ids[1:], [1] * (len(ids) - 1)
    elif "completion" in row:
        prompt = _render(tokenizer, [{"role": "user", "content": row["prompt"]}], True) if template \
            else row["prompt"]
        context = _ids(tokenizer, prompt, special=not template)
        target = _ids(tokenizer, row["completion"]) + [eos_id]
        loss = [1] * len(target)
    else:
        pieces = _chat_segments(tokenizer, row["messages"]) if template else _plain_segments(row["messages"])
        ids, marks = [], []
        for text, learn in pieces:
            piece = _ids(tokenizer, text, special=not template and not ids)
            if learn and not template:
                piece = piece + [eos_id]
            # loss up to and including the end-of-turn id: what a template writes after it (a
            # newline) the model never samples
            stop = piece.index(eos_id) + 1 if learn and eos_id in piece else len(piece)
            ids += piece
            marks += [int(learn)] * stop + [0] * (len(piece) - stop)
        first = marks.index(1) if 1 in marks else len(ids)
        context, target, loss = ids[:max(first, 1)], ids[max(first, 1):], marks[max(first, 1):]
    context = context[-max(1, max_length // 2):] if len(context) >= max_length else context
    keep = max(0, max_length - len(context))
    target, loss = target[:keep], loss[:keep]
    return Example(context, target, loss) if any(loss) and context else None


def encode_rows(rows: list[dict], tokenizer, eos_id: int, max_length: int, what: str) -> list[Example]:
    """Every row's Example; a TaskError when none has a token to learn from."""
    examples = [e for e in (encode(r, tokenizer, eos_id, max_length) for r in rows) if e is not None]
    if not examples:
        raise TaskError(f"{what} has no usable rows: none has a token to learn from within "
                        f"{max_length} tokens (rows need non-empty 'text', 'completion' or assistant messages)")
    return examples


def collate(examples: list[Example], pad_id: int, device: torch.device) -> Batch:
    """The examples as one Batch: obs (B, P+T) = left-padded contexts then right-padded targets,
    actions (B, T) = targets, mask (B, T) = the loss mask."""
    P = max(len(e.context) for e in examples)
    T = max(len(e.target) for e in examples)
    B = len(examples)
    obs = torch.full((B, P + T), pad_id, dtype=torch.long)
    obs_mask = torch.zeros(B, P + T)
    mask = torch.zeros(B, T)
    for i, e in enumerate(examples):
        obs[i, P - len(e.context):P] = torch.tensor(e.context)
        obs[i, P:P + len(e.target)] = torch.tensor(e.target, dtype=torch.long)
        obs_mask[i, P - len(e.context):P + len(e.target)] = 1.0
        mask[i, :len(e.loss)] = torch.tensor(e.loss, dtype=torch.float32)
    zeros = torch.zeros(B, T)
    batch = Batch(obs=obs, actions=obs[:, P:].clone(), log_prob=zeros, rewards=zeros, terminated=zeros,
                  truncated=zeros, mask=mask, obs_mask=obs_mask)
    return batch._map(lambda x: x.to(device))


def eos_of(policy) -> int:
    """The end-of-turn id a target ends with: the tokenizer's EOS when the model stops on it, else
    the model's first stop id (what sampling would end a reply with)."""
    eos = policy.tokenizer.eos_token_id
    return eos if eos in policy.eos_ids else min(policy.eos_ids)


def nll_sum(policy, batch: Batch) -> torch.Tensor:
    """() the summed negative log-likelihood of the batch's loss tokens under the policy's model
    (temperature 1: the model's own distribution, whatever the sampling temperature)."""
    return -policy.data_log_prob(batch).sum()


@torch.no_grad()
def mean_nll(policy, examples: list[Example], batch_size: int = 8) -> float:
    """The mean token NLL of the examples (all loss tokens weigh alike)."""
    total, tokens = 0.0, 0.0
    with policy.gathered():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], policy.tokenizer.pad_token_id,
                            policy.placement.device)
            total += float(nll_sum(policy, batch))
            tokens += float(batch.mask.sum())
    return total / max(tokens, 1.0)
