"""The SimPy cluster model: closed forms on free links, the link model, collectives, memory, determinism."""
from __future__ import annotations

import json
import math

import networkx as nx
import pytest
import simpy

from planner.check import ProgramError, UnitCosts, dry_run, inflight_bound
from planner.plan import even_plan
from planner.profile import uniform_profile
from planner.program import Action, Kind
from planner.schedules import generate, make_spec
from planner.trace import bubble_fraction, makespan_s, peak_memory_bytes, worker_events
from sim import SimError, SimParams, bytes_per_link, simulate, simulate_plan
from sim.collectives import Collective, ring_phases
from sim.memory import StageBytes, memory_levels, round_function
from sim.network import Network
from topologies.presets import load_topology
from topologies.records import Device, Link
from topologies.topology import Topology


def _devices(program):
    return {w: f"d{w}" for w in program.workers}


def sim_unit(family, P, M, params=SimParams(), **spec):
    """Simulate a family on ideal links with one layer per (virtual) stage: forward 1, backward 2 per device."""
    prog = generate(make_spec(family, P, M, **spec), check_program=False)
    V = prog.spec.chunks
    prof = uniform_profile(len(prog.stage_workers), 1.0 / V, 2.0 / V)
    topo = load_topology(f"ideal:{len(prog.workers)}")
    return prog, simulate(prog, prof, topo, _devices(prog), params=params, check_program=False)


def star(n, bandwidth=1e9, latency=1e-6, slow=None):
    """n devices d0.. on one switch; ``slow`` maps a device to its own link bandwidth."""
    g = nx.Graph()
    g.add_node("sw", switch=True)
    for i in range(n):
        g.add_node(f"d{i}", device=Device(f"d{i}"))
        bw = (slow or {}).get(f"d{i}", bandwidth)
        g.add_edge(f"d{i}", "sw", link=Link("infiniband", bw, latency))
    return Topology(g, f"star{n}")


def compute_spans(trace):
    """(worker, action, start or end) -> time, for every compute action."""
    out = {}
    for e in trace.events:
        if isinstance(e.lane, int) and e.is_compute:
            out[(e.lane, e.action, "start")] = e.start_s
            out[(e.lane, e.action, "end")] = e.end_s
    return out


# --- closed forms on free links ------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", [(2, 1), (2, 7), (3, 5), (4, 16), (8, 32), (16, 3), (24, 100), (40, 40)])
def test_gpipe_and_1f1b_match_closed_form_and_dry_run(family, P, M):
    prog, t = sim_unit(family, P, M)
    assert makespan_s(t) == pytest.approx((M + P - 1) * 3.0, abs=1e-9)
    assert bubble_fraction(t) == pytest.approx((P - 1) / (M + P - 1), abs=1e-9)
    dry = dry_run(prog, UnitCosts(f=1, b=2))
    assert compute_spans(t) == pytest.approx(compute_spans(dry), abs=1e-9)


def test_1f1b_with_64_stages_and_512_microbatches_matches_closed_form_and_dry_run():
    prog, t = sim_unit("1f1b", 64, 512)
    assert makespan_s(t) == pytest.approx((512 + 63) * 3.0, abs=1e-9)
    assert bubble_fraction(t) == pytest.approx(63 / 575, abs=1e-9)
    assert compute_spans(t) == pytest.approx(compute_spans(dry_run(prog, UnitCosts(f=1, b=2))), abs=1e-9)


@pytest.mark.parametrize("P,M,V", [(2, 4, 2), (4, 8, 2), (4, 16, 4), (8, 16, 2), (3, 9, 3)])
def test_interleaved_makespan_is_m_work_plus_a_vth_of_the_fill(P, M, V):
    prog, t = sim_unit("interleaved", P, M, chunks=V)
    assert makespan_s(t) == pytest.approx(M * 3.0 + (P - 1) * 3.0 / V, abs=1e-9)
    assert compute_spans(t) == pytest.approx(compute_spans(dry_run(prog, UnitCosts(f=1, b=2))), abs=1e-9)


@pytest.mark.parametrize("P,M", [(2, 2), (4, 8), (8, 8), (8, 24), (16, 32)])
def test_zb_h1_makespan_is_3m_plus_p_minus_1(P, M):
    _, t = sim_unit("zb-h1", P, M)  # tF = tBI = tBW = 1 (backward 2 split half and half)
    assert makespan_s(t) == pytest.approx(3 * M + P - 1, abs=1e-9)


