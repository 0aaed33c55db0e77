"""PipeDream-compatible optimizer: its states, its reference answers, brute force, the fast kernels, reductions."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner.pipedream import (
    PipeDreamError,
    optimize_pipedream,
    pipedream_chain_profile,
    pipedream_states,
)
from planner.pipedream import recurrence as pd
from planner.pipedream import reduction, states
from planner.pipedream.reference import brute_force_pipedream
from planner.plan import Plan, StagePlan
from planner.profile import Layer, ModelProfile, read_pipedream_graph

FIX = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "pipedream_profiles"
needs_profiles = pytest.mark.skipif(not SHARED.exists(), reason="PipeDream profiles not beside the repo")


def _profile(name: str) -> ModelProfile:
    return read_pipedream_graph(SHARED / f"{name}.graph.txt")


# ---------------------------------------------------------------- states
@needs_profiles
@pytest.mark.parametrize("name,count", [("vgg16", 40), ("resnet50", 240), ("resnet101", 410), ("gnmt_large", 1495)])
def test_state_counts_are_pipedreams(name, count):
    s = pipedream_states(_profile(name))
    assert len(s) == count and s.reduction is None
    # cumulative figures grow along every predecessor relation; the last state covers every kept node
    for j in range(len(s)):
        for k in s.preds[j][-3:]:
            assert set(s.members[k]) < set(s.members[j])


def test_chain_profile_has_one_state_per_layer():
    p = ModelProfile("c", tuple(Layer(f"l{i}", 1e-3 * (i + 1), 2e-3, 10.0 * i, 5.0, 100.0) for i in range(5)))
    s = pipedream_states(p)
    assert len(s) == 5 and s.preds[3] == (0, 1, 2)
    assert s.compute_s[-1] == pytest.approx(sum(1e-3 * (i + 1) + 2e-3 for i in range(5)))
    assert list(s.output_activation_bytes) == [0.0, 10.0, 20.0, 30.0, 40.0]


def test_branchy_fixture_states_and_plan_cover_every_node():
    p = read_pipedream_graph(FIX / "tiny_branchy.graph.txt")
    s = pipedream_states(p)
    assert len(s) >= 4
    r = optimize_pipedream(p, [(2, 1e9)])
    covered = [n for stg in r.stages for n in stg.nodes]
    assert sorted(covered) == sorted(p.graph.nodes)


# ---------------------------------------------------------------- PipeDream's reference points
@needs_profiles
def test_vgg16_reference_points_to_the_last_digit():
    p = _profile("vgg16")
    r = optimize_pipedream(p, [(4, 1e9)], activation_compression_ratio=1)
    assert r.pipeline_time_s == 0.205520896
    # PipeDream prints (0, 17) x3 and (17, 40) x1: states 0..16 replicated 3 ways, 17..39 on one worker
    assert [(s.first_state, s.last_state + 1, s.replicas) for s in r.stages] == [(0, 17, 3), (17, 40, 1)]
    straight = optimize_pipedream(p, [(4, 1e9)], activation_compression_ratio=1, straight=True)
    assert straight.pipeline_time_s == 0.411041792
    assert all(s.replicas == 1 for s in straight.stages) and len(straight.stages) == 4


@needs_profiles
def test_resnet50_hierarchical_multiplies_replicas():
    p = _profile("resnet50")
    r = optimize_pipedream(p, [(4, 10e9), (4, 1.25e9)])
    assert sum(s.replicas for s in r.stages) == 16


# ---------------------------------------------------------------- brute force
def _chain(draw_layers):
    return ModelProfile("chain", tuple(Layer(f"l{i}", f, b, a, a, p) for i, (f, b, a, p) in enumerate(draw_layers)))


layer_st = st.tuples(
    st.floats(0.0, 5e-3), st.floats(0.0, 1e-2),
    st.sampled_from([0.0, 1e6, 4e6, 1.6e7]) | st.floats(0.0, 2e7),
    st.sampled_from([0.0, 1e7, 5e7]) | st.floats(0.0, 6e7),
)


@st.composite
def cases(draw):
    layers = draw(st.lists(layer_st, min_size=1, max_size=12))
    if draw(st.booleans()):
        levels = [(draw(st.integers(1, 8)), draw(st.sampled_from([1e9, 10e9, 3.3e9])))]
    else:
        w1 = draw(st.integers(1, 4))
        w2 = draw(st.integers(1, 8 // w1))
        levels = [(w1, draw(st.sampled_from([10e9, 25e9]))), (w2, draw(st.sampled_from([1e9, 1.25e9])))]
    kw = dict(
        straight=draw(st.booleans()),
        activation_compression_ratio=draw(st.none() | st.sampled_from([1.0, 2.0, 7.5])),
        memory_size=draw(st.none() | st.floats(1e7, 4e8)),
    )
    return _chain(layers), levels, kw


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_dp_equals_brute_force_on_tiny_chains(case):
    prof, levels, kw = case
    n_devices = math.prod(w for w, _ in levels)
    if len(prof) > 9 and n_devices > 4:  # keep the enumeration small
        prof = ModelProfile(prof.name, prof.layers[:9])
    want = brute_force_pipedream(prof, levels, **kw)
    for kernel in ("auto", "fast"):  # plain products, then the fast kernels forced
        try:
            r = optimize_pipedream(prof, levels, kernel=kernel, **kw)
            got = r.pipeline_time_s
        except PipeDreamError:
            got = math.inf
        assert got == want  # the same arithmetic, so the same float
    if math.isfinite(got):
        assert sum(s.replicas for s in r.stages) == n_devices
        if kw["straight"]:
            assert len(r.stages) == n_devices


# ---------------------------------------------------------------- kernels against plain loops
@settings(max_examples=25, deadline=None)
@given(st.integers(17, 70), st.integers(0, 10_000), st.floats(0.0, 0.9))
def test_reference_column_kernel_equals_dense_product(n, seed, holes):
    rng = np.random.default_rng(seed)
    R = n + 1
    Ac = rng.exponential(1.0, (R, n)) + np.arange(n)[None, :] * 0.05
    Ac[np.arange(n)[None, :] < np.arange(R)[:, None]] = np.inf  # A[r, k] is None for k < r
    G = rng.exponential(1.0, (n, n))
    pred = np.triu(rng.random((n, n)) >= holes, 1)  # pred[k, j]: k < j and k a predecessor of j
    G = np.where(pred, G, np.inf)
    U = rng.exponential(2.0, (R, n))
    want = np.minimum(U, pd._minmax_dense(Ac, G, np.arange(R)))
    ref = U.copy()
    pd._minmax_columns_reference(Ac, G, ref, [np.flatnonzero(pred[:, j]) for j in range(n)])
    assert np.array_equal(ref, want)


def test_fold_and_bits():
    x = np.random.default_rng(0).random((5, 7, 32))
    assert np.array_equal(pd._fold(x, np.minimum), x.min(axis=2))
    assert np.array_equal(pd._fold(x, np.maximum), x.max(axis=2))
    for mask in (0, 1, (1 << 200) | (1 << 3), sum(1 << i for i in range(0, 3000, 7))):
        assert states._bits(mask) == [i for i in range(mask.bit_length()) if mask >> i & 1]


def _reference_level_loops(pb, Tc, M, B, n_in, final):
    """PipeDream's recurrence as plain loops (slow), for checking the vectorised solver on a real DAG."""
    n = pb.n
    rows = 1 if final else n + 1
    A = pd._base(pb, Tc[:rows], np.arange(rows), M, B, n_in).tolist()
    for i in range(rows):
        for m in range(1, M):
            for j in range(i + 1, n):
                best = A[i][j][m]
                for k in pb.pred_lists[j]:
                    for mp in range(1, (2 if pb.straight else m + 1)):
                        T = Tc[k + 1][j]
                        if not math.isfinite(T) or not math.isfinite(A[i][k][m - mp]):
                            continue
                        P = pb.ParR[k + 1][j]
                        if pb.mem is not None and pb.need[k + 1][j] * math.ceil((M - (m + 1)) / mp) > pb.mem:
                            continue
                        last = (T + (4 * (mp - 1) * P) / (B * mp)) / mp
                        v = max(A[i][k][m - mp], last)
                        if pb.acr is not None:
                            v = max(v, ((2.0 * pb.oact[k]) / (B * mp)) / pb.acr)
                            if j < n - 1:
                                v = max(v, ((2.0 * pb.oact[j]) / (B * mp)) / pb.acr)
                        if v < best:
                            best = v
                A[i][j][m] = best
    return np.array(A)


