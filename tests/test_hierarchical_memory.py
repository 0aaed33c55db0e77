"""The hierarchical programme charges every stage the cost model's memory, in the stage's place in the plan.

The truth here is brute force over the programme's own search space: every plan the programme can build on a
two-level cluster (at each level, contiguous block ranges on unit counts that add up; a stage above level 0 a
range replicated over whole domains, each running one sub-plan of that range on all of the domain), each plan's
time from the programme's documented stage model (a unit's time / m plus the all-reduce over m units on that
level's links, cuts on that level's links: written out here from the topology's links) and its memory from
``costmodel.evaluate`` (``planner.stagememory``'s bytes at the family's counts: weights × versions, optimizer
state, ZeRO shards and gathered units, what recomputation keeps, the in-flight microbatches of the plan's
schedule). The programme's answer must be the fastest plan that fits and that the schedules run, None exactly
when none does — under memory limits chosen between the least any plan needs and what the unconstrained best
needs, so that the limit binds and the unconstrained best does not fit. A returned plan fits by ``evaluate`` and,
where layers send nothing (the closed form bounds the replay there, ``tests/test_stage_memory_agreement.py``),
by the simulator's replay too.
"""
from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner import hierarchical as hier
from planner import partition as part
from planner.costmodel import OPTIMIZER_STATE, CostOptions, evaluate, update_interval
from planner.plan import Plan, StagePlan
from planner.profile import Layer, ModelProfile
from planner.program import FAMILY
from planner.recompute import layer_extra_forward_s
from planner.trace import peak_memory_bytes
from sim import SimParams, simulate_plan
from tests.test_partition_memory import LINEAR, _schedulable
from topologies.presets import load_topology

#: Two-level clusters of 4 to 8 devices: (devices per server, servers).
SHAPES = [(2, 2), (4, 1), (2, 3), (3, 2), (4, 2), (2, 4)]


def _topology(per: int, servers: int):
    return load_topology(f"hier:{per}@nvlink:300e9,{servers}@ib:25e9")


def _profile(rng: random.Random, layers: int, sends: bool = True) -> ModelProfile:
    out = []
    for i in range(layers):
        f = rng.uniform(1e-4, 1e-2)
        out.append(Layer(f"l{i}", f, f * rng.uniform(1.0, 3.0), rng.choice([1e5, 1e6, 1e7]) if sends else 0.0,
                         rng.choice([1e6, 1e7, 3e7]), rng.choice([0.0, 1e6, 1e7, 1e8]),
                         attention_saved_bytes=rng.choice([0.0, 5e5]), attention_forward_s=f / 4))
    return ModelProfile("chain", tuple(out))


