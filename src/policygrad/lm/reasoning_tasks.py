"""reasoning-gym's procedural generators as tasks: `reasoning-gym:chain_sum` (or several joined by
`+`, or a task YAML's `reasoning_gym:` with each generator's own options and weights).

Each split is generated from its own seed, and a held-out split keeps only questions that no
earlier split asked (small generators repeat themselves), so no held-out question is trained on.
A row is the question with a short answer-format instruction (the chat template is applied where
every prompt's is), its oracle `answer`, and the generator's `entry`; the reward is the generator's
own `score_answer` of the answer taken from the completion (`extract_answer`, the same on every split).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Optional

from ..errors import TaskError

ANSWER_FORMATS = {
    "tag": "Give only your final answer between <answer> and </answer>.",
    "plain": "Reply with only the final answer.",
    "number": "Answer with just the number.",
}
"""The instruction after each question, by answer_format; extract_answer reads the same format."""
SPLIT_SEEDS = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
"""Each split's generator seed (plus the spec's seed): far apart, as reasoning-gym seeds item i
with seed + i."""
SPLIT_SIZES = {"train": 2000, "validation": 100, "test": 200}
TRIES_PER_ROW = 20
"""A held-out split draws at most this many items per row it needs before it gives up."""
EXTRA = "pip install -e '.[tasks]' (make install does)"


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def extract_answer(completion: str, answer_format: str) -> Optional[str]:
    """What is taken as the answer: `tag`, the text of the last <answer>...</answer> (reasoning-gym's
    own rule), None without one; `plain`, the first non-empty line, stripped, without a final '.';
    `number` (generators whose answers are numbers), the last number, commas dropped, None without one."""
    if answer_format == "tag":
        from reasoning_gym.utils import extract_answer as tagged  # the optional extra, checked on load
        return tagged(completion)
    if answer_format == "number":
        found = NUMBER.findall(completion.replace(",", ""))
        return found[-1] if found else None
    line = next((line.strip() for line in completion.splitlines() if line.strip()), "")
    return line[:-1].rstrip() if line.endswith(".") else line


@dataclass
class ReasoningGymSpec:
    """A reasoning-gym task: generators with their options (and weights, for a composite)."""
    generators: dict[str, dict] = field(default_factory=dict)
    """Generator name -> its config options (e.g. {chain_sum: {min_terms: 2}}); a `weight` key
    weighs it in a composite of several."""
    answer_format: str = "tag"
    sizes: dict[str, int] = field(default_factory=lambda: dict(SPLIT_SIZES))
    seed: int = 0
    """Added to every split's seed (SPLIT_SEEDS): another draw of the same generators."""
    partial_credit: bool = True
    """False: a score below 1 counts as 0. Many generators' default score_answer gives
    len(oracle) / len(answer) to an answer that merely contains the oracle ('12' for '2' scores
    0.5), which a policy can learn to farm instead of the task."""

    @property
    def name(self) -> str:
        return "reasoning-gym:" + "+".join(self.generators)

    def describe(self) -> dict:
        """JSON: everything the rows derive from (written beside each checkpoint as task.json)."""
        return {"source": "reasoning-gym", "version": _version(), "generators": self.generators,
                "answer_format": self.answer_format, "partial_credit": self.partial_credit,
                "splits": {s: {"seed": SPLIT_SEEDS[s] + self.seed, "size": self.sizes[s]} for s in SPLIT_SEEDS}}


def _version() -> str:
    return version("reasoning-gym")


def _library():
    try:
        import reasoning_gym  # an optional extra: only these tasks need it
    except ImportError:
        raise TaskError(f"reasoning-gym tasks need the reasoning-gym package: {EXTRA}") from None
    return reasoning_gym


def parse(spec: Any, where: str) -> ReasoningGymSpec:
    """`reasoning_gym:` of a task YAML (or Python's arguments): a generator's name, a list of
    names, a {name: options} mapping, or {generators: ..., answer_format, sizes, seed, partial_credit}."""
    if isinstance(spec, dict) and "generators" in spec:
        rest = {k: v for k, v in spec.items() if k != "generators"}
        unknown = sorted(set(rest) - {"answer_format", "sizes", "seed", "partial_credit"})
        if unknown:
            raise TaskError(f"{where}: unknown key '{unknown[0]}' (generators, answer_format, sizes, seed, "
                            "partial_credit)")
        parsed = parse(spec["generators"], where)
        return _checked(ReasoningGymSpec(parsed.generators, rest.get("answer_format", "tag"),
                                         {**SPLIT_SIZES, **(rest.get("sizes") or {})}, rest.get("seed", 0),
                                         rest.get("partial_credit", True)), where)
    if isinstance(spec, str):
        spec = [name for name in spec.split("+")]
    if isinstance(spec, list) and all(isinstance(n, str) and n for n in spec):
        return _checked(ReasoningGymSpec({name: {} for name in spec}), where)
    if isinstance(spec, dict) and spec and all(isinstance(v, dict) or v is None for v in spec.values()):
        return _checked(ReasoningGymSpec({str(k): dict(v or {}) for k, v in spec.items()}), where)
    raise TaskError(f"{where}: reasoning_gym must be a generator's name, a list of names or a mapping of "
                    f"names to their options; got {spec!r}")


