"""mkdocs hook: writes reference/config.md from src/policygrad/config.py at build time, so the
configuration reference is never copied by hand.

Names, types and defaults come from `dataclasses.fields(Config)`; each field's text is the string
literal right under it (read with `ast`), or, failing that, `metadata["doc"]` / `metadata["help"]`.
Fields are grouped by `metadata["family"]` where a field has one, else by the `# --- section ---`
comment above it. Both `name: int = 3` and `name: int = field(default=3, metadata={...})` work.

config.py is loaded as a module of a private package pointed at src/policygrad, so the build does
not import policygrad's __init__ (torch, transformers) and never shadows an installed policygrad.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import re
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG_PY = ROOT / "src" / "policygrad" / "config.py"
PAGE = "reference/config.md"
SECTION = re.compile(r"^\s*#\s*-{2,}\s*(.+?)\s*-{2,}\s*$")
_PACKAGE = "_policygrad_docs"


def load_config_module():
    """config.py as `_policygrad_docs.config`; its relative imports resolve inside src/policygrad."""
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(CONFIG_PY.parent)]
        sys.modules[_PACKAGE] = package
    name = f"{_PACKAGE}.config"
    spec = importlib.util.spec_from_file_location(name, CONFIG_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses looks its module up while building the class
    spec.loader.exec_module(module)
    return module


def field_docs(source: str, class_name: str = "Config") -> dict[str, tuple[str, str]]:
    """name -> (section, docstring) of each annotated field of the class, from the source alone."""
    lines = source.splitlines()
    cls = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef) and n.name == class_name)
    out, body = {}, cls.body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        doc = ""
        if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            doc = after.value.value
        section = ""
        for line in reversed(lines[cls.lineno:node.lineno - 1]):  # the nearest section comment above
            match = SECTION.match(line)
            if match:
                section = match.group(1)
                break
        out[node.target.id] = (section, " ".join(doc.split()))
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _type(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render() -> str:
    module = load_config_module()
    docs = field_docs(CONFIG_PY.read_text())
    choices = getattr(module, "CHOICES", {})
    groups: dict[str, list[str]] = {}
    for f in dataclasses.fields(module.Config):
        section, doc = docs.get(f.name, ("", ""))
        family = f.metadata.get("family") if f.metadata else None
        doc = doc or (f.metadata.get("doc") or f.metadata.get("help") or "" if f.metadata else "")
        if choices.get(f.name):
            doc += " Choices: " + ", ".join(f"`{c}`" for c in choices[f.name]) + "."
        row = f"| `{f.name}` | `{_cell(_type(f))}` | `{_cell(_default(f))}` | {_cell(doc.strip()) or '(undocumented)'} |"
        groups.setdefault(str(family or section or "other"), []).append(row)
    parts = ["# Configuration reference", "",
             "Every key of `policygrad.Config`, generated at build time from the field docstrings of",
             "`src/policygrad/config.py` (`docs/hooks/config_reference.py`). A key goes in a YAML file",
             "(`--config`), on the command line as `key=value`, in a task YAML, or as a keyword of",
             "`policygrad.train`. Layering, later wins: defaults < preset for (env, algo) < task <",
             "`--config FILE.yaml` < `key=value` overrides < explicit CLI flags. An unknown key is an",
             "error that lists the valid ones.", ""]
    for group, rows in groups.items():
        parts += [f"## {group[0].upper() + group[1:]}", "", "| key | type | default | meaning |",
                  "| --- | --- | --- | --- |", *rows, ""]
    return "\n".join(parts)


def on_files(files, config):
    from mkdocs.structure.files import File
    files.append(File.generated(config, PAGE, content=render()))
    return files