# --- the programme's search space, plan by plan ------------------------------------------------
def _levels(topo, D: int):
    """Per level: (units, devices per unit, ring latency per hop, ring bandwidth, cut latency, cut bandwidth), from
    the links between the first devices of two units of that level (every such pair crosses the same kind of link)."""
    devs, out, unit = topo.devices, [], 1
    for count, _bw in topo.levels():
        count = min(count, D // unit)
        if count < 1:
            break
        a, b = (devs[0], devs[unit]) if count > 1 else (devs[0], devs[0])
        lat, bw = (topo.path_latency(a, b), topo.path_bandwidth(a, b)) if count > 1 else (0.0, math.inf)
        out.append((count, unit, lat, bw))
        unit *= count
    return out


def _compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        b = (0, *cuts, total)
        yield [(b[x], b[x + 1]) for x in range(parts)]


def every_plan(prof: ModelProfile, topo, family: str, M: int, recompute: str = "none"):
    """(programme time, flat stages (first, last layer, device indices)) of every plan in the programme's space
    (``recompute``: the forward a recomputed backward runs again is compute too, ``planner.recompute``)."""
    levels = _levels(topo, len(topo.devices))
    L, mb = len(prof), prof.microbatch_size
    speed = min(topo.device(d).speed for d in topo.devices)
    work = [l.forward_s + l.backward_s + layer_extra_forward_s(l, recompute) for l in prof.layers]
    params = [l.param_bytes for l in prof.layers]

    def allreduce(lv, a, b, m):
        _c, _u, lat, bw = levels[lv]
        if m < 2:
            return 0.0
        return (2 * (m - 1) * lat + 2 * (m - 1) / m * sum(params[a:b]) / bw) / update_interval(family, M, m)

    @functools.lru_cache(maxsize=None)
    def plans(lv: int, i: int, j: int, m: int):
        """Every plan of layers [i, j) on exactly m units of level ``lv``: (time, stages with device offsets)."""
        count, unit, lat, bw = levels[lv]
        out = []
        for P in range(1, min(j - i, m) + 1):
            for lay in _compositions(j - i, P):
                for units in _compositions(m, P):
                    per_stage = []
                    for (a, b), (u0, u1) in zip(lay, units):
                        a, b, r = a + i, b + i, u1 - u0
                        if lv == 0:
                            per_stage.append([(sum(work[a:b]) / speed / r + allreduce(0, a, b, r),
                                               [(a, b - 1, tuple(range(u0, u1)))])])
                        else:
                            below = levels[lv - 1][0]
                            per_stage.append([(t / r + allreduce(lv, a, b, r),
                                               [(x, y, tuple(u * unit + d for u in range(u0, u1) for d in idx))
                                                for x, y, idx in sub])
                                              for t, sub in plans(lv - 1, a, b, below)])
                    cuts = [lat + prof.boundary_bytes(b + i - 1) * mb / bw for (_a, b), _u in zip(lay[:-1], units)]
                    for pick in itertools.product(*per_stage):
                        t = max([s[0] for s in pick] + cuts)
                        out.append((t, [st for s in pick for st in s[1]]))
        return out

    top = len(levels) - 1
    return [p for m in range(1, levels[top][0] + 1) for p in plans(top, 0, L, m)]


def _plan(stages, topo, family: str, M: int, prof: ModelProfile) -> Plan:
    sp = tuple(StagePlan(a, b, len(idx), tuple(topo.devices[x] for x in idx)) for a, b, idx in stages)
    return Plan(prof.name, sp, schedule=family, microbatches=M)


def _peak(stages, topo, family, M, prof, opts) -> float:
    """The cost model's peak bytes per device of a plan (``evaluate``: stagememory's bytes at the family's counts)."""
    return max(s.memory_bytes for s in evaluate(_plan(stages, topo, family, M, prof), prof, topo, opts).stages)


def _runs(stages, family, M, opts) -> bool:
    return _schedulable(family, M, stages, opts.zero_stage)


def _brute_force(space, topo, family, M, prof, opts):
    """The fastest plan of ``space`` that the schedules run and that fits by ``evaluate``: (time, stages) or None."""
    for t, stages in sorted(space, key=lambda p: p[0]):
        if _runs(stages, family, M, opts) and evaluate(_plan(stages, topo, family, M, prof), prof, topo, opts).fits:
            return t, stages
    return None


@st.composite
def cases(draw):
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    per, servers = draw(st.sampled_from(SHAPES))
    layers = draw(st.integers(4, 6 if per * servers > 6 else 8))
    family = draw(st.sampled_from(LINEAR))
    opts = CostOptions(recompute=draw(st.sampled_from(["none", "selective", "full"])),
                       optimizer=draw(st.sampled_from(["sgd", "adam"])), link_load=False,
                       zero_stage=draw(st.sampled_from([0, 0, 1, 2, 3])) if FAMILY[family].weight_copies == 1 else 0)
    return _profile(rng, layers), _topology(per, servers), family, draw(st.sampled_from([1, 2, 4, 8])), opts


def _limits(space, topo, family, M, prof, opts, where: float):
    """A memory limit ``where`` of the way from the least any runnable plan needs to what the fastest runnable plan
    needs (below 0: nothing fits), and that fastest plan's time."""
    runnable = [(t, s) for t, s in space if _runs(s, family, M, opts)]
    if not runnable:
        return None, None
    peaks = {id(s): _peak(s, topo, family, M, prof, opts) for _t, s in runnable}
    least = min(peaks.values())
    fastest = min(runnable, key=lambda p: p[0])
    return least + where * (peaks[id(fastest[1])] - least), fastest[0]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(cases(), st.sampled_from([-0.05, 0.0, 0.3, 0.7, 0.999, 1.0]))
def test_the_hierarchical_answer_is_the_fastest_plan_of_its_space_that_fits_by_the_cost_model(case, where):
    prof, topo, family, M, opts = case
    space = every_plan(prof, topo, family, M, opts.recompute)
    limit, fastest_t = _limits(space, topo, family, M, prof, opts, where)
    if limit is None:  # no plan the schedules run: the programme finds none either
        assert hier.solve_hierarchical(part.Problem(prof, tuple(topo.devices), family, M, opts), topo) is None
        return
    tight = replace(opts, memory_limit_bytes=limit * (1 - 1e-6) if where < 0 else limit)
    want = _brute_force(space, topo, family, M, prof, tight)
    got = hier.solve_hierarchical(part.Problem(prof, tuple(topo.devices), family, M, tight), topo)
    assert (got is None) == (want is None)
    if got is None:
        return
    assert got.value == pytest.approx(want[0], rel=1e-9)
    stages = got.stages
    assert sorted(x for _a, _b, idx in stages for x in idx) == list(range(got.devices_used))
    # the plan is in the space, at the time the programme says, runs, and fits
    assert any(s == list(stages) and t == pytest.approx(got.value, rel=1e-9) for t, s in space)
    assert _runs(stages, family, M, tight)
    assert evaluate(_plan(stages, topo, family, M, prof), prof, topo, tight).fits
    if where < 1.0 and want[0] > fastest_t * (1 + 1e-9):  # the limit binds: the unconstrained best does not fit
        assert got.value > fastest_t * (1 + 1e-9)


@pytest.mark.parametrize("family", ["1f1b", "gpipe", "pipedream", "2bw", "zb-h1", "zb-h2"])
def test_in_flight_activations_decide_the_plan(family):
    """Eight layers whose activations outweigh their weights on 2 × 4 devices: the stages at the front of a 1F1B-like
    pipeline hold more microbatches, so a plan sized by weights alone does not fit; the programme's plan does, and
    it is the brute-force best."""
    rng = random.Random(7)
    layers = tuple(Layer(f"l{i}", 1e-3, 2e-3, 1e5, 4e7, 1e6 * rng.choice([1, 2])) for i in range(8))
    prof, topo, M = ModelProfile("act", layers), _topology(4, 2), 8
    space = every_plan(prof, topo, family, M)
    opts = CostOptions(link_load=False)
    limit, fastest_t = _limits(space, topo, family, M, prof, opts, 0.5)
    tight = replace(opts, memory_limit_bytes=limit)
    want = _brute_force(space, topo, family, M, prof, tight)
    got = hier.solve_hierarchical(part.Problem(prof, tuple(topo.devices), family, M, tight), topo)
    assert got is not None and want is not None
    assert got.value == pytest.approx(want[0], rel=1e-9)
    assert evaluate(_plan(got.stages, topo, family, M, prof), prof, topo, tight).fits


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(SHAPES), st.sampled_from(["1f1b", "gpipe", "pipedream", "2bw"]),
       st.sampled_from([2, 4, 8]), st.sampled_from(["sgd", "adam"]), st.sampled_from([0.0, 0.4, 0.9]))
