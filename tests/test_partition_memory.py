"""The partition search charges every stage the cost model's memory: per family, from the registry's traits.

* the memory the search charges a stage is ``costmodel.evaluate``'s for the same plan, for every family the
  flat search takes (ZB-H1 and ZB-H2 hold P and 2P − 1 activations awaiting BW, not 1F1B's P − s);
* near the memory limit the search's answer is the brute-force best over every partition, each costed by
  ``evaluate`` (the independent truth), and its plan fits;
* the answers for 1F1B, GPipe, PipeDream and 2BW are the ones pinned in ``golden/partition_answers.json``
  (``PIPETWIN_UPDATE_GOLDEN=1`` rewrites it, on purpose only).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
from dataclasses import replace
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner import hierarchical as hier
from planner import partition as part
from planner.costmodel import CostOptions, evaluate
from planner.plan import Plan, PlanError, StagePlan
from planner.profile import Layer, ModelProfile, uniform_profile
from planner.program import FAMILY
from planner.search import plan_model
from topologies.presets import load_topology
from topologies.records import Device, Link
from topologies.topology import Topology

GOLDEN = Path(__file__).parent / "golden" / "partition_answers.json"
#: The families whose answers must not move (they were sized right before the ZB fix).
PINNED = ("1f1b", "gpipe", "pipedream", "2bw")


# --- instances: seeded, so the golden file names them by seed ------------------------------
def _chain(rng: random.Random, layers: int) -> ModelProfile:
    out = []
    for i in range(layers):
        f = rng.uniform(1e-4, 1e-2)
        out.append(Layer(f"l{i}", f, f * rng.uniform(1.0, 3.0), rng.choice([1e5, 1e6, 1e7]), rng.choice([1e6, 1e7]),
                         rng.choice([0.0, 1e6, 1e7, 1e8])))
    return ModelProfile("chain", tuple(out))


def _cluster(rng: random.Random, n: int) -> Topology:
    """Servers of ``per`` devices on a switch each, the switches on a slower top switch; memory left to the limit."""
    per = rng.randint(1, n)
    g = nx.Graph()
    g.add_node("top", switch=True)
    for s in range(-(-n // per)):
        hub = f"sw{s}"
        g.add_node(hub, switch=True)
        g.add_edge(hub, "top", link=Link("ethernet", rng.choice([1e9, 1e10]), rng.choice([0.0, 1e-5])))
        for d in range(s * per, min(n, (s + 1) * per)):
            g.add_node(f"d{d}", device=Device(f"d{d}", speed=rng.choice([0.5, 1.0, 2.0]), memory_bytes=16e9))
            g.add_edge(f"d{d}", hub, link=Link("nvlink", rng.choice([1e11, 3e11]), 2e-6))
    return Topology(g, "random")


def _instance(seed: int):
    rng = random.Random(seed)
    return _chain(rng, rng.randint(3, 9)), _cluster(rng, rng.randint(2, 6)), rng.choice([2, 4, 8]), rng.random() < 0.5


def _tight_limit(pb: part.Problem, topo: Topology, slack: float) -> float | None:
    """A memory limit ``slack`` above the least any partition needs (so memory decides the answer)."""
    low = part.solve_flat(pb, topo, objective="memory")
    return None if low is None else low.value * slack


def _answers(family: str) -> dict:
    """Every answer the searches give for ``family`` on the pinned instances, as plain data."""
    out = {}
    for seed in range(12):
        prof, topo, M, rec = _instance(seed)
        loose = part.Problem(prof, tuple(topo.devices), family, M, CostOptions(recompute=rec))
        rows = {"memory": _plain(part.solve_flat(loose, topo, objective="memory"))}
        for slack in (1.0, 1.15, 1.6):
            lim = _tight_limit(loose, topo, slack)
            pb = part.Problem(prof, tuple(topo.devices), family, M, CostOptions(recompute=rec, memory_limit_bytes=lim))
            rows[f"time@{slack}"] = [_plain(s) for s in part.solve_flat_per_count(pb, topo)]
        out[str(seed)] = rows
    topo = load_topology("hier:4@nvlink:300e9,4@ib:25e9,5@eth:1.25e9")  # 80 devices: the hierarchical search
    prof = uniform_profile(60, 1e-3, 2e-3, act=1e6, params=4e7)
    for lim in (None, 3e8, 1.5e8):
        pb = part.Problem(prof, tuple(topo.devices), family, 16, CostOptions(memory_limit_bytes=lim))
        out[f"hier@{lim}"] = _plain(hier.solve_hierarchical(pb, topo))
        try:  # the whole search on that cluster: its hierarchical, regular and refined plans, ranked
            best = plan_model(prof, topo, schedule=family, microbatches=16, memory_limit_bytes=lim, top_k=1).best_candidate
            out[f"plan@{lim}"] = [float(f"{best.time_per_sample_s:.12g}"),
                                  [[s.first_layer, s.last_layer, list(s.devices)] for s in best.plan.stages]]
        except PlanError as e:
            out[f"plan@{lim}"] = str(e)
    return out


def _plain(sol: part.Partition | None):
    if sol is None:
        return None
    return {"value": float(f"{sol.value:.12g}"), "devices_used": sol.devices_used,
            "stages": [[a, b, list(idx)] for a, b, idx in sol.stages]}


def test_the_1f1b_gpipe_pipedream_and_2bw_answers_are_the_pinned_ones():
    """Sizing ZB-H1/ZB-H2 right must not move the other families: flat answers at three memory limits (tight to
    loose) and the memory objective on seeded instances, and the hierarchical answer on 80 devices."""
    got = {fam: _answers(fam) for fam in PINNED}
    if os.environ.get("PIPETWIN_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text("{\n" + ",\n".join(f" {json.dumps(fam)}: {{\n" + ",\n".join(
            f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in rows.items()) + "\n }" for fam, rows in got.items()) + "\n}\n")
    assert got == json.loads(GOLDEN.read_text()), f"{GOLDEN.name} changed; if on purpose, rerun with PIPETWIN_UPDATE_GOLDEN=1"


# --- the stage memory is the cost model's, for every family the flat search takes -----------------
#: The families the flat and hierarchical searches plan (one stage per device set), read from the registry.
LINEAR = tuple(n for n, f in FAMILY.items() if f.generated and f.placement == "linear")


def test_the_linear_families_include_both_zero_bubble_halves():
    assert {"zb-h1", "zb-h2", "1f1b", "gpipe", "pipedream", "2bw"} <= set(LINEAR)


@st.composite
def small_cases(draw):
    """A chain of up to 5 layers on up to 4 devices, a family, M and the cost options (ZeRO 1, 2 or 3 where the
    family keeps one weight version)."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    prof = _chain(rng, draw(st.integers(1, 5)))
    topo = _cluster(rng, draw(st.integers(1, 4)))
    family = draw(st.sampled_from(LINEAR))
    opts = CostOptions(recompute=draw(st.sampled_from(["none", "selective", "full"])),
                       optimizer=draw(st.sampled_from(["sgd", "adam"])),
                       zero_stage=draw(st.sampled_from([0, 1, 2, 3])) if FAMILY[family].weight_copies == 1 else 0)
    return prof, topo, family, draw(st.sampled_from([1, 2, 3, 4, 8])), opts


