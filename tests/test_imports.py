"""The package's import graph, read from the source with `ast` (nothing is imported):

- no module of provae/ takes part in an import cycle (lazy imports inside functions count too);
- no module of provae/ imports a stage script or a script (the stages import the package, never
  the other way round), and no stage script imports another one (only `stages/common.py`);
- the leaves stay leaves: provae/datasets.py, provae/grid.py, provae/files.py and
  provae/certificate_audit.py import nothing of provae;
- each stage of dvc.yaml lists in its `deps` exactly the Python files it imports, transitively
  within provae/ and stages/common.py (imports at module level: what runs when the script starts).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "provae"
STAGES = ROOT / "stages"
SCRIPTS = ROOT / "scripts"
LEAVES = ("provae.datasets", "provae.grid", "provae.files", "provae.certificate_audit")
# The stages whose deps this file checks: every stage but `report`, whose split into a package is under way.
CHECKED_STAGES = ("data", "train", "evaluate", "attack_strength", "attack_budget", "fixed_encoder", "certify",
                  "certify_elbo", "train_bound", "evaluate_bound", "certify_bound")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, module_level_only: bool = False) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in ``path``; relative ones resolved against it.
    ``from a import b`` gives ``a.b`` when that is a module of provae, else ``a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    if module_level_only:  # module level, including inside if/try blocks there, not inside functions or classes
        nodes, pending = [], list(tree.body)
        while pending:
            node = pending.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try)):
                pending += [*node.body, *node.orelse, *getattr(node, "handlers", []), *getattr(node, "finalbody", [])]
            elif isinstance(node, ast.ExceptHandler):
                pending += node.body
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found += [(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source, node.lineno)
                      for alias in node.names]
    return found


def package_imports(path: Path, module_level_only: bool = False) -> set[str]:
    """The modules of provae that ``path`` imports (``provae`` itself: its __init__)."""
    return {name for name, _ in imports(path, module_level_only) if name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_imports_of_every_form(tmp_path):
    assert package_imports(PACKAGE / "attacks.py") >= {"provae.bounds", "provae.model", "provae.sensitivity"}  # relative
    assert "provae.datasets" in package_imports(PACKAGE / "data.py")  # absolute
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle():
    graph = {name: package_imports(path) - {name, "provae"} for name, path in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in provae: " + " -> ".join(cycle)


def test_the_package_imports_no_stage_or_script():
    outside = {"stages", "scripts"} | {path.stem for path in [*STAGES.glob("*.py"), *SCRIPTS.glob("*.py")]}
    offending = [f"{path.relative_to(ROOT)}:{line} imports {name}" for path in MODULES.values()
                 for name, line in imports(path) if name.split(".")[0] in outside and not name.startswith("provae")]
    assert not offending, "\n".join(offending)


@pytest.mark.parametrize("leaf", LEAVES)
def test_the_leaves_import_nothing_of_the_package(leaf):
    assert package_imports(MODULES[leaf]) == set(), f"{leaf} must import nothing of provae"


def test_no_stage_imports_another_stage():
    stems = {path.stem for path in STAGES.glob("*.py")} - {"common"}
    offending = [f"{path.name}:{line} imports {name}" for path in STAGES.glob("*.py")
                 for name, line in imports(path) if name.split(".")[0] in stems | {"stages"}]
    assert not offending, "\n".join(offending)


def python_deps_of(script: Path, lazy: bool = False) -> set[str]:
    """The Python files a stage script loads at start-up: itself, stages/common.py if it imports
    it, and every provae module reached (with the package __init__s that importing them runs);
    ``lazy``: also those imported inside functions, which a stage may need only with some options."""
    files, pending = {script}, [script]
    while pending:
        path = pending.pop()
        reached = [MODULES[name] for name in package_imports(path, module_level_only=not lazy)]
        if any(name == "common" for name, _ in imports(path, module_level_only=not lazy)):
            reached.append(STAGES / "common.py")
        for found in reached:
            name = module_name(found) if found.is_relative_to(PACKAGE) else ""
            parents = [MODULES[".".join(name.split(".")[:i])] for i in range(1, name.count(".") + 1)]
            for new in [found, *parents]:
                if new not in files:
                    files.add(new)
                    pending.append(new)
    return {str(path.relative_to(ROOT)) for path in files}


def stage_definitions() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


@pytest.mark.parametrize("stage", CHECKED_STAGES)
def test_each_stage_depends_on_exactly_the_modules_it_imports(stage):
    """Every file loaded at start-up is a dep; beyond those, only files imported inside functions
    (`train_bound` needs the ELBO-level bound that `train.py --bound elbo_crown` imports lazily)."""
    definition = stage_definitions()[stage]
    script = ROOT / definition["cmd"].split()[1]
    listed = {dep for dep in definition["deps"] if dep.endswith(".py")}
    expected, reachable = python_deps_of(script), python_deps_of(script, lazy=True)
    assert expected <= listed <= reachable, (f"dvc.yaml, stage {stage}: missing {sorted(expected - listed)}, "
                                             f"never imported {sorted(listed - reachable)}")
