"""A learned reward model as a reward: `rm:PATH`, or `rm:PATH#LABEL` for one label of a classifier.

PATH is any folder `AutoModelForSequenceClassification` loads. Each completion is decoded text
(the rewards never see token ids) and is tokenised again with the reward model's own tokenizer,
through its chat template when it has one: the policy's token ids mean other tokens in another
vocabulary, a mistake that gives wrong rewards without any error. One scalar head (num_labels = 1,
as a Bradley-Terry reward model has) gives its logit; a classifier's LABEL gives that label's
probability. Scoring runs in batches, without gradients, on the run's device; with
reward_normalize=true, scores are standardised with the statistics saved beside the model. A model
from `policygrad rm` saves how its training cut long texts (reward_stats.json's `truncation`) and
is scored with the same cut; a folder without one reads texts whole.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import RewardError

STATS_FILE = "reward_stats.json"


def scored_text(tokenizer, prompt: str, completion: str) -> str:
    """What the reward model reads for one completion: the user's prompt and the assistant's
    reply through its chat template, or the two texts joined when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": completion}], tokenize=False)
    return f"{prompt}\n{completion}"


@dataclass(frozen=True)
class Truncation:
    """How many tokens of each scored text a reward model reads, and which end is cut."""
    max_length: int
    side: str = "right"
    """right: the end is cut (a tokenizer's default); left: the start."""


def encode(tokenizer, texts: list[str], truncation: Optional[Truncation]):
    """The padded input ids of scored texts, cut as `truncation` says (None: whole). `policygrad rm`
    trains through this and the rm: reward scores through it, so both read the same tokens (#23)."""
    if truncation is not None:
        tokenizer.truncation_side = truncation.side
    return tokenizer(texts, return_tensors="pt", padding=True, truncation=truncation is not None,
                     max_length=truncation.max_length if truncation else None,
                     add_special_tokens=not getattr(tokenizer, "chat_template", None))


def _truncation(stats: dict, spec: str) -> Optional[Truncation]:
    """The saved truncation of reward_stats.json; None in a folder from before it was saved."""
    saved = stats.get("truncation")
    if saved is None:
        return None
    try:
        truncation = Truncation(int(saved["max_length"]), str(saved.get("side", "right")))
    except (TypeError, KeyError, ValueError):
        truncation = None
    if truncation is None or truncation.max_length < 1 or truncation.side not in ("left", "right"):
        raise RewardError(f"reward '{spec}': {STATS_FILE} has a bad truncation {saved!r}; want "
                          "{\"max_length\": N, \"side\": \"right\" or \"left\"}")
    return truncation


def _label_index(config, label: Optional[str], spec: str) -> Optional[int]:
    """Which output to read: None for a scalar head, else the index of LABEL."""
    names = {str(v): int(k) for k, v in (config.id2label or {}).items()}
    if config.num_labels == 1:
        if label is not None:
            raise RewardError(f"reward '{spec}' has one scalar output; drop '#{label}'")
        return None
    if label is None:
        raise RewardError(f"reward '{spec}' is a classifier with {config.num_labels} labels: pick one as "
                          f"rm:PATH#LABEL, one of {', '.join(names)}")
    if label in names:
        return names[label]
    if label.isdigit() and int(label) < config.num_labels:
        return int(label)
    raise RewardError(f"reward '{spec}' has no label '{label}'; its labels: {', '.join(names)}")


class RewardModel:
    """Scores (prompt, completion) texts with a sequence-classification model; callable as a
    reward function: (prompts, completions, **columns) -> list[float]."""

    def __init__(self, model, tokenizer, label: Optional[str] = None, batch_size: int = 16, name: str = "rm",
                 truncation: Optional[Truncation] = None):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer, self.batch_size, self.name = tokenizer, batch_size, name
        self.truncation = truncation
        """How texts are cut before scoring (None: read whole), as the model was trained to read them."""
        if tokenizer.pad_token is None:  # a batch is padded; the pad token is never read
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        # the classifier reads the last token that is not padding: it must know which id pads
        model.config.pad_token_id = tokenizer.pad_token_id
        self.index = _label_index(model.config, label, name)
        self.stats: Optional[dict] = None
        """Mean and std of its rewards on its training answers (reward_stats.json, from `policygrad rm`)."""
        self.normalized = False

    @classmethod
    def load(cls, spec: str, base: Path = Path(".")) -> "RewardModel":
        """`rm:PATH` or `rm:PATH#LABEL`; PATH relative to `base` (a task file's folder)."""
        # transformers: not for control runs
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path_text, _, label = spec[len("rm:"):].partition("#")
        path = Path(path_text) if Path(path_text).is_absolute() else base / path_text
        if not (path / "config.json").is_file():
            raise RewardError(f"reward '{spec}': '{path}' is not a model folder (no config.json)")
        config = AutoConfig.from_pretrained(path)
        if not any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
            raise RewardError(f"reward '{spec}': '{path}' is not a sequence-classification model (its "
                              f"architectures: {', '.join(config.architectures or ['none'])}); a reward model "
                              "is a folder AutoModelForSequenceClassification loads")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as e:
            raise RewardError(f"reward '{spec}' cannot be loaded: {str(e).splitlines()[0]}") from None
        stats = json.loads((path / STATS_FILE).read_text()) if (path / STATS_FILE).is_file() else None
        scorer = cls(model, tokenizer, label or None, name=spec, truncation=_truncation(stats or {}, spec))
        scorer.stats = stats
        return scorer

    def place(self, device: torch.device | str) -> None:
        self.model.to(device)

    def normalize(self, on: bool) -> None:
        """Score (reward - mean) / std with the saved statistics (reward_normalize=true), so that a
        learned reward has the scale kl_coef and the other rewards' weights were set for."""
        if on and self.index is not None:
            raise RewardError(f"reward '{self.name}' is a label's probability; reward_normalize standardises a "
                              "scalar reward model's logit: drop reward_normalize or use a scalar model")
        if on and not (self.stats and self.stats.get("std", 0) > 0):
            raise RewardError(f"reward '{self.name}': reward_normalize=true needs the mean and std of its "
                              f"rewards in {STATS_FILE} beside the model (`policygrad rm` writes it); set "
                              "reward_normalize=false")
        self.normalized = on

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **columns) -> list[float]:
        texts = [scored_text(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        device = next(self.model.parameters()).device
        scores = []
        for start in range(0, len(texts), self.batch_size):
            enc = encode(self.tokenizer, texts[start:start + self.batch_size], self.truncation)
            logits = self.model(**enc.to(device)).logits.float()                    # (b, num_labels)
            if self.index is None:
                scores.append(logits[:, 0])
            else:
                scores.append(torch.softmax(logits, -1)[:, self.index])
        if not scores:
            return []
        values = torch.cat(scores)                                                   # (N,)
        if self.normalized:
            values = (values - self.stats["mean"]) / self.stats["std"]
        return values.tolist()