def _partitions(L: int, N: int):
    """Every partition of L layers into contiguous stages on contiguous blocks of the first N devices."""
    for P in range(1, min(L, N) + 1):
        for lay in _compositions(L, P):
            for dev in _compositions(N, P):
                yield tuple((a, b - 1, tuple(range(c, d))) for (a, b), (c, d) in zip(lay, dev))


def _compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        b = (0, *cuts, total)
        yield [(b[x], b[x + 1]) for x in range(parts)]


def _plan(stages, topo, family, M, prof) -> Plan:
    sp = tuple(StagePlan(a, b, len(idx), tuple(topo.devices[x] for x in idx)) for a, b, idx in stages)
    return Plan(prof.name, sp, schedule=family, microbatches=M)


def _schedulable(family, M, stages, zero_stage=0) -> bool:
    """What the schedule generator takes (``refine.schedulable``) and ZeRO-3 can time (``costmodel.zero_refusal``)."""
    from planner.costmodel import zero_refusal
    from planner.refine import schedulable

    reps = tuple(len(idx) for _a, _b, idx in stages)
    plan = Plan("p", tuple(StagePlan(a, b, len(idx), tuple(f"d{x}" for x in idx)) for a, b, idx in stages),
                schedule=family, microbatches=M)
    return schedulable(family, M, reps) and not zero_refusal(plan, zero_stage)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_cases(), st.data())
