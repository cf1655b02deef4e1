"""Docs that run: every Python block of the README and every script in examples/, as written except
for their budgets (the tiny random model for the default one, a few steps), so they cannot rot."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def readme_blocks() -> list[tuple[str, str]]:
    blocks = BLOCK.findall((ROOT / "README.md").read_text())
    return [(f"README block {i + 1}", code) for i, code in enumerate(blocks)]


def examples() -> list[tuple[str, str]]:
    return [(f"examples/{p.name}", p.read_text()) for p in sorted((ROOT / "examples").glob("*.py"))]


def shrink(code: str, tiny_lm: Path) -> str:
    """The budgets cut down; nothing else of the code changes. Language-model steps are updates,
    control steps environment steps."""
    is_lm = '"smollm2-135m"' in code
    code = code.replace('"smollm2-135m"', repr(str(tiny_lm)))
    code = re.sub(r"total_steps=[\d_]+", f"total_steps={2 if is_lm else 1024}", code)
    code = re.sub(r"eval_every=[\d_]+", "eval_every=256", code)
    code = re.sub(r"episodes=\d+", "episodes=2", code)
    return code


def test_the_readme_has_a_language_model_and_a_control_example():
    codes = [code for _, code in readme_blocks()]
    assert any("rewards=" in c and "data=" in c for c in codes) and any('env="CartPole-v1"' in c for c in codes)
    assert {name for name, _ in examples()} == {"examples/custom_reward.py", "examples/dataset_input.py",
                                                "examples/early_stopping.py", "examples/sweep.py"}


@pytest.mark.parametrize("name, code", [pytest.param(n, c, id=n) for n, c in readme_blocks() + examples()])
def test_python_in_the_docs_runs_as_written(name, code, tiny_lm, tmp_path, monkeypatch, capsys):
    small = shrink(code, tiny_lm)
    assert "smollm2-135m" not in small and re.findall(r"total_steps=\d+", small) == re.findall(
        r"total_steps=(?:2|1024)\b", small), f"{name}: a budget the test does not cut down"
    monkeypatch.chdir(tmp_path)  # runs/ and saved models land here
    exec(compile(small, name, "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert printed.strip(), f"{name} printed nothing"