@needs_profiles
@pytest.mark.parametrize("acr,mem", [(None, None), (1.0, None), (None, 3e9)])
def test_vectorised_levels_match_loops_on_gnmt8(acr, mem):
    s = pipedream_states(_profile("gnmt"))  # 99 states, a sparse antichain DAG
    pb = pd._Problem(s, False, acr, mem)
    lv1 = pd._solve_level(pb, pb.Tc, 3, 10e9, 1, final=False)
    ref1 = _reference_level_loops(pb, pb.Tc, 3, 10e9, 1, final=False)
    assert np.array_equal(lv1.A, ref1)
    Tc2 = lv1.A[:, :, 2]
    lv2 = pd._solve_level(pb, Tc2, 2, 1e9, 3, final=True)
    assert np.array_equal(lv2.A, _reference_level_loops(pb, Tc2, 2, 1e9, 3, final=True))


@needs_profiles
@pytest.mark.parametrize("levels,kw", [
    ([(4, 10e9), (4, 1.25e9)], {}),
    ([(2, 10e9), (8, 1.25e9)], {}),
    ([(3, 25e9), (2, 10e9), (2, 1.25e9)], {}),
    ([(4, 10e9), (2, 1.25e9)], {"activation_compression_ratio": 2.0}),
    ([(4, 10e9), (2, 1.25e9)], {"memory_size": 3e9}),
])
def test_gnmt8_hierarchical_equals_reference_path(levels, kw):
    """The fast path (dominated splits dropped, banded inner levels, pair-wise top level) gives the
    reference path's answer and stages bit for bit."""
    p = _profile("gnmt")
    fast = optimize_pipedream(p, levels, **kw)
    ref = optimize_pipedream(p, levels, kernel="reference", **kw)
    assert fast.pipeline_time_s == ref.pipeline_time_s
    assert fast.stages == ref.stages


