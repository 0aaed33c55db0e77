"""docs/architecture.md's "Modules, one line each" against the tree: every module of every package is listed, none
that does not exist.

The truth is the file system: the ``.py`` files under the seven packages, found by walking them.
"""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("topologies", "planner", "sim", "executor", "validation", "whatif", "pipetwin")


def _lines() -> list[str]:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = doc.split("## Modules, one line each", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^- `([\w/]+\.py)` — \S", section, re.M)


def _listed() -> set[str]:
    return set(_lines())


def _tree() -> set[str]:
    return {
        p.relative_to(ROOT).as_posix()
        for pkg in PACKAGES
        for p in (ROOT / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    }


def test_every_module_in_the_tree_has_its_line():
    missing = sorted(_tree() - _listed())
    assert not missing, f"docs/architecture.md lists no line for {missing}; add one under its package"


def test_every_listed_module_exists():
    stale = sorted(_listed() - _tree())
    assert not stale, f"docs/architecture.md lists {stale}, which are not in the tree"


def test_no_module_has_two_lines():
    # Two helpers once each added planner/stagememory.py's line; the set comparisons above cannot see a repeat.
    names = _lines()
    repeated = sorted({n for n in names if names.count(n) > 1})
    assert not repeated, f"docs/architecture.md lists {repeated} more than once; keep one line each"


def test_the_section_is_parsed():
    # The parser reads the doc's real lines: a format change that made it read nothing would pass the two above.
    assert {"planner/program.py", "sim/engine.py", "pipetwin/cli.py"} <= _listed()
