"""Docs that run: every Python and shell block of the README and of docs/**/*.md, and every script in
examples/, as written except for their budgets (the tiny random model for the default one, a few
steps), so they cannot rot. The site itself is built with `mkdocs build --strict`.

Which blocks run is visible in the Markdown: ```python and ```bash (or sh, shell) blocks run; other
fence languages (text, yaml, json) are not code to run; a Python or shell block that must not run
(a benchmark, a GPU, two machines) has `<!-- not run: why -->` on the line right above its fence."""
import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>.+?)\s*-->\s*$")
SHELL = ("bash", "sh", "shell")
SOURCES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@dataclasses.dataclass
class Block:
    name: str       # file:line of the opening fence
    lang: str
    code: str
    not_run: str    # the reason given in <!-- not run: ... -->, or ""


def blocks(path: Path) -> list[Block]:
    text = path.read_text()
    out = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        above = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        why = NOT_RUN.search(above)
        indent = len(m.group("indent"))
        code = "".join(l[indent:] if l[:indent].isspace() else l for l in m.group("body").splitlines(True))
        out.append(Block(f"{path.relative_to(ROOT)}:{line}", m.group("lang"), code, why.group("why") if why else ""))
    return out


def all_blocks() -> list[Block]:
    return [b for path in SOURCES for b in blocks(path)]


def runnable(lang: str | tuple) -> list[Block]:
    langs = (lang,) if isinstance(lang, str) else lang
    return [b for b in all_blocks() if b.lang in langs and not b.not_run]


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


def commands(code: str) -> list[list[str]]:
    """A shell block's commands: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


TINY_LM_KEYS = {"max_new_tokens": 8, "eval_prompts": 4, "eval_every": 2}
MULTI_TURN = {"guess-number", "dialogue"}
"""Built-in multi-turn tasks: their runs get max_turns=2 (every test-split episode is played)."""
SHRUNK_FLAGS = {"--steps": "2", "--total-steps": "1024", "--episodes": "2", "--samples": "2", "--best-of": "2"}


def shrink_command(words: list[str], tiny_lm: Path) -> list[str]:
    """A policygrad command on tiny budgets: the tiny model for the default one, a language-model
    run of 2 updates of short completions, a control run of 1024 environment steps, 2 evaluation
    episodes. Checkpoint names follow (update-000040 -> update-000002)."""
    words = [str(tiny_lm) if w == "smollm2-135m" else w for w in words]
    words = [re.sub(r"^eval_every=\d+$", "eval_every=256", w) for w in words]
    words = [re.sub(r"update-\d{6}", "update-000002", w) for w in words]  # the last of 2 updates
    for i, w in enumerate(words[:-1]):
        if w in SHRUNK_FLAGS:
            words[i + 1] = SHRUNK_FLAGS[w]
    if words[1] == "train" and "--resume" not in words:
        if "--task" in words and "--model" not in words:
            words += ["--model", str(tiny_lm)]
        if "--task" in words and "--steps" not in words:
            words += ["--steps", "2"]
        if "--task" in words:  # short completions, small validation, one validation (a best checkpoint)
            keys = {**TINY_LM_KEYS, **({"max_turns": 2} if words[words.index("--task") + 1] in MULTI_TURN else {})}
            words += [f"{k}={v}" for k, v in keys.items() if not any(w.startswith(f"{k}=") for w in words)]
        if "--env" in words and "--total-steps" not in words:
            words += ["--total-steps", "1024"]
    return words


def test_the_readme_has_a_language_model_and_a_control_example():
    codes = [b.code for b in blocks(ROOT / "README.md") if b.lang == "python"]
    assert any("rewards=" in c and "data=" in c for c in codes) and any('env="CartPole-v1"' in c for c in codes)
    assert {name for name, _ in examples()} == {"examples/custom_reward.py", "examples/dataset_input.py",
                                                "examples/early_stopping.py", "examples/sweep.py"}


def test_blocks_that_do_not_run_say_why_and_are_code():
    """The exclusion is for Python and shell only (other languages never run), and names a reason."""
    skipped = [b for b in all_blocks() if b.not_run]
    assert skipped, "the marker is read"
    for b in skipped:
        assert b.lang in ("python", *SHELL), f"{b.name}: <!-- not run --> above a ```{b.lang} block"
        assert len(b.not_run) > 10, f"{b.name}: say why the block does not run"
    assert len(runnable(SHELL)) >= 6 and len(runnable("python")) >= 4


@pytest.mark.parametrize("name, code", [pytest.param(b.name, b.code, id=b.name) for b in runnable("python")]
                         + [pytest.param(n, c, id=n) for n, c in examples()])
def test_python_in_the_docs_runs_as_written(name, code, tiny_lm, tmp_path, monkeypatch, capsys):
    small = shrink(code, tiny_lm)
    assert "smollm2-135m" not in small and re.findall(r"total_steps=\d+", small) == re.findall(
        r"total_steps=(?:2|1024)\b", small), f"{name}: a budget the test does not cut down"
    monkeypatch.chdir(tmp_path)  # runs/ and saved models land here
    exec(compile(small, name, "exec"), {"__name__": "__main__"})
    printed = capsys.readouterr().out
    assert printed.strip(), f"{name} printed nothing"


@pytest.mark.parametrize("name, code", [pytest.param(b.name, b.code, id=b.name) for b in runnable(SHELL)])
def test_shell_in_the_docs_runs_as_written(name, code, tiny_lm, tmp_path, monkeypatch, capsys):
    """Each command of the block, in order, in one folder, through the CLI's own entry point
    (in this process: importing torch once keeps the file fast); each must exit 0."""
    from policygrad import cli
    monkeypatch.chdir(tmp_path)
    for words in commands(code):
        assert words[0] == "policygrad", (
            f"{name}: `{words[0]}` is not a policygrad command; mark the block <!-- not run: why -->")
        words = shrink_command(words, tiny_lm)
        assert "smollm2-135m" not in words
        rc = cli.main(words[1:])
        captured = capsys.readouterr()
        assert rc == 0, f"{name}: {shlex.join(words)} exited {rc}:\n{captured.err[-2000:]}"


# --- the site ---------------------------------------------------------------------------------------

def load_hook():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    if shutil.which("mkdocs") is None and importlib.util.find_spec("mkdocs") is None:
        pytest.fail("mkdocs is not installed: `make install` installs the dev extras (mkdocs-material)")
    out = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return out


def test_the_site_builds_without_warnings(site):
    assert (site / "index.html").exists() and (site / "results" / "index.html").exists()


def test_the_config_reference_lists_every_field(site):
    from policygrad import Config
    page = (site / "reference" / "config" / "index.html").read_text()
    missing = [f.name for f in dataclasses.fields(Config) if f"<code>{f.name}</code>" not in page]
    assert not missing, f"fields missing from the generated configuration reference: {missing}"


def test_the_config_reference_reads_both_field_forms():
    """`name: int = 3` and `name: int = field(default=3, metadata=...)`, docstring under each, and the
    section comment above."""
    source = ('class Config:\n    # --- first ---\n    a: int = 3\n    """A\'s text."""\n'
              '    # --- second part ---\n    b: int = field(default=4, metadata={"family": "x"})\n'
              '    """B\'s\n    text."""\n    c: list = field(default_factory=list)\n')
    docs = load_hook().field_docs(source)
    assert docs == {"a": ("first", "A's text."), "b": ("second part", "B's text."), "c": ("second part", "")}
