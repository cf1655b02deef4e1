"""Sampling completions: one small seam between the policy and whatever engine generates.

A Generator takes prompt ids and returns completion ids, their mask and (when it can give them
exactly) their log-probabilities. transformers' `generate` is today's engine; a faster one (vLLM,
SGLang) would be another class with the same method, and nothing in the algorithms changes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import nn

from ..placement import Placement


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0
    """Benchmarks force full-length completions with min_new_tokens = max_new_tokens."""


@dataclass
class Generated:
    tokens: torch.Tensor
    """(B, T) completion ids (padding after EOS)."""
    mask: torch.Tensor
    """(B, T) 1.0 up to and including the first EOS."""
    log_prob: Optional[torch.Tensor]
    """(B, T) float32 log-probabilities of the tokens under the distribution they were drawn from,
    masked; None when the engine's numbers would not match the training pass exactly (the policy
    then computes them with its own forward pass)."""
    past: Optional[dict[str, Any]] = None
    """The engine's KV cache of the prompts and completions but their last token, as generate's
    keyword argument (None: it keeps none); a multi-turn rollout passes it back, rows selected,
    with the conversation's next tokens appended, and only those run."""


class Generator(Protocol):
    def generate(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling, seed: int,
                 samples_per_prompt: int = 1) -> Generated:
        """Left-padded prompts (B, P) in; one completion per row out. With runs of samples_per_prompt
        equal rows, an engine may process each prompt once."""
        ...


def completion_mask(tokens: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """(B, T) 1 up to and including the first EOS."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= tokens == eos
    after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0                        # (B, T)
    return (~after_eos).float()


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Naive twin: log_softmax over the vocabulary, then the chosen token's entry. (..., V) -> (...)."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def cache_name(output) -> str:
    """The KV cache's name in a model output and forward argument (transformers 5.x renamed
    past_key_values to cache)."""
    return "cache" if getattr(output, "cache", None) is not None else "past_key_values"


def repeated_cache(output, n: int):
    """The output's KV cache with each row repeated n times (row i becomes rows i*n .. i*n+n-1)."""
    cache = getattr(output, cache_name(output))
    cache.batch_repeat_interleave(n)
    return cache


class TransformersGenerator:
    """transformers' `generate`, with each prompt of a group prefilled once and the old log-probs
    taken from the sampling pass itself (float32 runs; under autocast the policy recomputes them)."""

    def __init__(self, model: nn.Module, pad_token_id: int, eos_ids: set[int], placement: Placement,
                 share_prompts: bool = True):
        self.model, self.pad_token_id, self.eos_ids = model, pad_token_id, eos_ids
        self.placement, self.share_prompts = placement, share_prompts

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: Sampling, seed: int,
                 samples_per_prompt: int = 1, past: Any = None) -> Generated:
        """past: an earlier call's Generated.past (its rows selected), a cache of the first positions
        of prompt_ids; only the positions after it are run."""
        self.model.eval()  # generation keeps its KV cache (training mode + checkpointing drops it)
        exact = not self.placement.mixed
        with self.placement.autocast():
            prefilled = self._shared_prefill(prompt_ids, attention_mask,
                                             samples_per_prompt if self.share_prompts else 1) \
                if past is None else past
            device = self.placement.device
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                out = self.model.generate(
                    input_ids=prompt_ids, attention_mask=attention_mask, **prefilled, do_sample=True,
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                    max_new_tokens=sampling.max_new_tokens, min_new_tokens=sampling.min_new_tokens or None,
                    pad_token_id=self.pad_token_id, return_dict_in_generate=True, output_scores=exact,
                    # with sharded weights transformers would keep every rank decoding until all are
                    # done; ours are gathered for sampling (dist.gathered), so each stops on its own
                    synced_gpus=False)
        tokens = out.sequences[:, prompt_ids.shape[1]:]                          # (B, T)
        mask = completion_mask(tokens, self.eos_ids)                             # (B, T)
        log_prob = None
        if exact:
            # `scores` are the logits after generate's processors (temperature, and top-k/top-p where
            # sample/eval ask for them): the distribution the tokens were drawn from. Training refuses
            # truncation (config.py), so there they equal log_softmax(logits / T); one (B, V) step
            # at a time, no second forward pass.
            log_prob = torch.stack([token_log_probs(step.float(), tokens[:, t])
                                    for t, step in enumerate(out.scores)], 1) * mask  # (B, T)
        name = cache_name(out)
        cache = getattr(out, name, None)
        return Generated(tokens=tokens, mask=mask, log_prob=log_prob, past=None if cache is None else {name: cache})

    def _shared_prefill(self, ids: torch.Tensor, attention: torch.Tensor, n: int) -> dict:
        """A KV cache of every prompt but its last token, computed once per run of n equal prompts
        and repeated n times; generate then runs only the last prompt token and the new ones.
        Empty (generate prefills itself) when the rows do not come in such runs."""
        if n <= 1 or ids.shape[0] % n or ids.shape[1] < 2 or not torch.equal(ids[::n].repeat_interleave(n, 0), ids):
            return {}
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        prefix = self.model(input_ids=ids[::n, :-1], attention_mask=attention[::n, :-1],
                            position_ids=positions[::n, :-1], use_cache=True, logits_to_keep=1)
        return {name: repeated_cache(prefix, n) for name in [cache_name(prefix)]}
