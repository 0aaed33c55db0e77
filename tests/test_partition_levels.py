"""The hierarchical programme's level tables: the top level's first-row programme against the full one and brute force."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner import partition as part
from planner.costmodel import CostOptions
from tests.test_planner import _irregular


@st.composite
def levels(draw, max_blocks=6, max_units=7):
    """A level's inputs as ``solve_hierarchical`` builds them: single[i, j, m] finite only for i < j and m ≥ 1 (some
    ranges too big for any unit count: inf), cut[k] ≥ 0 with cut[0] = cut[B] = 0. Values come from a small set so
    that ties, which the programmes must break alike, are common."""
    B, C = draw(st.integers(1, max_blocks)), draw(st.integers(1, max_units))
    pool = st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 7.0, math.inf])
    single = np.full((B + 1, B + 1, C + 1), math.inf)
    for i in range(B):
        for j in range(i + 1, B + 1):
            for m in range(1, C + 1):
                single[i, j, m] = draw(pool)
    cut = np.array([0.0] + [draw(st.sampled_from([0.0, 0.5, 1.0, 2.5])) for _ in range(B - 1)] + [0.0])[:B + 1]
    return single, cut


def _brute(single: np.ndarray, cut: np.ndarray, j: int, m: int) -> float:
    """The best bottleneck of blocks [0, j) on exactly m units, every split into stages enumerated."""

    @functools.lru_cache(maxsize=None)
    def best(j: int, m: int) -> float:
        out = single[0, j, m]
        for k in range(1, j):
            for m2 in range(1, m):
                out = min(out, max(best(k, m - m2), cut[k], single[k, j, m2]))
        return float(out)

    return best(j, m)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(levels())
def test_the_first_row_programme_is_row_0_of_the_full_one_bit_for_bit_and_the_brute_force_optimum(lv):
    single, cut = lv
    A, arg = part._level_tables(single, cut, None)
    A0, arg0 = part._level_tables(single, cut, None, first_row=True)
    assert A0.shape == (1,) + A.shape[1:] and arg0.shape == (1,) + arg.shape[1:]
    assert np.array_equal(A0[0], A[0]) and np.array_equal(arg0[0], arg[0])  # values and tie-broken splits
    B, C = single.shape[0] - 1, single.shape[2] - 1
    for j in range(1, B + 1):
        for m in range(1, C + 1):
            assert A0[0, j, m] == _brute(single, cut, j, m)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(levels(max_units=9), st.integers(1, 8), st.booleans())
def test_a_first_row_table_extended_from_the_cache_is_the_fresh_one(lv, shorter, full_first):
    # a level over fewer units with the same inputs is a prefix; the cache extends it (and never hands a first
    # row where the full table is asked for, or the other way round)
    single, cut = lv
    C = single.shape[2] - 1
    cache = part.PartitionCache()
    c = min(shorter, C)
    if full_first:
        part._level_tables(single[:, :, :c + 1].copy(), cut, cache)
    part._level_tables(single[:, :, :c + 1].copy(), cut, cache, first_row=True)
    A0, arg0 = part._level_tables(single, cut, cache, first_row=True)
    want_A, want_arg = part._level_tables(single, cut, None, first_row=True)
    assert np.array_equal(A0, want_A) and np.array_equal(arg0, want_arg)
    A, arg = part._level_tables(single, cut, cache)
    assert A.shape[0] == single.shape[0] and np.array_equal(A, part._level_tables(single, cut, None)[0])


@pytest.mark.parametrize("spec", ["dgx:servers=12", "pcie:servers=20,gpus=4,kind=v100,eth=10",
                                  "fattree:gpus=128,kind=h100", "hier:4@nvlink:300e9,6@ib:25e9,3@eth:1.25e9"])
def test_hierarchical_plans_are_those_of_the_full_top_level_table(spec, monkeypatch):
    # the top level's first row is all the search reads: computing only it leaves every plan as it was
    from topologies.presets import load_topology

    topo = load_topology(spec)
    prof = _irregular(50)
    fams = [("1f1b", 32, CostOptions()), ("pipedream", 32, CostOptions(optimizer="adam")), ("2bw", 64, CostOptions())]
    got = [part.solve_hierarchical(part.Problem(prof, tuple(topo.devices), f, M, o), topo) for f, M, o in fams]
    full = part._level_tables

    def full_rows(single, cut, cache, first_row=False):
        A, arg = full(single, cut, cache)
        return (A[:1], arg[:1]) if first_row else (A, arg)

    monkeypatch.setattr(part, "_level_tables", full_rows)
    want = [part.solve_hierarchical(part.Problem(prof, tuple(topo.devices), f, M, o), topo) for f, M, o in fams]
    assert got == want and all(p is not None for p in got)
