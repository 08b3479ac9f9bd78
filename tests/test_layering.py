"""The package's import direction (see the slimtune package docstring), checked from the source with ast.

Every import counts, including those inside functions: a lazy import that runs back up is still a
cycle in the design. Each module belongs to a tier; a module may import its own tier's units and
lower tiers only, and the units (top-level modules and subpackages) must form no cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import slimtune

PACKAGE = Path(slimtune.__file__).parent

# Lowest first. A unit may import units of its own tier or below; never above.
TIERS: list[set[str]] = [
    {"errors", "utils", "malloc"},
    {"config", "runtime", "compiled_inference", "checkpoint", "data", "preprocessing", "testing"},
    {"nets"},
    {"evaluate", "train", "predict", "features", "export", "probe"},
    {"demo", "cli", "__main__"},
]
ROOT = "<root>"  # slimtune/__init__.py: lazy attribute access only, importable from anywhere


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def _tier(unit: str) -> int:
    for index, tier in enumerate(TIERS):
        if unit in tier:
            return index
    raise AssertionError(f"slimtune.{unit} is in no tier: add it to TIERS and to the package docstring")


def _module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_edges(package: Path = PACKAGE) -> list[tuple[str, str, str]]:
    """(importing module, imported module, 'file:line') for every slimtune import in the source."""
    edges = []
    for path in sorted(package.rglob("*.py")):
        module = _module_name(path, package)
        base = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"{path.relative_to(package.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base.split(".")[:len(base.split(".")) - (node.level - 1)]
                    target = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("slimtune"):
                    continue
                for alias in node.names:  # `from x import y`: y is a submodule, or a name in x
                    inner = package.parent.joinpath(*target.split("."), alias.name)
                    named = inner.is_dir() or inner.with_suffix(".py").is_file()
                    edges.append((module, f"{target}.{alias.name}" if named else target, where))
            elif isinstance(node, ast.Import):
                edges += [(module, alias.name, where) for alias in node.names if alias.name.startswith("slimtune")]
    return edges


def upward_imports(edges: list[tuple[str, str, str]]) -> list[str]:
    """Imports from a lower tier into a higher one."""
    bad = []
    for source, target, where in edges:
        a, b = _unit(source), _unit(target)
        if ROOT in (a, b) or a == b:
            continue
        if _tier(b) > _tier(a):
            bad.append(f"{where}: {source} (tier {_tier(a)}) imports {target} (tier {_tier(b)})")
    return bad


def unit_cycles(edges: list[tuple[str, str, str]]) -> list[list[str]]:
    """Cycles in the graph of units (top-level modules and subpackages)."""
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges:
        a, b = _unit(source), _unit(target)
        if ROOT not in (a, b) and a != b:
            graph.setdefault(a, set()).add(b)
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_no_import_runs_back_up_and_no_cycle():
    edges = import_edges()
    assert len(edges) > 50  # the walk saw the package
    assert upward_imports(edges) == []
    assert unit_cycles(edges) == []


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    fake = tmp_path / "slimtune"
    (fake / "evaluate").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "evaluate" / "__init__.py").write_text("")
    (fake / "train" / "__init__.py").write_text("")
    (fake / "train" / "checkpoints.py").write_text("")
    (fake / "evaluate" / "run.py").write_text("from ..train import checkpoints\n")
    (fake / "train" / "loop.py").write_text("def f():\n    from ..evaluate.run import x\n")
    (fake / "data.py").write_text("from slimtune.nets import registry\n")
    edges = import_edges(fake)
    assert ("slimtune.evaluate.run", "slimtune.train.checkpoints", "slimtune/evaluate/run.py:1") in edges
    assert unit_cycles(edges) == [["evaluate", "train", "evaluate"]]
    assert upward_imports(edges) == ["slimtune/data.py:1: slimtune.data (tier 1) imports slimtune.nets (tier 2)"]


def test_the_tiers_are_the_documented_ones():
    doc = slimtune.__doc__
    for tier in TIERS:
        for unit in tier - {"__main__", "testing", "export"}:
            assert unit in doc, f"the package docstring does not place {unit}"


@pytest.mark.parametrize("module", ["slimtune", "slimtune.checkpoint.train_dir", "slimtune.runtime",
                                    "slimtune.evaluate.run", "slimtune.train.loop", "slimtune.cli"])
def test_each_module_imports_alone(module):
    # A fresh interpreter per module: an import cycle shows as an ImportError only on a cold start.
    finished = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr[-1500:]