@pytest.mark.parametrize("P,M", [(2, 16), (4, 32), (8, 64), (16, 200)])
def test_pipedream_has_no_idle_time_once_the_pipeline_is_full(P, M):
    prog, t = sim_unit("pipedream", P, M)
    for w, evs in worker_events(t).items():
        comp = [e for e in evs if e.is_compute]
        comp.sort(key=lambda e: e.start_s)
        first_b = next(i for i, e in enumerate(comp) if e.kind == "B")
        last_f = max(i for i, e in enumerate(comp) if e.kind == "F")
        for a, b in zip(comp[first_b:last_f], comp[first_b + 1:last_f + 1]):
            assert b.start_s == pytest.approx(a.end_s, abs=1e-9)
    assert compute_spans(t) == pytest.approx(compute_spans(dry_run(prog, UnitCosts(f=1, b=2))), abs=1e-9)


@pytest.mark.parametrize("family,P,M,replicas", [("pipedream", 3, 24, (2, 1, 1)), ("pipedream", 4, 20, (1, 3, 1, 2)),
                                                 ("1f1b", 3, 12, (2, 2, 1)), ("gpipe", 2, 8, (4, 2)), ("2bw", 4, 8, None)])
def test_replicated_and_2bw_programs_match_the_dry_run(family, P, M, replicas):
    prog, t = sim_unit(family, P, M, replicas=replicas, batches=2 if family != "pipedream" else 1)
    assert compute_spans(t) == pytest.approx(compute_spans(dry_run(prog, UnitCosts(f=1, b=2))), abs=1e-9)


def test_device_speed_divides_compute_time_and_microbatch_size_scales_it():
    prog = generate(make_spec("1f1b", 2, 4), check_program=False)
    prof = uniform_profile(2, 1.0, 2.0)
    topo = load_topology("ideal:2").with_device_speed({"d0": 0.5, "d1": 0.5})
    t = simulate(prog, prof, topo, _devices(prog), microbatch_size=3, check_program=False)
    assert makespan_s(t) == pytest.approx((4 + 1) * 3.0 * 3 / 0.5)


def test_overhead_is_paid_by_every_action():
    prog = generate(make_spec("gpipe", 1, 3), check_program=False)
    t = simulate(prog, uniform_profile(1, 1.0, 2.0), load_topology("ideal:1"), _devices(prog),
                 params=SimParams(overhead_s=0.25), check_program=False)
    assert makespan_s(t) == pytest.approx(3 * 3.0 + 0.25 * len(prog[0]))


# --- the link model ------------------------------------------------------------------------
def _run_transfers(topo, flows):
    env = simpy.Environment()
    net = Network(env, topo)
    ends = {}
    for name, (src, dst, nbytes) in flows.items():
        if net.transfer(src, dst, nbytes, lambda n: ends.__setitem__(n, env.now), name):
            ends[name] = env.now
    env.run()
    return ends, net


