"""The V families' batch time (ZB-V, DualPipeV, V-Half, V-Min): the longest path through their program.

Their generators fix each rank's order of passes at unit costs (``planner.schedules``), so when F, BI and BW
differ (recomputation, a backward twice the forward) the ranks keep that order and wait where it no longer fits:
the batch takes the longest path through the order's graph (a rank's passes in its order; F(s, i) after
F(s − 1, i); B or BI(s, i) after B or BI(s + 1, i), the last stage's after its F; BW after its BI), a max over
paths of their counts of each pass, not one closed form in (P, M, F, BI, BW). The simulator interprets the same
order, so on a topology whose sends are free this is its batch time exactly (``tests/test_costmodel_vpath.py``).
"""
from __future__ import annotations

from functools import lru_cache

from planner.program import Kind
from planner.schedulespec import make_spec
from planner.schedules import ORDERS, REQUIRES

_KINDS = (Kind.F, Kind.B, Kind.BI, Kind.BW)


@lru_cache(maxsize=256)
def _graph(family: str, P: int, M: int) -> tuple[tuple[int, int, int, int], ...]:
    """The order's passes in a dependency-respecting sequence: (rank, kind index, stage, index of the pass it
    waits for or −1)."""
    spec = make_spec(family, P, M)
    if family in REQUIRES:
        REQUIRES[family](spec)
    order = ORDERS[family](spec)
    acts = {w: [a for a in order[w] if a.kind in _KINDS] for w in order}
    S = spec.virtual_stages
    index: dict[tuple[Kind, int, int], int] = {}
    out: list[tuple[int, int, int, int]] = []
    pos = {w: 0 for w in acts}
    moved = True
    while moved:
        moved = False
        for w, seq in acts.items():
            while pos[w] < len(seq):
                a = seq[pos[w]]
                if a.kind is Kind.F:
                    deps = [(Kind.F, a.stage - 1, a.mb)] if a.stage > 0 else []
                elif a.kind is Kind.BW:
                    deps = [(Kind.BI, a.stage, a.mb)]
                elif a.stage == S - 1:
                    deps = [(Kind.F, a.stage, a.mb)]
                else:
                    deps = [(Kind.BI, a.stage + 1, a.mb), (Kind.B, a.stage + 1, a.mb)]
                found = [index[d] for d in deps if d in index]
                if deps and not found:
                    break
                index[(a.kind, a.stage, a.mb)] = len(out)
                out.append((w, _KINDS.index(a.kind), a.stage, found[0] if found else -1))
                pos[w] += 1
                moved = True
    if any(pos[w] < len(seq) for w, seq in acts.items()):  # a generator's order always completes (check.py)
        raise ValueError(f"{family}: P={P}, M={M}: the order's passes wait on each other")
    return tuple(out)


@lru_cache(maxsize=4096)
def batch_time(family: str, P: int, M: int, pass_s: tuple[tuple[float, float, float, float], ...]) -> float:
    """Seconds of one batch: ``pass_s[v]`` = (F, B, BI, BW) seconds of virtual stage v (a search asks for the same
    stages' times many times: cached)."""
    free: dict[int, float] = {}
    end: list[float] = []
    for w, k, s, dep in _graph(family, P, M):
        t = free.get(w, 0.0)
        if dep >= 0 and end[dep] > t:
            t = end[dep]
        t += pass_s[s][k]
        end.append(t)
        free[w] = t
    return max(free.values())
