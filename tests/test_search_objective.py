"""One objective: the planner's answer is the cost model's optimum over every (partition, replication, placement).

The oracle enumerates every placed plan of small clusters of servers behind a shared NIC (contiguous
layer ranges, any replica counts, every assignment of each replica to a server) and costs each with
``planner.costmodel.evaluate``, the figure a plan reports; whether a schedule runs it is what
``planner.schedules.generate`` says. It places a server's replicas on its devices in order, which
is exact because the cost model cannot tell two devices of a server apart (checked below).
"""
from __future__ import annotations

import functools
import itertools
import math

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner.costmodel import CostOptions, evaluate
from planner.plan import Plan, PlanError, StagePlan
from planner.profile import Layer, ModelProfile
from planner.schedules import ScheduleError, generate, make_spec
from planner.search import plan_model
from topologies.presets import load_topology

#: Two-level clusters: servers of GPUs on a PCIe switch or NVSwitch, each server's NIC shared by its GPUs.
TOPOLOGIES = ("pcie:servers=2,gpus=1", "pcie:servers=2,gpus=2", "pcie:servers=2,gpus=3", "pcie:servers=2,gpus=4",
              "pcie:servers=3,gpus=2", "pcie:servers=4,gpus=2", "dgx:servers=2,gpus=2,ib=10",
              "pcie:servers=2,gpus=2,eth=1")
FAMILIES = ("1f1b", "gpipe", "pipedream", "2bw", "zb-h1")
#: The most placed plans the oracle costs for one example (layers are trimmed to stay under it).
ORACLE_PLANS = 350


def _servers(topo) -> list[list[str]]:
    return [list(d) for d in topo.domains(0)]


def _raw_placements(n: int, servers: list[list[str]]) -> tuple[tuple[int, ...], ...]:
    """Every sequence of n server indices using each server at most its size."""
    return _placements(n, tuple(len(s) for s in servers))


@functools.lru_cache(maxsize=None)
def _placements(n: int, sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    # cached: every example (and every layer count the strategy tries) asks again for the same few clusters
    return tuple(labels for labels in itertools.product(range(len(sizes)), repeat=n)
                 if all(labels.count(s) <= sizes[s] for s in range(len(sizes))))


def _oracle_count(L: int, servers: list[list[str]]) -> int:
    D = sum(len(s) for s in servers)
    raw = [len(_raw_placements(n, servers)) for n in range(D + 1)]
    return sum(math.comb(L - 1, P - 1) * math.comb(N - 1, P - 1) * raw[N]
               for P in range(1, min(L, D) + 1) for N in range(P, D + 1))


@functools.lru_cache(maxsize=None)
def _runs(family: str, M: int, reps: tuple[int, ...]) -> bool:
    """The schedules room's own answer: does the generator run this family, M and replication?"""
    try:
        generate(make_spec(family, len(reps), M, reps, batches=3))  # a plan trains for many batches (2BW's rule)
    except ScheduleError:
        return False
    return True


def oracle(prof: ModelProfile, topo, family: str, M: int, options: CostOptions) -> float:
    """The least time per sample of any placed plan that the schedules accept and that fits (inf if none)."""
    servers = _servers(topo)
    D, L = sum(len(s) for s in servers), len(prof)
    best = math.inf
    for N in range(1, D + 1):
        placements = _raw_placements(N, servers)
        for P in range(1, min(L, N) + 1):
            for rcuts in itertools.combinations(range(1, N), P - 1):
                rb = (0,) + rcuts + (N,)
                reps = tuple(rb[i + 1] - rb[i] for i in range(P))
                if not _runs(family, M, reps):
                    continue
                for lcuts in itertools.combinations(range(1, L), P - 1):
                    lb = (0,) + lcuts + (L,)
                    for labels in placements:
                        nxt = [0] * len(servers)
                        devs = []
                        for s in labels:
                            devs.append(servers[s][nxt[s]])
                            nxt[s] += 1
                        stages = tuple(StagePlan(lb[i], lb[i + 1] - 1, reps[i], tuple(devs[rb[i]:rb[i + 1]]))
                                       for i in range(P))
                        c = evaluate(Plan(model="m", stages=stages, schedule=family, microbatches=M), prof, topo, options)
                        if c.fits:
                            best = min(best, c.time_per_sample_s)
    return best


@st.composite
def instances(draw):
    spec = draw(st.sampled_from(TOPOLOGIES))
    topo = load_topology(spec)
    L = draw(st.integers(1, 12))
    while L > 1 and _oracle_count(L, _servers(topo)) > ORACLE_PLANS:
        L -= 1
    layers = []
    for i in range(L):
        f = draw(st.floats(1e-4, 2e-2))
        layers.append(Layer(f"l{i}", f, f * draw(st.floats(1.0, 3.0)), draw(st.sampled_from([1e3, 1e5, 1e6, 1e7, 4e7])),
                            draw(st.sampled_from([1e3, 1e6, 1e7])), draw(st.sampled_from([0.0, 1e5, 1e7, 1e8, 4e8]))))
    prof = ModelProfile("m", tuple(layers))
    family = draw(st.sampled_from(FAMILIES))
    M = draw(st.sampled_from([1, 2, 4, 8]))
    limit = draw(st.sampled_from([None, None, 2e9, 6e8]))
    return prof, spec, topo, family, M, limit


@pytest.mark.timeout(900)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(instances())
def test_planner_answer_is_the_cost_models_optimum_over_every_placed_plan(case):
    prof, spec, topo, family, M, limit = case
    options = CostOptions(memory_limit_bytes=limit)
    want = oracle(prof, topo, family, M, options)
    try:
        got = plan_model(prof, topo, schedule=family, microbatches=M, memory_limit_bytes=limit,
                         top_k=1).best_candidate
    except PlanError:
        assert want == math.inf, f"the planner found nothing on {spec}, the oracle {want}"
        return
    # the planner's figure is the one the plan reports
    again = evaluate(got.plan, prof, topo, options)
    assert again.time_per_sample_s == got.time_per_sample_s
    assert got.time_per_sample_s == pytest.approx(want, rel=1e-9), (spec, family, M, [s.replicas for s in got.stages])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TOPOLOGIES[1:]), st.integers(0, 10**6), st.sampled_from(FAMILIES))