def test_a_transfer_costs_route_latency_plus_bytes_over_the_bottleneck():
    topo = star(2, bandwidth=4e9, latency=3e-6, slow={"d1": 1e9})
    ends, _ = _run_transfers(topo, {"x": ("d0", "d1", 5e6)})
    assert ends["x"] == pytest.approx(2 * 3e-6 + 5e6 / 1e9, rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_k_equal_flows_on_one_link_each_take_k_times_as_long(k):
    topo = star(2, bandwidth=1e9, latency=0.0)
    ends, _ = _run_transfers(topo, {i: ("d0", "d1", 1e6) for i in range(k)})
    assert all(t == pytest.approx(k * 1e6 / 1e9, rel=1e-12) for t in ends.values())


def test_links_are_full_duplex():
    topo = star(2, bandwidth=1e9, latency=0.0)
    ends, _ = _run_transfers(topo, {"ab": ("d0", "d1", 1e6), "ba": ("d1", "d0", 1e6)})
    assert ends == {"ab": pytest.approx(1e-3), "ba": pytest.approx(1e-3)}


def test_sharing_is_max_min_fair_and_rates_change_when_a_flow_leaves():
    # d0's uplink (1 GB/s) carries two flows; the one to d2 is held to 0.25 GB/s by d2's link,
    # so the flow to d1 gets the other 0.75 GB/s.
    topo = star(3, bandwidth=1e9, latency=0.0, slow={"d2": 0.25e9})
    ends, _ = _run_transfers(topo, {"fast": ("d0", "d1", 0.75e6), "slow": ("d0", "d2", 0.5e6)})
    assert ends["fast"] == pytest.approx(1e-3, rel=1e-12)
    assert ends["slow"] == pytest.approx(2e-3, rel=1e-12)
    # equal flows finishing at different times: the survivor speeds up
    ends, _ = _run_transfers(star(2, latency=0.0), {"a": ("d0", "d1", 1e6), "b": ("d0", "d1", 3e6)})
    assert ends["a"] == pytest.approx(2e-3, rel=1e-12)
    assert ends["b"] == pytest.approx(2e-3 + 2e6 / 1e9, rel=1e-12)


def test_infinite_links_cost_nothing():
    ends, net = _run_transfers(load_topology("ideal:4"), {"x": ("d0", "d3", 1e12)})
    assert ends["x"] == 0.0


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_allreduce_costs_its_closed_form(n):
    lat, bw, S = 2e-6, 1e9, 8e6
    topo = star(n, bandwidth=bw, latency=lat)
    env = simpy.Environment()
    done = []
    coll = Collective(Network(env, topo), ring_phases([f"d{i}" for i in range(n)], S), lambda _: done.append(env.now), None, "ar")
    assert not coll.start()
    env.run()
    path_latency = 2 * lat  # device -> switch -> device
    assert done[0] == pytest.approx(2 * (n - 1) * path_latency + 2 * (n - 1) / n * S / bw, rel=1e-9)


def test_stage_allreduce_in_a_simulated_program_costs_the_ring_closed_form():
    n, S = 4, 4e6
    prog = generate(make_spec("1f1b", 1, 4, replicas=(n,)), lambda s: 0, lambda s: S, check_program=False)
    topo = star(n, bandwidth=1e9, latency=1e-6)
    t = simulate(prog, uniform_profile(1, 1.0, 2.0, params=S), topo, _devices(prog),
                 params=SimParams(allreduce="ring"), check_program=False)
    ar = [e for e in t.events if e.kind == "ALLREDUCE"]
    assert len(ar) == n
    for e in ar:
        assert e.duration_s == pytest.approx(2 * (n - 1) * 2e-6 + 2 * (n - 1) / n * S / 1e9, rel=1e-9)


def test_hierarchical_allreduce_beats_a_flat_ring_across_servers():
    topo = load_topology("hier:4@nvlink:300e9,2@ib:1e9")
    plan = even_plan("m", 2, 1, replicas=(8,), schedule="1f1b", microbatches=8)
    plan = plan.with_devices([tuple(topo.devices)])
    prof = uniform_profile(2, 1e-3, 2e-3, params=50e6)
    times = {}
    for algo in ("ring", "hierarchical"):
        t = simulate_plan(plan, prof, topo, SimParams(allreduce=algo))
        assert t.meta["allreduce"] == [algo]
        times[algo] = max(e.duration_s for e in t.events if e.kind == "ALLREDUCE")
    assert times["hierarchical"] < times["ring"]


def test_pipeline_sends_and_allreduces_contend_on_a_shared_nic():
    topo = load_topology("dgx:servers=2,gpus=2")
    prof = uniform_profile(2, 1e-3, 2e-3, act=20e6, params=200e6)
    plan = even_plan("m", 2, 2, replicas=(2, 1), schedule="pipedream", microbatches=16)
    plan = plan.with_devices([("s0g0", "s1g0"), ("s0g1",)])
    t = simulate_plan(plan, prof, topo)
    lanes = bytes_per_link(t)
    assert lanes["s1-nvswitch->ib-switch"] > 0 and lanes["s0g0->s0-nvswitch"] > 0
    busy = [e for e in t.events if e.lane == "s1-nvswitch->ib-switch"]
    # the NIC carries both all-reduce traffic and stage-0 replica 1's activations
    assert {e.action.split("ALLREDUCE")[0] != e.action for e in busy} == {True, False}


def test_overlap_off_makes_devices_wait_for_their_sends():
    topo = load_topology("pcie:servers=1,gpus=4")
    prof = uniform_profile(4, 1e-3, 2e-3, act=10e6)
    plan = even_plan("m", 4, 4, schedule="1f1b", microbatches=8).with_devices([(d,) for d in topo.devices])
    on = makespan_s(simulate_plan(plan, prof, topo, SimParams(overlap_comm=True)))
    off = makespan_s(simulate_plan(plan, prof, topo, SimParams(overlap_comm=False)))
    assert off > on


# --- memory --------------------------------------------------------------------------------
@pytest.mark.parametrize("family,P,M", [("1f1b", 4, 8), ("1f1b", 6, 3), ("gpipe", 4, 8), ("pipedream", 4, 16),
                                        ("zb-h1", 4, 8)])
def test_peak_activations_per_stage_match_the_schedule_bound(family, P, M):
    mbs = 3
    prog = generate(make_spec(family, P, M), check_program=False)
    prof = uniform_profile(P, 1.0, 2.0, act=0.0, params=0.0, saved=1.0)
    t = simulate(prog, prof, load_topology(f"ideal:{P}"), _devices(prog), microbatch_size=mbs, check_program=False)
    peak = peak_memory_bytes(t)
    for s, (w,) in enumerate(prog.stage_workers):
        want = {"1f1b": min(P - s, M), "gpipe": M, "zb-h1": None}.get(family, inflight_bound(prog, s))
        if family == "zb-h1":  # activations live until BW: at most 1F1B's peak (stage 0's P) on any stage
            assert peak[w] <= P * mbs
        else:
            assert peak[w] == pytest.approx(min(want, M) * mbs)


def test_weight_stashing_costs_a_weight_copy_per_stashed_version():
    """PipeDream's stage 0 holds P - 1 versions (those its in-flight minibatches used, the newest among them),
    the one its last backward freed (kept for the next STEP to write into) and, between a B and its STEP,
    one gradient buffer; the last stage steps in place and stashes nothing; flush holds one version."""
    P, M, pbytes = 4, 16, 1000.0
    prog = generate(make_spec("pipedream", P, M), check_program=False)
    t = simulate(prog, uniform_profile(P, 1.0, 2.0, params=pbytes), load_topology(f"ideal:{P}"), _devices(prog),
                 params=SimParams(optimizer_state_factor=2.0), check_program=False)
    peak = peak_memory_bytes(t)
    adam = 2 * pbytes
    assert peak[0] == pytest.approx(adam + (P - 1) * pbytes + pbytes + pbytes)  # versions, the spare, gradients
    assert peak[P - 1] == pytest.approx(adam + pbytes + pbytes)  # weights, gradients
    flush = generate(make_spec("1f1b", P, M), check_program=False)
    t2 = simulate(flush, uniform_profile(P, 1.0, 2.0, params=pbytes), load_topology(f"ideal:{P}"), _devices(flush),
                  params=SimParams(optimizer_state_factor=2.0), check_program=False)
    assert max(peak_memory_bytes(t2).values()) == pytest.approx(adam + pbytes + pbytes)


def test_gradients_live_from_a_batch_first_backward_to_its_step():
    P, M, pbytes = 2, 4, 1000.0
    prog = generate(make_spec("1f1b", P, M, batches=2), check_program=False)
    for w in prog.workers:
        init, levels = memory_levels(prog[w], {w: StageBytes(pbytes, 0.0)}, 0.0, round_function(prog))
        assert init == pbytes  # weights only: no gradient before the first backward
        acts = prog[w]
        first_b = [i for i, a in enumerate(acts) if a.kind is Kind.B and a.mb % M == 0]
        steps = [i for i, a in enumerate(acts) if a.kind is Kind.STEP]
        for i, (a, (_, end)) in enumerate(zip(acts, levels)):
            open_ = any(b <= i < s for b, s in zip(first_b, steps))
            assert end == pbytes * (2 if open_ else 1), (w, str(a))


@pytest.mark.parametrize("lookahead", [0, 1, 2, 3, 8])
def test_receive_buffers_are_pooled_and_posted_ahead(lookahead):
    """GPipe, 2 stages, 4 microbatches, 100-byte messages. Stage 1 keeps every received activation until its
    backward: 4 buffers whatever the lookahead, plus an input gradient between its B and its SEND. Stage 0
    frees a gradient's buffer at its B, right after the RECV: posted ahead, min(lookahead + 1, 4) in use."""
    prog = generate(make_spec("gpipe", 2, 4), lambda s: 100, check_program=False)
    t = simulate(prog, uniform_profile(2, 1.0, 2.0), load_topology("ideal:2"), _devices(prog), check_program=False,
                 params=SimParams(recv_lookahead=lookahead))
    peak = peak_memory_bytes(t)
    assert peak[1] == pytest.approx(4 * 100 + 100)
    assert peak[0] == pytest.approx(min(lookahead + 1, 4) * 100)


@pytest.mark.parametrize("schedule,stages,replicas,chunks", [
    ("gpipe", 3, None, 1), ("1f1b", 4, None, 1), ("zb-h1", 3, None, 1), ("interleaved", 4, None, 2),
    ("pipedream", 3, (2, 1, 1), 1), ("2bw", 2, (2, 2), 1)])
def test_peak_memory_without_simulating_is_the_simulated_peak(schedule, stages, replicas, chunks):
    from planner.lowering import plan_to_program
    from sim import peak_memory

    prof = uniform_profile(8, 1e-3, 2e-3, act=3000.0, params=5e4, saved=7000.0)
    plan = even_plan("m", 8, stages * chunks, replicas, schedule=schedule, microbatches=8, microbatch_size=2,
                     batches=2, chunks=chunks)
    topo = load_topology(f"ideal:{sum(s.replicas for s in plan.stages) // chunks}")
    params = SimParams(optimizer_state_factor=1.0, recv_lookahead=3)
    trace = simulate_plan(plan, prof, topo, params)
    got = peak_memory(plan_to_program(plan, prof), prof, microbatch_size=2, params=params,
                      stage_layers=[s.layers for s in plan.stages])
    assert got == peak_memory_bytes(trace)


def test_stage_bytes_count_the_received_input_once_and_the_output_until_backward():
    from planner.profile import Layer, ModelProfile
    from sim.memory import stage_bytes

    layers = (Layer("a", 1, 1, 3.0, 10.0, 7.0), Layer("b", 1, 1, 5.0, 2.0, 0.0), Layer("c", 1, 1, 4.0, 9.0, 1.0))
    got = stage_bytes(ModelProfile("m", layers), [(0, 0), (1, 1), (2, 2)], microbatch_size=2)
    assert got[0] == StageBytes(7.0, 10.0 * 2, 3.0 * 2)       # its input is the data, counted in saved
    assert got[1] == StageBytes(0.0, 0.0, 5.0 * 2)           # keeps only part of its (3-byte) input
    assert got[2] == StageBytes(1.0, (9.0 - 5.0) * 2, 0.0)   # the last stage's output is the loss


# --- determinism, symmetry, errors ------------------------------------------------------------
def test_same_input_gives_the_same_trace_bit_for_bit():
    topo = load_topology("dgx:servers=2,gpus=4")
    prof = uniform_profile(8, 1e-3, 2e-3, act=4e6, params=30e6)
    plan = even_plan("m", 8, 4, replicas=(2, 2, 2, 2), schedule="pipedream", microbatches=24)
    plan = plan.with_devices([tuple(topo.devices[2 * s:2 * s + 2]) for s in range(4)])
    params = SimParams(jitter=0.1, seed=7)
    a, b = simulate_plan(plan, prof, topo, params), simulate_plan(plan, prof, topo, params)
    assert a.events == b.events and a.memory == b.memory
    c = simulate_plan(plan, prof, topo, SimParams(jitter=0.1, seed=8))
    assert c.events != a.events


@pytest.mark.parametrize("family", ["1f1b", "gpipe", "pipedream", "zb-h1"])
def test_symmetric_replicas_are_simulated_once_and_give_the_full_trace(family):
    P, R = 4, 3
    prog = generate(make_spec(family, P, 12, replicas=(R,) * P), lambda s: 1e6, lambda s: 8e6, check_program=False)
    topo = load_topology(f"ideal:{P * R}")
    prof = uniform_profile(P, 1.0, 2.0, params=8e6, saved=10.0)
    sym = simulate(prog, prof, topo, _devices(prog), check_program=False)
    full = simulate(prog, prof, topo, _devices(prog), params=SimParams(use_symmetry=False), check_program=False)
    assert sym.meta["symmetry"] == {"used": True, "replicas": R}
    assert not full.meta["symmetry"]["used"]
    key = lambda e: (e.start_s, str(e.lane), e.action, e.end_s)
    assert sorted(sym.events, key=key) == sorted(full.events, key=key)
    assert sorted(sym.memory, key=lambda m: (m.worker, m.time_s)) == sorted(full.memory, key=lambda m: (m.worker, m.time_s))


def test_replica_pipelines_sharing_links_are_not_copied_but_folded_onto_the_same_trace():
    from planner.lowering import plan_to_program, worker_devices
    from sim.engine import _Run
    from sim.symmetry import symmetry

    topo = load_topology("dgx:servers=2,gpus=2")
    plan = even_plan("m", 2, 2, replicas=(2, 2), microbatches=4)
    plan = plan.with_devices([("s0g0", "s1g0"), ("s0g1", "s1g1")])
    prof = uniform_profile(2, 1e-3, 2e-3, act=1e6, params=1e6)
    t = simulate_plan(plan, prof, topo)
    full = simulate_plan(plan, prof, topo, SimParams(use_symmetry=False))
    prog = plan_to_program(plan, prof)
    run = _Run(prog, prof, topo, worker_devices(plan, prog), 1, SimParams(use_symmetry=False), [(0, 0), (1, 1)])
    assert "share" in symmetry(run)[1]  # whole pipelines cannot be copied ...
    assert t.meta["symmetry"]["folded"] and t.meta["workers_simulated"] == 2  # ... one per orbit is simulated
    key = lambda e: (str(e.lane), e.start_s, e.action)
    assert [(e.lane, e.action) for e in sorted(t.events, key=key)] == [(e.lane, e.action) for e in sorted(full.events, key=key)]
    assert [e.end_s for e in sorted(t.events, key=key)] == pytest.approx([e.end_s for e in sorted(full.events, key=key)])


def test_bad_inputs_raise_one_line_value_errors():
    prog = generate(make_spec("1f1b", 2, 2), check_program=False)
    prof = uniform_profile(2, 1.0, 2.0)
    with pytest.raises(SimError, match="not in topology"):
        simulate(prog, prof, load_topology("ideal:4"), {0: "d0", 1: "gpu9"})
    with pytest.raises(SimError, match="profile"):
        simulate(prog, uniform_profile(1, 1.0, 2.0), load_topology("ideal:4"), _devices(prog))
    with pytest.raises(SimError, match="both sit on"):
        simulate(prog, prof, load_topology("ideal:4"), {0: "d0", 1: "d0"})
    broken = prog.with_actions({0: prog[0], 1: prog[1][1:]})  # drops a RECV
    with pytest.raises(ProgramError):
        simulate(broken, prof, load_topology("ideal:4"), _devices(prog))
    plan = even_plan("m", 8, 2)
    with pytest.raises(SimError, match="re-plan"):
        simulate_plan(plan, uniform_profile(4, 1.0, 2.0), load_topology("ideal:4"))
    assert issubclass(SimError, ValueError)


def test_progress_reports_every_action_at_the_end():
    seen = []
    prog = generate(make_spec("1f1b", 3, 6), check_program=False)
    simulate(prog, uniform_profile(3, 1.0, 2.0), load_topology("ideal:3"), _devices(prog),
             progress=lambda done, total: seen.append((done, total)), check_program=False)
    total = sum(len(a) for a in prog.actions.values())
    assert seen[-1] == (total, total)


def test_trace_lanes_meta_and_chrome_export(tmp_path):
    topo = load_topology("dgx:servers=1,gpus=4")
    plan = even_plan("m", 4, 4, microbatches=4).with_devices([(d,) for d in topo.devices])
    t = simulate_plan(plan, uniform_profile(4, 1e-3, 2e-3, act=1e6), topo)
    assert {"microbatch_size", "family", "symmetry"} <= set(t.meta)
    assert any(isinstance(e.lane, str) and "->" in e.lane for e in t.events)
    assert t.memory and all(isinstance(m.worker, int) for m in t.memory)
    t.save(tmp_path / "t.json")
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]


