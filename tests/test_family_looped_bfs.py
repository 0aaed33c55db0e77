"""Looped BFS: chunk by chunk, breadth first; its makespan, its reverse-order backwards, torch's own order.

At tF = 1, tB = 2 each chunk costs 1/V: device d's forwards of chunk c can start once
chunk c − 1 of microbatch 0 has come round, so with M ≥ P the forwards run back to back
after the first (P − 1)/V fill and the backwards mirror them: makespan 3M + 3(P − 1)/V,
interleaved's bubble, with GPipe's memory (every microbatch of a batch in flight).
"""
from __future__ import annotations

import pytest

from planner.check import UnitCosts, dry_run, measured_bounds
from planner.schedules import generate, make_spec
from planner.trace import makespan_s

U = UnitCosts(f=1, b=2)


@pytest.mark.parametrize("P,M,V", [(1, 3, 2), (2, 4, 2), (4, 8, 2), (4, 7, 3), (8, 16, 2), (3, 9, 4), (16, 49, 2)])
def test_looped_bfs_makespan_is_interleaveds_when_m_covers_the_loop(P, M, V):
    assert makespan_s(dry_run(generate(make_spec("looped-bfs", P, M, chunks=V)), U)) == pytest.approx(3 * M + 3 * (P - 1) / V)


def test_looped_bfs_runs_backwards_in_reverse_and_holds_the_whole_batch():
    prog = generate(make_spec("looped-bfs", 2, 4, chunks=2))
    b = measured_bounds(prog)
    assert not b["in_microbatch_order"]
    assert b["inflight"] == {s: 4 for s in range(4)}
    assert [str(a) for a in prog[0] if a.is_compute][-4:] == ["0B3", "0B2", "0B1", "0B0"]


def test_looped_bfs_is_torchs_order():
    pytest.importorskip("torch")
    from tests.torch_schedules import torch_schedule

    P, M = 4, 8
    sch = torch_schedule("LoopedBFS", P, M)
    mine = generate(make_spec("looped-bfs", P, M, chunks=2))
    kinds = {"F": "F", "B": "B"}
    for r in range(P):
        theirs = [str(a) for a in sch.pipeline_order[r] if a is not None and a.computation_type.value in kinds]
        assert [str(a) for a in mine[r] if a.is_compute] == theirs