def test_a_returned_plan_fits_when_simulated(seed, shape, family, M, optimizer, where):
    """Layers that send nothing (no receive buffers, no stage outputs: where the cost model's closed form bounds the
    simulator's replay from above): the simulator's peak on every worker is within the limit."""
    rng = random.Random(seed)
    prof, topo = _profile(rng, rng.randint(4, 6), sends=False), _topology(*shape)
    opts = CostOptions(optimizer=optimizer, link_load=False)
    space = every_plan(prof, topo, family, M)
    limit, _t = _limits(space, topo, family, M, prof, opts, where)
    if limit is None:
        return
    tight = replace(opts, memory_limit_bytes=limit)
    got = hier.solve_hierarchical(part.Problem(prof, tuple(topo.devices), family, M, tight), topo)
    assert got is not None
    plan = replace(_plan(got.stages, topo, family, M, prof), batches=1 if family == "pipedream" else 2)
    trace = simulate_plan(plan, prof, topo, SimParams(optimizer_state_factor=OPTIMIZER_STATE[optimizer]))
    assert max(peak_memory_bytes(trace).values()) <= limit * (1 + 1e-9)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.sampled_from([0.3, 0.7, 1.0]))
def test_past_the_context_tables_budget_a_returned_plan_still_fits(case, where):
    """Where the context programme's tables would be too big (``CONTEXT_MAX_ENTRIES``, forced to 0 here) the programme
    admits only the stages that fit in every context: its plan may be slower than the best, never faster, and fits."""
    prof, topo, family, M, opts = case
    space = every_plan(prof, topo, family, M, opts.recompute)
    limit, _t = _limits(space, topo, family, M, prof, opts, where)
    if limit is None:
        return
    tight = replace(opts, memory_limit_bytes=limit)
    want = _brute_force(space, topo, family, M, prof, tight)
    keep, hier.CONTEXT_MAX_ENTRIES = hier.CONTEXT_MAX_ENTRIES, 0
    try:
        got = hier.solve_hierarchical(part.Problem(prof, tuple(topo.devices), family, M, tight), topo)
    finally:
        hier.CONTEXT_MAX_ENTRIES = keep
    if got is None:
        return
    assert want is not None and got.value >= want[0] * (1 - 1e-9)
    assert _runs(got.stages, family, M, tight)
    assert evaluate(_plan(got.stages, topo, family, M, prof), prof, topo, tight).fits