def test_the_memory_the_search_charges_a_stage_is_the_cost_models(case, data):
    prof, topo, family, M, opts = case
    N = data.draw(st.integers(1, len(topo.devices)))
    stages = data.draw(st.sampled_from(list(_partitions(len(prof), N))))
    charged = part.stage_memory(part.Problem(prof, tuple(topo.devices), family, M, opts), topo, stages)
    if not _schedulable(family, M, stages, opts.zero_stage):  # the search leaves out the stages no schedule runs
        assert any(math.isinf(x) for x in charged)
        return
    truth = [s.memory_bytes for s in evaluate(_plan(stages, topo, family, M, prof), prof, topo, opts).stages]
    assert charged == pytest.approx(truth, rel=1e-9)


def _brute_force(prof, topo, family, M, opts):
    """(least bottleneck among the plans that fit, least peak memory) over every schedulable partition, each costed
    by ``evaluate`` alone."""
    best_t = best_m = math.inf
    for N in range(1, len(topo.devices) + 1):
        for stages in _partitions(len(prof), N):
            if not _schedulable(family, M, stages, opts.zero_stage):
                continue
            cand = evaluate(_plan(stages, topo, family, M, prof), prof, topo, opts)
            best_m = min(best_m, max(s.memory_bytes for s in cand.stages))
            if cand.fits:
                best_t = min(best_t, cand.bottleneck_s)
    return best_t, best_m


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_cases(), st.sampled_from([1.0, 1.1, 1.3, 2.0]))
def test_near_the_memory_limit_the_search_finds_the_brute_force_best_by_the_cost_model(case, slack):
    prof, topo, family, M, opts = case
    _t, least = _brute_force(prof, topo, family, M, opts)
    pb = part.Problem(prof, tuple(topo.devices), family, M, opts)
    low = part.solve_flat(pb, topo, objective="memory")
    assert (low is None) == math.isinf(least)
    if low is None:
        return
    assert low.value == pytest.approx(least, rel=1e-9)
    if opts.zero_stage == 3:  # the programme does not time ZeRO-3's passes (evaluate does): its memory only, above
        return
    tight = replace(opts, memory_limit_bytes=least * slack)
    best_t, _m = _brute_force(prof, topo, family, M, tight)
    sol = part.solve_flat(part.Problem(prof, tuple(topo.devices), family, M, tight), topo)
    assert sol is not None and sol.value == pytest.approx(best_t, rel=1e-9)
    assert evaluate(_plan(sol.stages, topo, family, M, prof), prof, topo, tight).fits


@pytest.mark.parametrize("family", ["zb-h1", "zb-h2"])
def test_a_zero_bubble_plan_the_search_returns_fits_where_1f1b_counts_would_overfill_it(family):
    """Eight equal layers on four devices, memory 20 % above the least any plan needs: sized with 1F1B's P − s,
    the last stages look roomy and the search doubled the last one up (layers 4-7 on two replicas), which ZB holds
    P (ZB-H2: 2P − 1) activations on and does not fit; the answer is now the cost model's brute-force best."""
    prof, topo, M = uniform_profile(8, 1e-3, 2e-3, act=1e6, params=1e6), load_topology("ideal:4"), 8
    loose = CostOptions()
    _t, least = _brute_force(prof, topo, family, M, loose)
    tight = CostOptions(memory_limit_bytes=least * 1.2)
    best_t, _m = _brute_force(prof, topo, family, M, tight)
    sol = part.solve_flat(part.Problem(prof, tuple(topo.devices), family, M, tight), topo)
    assert sol.value == pytest.approx(best_t, rel=1e-9)
    cand = evaluate(_plan(sol.stages, topo, family, M, prof), prof, topo, tight)
    assert cand.fits
    assert [s.memory_bytes for s in cand.stages] == pytest.approx(
        part.stage_memory(part.Problem(prof, tuple(topo.devices), family, M, tight), topo, sol.stages), rel=1e-9)


# --- the depth masks give every pass's answer, and deepest_limit0 inverts the count -------------------
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(["zb-h1", "zb-h2"]), st.sampled_from([1, 2, 4, 16]),
       st.sampled_from([1.0, 1.1, 1.4]))
