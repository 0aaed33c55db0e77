"""PipeDream's answer by brute force over every split and replication: the tests' oracle, not production code."""
from __future__ import annotations

import itertools
import math

from planner.pipedream.hierarchy import _check_levels
from planner.pipedream.reduction import pipedream_states
from planner.pipedream.states import PipeDreamError
from planner.profile import ModelProfile

_INF = float("inf")


def brute_force_pipedream(
    profile: ModelProfile,
    levels: list[tuple[int, float]],
    *,
    memory_size: float | None = None,
    straight: bool = False,
    activation_compression_ratio: float | None = None,
) -> float:
    """PipeDream's answer by enumerating every split and every replication assignment (tiny chains only).

    Level by level, the value of a range on one whole machine is the minimum, over every way to cut the range
    into consecutive stages and every way to give the stages worker counts summing to exactly the level's
    workers, of the slowest stage under PipeDream's cost rules. Returns inf when nothing is feasible.
    """
    lv = _check_levels(levels)
    st = pipedream_states(profile)
    n = len(st)
    if n > 14 or any(len(p) != i for i, p in enumerate(st.preds)):
        raise PipeDreamError("brute force is for chains of at most 14 states")
    comp, act, par, oact = st.compute_s, st.activation_bytes, st.param_bytes, st.output_activation_bytes
    acr, mem = activation_compression_ratio, memory_size

    def diff(x, a, b):  # PipeDream's range table: row 0 is the cumulative figure itself
        return float(x[b]) if a == 0 else float(x[b] - x[a - 1])

    def compositions(total: int, parts: int):
        if parts == 1:
            yield (total,)
            return
        for first in range(1, total - parts + 2):
            for rest in compositions(total - first, parts - 1):
                yield (first,) + rest

    T = {(a, b): diff(comp, a, b) for a in range(n) for b in range(a, n)}
    n_in = 1
    value = _INF
    for li, (M, B) in enumerate(lv):
        V = {}
        for (a, b) in T:
            best = _INF
            inner = list(range(a, b))  # possible cut points k (a piece ends at k)
            for ncuts in range(0, min(len(inner), M - 1) + 1):
                for cuts in itertools.combinations(inner, ncuts):
                    pieces = list(zip((a,) + tuple(k + 1 for k in cuts), cuts + (b,)))
                    counts = [(1,) * len(pieces)] if straight else compositions(M, len(pieces))
                    if straight and len(pieces) != M:
                        continue
                    for cs in counts:
                        cost, used, ok = -_INF, 0, True
                        for idx, ((x, y), c) in enumerate(zip(pieces, cs)):
                            used += c
                            need = diff(act, x, y) + diff(par, x, y)
                            P = diff(par, x, y)
                            if idx == 0:
                                if mem is not None and math.ceil((M - c) / c) * need > mem:
                                    ok = False
                                    break
                                dp = ((4 * (c - 1) * P) / (B * c)) / n_in
                                piece = (T[(x, y)] + dp) / c
                            else:
                                if mem is not None and need * math.ceil((M - used) / c) > mem:
                                    ok = False
                                    break
                                piece = (T[(x, y)] + (4 * (c - 1) * P) / (B * c)) / c
                                if acr is not None:
                                    piece = max(piece, ((2.0 * float(oact[x - 1])) / (B * c)) / acr)
                                    if y < n - 1:
                                        piece = max(piece, ((2.0 * float(oact[y])) / (B * c)) / acr)
                            cost = max(cost, piece)
                        if ok and cost < best:
                            best = cost
            V[(a, b)] = best
        if li == len(lv) - 1:
            value = V[(0, n - 1)]
        T = V
        n_in = M
    return value
