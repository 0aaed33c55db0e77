"""The hierarchical programme's level tables: the top level's first-row programme against the full one and brute force."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner import hierarchical as hier
from planner import partition as part
from planner.costmodel import CostOptions
from tests.test_planner import NON_INTERLEAVED, _irregular, _problem, chains, clusters


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
    A, arg = hier._level_tables(single, cut, None)
    A0, arg0 = hier._level_tables(single, cut, None, first_row=True)
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
        hier._level_tables(single[:, :, :c + 1].copy(), cut, cache)
    hier._level_tables(single[:, :, :c + 1].copy(), cut, cache, first_row=True)
    A0, arg0 = hier._level_tables(single, cut, cache, first_row=True)
    want_A, want_arg = hier._level_tables(single, cut, None, first_row=True)
    assert np.array_equal(A0, want_A) and np.array_equal(arg0, want_arg)
    A, arg = hier._level_tables(single, cut, cache)
    assert A.shape[0] == single.shape[0] and np.array_equal(A, hier._level_tables(single, cut, None)[0])


@pytest.mark.parametrize("spec", ["dgx:servers=12", "pcie:servers=20,gpus=4,kind=v100,eth=10",
                                  "fattree:gpus=128,kind=h100", "hier:4@nvlink:300e9,6@ib:25e9,3@eth:1.25e9"])
def test_hierarchical_plans_are_those_of_the_full_top_level_table(spec, monkeypatch):
    # the top level's first row is all the search reads: computing only it leaves every plan as it was
    from topologies.presets import load_topology

    topo = load_topology(spec)
    prof = _irregular(50)
    fams = [("1f1b", 32, CostOptions()), ("pipedream", 32, CostOptions(optimizer="adam")), ("2bw", 64, CostOptions())]
    got = [hier.solve_hierarchical(part.Problem(prof, tuple(topo.devices), f, M, o), topo) for f, M, o in fams]
    full = hier._level_tables

    def full_rows(single, cut, cache, first_row=False):
        A, arg = full(single, cut, cache)
        return (A[:1], arg[:1]) if first_row else (A, arg)

    monkeypatch.setattr(hier, "_level_tables", full_rows)
    want = [hier.solve_hierarchical(part.Problem(prof, tuple(topo.devices), f, M, o), topo) for f, M, o in fams]
    assert got == want and all(p is not None for p in got)


# --- the flat programme's pass, against a plain reference of its rule -----------------------------
def _reference_pass(tb, pb, N, objective, limit0):
    """The flat programme's rule written out state by state: f(i, k0) is the least max(stage, f(j, k)) over every first
    stage [i, j) on devices [k0, k); among the values within 1e-12 of it the shallowest suffix wins, then the first
    (j, k) in order. Stage figures one at a time (``_stage_arrays`` on scalars)."""
    L, inf = tb.L, math.inf
    f, depth, choice = {(L, N): 0.0}, {(L, N): 0}, {}
    for i in range(L - 1, -1, -1):
        for k0 in ([0] if i == 0 else range(1, N)):
            cands = []
            for j in range(i + 1, L + 1):
                for k in range(k0 + 1, N + 1):
                    t, mem, lim = (float(x) for x in part._stage_arrays(tb, pb, N, i, np.array(k0), np.array(j),
                                                                        np.array(k), limit0))
                    stage = mem if objective == "memory" else (t if mem <= lim * (1 + 1e-9) else inf)
                    cands.append((max(stage, f.get((j, k), inf)), j, k))
            vmin = min((c[0] for c in cands), default=inf)
            if vmin < inf:
                v, j, k = min((c for c in cands if c[0] <= vmin * (1 + 1e-12)), key=lambda c: depth[c[1], c[2]])
                f[i, k0], depth[i, k0], choice[i, k0] = v, depth[j, k] + 1, (j, k)
    if (0, 0) not in f:
        return None
    stages, i, k0 = [], 0, 0
    while i < L:
        j, k = choice[i, k0]
        stages.append((i, j - 1, tuple(range(k0, k))))
        i, k0 = j, k
    return part.Partition(f[0, 0], tuple(stages), N)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains(5), clusters(5), st.sampled_from(NON_INTERLEAVED + ("zb-h2",)), st.integers(1, 6), st.booleans(),
       st.sampled_from(["time", "memory"]))
def test_a_flat_pass_is_its_rule_state_by_state_with_stage_times_shared_by_every_family(profile, topo, family, M, rec,
                                                                                        objective):
    # the pass reads the suffix tables as slices and the stage times from a store other families filled first: the
    # partition (value and tie-broken stages) is the plain rule's, bit for bit
    keep, part.STORE_MIN_STAGES = part.STORE_MIN_STAGES, 1  # every grid through the store
    try:
        cache = part.PartitionCache()
        for other in NON_INTERLEAVED:
            part.solve_flat_per_count(_problem(profile, topo, other, M, recompute=rec), topo, cache=cache)
        pb = _problem(profile, topo, family, M, recompute=rec)
        tb = part._Tables(pb, topo)
        tb.times = cache.times
        for N in range(len(topo.devices), 0, -1):  # the whole cluster first: its prefixes must not take its key
            sub = tb.prefix(N)
            for limit0 in {N, None, max(1, N - 1)} if part.holds_until_weight_grad(family) else {N}:
                assert part._solve_pass(sub, pb, N, objective, limit0) == _reference_pass(sub, pb, N, objective, limit0)
            fresh = part._Tables(pb, topo).prefix(N)  # its own empty store
            for i in range(len(profile)):  # what the store hands back on a pass's grid is this family's own time
                k0 = (np.array([0]) if i == 0 else np.arange(1, N))[:, None, None]
                j, k = np.arange(i + 1, len(profile) + 1)[None, :, None], np.arange(N + 1)[None, None, :]
                k = np.where(k > k0, k, np.minimum(k0 + 1, N))
                assert np.array_equal(part._stage_time(sub, pb, i, k0, j, k), part._stage_time(fresh, pb, i, k0, j, k))
    finally:
        part.STORE_MIN_STAGES = keep