# --- the CLI -------------------------------------------------------------------------------
def test_cli_simulate_json_and_bad_input(tmp_path, capsys):
    from pipetwin.cli import main

    rc = main(["simulate", "--model", "uniform:layers=8,fwd=1e-3,bwd=2e-3,act=1e6,params=1e6", "--topology",
               "dgx:servers=1,gpus=8", "--stages", "4", "--replicas", "2,1,1,1", "--microbatches", "8", "--json",
               "--trace", str(tmp_path / "t.json"), "--chart", str(tmp_path / "c.png")])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("throughput_samples_per_s", "time_per_batch_s", "bubble_fraction", "per_device", "events"):
        assert key in doc
    assert set(doc["per_device"]["0"]) >= {"busy_s", "bubble_fraction", "peak_memory_bytes"}
    assert (tmp_path / "c.png").stat().st_size > 0
    plan = even_plan("uniform:layers=4", 4, 2, schedule="gpipe", microbatches=4, topology="ideal:2")
    plan.save(tmp_path / "plan.json")
    assert main(["simulate", "--plan", str(tmp_path / "plan.json"), "--steps", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["time_per_batch_s"] > 0
    bad = plan.with_devices([("x0",), ("x1",)])
    bad.save(tmp_path / "bad.json")
    assert main(["simulate", "--plan", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "x0" in err and len(err.strip().splitlines()) == 1
    # a directory or a binary file where a plan file belongs: one line naming the problem, exit 2
    (tmp_path / "adir").mkdir()
    (tmp_path / "bin.json").write_bytes(bytes(range(128, 256)))
    for path, says in ((tmp_path / "adir", "is a directory"), (tmp_path / "bin.json", "should be text")):
        assert main(["simulate", "--plan", str(path)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_unchecked_program_that_deadlocks_ends_in_a_sim_error():
    prog = generate(make_spec("1f1b", 2, 2), check_program=False)
    no_send = [a for a in prog[0] if a.kind is not Kind.SEND]
    with pytest.raises(SimError, match="deadlock: .*w1 at 1RECV0a<w0"):
        simulate(prog.with_actions({0: no_send, 1: prog[1]}), uniform_profile(2, 1.0, 2.0), load_topology("ideal:2"),
                 _devices(prog), check_program=False)


def test_split_backward_factor_and_free_first_stage_bi():
    """BI/BW durations: bi share x split factor on stages > 0; stage 0's BI free and its BW whole when asked."""
    plan = even_plan("m", 3, 3, schedule="zb-h1", microbatches=4, topology="ideal:3")
    prof = uniform_profile(3, 1e-3, 2e-3)
    prm = SimParams(bi_fraction=0.25, split_factor=1.5, first_stage_bi_free=True)
    t = simulate_plan(plan, prof, load_topology("ideal:3"), prm)
    for e in t.events:
        if e.kind not in ("BI", "BW"):
            continue
        s = Action.parse(e.action).stage
        want = {("BI", True): 0.0, ("BW", True): 2e-3,
                ("BI", False): 2e-3 * 1.5 * 0.25, ("BW", False): 2e-3 * 1.5 * 0.75}[(e.kind, s == 0)]
        assert e.end_s - e.start_s == pytest.approx(want, abs=1e-12), e
    # the defaults keep the closed-form model: every stage splits, nothing scaled
    t0 = simulate_plan(plan, prof, load_topology("ideal:3"), SimParams(bi_fraction=0.25))
    assert {round(e.end_s - e.start_s, 12) for e in t0.events if e.kind == "BI"} == {5e-4}
    with pytest.raises(SimError, match="split_factor"):
        SimParams(split_factor=0)


@pytest.mark.parametrize("family,replicas", [("1f1b", 1), ("gpipe", 1), ("2bw", 1), ("zb-h1", 1),
                                             ("pipedream", 1), ("pipedream", 2), ("1f1b", 2)])
def test_gradient_accumulation_is_paid_by_every_backward_after_the_first_of_its_round(family, replicas):
    """accumulate_s_per_byte: each B/BW after the first of its optimizer round on a worker pays it per
    parameter byte of its stage. Closed form: a worker holding M/r microbatches of each of `batches` batches
    adds M/r - 1 times a batch; PipeDream (one minibatch per replica round) never does."""
    P, M, batches, pbytes, per_byte = 2, 4, 3, 8192, 1e-9
    reps = (replicas,) * P if replicas > 1 else None
    kw = {} if family == "pipedream" else {"batches": batches}
    plan = even_plan("m", 4, P, reps, schedule=family, microbatches=M if family != "pipedream" else 8, **kw)
    prof = uniform_profile(4, 1e-3, 2e-3, params=pbytes // 2)  # two layers per stage
    topo = load_topology(f"ideal:{P * replicas}")
    base = simulate_plan(plan, prof, topo, SimParams())
    paid = simulate_plan(plan, prof, topo, SimParams(accumulate_s_per_byte=per_byte))
    extra = {}
    for a, b in zip(sorted(base.events, key=lambda e: (str(e.lane), e.action)),
                    sorted(paid.events, key=lambda e: (str(e.lane), e.action))):
        assert a.action == b.action
        if isinstance(a.lane, int) and a.kind in ("B", "BW"):
            extra[a.lane] = extra.get(a.lane, 0) + round((b.duration_s - a.duration_s) / (pbytes * per_byte))
    adds = 0 if family == "pipedream" else (M // replicas - 1) * batches
    assert extra == {w: adds for w in range(P * replicas)}


def test_a_receive_that_waits_pays_the_wake_up_and_one_that_does_not_is_free():
    """recv_wake_s: GPipe on 2 stages with one microbatch blocks each stage once (stage 1 on the activation,
    stage 0 on the gradient), so the makespan grows by exactly two wake-ups. With four microbatches stage 1's
    later activations arrive while it still computes (forward 1 ms, messages instant): only its first RECV waits."""
    prof = uniform_profile(2, 1e-3, 2e-3)
    topo = load_topology("ideal:2")
    wake = 3e-4
    one = even_plan("m", 2, 2, schedule="gpipe", microbatches=1)
    a = simulate_plan(one, prof, topo, SimParams())
    b = simulate_plan(one, prof, topo, SimParams(recv_wake_s=wake))
    span = lambda t: max(e.end_s for e in t.events) - min(e.start_s for e in t.events)  # noqa: E731
    assert span(b) - span(a) == pytest.approx(2 * wake, abs=1e-12)
    four = even_plan("m", 2, 2, schedule="gpipe", microbatches=4)
    t = simulate_plan(four, prof, topo, SimParams(recv_wake_s=wake))
    recv_act = sorted((e for e in t.events if e.lane == 1 and e.kind == "RECV" and "a<" in e.action),
                      key=lambda e: e.start_s)
    assert [round(e.duration_s, 9) for e in recv_act] == [round(1e-3 + wake, 9), 0.0, 0.0, 0.0]
    with pytest.raises(SimError, match="recv_wake_s"):
        SimParams(recv_wake_s=-1.0)


def test_a_receive_whose_message_is_already_there_pays_recv_ready():
    """recv_ready_s: GPipe on 2 stages, four microbatches, stage 1's forward (2 ms) twice stage 0's (1 ms),
    messages instant. Stage 1's first RECV waits (1 ms, none of recv_ready_s); its later activations arrive
    while it still computes (a1 at 2 ms, wanted at 3 ms, ...), so each of those RECVs takes exactly
    recv_ready_s, and they lie on stage 1's critical path: the makespan grows by three of them."""
    from planner.profile import Layer, ModelProfile

    prof = ModelProfile("two", (Layer("l0", 1e-3, 2e-3, 0.0, 0.0, 0.0), Layer("l1", 2e-3, 4e-3, 0.0, 0.0, 0.0)))
    topo = load_topology("ideal:2")
    ready = 2e-4
    four = even_plan("m", 2, 2, schedule="gpipe", microbatches=4)
    t = simulate_plan(four, prof, topo, SimParams(recv_ready_s=ready))
    recv_act = sorted((e for e in t.events if e.lane == 1 and e.kind == "RECV" and "a<" in e.action),
                      key=lambda e: e.start_s)
    assert [round(e.duration_s, 9) for e in recv_act] == [round(1e-3, 9), ready, ready, ready]
    base = simulate_plan(four, prof, topo, SimParams())
    span = lambda tr: max(e.end_s for e in tr.events) - min(e.start_s for e in tr.events)  # noqa: E731
    assert span(t) - span(base) == pytest.approx(3 * ready, abs=1e-12)
    with pytest.raises(SimError, match="recv_ready_s"):
        SimParams(recv_ready_s=-1.0)