def test_the_depth_masks_answer_is_the_best_of_one_pass_per_depth(seed, family, M, slack):
    """Where the lower bound does not settle a ZB search, the bisection over bit masks of depths answers; it must
    be the best of the passes, one per L₀ (the slow, plain way), on chains longer than the brute force reaches."""
    rng = random.Random(seed)
    prof, topo = _chain(rng, rng.randint(2, 10)), _cluster(rng, rng.randint(2, 8))
    pb = part.Problem(prof, tuple(topo.devices), family, M, CostOptions())
    least = part.solve_flat(pb, topo, objective="memory")
    pb = part.Problem(prof, tuple(topo.devices), family, M, CostOptions(memory_limit_bytes=least.value * slack))
    tb = part._Tables(pb, topo)
    for N in range(1, len(topo.devices) + 1):
        sub = tb.prefix(N)
        passes = [s for s in (part._solve_pass(sub, pb, N, "time", L0) for L0 in part._depths(pb, N)) if s is not None]
        masks = part._solve_by_depth_masks(sub, pb, N, 0.0)
        if masks is False:  # a rounding at a memory boundary: the search runs the passes itself
            continue
        assert (masks is None) == (not passes)
        if passes:
            assert masks.value == pytest.approx(min(s.value for s in passes), rel=1e-12)


@given(st.sampled_from(LINEAR), st.integers(1, 64), st.integers(1, 64), st.integers(1, 8), st.integers(1, 64),
       st.floats(0, 80))
def test_deepest_limit0_is_the_last_depth_at_which_the_held_count_fits(family, M, n_in, replicas, deepest, max_held):
    from planner.costmodel import deepest_limit0, held_until_weight_grad

    fits = [L0 for L0 in range(1, deepest + 1) if held_until_weight_grad(family, M, n_in, L0, replicas) <= max_held]
    assert fits == list(range(1, len(fits) + 1))  # the count does not fall as L₀ grows
    assert int(deepest_limit0(family, M, n_in, replicas, max_held, deepest)) == len(fits)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_cases(), st.sampled_from([(f, g) for f in LINEAR for g in LINEAR if part.needs_no_less_than(f, g)]))
def test_a_family_said_to_need_no_less_does_need_no_less(case, pair):
    """``needs_no_less_than`` lets the "nothing fits" line skip ZB's slow memory search: its claim, on the least
    memory any partition needs (brute force by ``evaluate``)."""
    prof, topo, _family, M, opts = case
    family, other = pair
    assert part.needs_no_less_than(family, other, opts.zero_stage) or opts.zero_stage == 3
    if not part.needs_no_less_than(family, other, opts.zero_stage):
        return
    assert _brute_force(prof, topo, family, M, opts)[1] >= _brute_force(prof, topo, other, M, opts)[1] * (1 - 1e-12)


def test_zero_bubble_halves_need_no_less_than_1f1b():
    assert part.needs_no_less_than("zb-h1", "1f1b") and part.needs_no_less_than("zb-h2", "1f1b")
    assert not part.needs_no_less_than("1f1b", "zb-h1") and not part.needs_no_less_than("zb-h1", "zb-h2")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.sampled_from(["zb-h1", "zb-h2"]), st.sampled_from([2, 8, 64]))
def test_the_depths_the_memory_objective_keeps_hold_the_best_pass(seed, family, M):
    """``_memory_depths`` narrows the memory objective's passes to the depths at which a near-best partition fits;
    the best of those passes must be the best of all (narrowed to a single depth where it can be)."""
    rng = random.Random(seed)
    prof, topo = _chain(rng, rng.randint(2, 10)), _cluster(rng, rng.randint(2, 8))
    pb = part.Problem(prof, tuple(topo.devices), family, M, CostOptions(recompute=rng.choice(["none", "full"])))
    tb = part._Tables(pb, topo)
    keep, part._MEMORY_PASSES = part._MEMORY_PASSES, 2
    try:
        for N in range(2, len(topo.devices) + 1):
            sub = tb.prefix(N)
            every = [s.value for s in (part._solve_pass(sub, pb, N, "memory", L0) for L0 in part._depths(pb, N)) if s]
            low = part._solve_pass(sub, pb, N, "memory", None)
            if low is None:
                assert not every
                continue
            upper = max(part.stage_memory(pb, topo, low.stages))
            kept = part._memory_depths(sub, pb, N, low.value, upper)
            narrowed = [s.value for s in (part._solve_pass(sub, pb, N, "memory", L0) for L0 in kept) if s]
            assert min(narrowed) == pytest.approx(min(every), rel=1e-12)
    finally:
        part._MEMORY_PASSES = keep
