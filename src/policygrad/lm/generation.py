"""Sampling completions: one small seam between the policy and whatever engine generates.

A Generator takes prompt ids and returns completion ids, their mask and the sampler's own
log-probabilities of them. transformers' `generate` is today's engine; a faster one (vLLM, SGLang)
would be another class with the same method, and nothing in the algorithms changes.

The sampling contract: what was sampled is what is trained. The engine samples with exactly the
processors the Sampling settings name (temperature; top-k and top-p where they are set), never
with those a model's own generation_config adds (a repetition_penalty, a no_repeat_ngram_size, ...),
which the training pass would not see; and it returns the log-probabilities of the distribution it
drew from (the behaviour policy), so the update can measure and correct the gap to the trainer's.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
from torch import nn
from transformers import GenerationConfig

from ..placement import Placement


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_new_tokens: int = 0
    """Benchmarks force full-length completions with min_new_tokens = max_new_tokens."""
    model_defaults: bool = False
    """Add the model's own generation_config processors (`policygrad sample --model-defaults`, for
    reading completions as the model's authors tuned them); training and evaluation never do."""


@dataclass
class Generated:
    tokens: torch.Tensor
    """(B, T) completion ids (padding after EOS)."""
    mask: torch.Tensor
    """(B, T) 1.0 up to and including the first EOS."""
    log_prob: torch.Tensor
    """(B, T) float32 log-probabilities of the tokens under the distribution they were drawn from
    (the sampler's own numbers, its precision's), masked."""
    exact: bool = True
    """Whether log_prob equals the training pass's up to float32 rounding (a float32 sampler over
    the same weights); under autocast the policy recomputes the old log-probs with its training
    pass and keeps these as the behaviour log-probs."""
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


TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
"""What a generation config may carry into our sampling: which tokens are which, no processor."""


@contextlib.contextmanager
def own_processors_only(model: nn.Module, keep_model_defaults: bool = False):
    """For the while, the model's generation_config holds its token ids alone, so that `generate`
    (which fills whatever its caller leaves unset from that config) applies only the processors the
    caller names, on top of transformers' neutral global defaults. A PeftModel forwards the
    attribute to the transformers model inside, whose config is swapped."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = getattr(inner, "generation_config", None)
    if keep_model_defaults or own is None:
        yield
        return
    inner.generation_config = GenerationConfig(**{k: getattr(own, k) for k in TOKEN_ID_KEYS
                                                  if getattr(own, k, None) is not None})
    try:
        yield
    finally:
        inner.generation_config = own


class TransformersGenerator:
    """transformers' `generate`, with each prompt of a group prefilled once, our processors only
    (own_processors_only), and the sampler's log-probs taken from the sampling pass itself."""

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
        with self.placement.autocast(), own_processors_only(self.model, sampling.model_defaults):
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
                    pad_token_id=self.pad_token_id, return_dict_in_generate=True, output_scores=True,
                    # with sharded weights transformers would keep every rank decoding until all are
                    # done; ours are gathered for sampling (dist.gathered), so each stops on its own
                    synced_gpus=False)
        tokens = out.sequences[:, prompt_ids.shape[1]:]                          # (B, T)
        mask = completion_mask(tokens, self.eos_ids)                             # (B, T)
        # `scores` are the logits after generate's processors (temperature, and top-k/top-p where
        # sample/eval ask for them): the distribution the tokens were drawn from. Training refuses
        # truncation (config.py), so there they equal log_softmax(logits / T); one (B, V) step at a
        # time, no second forward pass. Under autocast they carry the sampler's bfloat16 rounding.
        log_prob = torch.stack([token_log_probs(step.float(), tokens[:, t])
                                for t, step in enumerate(out.scores)], 1) * mask  # (B, T)
        name = cache_name(out)
        cache = getattr(out, name, None)
        return Generated(tokens=tokens, mask=mask, log_prob=log_prob, exact=not self.placement.mixed,
                         past=None if cache is None else {name: cache})

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
