"""Golden files: the exact lowered action order of every family for a few (P, M, V), as torch pins its schedules.

Each file ``tests/golden/schedules/<family>_P<p>_M<m>[_V<v>].txt`` holds one line
per worker, ``w<id>: <action> <action> ...``, of ``generate(make_spec(family, P, M,
chunks=V))``. A change to any family's order, steps, versions or communication
shows up here as a diff of that file.

Regenerate (after a deliberate change, then review the diff)::

    PYTHONPATH=. python tests/test_golden_schedules.py            # every existing file
    PYTHONPATH=. python tests/test_golden_schedules.py zb-v_P4_M8_V2   # add or rewrite one case
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from planner.families import FAMILIES
from planner.schedules import generate, make_spec

GOLDEN = Path(__file__).parent / "golden" / "schedules"
_NAME = re.compile(r"^(?P<family>.+)_P(?P<p>\d+)_M(?P<m>\d+)(?:_V(?P<v>\d+))?$")


def case_of(name: str) -> tuple[str, int, int, int]:
    m = _NAME.match(name)
    if not m:
        raise ValueError(f"golden case {name!r} is not <family>_P<p>_M<m>[_V<v>]")
    return m["family"], int(m["p"]), int(m["m"]), int(m["v"] or 1)


def render(name: str) -> str:
    family, P, M, V = case_of(name)
    prog = generate(make_spec(family, P, M, chunks=V))
    return "".join(f"w{w}: {' '.join(map(str, prog[w]))}\n" for w in prog.workers)


CASES = sorted(p.stem for p in GOLDEN.glob("*.txt"))


@pytest.mark.parametrize("name", CASES)
def test_generated_program_matches_its_golden_file(name):
    want = (GOLDEN / f"{name}.txt").read_text()
    got = render(name)
    assert got == want, f"{name}: the generated program differs from its golden file (regenerate: see module docstring)"


def test_every_family_has_golden_files():
    covered = {case_of(n)[0] for n in CASES}
    assert set(FAMILIES) <= covered, f"families without a golden file: {sorted(set(FAMILIES) - covered)}"


if __name__ == "__main__":
    for name in sys.argv[1:] or CASES:
        (GOLDEN / f"{name}.txt").write_text(render(name))
        print(f"wrote {GOLDEN / name}.txt")
