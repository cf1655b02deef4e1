"""The house's structure, read from the source: layers without an import cycle, and the written
interfaces (protocols.py) that the control and language-model implementations keep."""
import ast
import inspect
import sys
from pathlib import Path

import pytest

import policygrad
from policygrad import protocols
from policygrad.control.policy import ControlPolicy
from policygrad.control.rollout import ControlWorkload
from policygrad.lm.policy import LMPolicy
from policygrad.lm.rollout import LMWorkload

SRC = Path(policygrad.__file__).parent
HEAVY = ("transformers", "peft", "matplotlib", "wandb", "torch.utils.tensorboard", "sacrebleu", "vaderSentiment",
         "pyarrow", "torch.distributed.fsdp", "torch.distributed.tensor", "torch.distributed.checkpoint",
         "reasoning_gym", "textarena", "math_verify", "nltk")
"""Dependencies a run may not need (the last four: the optional tasks extra, which a user may not
have installed): an import inside a function is for keeping one of these out."""
API_LAYER = {"policygrad", "policygrad.__main__", "policygrad.cli", "policygrad.api", "policygrad.pipeline"}


def module_name(path: Path) -> str:
    parts = ("policygrad",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def imported(name: str, node: ast.AST) -> list[str]:
    """The modules an import statement of module `name` reads: policygrad's own by their full
    name (a package's submodule when one is named), others as written."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
        if node.level else node.module
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(name: str, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(MODULES[name].read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    return {m for node in nodes if isinstance(node, (ast.Import, ast.ImportFrom)) for m in imported(name, node)}


def own(modules: set[str]) -> set[str]:
    return {m for m in modules if m in MODULES}


GRAPH = {name: own(imports(name)) - {name} for name in MODULES}


def find_cycle() -> list[str]:
    """One import cycle among policygrad's modules (every import, in functions too), or []."""
    state: dict[str, int] = {}
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))

    def visit(node: str, path: list[str]) -> list[str]:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return []

    for start in sorted(MODULES):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return []


def test_the_modules_import_each_other_without_a_cycle():
    assert find_cycle() == []


def test_a_cycle_is_found_when_there_is_one(monkeypatch):
    """The cycle search itself: one added arrow from errors back to config closes a loop."""
    monkeypatch.setitem(GRAPH, "policygrad.errors", {"policygrad.config"})
    cycle = find_cycle()
    assert cycle[0] == cycle[-1] and set(cycle) == {"policygrad.config", "policygrad.errors"}


def test_the_core_is_pure_math_and_errors_import_nothing():
    """core/ reads torch and Batch only (besides Python's own modules): no gymnasium, no transformers."""
    for name in MODULES:
        if name.startswith("policygrad.core"):
            for module in imports(name):
                assert (module.split(".")[0] in sys.stdlib_module_names or module.split(".")[0] == "torch"
                        or module == "policygrad.batch" or module.startswith("policygrad.core")), (name, module)
    assert imports("policygrad.errors") == set()
    assert own(imports("policygrad.identity")) == set()
    assert own(imports("policygrad.config")) == {"policygrad.errors"}  # layering values is resolve.py's


def test_nothing_below_the_api_layer_imports_it():
    for name, deps in GRAPH.items():
        if name not in API_LAYER:
            assert not deps & {"policygrad.api", "policygrad.cli", "policygrad.pipeline"}, name


def heavy_at_import(name: str, seen: set[str]) -> bool:
    """Whether importing module `name` loads a HEAVY dependency (its top-level imports, followed)."""
    for dep in imports(name, top_level_only=True):
        if dep.startswith(HEAVY):
            return True
        if dep in MODULES and dep not in seen:
            seen.add(dep)
            if heavy_at_import(dep, seen):
                return True
    return False


def function_imports() -> list[tuple[str, int, str, list[str]]]:
    out = []
    for name, path in MODULES.items():
        lines = path.read_text().split("\n")
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        said = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                        out.append((name, node.lineno, "why" if said else "", imported(name, node)))
    return out


def test_an_import_inside_a_function_keeps_a_heavy_dependency_out_and_says_so():
    for name, line, why, modules in function_imports():
        assert why, f"{name}:{line} imports inside a function without a comment saying why"
        for module in modules:
            heavy = module.startswith(HEAVY) or (module in MODULES and heavy_at_import(module, set()))
            assert heavy, f"{name}:{line} imports {module} inside a function, and it is light: import it at the top"


# --- the written interfaces ---------------------------------------------------------------------
def members(protocol: type) -> dict[str, object]:
    """A Protocol's members: its methods and properties, and its annotated attributes (None)."""
    written = "    def __init__(" in inspect.getsource(protocol)  # typing gives every Protocol an __init__
    own_names = {k: v for k, v in vars(protocol).items() if not k.startswith("_") or (k == "__init__" and written)}
    attributes = {k: None for k in protocol.__annotations__}
    return {**attributes, **{k: v for k, v in own_names.items() if callable(v) or isinstance(v, property)}}


def parameters(fn) -> list[tuple[str, object]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def check_implements(protocol: type, obj: object) -> None:
    for member, spec in members(protocol).items():
        assert hasattr(obj, member), f"{type(obj).__name__} lacks {protocol.__name__}.{member}"
        if callable(spec) and not isinstance(spec, property):
            mine = getattr(type(obj), member)
            assert callable(mine), f"{type(obj).__name__}.{member} is not a method"
            assert parameters(mine) == parameters(spec), f"{type(obj).__name__}.{member}: {parameters(mine)}"


@pytest.fixture(scope="module")
def workloads(tiny_lm, task_file):
    from policygrad.resolve import resolve
    lm = resolve({}, {"torch_threads": 1}, {"algo": "reinforce", "task": str(task_file), "model": str(tiny_lm)})
    control = resolve({}, {"num_envs": 2, "n_steps": 8}, {"algo": "ppo", "env": "CartPole-v1"})
    return LMWorkload(lm, seed=0), ControlWorkload(control, seed=0)


def test_both_workloads_and_policies_implement_the_written_protocols(workloads):
    lm, control = workloads
    for work, policy_class in ((lm, LMPolicy), (control, ControlPolicy)):
        check_implements(protocols.Workload, work)
        assert isinstance(work.policy, policy_class)
        check_implements(protocols.Policy, work.policy)
    assert (lm.per_update, control.per_update) == (1, control.cfg.rollout_size)
    assert (lm.trained_on, control.trained_on) == ({"task": lm.cfg.task}, {"env": "CartPole-v1"})


def test_a_member_missing_or_with_other_parameters_is_caught(workloads):
    class Partial:
        def evaluate(self, batch, grad=True):
            pass

    with pytest.raises(AssertionError, match="lacks Policy"):
        check_implements(protocols.Policy, object())
    with pytest.raises(AssertionError, match="Partial.evaluate"):
        check_implements(protocols.Policy, Partial())


def test_every_member_of_the_protocols_has_a_docstring():
    for protocol in (protocols.Policy, protocols.Workload):
        source = inspect.getsource(protocol)
        for member, spec in members(protocol).items():
            doc = inspect.getdoc(spec.fget if isinstance(spec, property) else spec) if spec is not None else None
            if spec is None:  # an attribute: the string under its annotation
                doc = source.split(f"    {member}:", 1)[1].split("\n", 2)[1].strip()
                assert doc.startswith('"""'), (protocol.__name__, member)
            else:
                assert doc, (protocol.__name__, member)