# ---------------------------------------------------------------- fast kernels on random DAGs
def _dag_profile(seed: int, n_nodes: int, free: float) -> ModelProfile:
    """A random PipeDream graph: an Input, n_nodes nodes each fed by one or two of the four before it (a
    ``free`` share of them costing nothing at all, as GNMT's getitem and Add nodes), and a last node joining
    every sink."""
    rng = np.random.default_rng(seed)
    fields = "forward_compute_time={:.3f}, backward_compute_time={:.3f}, activation_size={:.1f}, parameter_size={:.3f}"
    lines = ["node0 -- Input0 -- " + fields.format(0, 0, 1e6, 0)]
    edges = [(0, 1)]
    for i in range(1, n_nodes + 2):
        if i <= n_nodes and rng.random() < free:
            f = b = a = par = 0.0
        else:
            f = float(rng.uniform(0.1, 5.0))
            b = 2 * f
            a = float(rng.choice([0.0, 1e5, 4e6, rng.uniform(1e5, 1e7)]))
            par = float(rng.choice([0.0, 1e6, 3e7, rng.uniform(0, 5e7)]))
        lines.append(f"node{i} -- Op{i} -- " + fields.format(f, b, a, par))
        if 2 <= i <= n_nodes:
            window = list(range(max(1, i - 4), i))
            for q in rng.choice(window, size=min(len(window), 1 + int(rng.random() < 0.4)), replace=False):
                edges.append((int(q), i))
    fed = {a for a, _ in edges}
    edges += [(v, n_nodes + 1) for v in range(1, n_nodes + 1) if v not in fed]
    text = "\n".join(lines + [f"\tnode{a} -- node{b}" for a, b in edges]) + "\n"
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dag.graph.txt"
        path.write_text(text)
        return read_pipedream_graph(path, name=f"dag{seed}")


