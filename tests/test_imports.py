"""The package import rules (DESIGN.md), checked on the source: an AST walk over every import of every package.

Every ``import``/``from ... import`` counts, function-local ones included, relative ones resolved, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. A breach is reported
as ``file:line: package imports name``. tests/ and benchmarks/ are exempt (they may import anything).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

OURS = ("topologies", "planner", "sim", "executor", "validation", "whatif", "pipetwin")
#: package -> top-level names it must never import. The face (pipetwin) may import everything.
RULES: dict[str, frozenset[str]] = {
    "topologies": frozenset({"planner", "sim", "executor", "validation", "whatif", "pipetwin", "simpy", "torch"}),
    "planner": frozenset({"sim", "executor", "validation", "whatif", "pipetwin", "simpy", "torch"}),
    "sim": frozenset({"executor", "validation", "whatif", "pipetwin", "torch"}),
    "executor": frozenset({"sim", "validation", "whatif", "pipetwin", "simpy"}),
    "whatif": frozenset({"sim", "executor", "validation", "pipetwin", "simpy", "torch"}),
    "validation": frozenset({"pipetwin"}),
}
#: Top-level folders free of rules: the face, and the two that may import anything.
FREE = ("pipetwin", "tests", "benchmarks")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in the file at ``path`` (a module of the tree at ``root``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(root, path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            f = node.func
            called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if called in ("import_module", "__import__"):
                out.append((node.lineno, node.args[0].value))
    return out


def breaches(root: Path, rules: dict[str, frozenset[str]] = RULES) -> list[str]:
    """``file:line: package imports name`` for every import under ``root`` that its package's rule forbids."""
    found = []
    for package, banned in sorted(rules.items()):
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imported_names(path, root):
                top = name.split(".")[0]
                if top in banned:
                    found.append(f"{path.relative_to(root)}:{line}: {package}/ imports {name}")
    return found


def test_every_package_keeps_the_import_rules():
    assert not breaches(ROOT), "import rules broken (DESIGN.md, Packages):\n" + "\n".join(breaches(ROOT))


def test_every_package_the_rules_name_exists_and_every_package_has_a_rule():
    """A rule over a folder that is not there would pass without reading anything; a new package without
    a rule would never be read."""
    for package in RULES:
        assert (ROOT / package / "__init__.py").exists(), package
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - set(RULES) - set(FREE) == set(), "add the new package to RULES in tests/test_imports.py"


# ---------------------------------------------------------------------- the checker itself
def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


def test_the_checker_names_every_kind_of_breach_with_file_and_line(tmp_path):
    root = _tree(tmp_path, {
        "planner/__init__.py": "",
        "planner/a.py": "import numpy\nimport torch.nn as nn\n",                       # top-level torch
        "planner/b.py": "def f():\n    from simpy import Environment\n",                # function-local simpy
        "sim/__init__.py": "",
        "sim/c.py": "import importlib\nm = importlib.import_module('torch.cuda')\n",  # import_module literal
        "sim/d.py": "x = __import__('torch')\n",
        "executor/__init__.py": "",
        "executor/e.py": "class K:\n    def g(self):\n        import simpy\n",
        "whatif/__init__.py": "from . import sweep\n",
        "whatif/sweep.py": "from sim.engine import simulate_plan\nfrom planner.plan import Plan\n",
        "whatif/deep/__init__.py": "",
        "whatif/deep/x.py": "from ...pipetwin import cli\n",                           # relative, climbing out
        "validation/__init__.py": "",
        "validation/r.py": "from pipetwin.charts import gantt\nfrom validation import compute\n",
        "topologies/__init__.py": "",
        "topologies/t.py": "import networkx\nimport yaml\n",
    })
    got = breaches(root)
    assert got == [
        "executor/e.py:3: executor/ imports simpy",
        "planner/a.py:2: planner/ imports torch.nn",
        "planner/b.py:2: planner/ imports simpy",
        "sim/c.py:2: sim/ imports torch.cuda",
        "sim/d.py:1: sim/ imports torch",
        "validation/r.py:1: validation/ imports pipetwin.charts",
        "whatif/deep/x.py:1: whatif/ imports pipetwin",
        "whatif/sweep.py:1: whatif/ imports sim.engine",
    ]


def test_the_checker_passes_a_clean_tree_and_reads_relative_imports_inside_a_package(tmp_path):
    root = _tree(tmp_path, {
        "planner/__init__.py": "from .plan import Plan\n",
        "planner/plan.py": "import numpy as np\nfrom topologies.topology import Topology\n",
        "sim/__init__.py": "",
        "sim/engine.py": "import simpy\nfrom planner.plan import Plan\nfrom . import network\n",
        "sim/network.py": "",
    })
    assert breaches(root) == []
    assert imported_names(root / "sim/engine.py", root) == [(1, "simpy"), (2, "planner.plan"), (3, "sim")]
    assert imported_names(root / "planner/__init__.py", root) == [(1, "planner.plan")]


@pytest.mark.parametrize("package,name", [("topologies", "planner"), ("whatif", "torch"), ("whatif", "validation"),
                                          ("executor", "sim"), ("sim", "pipetwin")])
def test_the_rules_forbid_what_design_forbids(package, name):
    assert name in RULES[package]
