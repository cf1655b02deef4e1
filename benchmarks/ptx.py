"""J_data, the data loss mixed into RL (InstructGPT's "PTX"): REINFORCE on positive-review for 40
steps (seed 1), without and with ptx_coef > 0. The policy's mean token NLL on held-out general
text must rise by at most half as much with the data loss as without, while the test-reward gain
stays at least 80% of the run without it.

The text is built offline from the Python standard library's own reference documentation
(`pydoc_data.topics`, the prose of "The Python Language Reference" that `help()` shows): its prose
paragraphs (200-1200 characters, mostly letters) are split into a data-loss file (4 of 5) and a
held-out file (1 of 5, the NLL measured), disjoint paragraphs of one source.
Prints one JSON line.

Usage: .venv/bin/python benchmarks/ptx.py [--coef 0.5] [--steps 40]
"""
import argparse
import json
import re
import time
from pathlib import Path

from common import cpu_name, run_cli  # benchmarks/common.py

NLL_RISE_SHARE, GAIN_SHARE = 0.5, 0.8


def python_docs_text(out: Path) -> tuple[Path, Path]:
    """The data-loss and held-out text files (text rows), written once."""
    from pydoc_data.topics import topics
    paragraphs = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            text = " ".join(block.split())
            if 200 <= len(text) <= 1200 and sum(c.isalpha() or c == " " for c in text) / len(text) > 0.9:
                paragraphs.append(text)
    train, held_out = out / "ptx-train.jsonl", out / "held-out-text.jsonl"
    train.write_text("".join(json.dumps({"text": t}) + "\n" for i, t in enumerate(paragraphs) if i % 5))
    held_out.write_text("".join(json.dumps({"text": t}) + "\n" for i, t in enumerate(paragraphs) if i % 5 == 0))
    return train, held_out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coef", type=float, default=0.5, help="ptx_coef of the run with the data loss")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="runs/bench-ptx")
    parser.add_argument("--reuse-baseline", action="store_true", help="keep an earlier run without the data loss")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_text, held_out = python_docs_text(out)
    import policygrad  # after the files: the runs below are subprocesses, as a user's would be

    start = time.perf_counter()
    base_reward = run_cli("eval", "--task", "positive-review", "--model", args.model, "--split", "test")["mean_reward"]
    base_nll = policygrad.nll(args.model, held_out, max_length=256)
    runs = {"without": out / "no-ptx", "with": out / f"ptx-{args.coef:g}"}
    common = ["train", "--algo", "reinforce", "--task", "positive-review", "--model", args.model, "--steps",
              str(args.steps), "--seed", "1", "--no-progress"]
    if not (args.reuse_baseline and (runs["without"] / "final_eval.json").is_file()):
        run_cli(*common, "--out", str(runs["without"]), "--overwrite")
    run_cli(*common, "--out", str(runs["with"]), "--overwrite", f"ptx_data={train_text.resolve()}",
               f"ptx_coef={args.coef}", "ptx_max_length=256")
    result = {}
    for name, folder in runs.items():
        final = json.loads((folder / "final_eval.json").read_text())
        nll = policygrad.nll(folder, held_out, max_length=256)
        result[name] = {"test_reward": final["test/reward_mean"], "reward_gain": final["test/reward_mean"] - base_reward,
                        "kl": final["test/kl_to_reference"], "held_out_nll": nll, "nll_rise": nll - base_nll}
    without, with_ = result["without"], result["with"]
    # meaningful only when the run without the data loss did move both
    nll_ok = without["nll_rise"] > 0 and with_["nll_rise"] <= NLL_RISE_SHARE * without["nll_rise"]
    gain_ok = without["reward_gain"] > 0 and with_["reward_gain"] >= GAIN_SHARE * without["reward_gain"]
    print(json.dumps({"benchmark": "ptx", "cpu": cpu_name(), "model": args.model, "steps": args.steps,
                      "ptx_coef": args.coef,
                      "text": "pydoc_data.topics prose paragraphs", "held_out_paragraphs": len(
                          held_out.read_text().splitlines()), "base_test_reward": base_reward,
                      "base_held_out_nll": base_nll, **result,
                      "nll_rise_ratio": with_["nll_rise"] / without["nll_rise"] if without["nll_rise"] else None,
                      "gain_ratio": with_["reward_gain"] / without["reward_gain"] if without["reward_gain"] else None,
                      "passed": nll_ok and gain_ok, "wall_s": time.perf_counter() - start}))


if __name__ == "__main__":
    main()