dag_cases = st.tuples(
    st.integers(0, 10**6),                      # seed
    st.integers(3, 11),                         # nodes
    st.sampled_from([0.0, 0.3, 0.5]),           # share of free nodes
    st.integers(1, 5),                          # workers
    st.sampled_from([1e9, 10e9]),               # bandwidth
    st.sampled_from([1, 3]),                    # n_in
    st.booleans(),                              # straight
    st.none() | st.sampled_from([1.0, 2.5]),    # acr
    st.none() | st.sampled_from([5e7, 2e8]),    # memory
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag_cases)
def test_fast_levels_equal_plain_loops_on_random_dags(case):
    """Banded inner level (over the dominance-reduced splits) and pair-wise top level, forced on problems of
    every size, against PipeDream's recurrence as plain loops over every predecessor: the same floats."""
    seed, nodes, free, M, B, n_in, straight, acr, mem = case
    s = pipedream_states(_dag_profile(seed, nodes, free))
    pb = pd._Problem(s, straight, acr, mem)
    inner = pd._solve_level(pb, pb.Tc, M, B, n_in, final=False, kernel="fast").A
    part = pd._solve_level(pb, pb.Tc, M, B, n_in, final=False, need_all=False, kernel="fast").A
    top = pd._solve_level(pb, pb.Tc, M, B, n_in, final=True, kernel="fast").A
    want = _reference_level_loops(pb, pb.Tc, M, B, n_in, final=False)
    assert np.array_equal(inner, want)
    assert np.array_equal(top, _reference_level_loops(pb, pb.Tc, M, B, n_in, final=True))
    # need_all=False: exact below the last m and on the cells the top level reads, an upper bound elsewhere
    n = pb.n
    needed = np.hstack([np.ones((n, 1), dtype=bool), pb.predM.T]).T  # [row, j]
    assert np.array_equal(part[:, :, :-1], want[:, :, :-1])
    assert np.array_equal(part[:, :, -1][needed], want[:, :, -1][needed])
    assert np.all(part[:, :, -1] >= want[:, :, -1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dag_cases, st.sampled_from([[(2, 25e9), (2, 1e9)], [(3, 10e9), (2, 1.25e9)], [(2, 25e9), (2, 10e9), (2, 1e9)]]))
def test_fast_optimizer_equals_reference_path_on_random_dags(case, levels):
    seed, nodes, free, _, _, _, straight, acr, mem = case
    p = _dag_profile(seed, nodes, free)
    runs = []
    for kernel in ("fast", "reference", "auto"):
        try:
            r = optimize_pipedream(p, levels, straight=straight, activation_compression_ratio=acr,
                                   memory_size=mem, kernel=kernel)
            runs.append((r.pipeline_time_s, r.stages))
        except PipeDreamError:
            runs.append(None)
    assert runs[0] == runs[1] == runs[2]


def test_dominated_splits_are_dropped_and_change_nothing():
    p = _dag_profile(7, 11, 0.5)
    s = pipedream_states(p)
    pb = pd._Problem(s, False, None, None)
    red = pb.reduced_preds()
    assert red.sum() < pb.predM.sum() and not (red & ~pb.predM).any()
    A = pd._solve_level(pb, pb.Tc, 4, 10e9, 1, final=False).A
    assert np.array_equal(A, _reference_level_loops(pb, pb.Tc, 4, 10e9, 1, final=False))


@needs_profiles
def test_gnmt16_fast_equals_reference_path():
    """PipeDream's GNMT-16 on 4x4 (1,495 states; 283k splits, 57k after dropping the dominated ones)."""
    p = _profile("gnmt_large")
    fast = optimize_pipedream(p, [(4, 10e9), (4, 1.25e9)])
    pb = pd._Problem(pipedream_states(p), False, None, None)
    assert pb.predM.sum() == 282986 and pb.reduced_preds().sum() < 60000
    ref = optimize_pipedream(p, [(4, 10e9), (4, 1.25e9)], kernel="reference")
    assert fast.pipeline_time_s == ref.pipeline_time_s and fast.stages == ref.stages


# ---------------------------------------------------------------- reductions
@needs_profiles
@pytest.mark.parametrize("name", ["inception_v3", "nasnetalarge"])
def test_exploding_antichains_are_reduced_and_reported(name):
    r = optimize_pipedream(_profile(name), [(4, 10e9), (4, 1.25e9)])
    assert r.reduction == "cut-points" and r.num_states <= reduction.REDUCED_STATES_CAP
    assert "antichains" in r.message and "not PipeDream's exact state set" in r.message
    assert sum(s.replicas for s in r.stages) == 16


def test_dp_budget_reduces_a_long_chain_and_says_so():
    p = ModelProfile("long", tuple(Layer(f"l{i}", 1e-3, 2e-3, 1e6, 1e6, 1e6) for i in range(300)))
    r = optimize_pipedream(p, [(8, 300e9), (8, 25e9)], max_dp_work=1e7)
    assert r.reduction == "cut-points" and r.num_states < 300 and "budget" in r.message
    exact = optimize_pipedream(ModelProfile("short", p.layers[:40]), [(4, 300e9)])
    assert exact.reduction is None and exact.num_states == 40


# ---------------------------------------------------------------- plans
@needs_profiles
def test_chain_profile_keeps_stages_contiguous_and_topological():
    p = _profile("resnet50")
    r = optimize_pipedream(p, [(4, 10e9), (4, 1.25e9)])
    cp, ranges = pipedream_chain_profile(p, r)
    assert len(cp.layers) == len(p.layers) and sorted(cp.graph.nodes) == sorted(p.graph.nodes)
    pos = {nid: i for i, nid in enumerate(cp.graph.nodes)}
    assert all(pos[a] < pos[b] for a, b in cp.graph.edges)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(cp.layers) - 1
    assert all(b + 1 == c for (_, b), (c, _) in zip(ranges, ranges[1:]))
    for (a, b), s in zip(ranges, r.stages):
        assert set(cp.graph.nodes[a : b + 1]) == set(s.nodes)
    plan = Plan(model="resnet50", stages=tuple(StagePlan(a, b, s.replicas) for (a, b), s in zip(ranges, r.stages)))
    assert len(plan.stages) == len(r.stages)
    assert cp.total_s == pytest.approx(p.total_s)


def test_bad_requests_end_in_one_clear_error():
    p = ModelProfile("c", tuple(Layer(f"l{i}", 1e-3, 2e-3, 1.0, 1.0, 1.0) for i in range(3)))
    with pytest.raises(PipeDreamError, match="straight pipeline needs a state per worker"):
        optimize_pipedream(p, [(4, 1e9)], straight=True)
    with pytest.raises(PipeDreamError, match="workers >= 1"):
        optimize_pipedream(p, [(0, 1e9)])
    # PipeDream's stash bound is 0 when a stage uses every worker, so only a split can break the memory limit
    assert optimize_pipedream(p, [(2, 1e9)], memory_size=0.5).stages[0].replicas == 2
    with pytest.raises(PipeDreamError, match="memory"):
        optimize_pipedream(p, [(2, 1e9)], memory_size=0.5, straight=True)
