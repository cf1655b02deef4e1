"""`policygrad pairs`: preference pairs from a task whose reward is a rule.

Each prompt of a split gets `samples` completions from the model; ranked by the task's reward, the
best is paired with the worst, the second best with the second worst, and so on, keeping a pair
only when the rewards differ by at least `min_gap` (a near tie says little about which answer is
better). A reward model learnt from these pairs can then be compared with the rule it learnt from.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import checkpoint
from ..config import Config
from ..lm.tasks import prompt_text


def ranked_pairs(prompt: str, completions: list[str], rewards: np.ndarray, min_gap: float) -> list[dict]:
    """The i-th best completion against the i-th worst, for i below half the count, kept when
    their rewards differ by min_gap or more."""
    ranked = np.argsort(-np.asarray(rewards), kind="stable")
    out = []
    for i in range(len(ranked) // 2):
        best, worst = ranked[i], ranked[-1 - i]
        if rewards[best] - rewards[worst] >= min_gap:
            out.append({"prompt": prompt, "chosen": completions[best], "rejected": completions[worst],
                        "chosen_reward": float(rewards[best]), "rejected_reward": float(rewards[worst])})
    return out


def build_pairs(cfg: Config, out: Path, samples: int, min_gap: float, split: str = "train") -> dict:
    """Sample, rank and pair; write the pairs to `out` (JSONL, atomically). Prompts go in chunks of
    prompts_per_step, each chunk with its own seed."""
    from ..lm.rollout import LMWorkload  # transformers: only generating pairs loads it
    work = LMWorkload(cfg, cfg.seed)
    rows = work.task.rows(split)
    pairs, prompts_used = [], 0
    for start in range(0, len(rows), cfg.prompts_per_step):
        chunk = rows[start:start + cfg.prompts_per_step]
        _, completions, rewards = work.sample(chunk, samples, seed=cfg.seed * 1_000_003 + start, reference=False)
        for i, row in enumerate(chunk):
            found = ranked_pairs(prompt_text(row), completions[i * samples:(i + 1) * samples],
                                 rewards[i * samples:(i + 1) * samples], min_gap)
            pairs += found
            prompts_used += bool(found)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_text_atomic(out, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    return {"pairs": len(pairs), "prompts": len(rows), "prompts_with_pairs": prompts_used, "out": str(out)}