def _checked(spec: ReasoningGymSpec, where: str) -> ReasoningGymSpec:
    if spec.answer_format not in ANSWER_FORMATS:
        raise TaskError(f"{where}: answer_format must be one of {', '.join(ANSWER_FORMATS)}; got "
                        f"{spec.answer_format!r}")
    if set(spec.sizes) != set(SPLIT_SIZES) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in spec.sizes.values()):
        raise TaskError(f"{where}: sizes must give train, validation and test a whole number > 0; got {spec.sizes}")
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool) or spec.seed < 0:
        raise TaskError(f"{where}: seed must be a whole number >= 0; got {spec.seed!r}")
    if not isinstance(spec.partial_credit, bool):
        raise TaskError(f"{where}: partial_credit must be true or false; got {spec.partial_credit!r}")
    for name, options in spec.generators.items():
        weight = options.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not weight > 0:
            raise TaskError(f"{where}: generator '{name}' has weight {weight!r}; it must be a number > 0")
    return spec


def dataset(spec: ReasoningGymSpec, seed: int, size: int):
    """The generator (a composite of several) at `seed`, options checked by the library."""
    library = _library()
    from reasoning_gym.factory import DATASETS  # the optional extra, found by _library() above

    for name in spec.generators:
        if name not in DATASETS:
            close = difflib.get_close_matches(name, list(DATASETS), n=3)
            raise TaskError(f"reasoning-gym has no generator '{name}'" +
                            (f"; did you mean {', '.join(close)}?" if close else f" ({len(DATASETS)} exist, "
                             "e.g. chain_sum, basic_arithmetic, leg_counting)"))
    options = {n: {k: v for k, v in o.items() if k != "weight"} for n, o in spec.generators.items()}
    try:
        if len(options) == 1:
            (name, kwargs), = options.items()
            return library.create_dataset(name, **kwargs, seed=seed, size=size)
        from reasoning_gym.composite import DatasetSpec  # the optional extra
        parts = [DatasetSpec(n, float(spec.generators[n].get("weight", 1.0)), kwargs) for n, kwargs in options.items()]
        return library.create_dataset("composite", datasets=parts, seed=seed, size=size)
    except (TypeError, ValueError, AssertionError, KeyError) as e:  # an unknown option, a bad value
        raise TaskError(f"{spec.name}: bad generator options {options} ({e.__class__.__name__}: "
                        f"{' '.join(str(e).split()) or 'rejected by its validate()'})") from None


def rows(spec: ReasoningGymSpec) -> dict[str, list[dict]]:
    """Train / validation / test rows, each split from its own seed; a held-out split skips every
    question an earlier split holds (and its own repeats), so the splits never share a question."""
    instruction, seen, out = ANSWER_FORMATS[spec.answer_format], set(), {}
    for split, base in SPLIT_SEEDS.items():
        size, generator = spec.sizes[split], dataset(spec, base + spec.seed, spec.sizes[split] * TRIES_PER_ROW)
        kept: list[dict] = []
        for index in range(size * TRIES_PER_ROW):
            entry = generator[index]
            if split != "train" and entry["question"] in seen:
                continue
            kept.append({"prompt": f"{entry['question']}\n\n{instruction}", "answer": str(entry["answer"]),
                         "entry": {"question": entry["question"], "answer": entry["answer"],
                                   "metadata": entry.get("metadata", {})}})
            if split != "train":
                seen.add(entry["question"])
            if len(kept) == size:
                break
        if len(kept) < size:
            raise TaskError(f"{spec.name}: the {split} split found only {len(kept)} of {size} questions that no "
                            f"earlier split asked, in {size * TRIES_PER_ROW} draws; give these generators "
                            f"harder options or a smaller {split} size (sizes: {{{split}: {len(kept)}}})")
        out[split] = kept
        if split == "train":
            seen |= {r["entry"]["question"] for r in kept}
    return out


class Score:
    """The generators' own score_answer of the answer extract_answer takes from each completion
    (without partial_credit, a score below 1 is 0)."""

    def __init__(self, spec: ReasoningGymSpec):
        self.answer_format, self.partial_credit = spec.answer_format, spec.partial_credit
        self.scorer = dataset(spec, SPLIT_SEEDS["train"] + spec.seed, 1)

    def __call__(self, prompts: list[str], completions: list[str], extras: dict[str, list]) -> list[float]:
        if "entry" not in extras:
            raise TaskError("the reasoning-gym reward needs the rows' 'entry' column (rows of a reasoning-gym task)")
        scores = [float(self.scorer.score_answer(extract_answer(c, self.answer_format), entry))
                  for c, entry in zip(completions, extras["entry"])]
        return scores if self.partial_credit else [float(score >= 1.0) for score in scores]
