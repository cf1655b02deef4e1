"""Seconds per TRPO Fisher-vector product: fvp=exact (the KL's Hessian by double backward) against
fvp=gauss_newton (one forward-mode pass and one backward, issue #25), on the tests' tiny LM and on a
random model of SmolLM2-135M's shape (no download), through LMPolicy as training runs them.

    python benchmarks/fvp.py [--models tiny,smol] [--rows 2] [--prompt 16] [--tokens 16] [--products 2] [--threads 1]

Prints one JSON line per model: seconds to set up (exact with one piece builds the KL-gradient
graph once) and per product, with one piece and with two micro-batches (exact then rebuilds each
piece's gradient graph every product), the largest difference of the two products, and the CPU.
"""
import argparse
import dataclasses
import json
import time
from types import SimpleNamespace

import torch

from common import cpu_name
from policygrad.batch import Batch
from policygrad.config import Config
from policygrad.core import trpo
from policygrad.lm.policy import LMPolicy

SHAPES = {
    "tiny": dict(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
    "smol": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3),  # SmolLM2-135M's config
}


def policy_of(shape: str) -> LMPolicy:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], tie_word_embeddings=True, eos_token_id=1, pad_token_id=0))
    model.set_attn_implementation("eager")  # as TRPO runs (torch's fused CPU attention has neither)
    tokenizer = SimpleNamespace(eos_token_id=1, pad_token_id=0, chat_template=None)
    cfg = dataclasses.replace(Config(), temperature=1.0, share_prompts=False)
    return LMPolicy(model, tokenizer, cfg, with_reference=False)


def batch_of(vocab: int, rows: int, prompt: int, tokens: int) -> Batch:
    g = torch.Generator().manual_seed(1)
    obs = torch.randint(2, vocab, (rows, prompt + tokens), generator=g)
    zeros = torch.zeros(rows, tokens)
    return Batch(obs=obs, obs_mask=torch.ones(obs.shape), actions=obs[:, prompt:], log_prob=zeros,
                 rewards=zeros, terminated=zeros, truncated=zeros, mask=torch.ones(rows, tokens))


def timed(make, v: torch.Tensor, products: int) -> tuple[float, float, torch.Tensor]:
    """(seconds to build the product, seconds per product after an untimed first one, the last
    product)."""
    start = time.perf_counter()
    product = make()
    setup = time.perf_counter() - start
    product(v)  # warm: the first pass of a path pays for its allocations
    start = time.perf_counter()
    for _ in range(products):
        out = product(v)
    return setup, (time.perf_counter() - start) / products, out


def measure(shape: str, rows: int, prompt: int, tokens: int, products: int) -> dict:
    policy = policy_of(shape)
    batch = batch_of(SHAPES[shape]["vocab_size"], rows, prompt, tokens)
    params = policy.actor_parameters()
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(2))
    result = {"model": shape, "params": sum(p.numel() for p in params), "rows": rows, "prompt": prompt,
              "tokens": tokens, "threads": torch.get_num_threads()}
    for pieces in (1, 2):
        parts = [(1.0 / pieces, m) for m in batch.split_rows(rows // pieces)]
        kl = [(w, lambda m=m, old=policy.snapshot_actor(m): policy.kl(m, old)) for w, m in parts]
        gn = [(w, lambda t, m=m: policy.fisher_outputs(m, t)) for w, m in parts]
        exact = timed(lambda: trpo.accumulated_fisher_vector_product(kl, params, 0.0), v, products)
        fast = timed(lambda: trpo.gauss_newton_vector_product(gn, params, 0.0), v, products)
        result[f"exact_{pieces}piece_setup_s"] = round(exact[0], 4)
        result[f"exact_{pieces}piece_s_per_product"] = round(exact[1], 4)
        result[f"gn_{pieces}piece_s_per_product"] = round(fast[1], 4)
        result[f"max_abs_diff_{pieces}piece"] = (exact[2] - fast[2]).abs().max().item()
        result[f"max_abs_{pieces}piece"] = exact[2].abs().max().item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,smol")
    parser.add_argument("--rows", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--products", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for shape in args.models.split(","):
        result = measure(shape, args.rows, args.prompt, args.tokens, args.products)
        print(json.dumps({**result, "cpu": cpu_name(), "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