def test_the_cost_model_cannot_tell_devices_of_a_server_or_two_servers_apart(spec, seed, family):
    """What the oracle's placement (a server's replicas on its devices in order) rests on: renaming devices inside
    servers, and servers among themselves, leaves every cost unchanged."""
    import random

    rnd = random.Random(seed)
    topo = load_topology(spec)
    servers = _servers(topo)
    prof = ModelProfile("m", tuple(Layer(f"l{i}", 1e-3 * (i + 1), 2e-3, 1e6 * (i + 1), 1e6, 1e7 * (3 - i % 3))
                                   for i in range(4)))
    devs = [d for s in servers for d in s]
    rnd.shuffle(devs)
    n = rnd.randint(1, len(devs))
    P = rnd.randint(1, min(4, n))
    cuts = sorted(rnd.sample(range(1, n), P - 1))
    rb = [0, *cuts, n]
    lcuts = sorted(rnd.sample(range(1, 4), P - 1))
    lb = [0, *lcuts, 4]
    M = 8

    def plan(order):
        return Plan(model="m", schedule=family, microbatches=M,
                    stages=tuple(StagePlan(lb[i], lb[i + 1] - 1, rb[i + 1] - rb[i], tuple(order[rb[i]:rb[i + 1]]))
                                 for i in range(P)))

    base = evaluate(plan(devs), prof, topo)
    perm_servers = list(range(len(servers)))
    rnd.shuffle(perm_servers)
    inside = [rnd.sample(s, len(s)) for s in servers]
    rename = {servers[a][i]: inside[perm_servers[a]][i] for a in range(len(servers)) for i in range(len(servers[a]))}
    other = evaluate(plan([rename[d] for d in devs]), prof, topo)
    assert other.time_per_sample_s == pytest.approx(base.time_per_sample_s, rel=1e-12)
    assert sorted(other.peak_memory_bytes.values()) == pytest.approx(sorted(base.peak_memory_bytes.values()))


def test_vgg16_on_pipedream_a_beats_every_wide_replication_with_a_small_tail():
    """Issue 17's example: the search used to return 14-1 (2,060 samples/s) while plans replicating the
    convolutions widely with the classifier on one or two workers rated better. Now no such plan beats it."""
    from planner.analytic import load_model
    from planner.cnn import pipedream_profiles_dir

    if pipedream_profiles_dir() is None:
        pytest.skip("PipeDream profiles not beside the repo")
    prof = load_model("vgg16")
    topo = load_topology("pipedream-a")
    got = plan_model(prof, topo, schedule="pipedream", microbatch_size=128, microbatches=16, top_k=1).best_candidate
    devs = topo.devices
    L = len(prof)
    for cut in range(1, L):
        for r0 in range(12, 16):
            for r1 in range(1, 17 - r0):
                stages = (StagePlan(0, cut - 1, r0, tuple(devs[:r0])), StagePlan(cut, L - 1, r1, tuple(devs[r0:r0 + r1])))
                c = evaluate(Plan(model="vgg16", stages=stages, schedule="pipedream", microbatch_size=128,
                                  microbatches=16), prof, topo)
                if c.fits:
                    assert got.time_per_sample_s <= c.time_per_sample_s * (1 + 1e-12), (cut, r0, r1)
    assert got.throughput_samples_per_s > 2060 * 1.1


def test_the_exhaustive_search_counts_and_lists_one_placement_per_class():
    """``exhaustive`` enumerates placements up to renaming servers and sizes itself by a closed-form count; both
    against brute force: every raw sequence of server labels, each server at most its size, canonicalised by
    renaming servers in first-use order."""
    from planner.refine import _count_labels, _label_sequences

    for per_server in (1, 2, 3):
        for servers in (1, 2, 3, 4):
            for n in range(per_server * servers + 1):
                if servers ** n > 5000:  # keep the brute force cheap (on 4 servers: n ≤ 6)
                    continue
                classes = set()
                for labels in _raw_placements(n, [[None] * per_server] * servers):
                    first: dict[int, int] = {}
                    classes.add(tuple(first.setdefault(s, len(first)) for s in labels))
                listed = list(_label_sequences(n, per_server, servers))
                assert sorted(listed) == sorted(classes), (n, per_server, servers)
                assert _count_labels(n, per_server, servers) == len(classes), (n, per_server, servers)
