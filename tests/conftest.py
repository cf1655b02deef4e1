import pytest
import torch

from lm_helpers import make_tiny_lm, write_task

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A tiny random causal LM folder (tests/lm_helpers.py), built once for the session."""
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny")


@pytest.fixture(scope="session")
def task_file(tmp_path_factory):
    """A task YAML: 30 prompts with an `answer` column, rewards VADER + 0.5 x a python brevity reward."""
    folder = tmp_path_factory.mktemp("task")
    (folder / "rewards.py").write_text(
        "def brevity(prompts, completions, answer):\n"
        "    return [1.0 / (1 + len(c)) for c in completions]\n")
    rows = [{"prompt": f"Say something nice about item {i}.", "answer": str(i)} for i in range(30)]
    return write_task(folder, rows, "data: prompts.jsonl\n"
                      "rewards:\n  - vader\n  - {reward: 'python:rewards.py:brevity', weight: 0.5}\n"
                      "max_new_tokens: 6\n")
