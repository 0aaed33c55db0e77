"""A program relabelled to another family keeps the laws and, often, the looser family's bounds: check passes it.

``declared_family_differs`` says so (the cost model would price the declared family), and ``simulate``/``run
--program`` print it as a warning while running the order as written. The relabellings below are ones a user
makes by editing one word of a file; that check lets them through is itself asserted, so the test fails if
check starts refusing them (then this warning is no longer the only guard and the test should say so).
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from planner.check import check, declared_family_differs
from planner.families import FAMILIES, FAMILY
from planner.program import Kind
from planner.schedulespec import chunks_for
from planner.schedules import generate, make_spec


def _as(prog, family: str):
    return replace(prog, spec=replace(prog.spec, family=family))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_generated_program_is_its_declared_family(family):
    V = chunks_for(family, 2) if FAMILY[family].multi_stage else 1
    prog = generate(make_spec(family, 4, 8, chunks=V, batches=1 if family == "pipedream" else 2))
    assert declared_family_differs(prog) is None


@pytest.mark.parametrize("real,declared,V", [
    ("1f1b", "gpipe", 1),            # 1F1B keeps GPipe's in-flight bound (a whole batch)
    ("zb-h1", "zb-h2", 1),           # ZB-H1 keeps ZB-H2's looser bounds
    ("interleaved", "looped-bfs", 2),  # interleaved keeps looped BFS's (a batch, any microbatch order)
    ("v-half", "zb-h1", 2),          # a V over 8 virtual stages declared as a 4-stage linear family
])
def test_a_relabelled_program_passes_check_and_is_reported(real, declared, V):
    prog = _as(generate(make_spec(real, 4, 8, chunks=V)), declared)
    check(prog)  # the laws and the declared family's bounds hold
    line = declared_family_differs(prog)
    assert line is not None and f"declared {declared}" in line and FAMILY[declared].title in line


def test_the_first_difference_is_named():
    real = generate(make_spec("1f1b", 4, 8))
    line = declared_family_differs(_as(real, "gpipe"))
    want = generate(make_spec("gpipe", 4, 8))
    # the first compute action where 1F1B and GPipe part, worked out here on stage 0's worker
    mine = [(i, a) for i, a in enumerate(real[0]) if a.is_compute]
    theirs = [a for a in want[0] if a.is_compute]
    i, a, b = next((i, a, b) for (i, a), b in zip(mine, theirs) if (a.kind, a.mb) != (b.kind, b.mb))
    assert f"w0[{i}] runs {a} where GPipe runs {b}" in line


def test_a_one_batch_1f1b_declared_2bw_is_2bw():
    """2BW's first batch is 1F1B's batch (version 0, one step): the same program, nothing to report."""
    prog = _as(generate(make_spec("1f1b", 4, 8)), "2bw")
    check(prog)
    assert declared_family_differs(prog) is None


def test_a_hand_edit_within_the_bounds_is_reported_and_custom_is_not():
    prog = generate(make_spec("gpipe", 2, 4))
    acts = list(prog[1])
    f = [i for i, a in enumerate(acts) if a.kind is Kind.F]
    b = [i for i, a in enumerate(acts) if a.kind is Kind.B]
    # on the last stage, run B0 straight after F0 (1F1B-like): still GPipe's bounds and every law
    acts.insert(f[0] + 1, acts.pop(b[0]))
    edited = prog.with_actions({**prog.actions, 1: acts})
    check(edited)
    assert "w1[" in declared_family_differs(edited)
    assert declared_family_differs(_as(edited, "custom")) is None


def test_simulate_warns_on_stderr_and_runs_the_program(tmp_path, capsys):
    from pipetwin.cli import main

    path = tmp_path / "p.json"
    path.write_text(json.dumps(_as(generate(make_spec("1f1b", 2, 4)), "gpipe").to_json()))
    code = main(["simulate", "--program", str(path), "--model", "uniform:layers=2,fwd=1e-3,bwd=2e-3",
                 "--topology", "ideal:2", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["throughput_samples_per_s"] > 0
    assert err.startswith("pipetwin simulate: warning:") and "declared gpipe" in err and len(err.splitlines()) == 1
