"""sim.fold: a folded run (one worker per orbit of the TP ranks and replicas, on a quotient of the links) gives
the trace a run of every worker gives, and weighted max-min fairness is what the quotient needs."""
from __future__ import annotations

import pytest
import simpy

from planner.plan import plan_from_flags
from planner.profile import Layer, ModelProfile
from planner.program import Kind
from sim import SimParams, simulate_plan
from sim.network import Network
from topologies.presets import load_topology


def _profile(T: int, layers: int, act: float = 2e6, params: float = 8e6) -> ModelProfile:
    """Per-TP-rank blocks with 2 TP all-reduces in forward and 2 in backward, activations and gradients on the links."""
    layer = Layer("block", 1e-4, 2e-4, act, act, params, tp_allreduce_bytes=4e6 if T > 1 else 0.0,
                  tp_forward_allreduces=2 if T > 1 else 0, tp_backward_allreduces=2 if T > 1 else 0)
    return ModelProfile("fold", (layer,) * layers, tensor_parallel=T)


def _both(topology: str, pp: int, dp: int, tp: int, microbatches: int, **plan):
    topo = load_topology(topology)
    p = plan_from_flags("m", 2 * pp, pp=pp, dp=dp, tp=tp, microbatches=microbatches, devices=topo.devices[:pp * dp * tp],
                        **plan)
    prof = _profile(tp, 2 * pp)
    return simulate_plan(p, prof, topo), simulate_plan(p, prof, topo, SimParams(use_symmetry=False))


def _same_trace(a, b) -> None:
    key = lambda e: (str(e.lane), e.start_s, e.action)
    ea, eb = sorted(a.events, key=key), sorted(b.events, key=key)
    assert len(ea) == len(eb)
    for x, y in zip(ea, eb):
        assert (x.lane, x.action, x.kind, x.nbytes) == (y.lane, y.action, y.kind, y.nbytes)
        assert x.start_s == pytest.approx(y.start_s, rel=1e-9, abs=1e-15)
        assert x.end_s == pytest.approx(y.end_s, rel=1e-9, abs=1e-15)
    ma, mb = (sorted(t.memory, key=lambda m: (m.worker, m.time_s, m.nbytes)) for t in (a, b))
    assert [(m.worker, m.nbytes) for m in ma] == [(m.worker, m.nbytes) for m in mb]
    assert [m.time_s for m in ma] == pytest.approx([m.time_s for m in mb], rel=1e-9, abs=1e-15)


# (topology, PP, DP, TP, microbatches, TP ranks folded, replicas simulated per stage)
CASES = [
    ("hier:8@nvswitch:1e+10", 2, 2, 2, 8, True, 1),          # one server: p2p, TP rings and DP rings share device links
    ("hier:8@nvswitch:1e+10", 1, 2, 4, 4, True, 1),
    ("hier:8@nvswitch:1e+10,2@ib:4e+9", 2, 2, 4, 4, True, 1),   # a server per stage: p2p over the node link
    ("hier:8@nvswitch:1e+10,4@ib:4e+9", 2, 4, 4, 8, True, 1),   # two replicas per server: DP rings hierarchical
    ("hier:4@nvswitch:1e+10,4@ib:4e+9", 2, 4, 1, 8, False, 1),  # T = 1, two replicas per server, hierarchical
    ("hier:4@nvswitch:1e+10,4@ib:4e+9", 1, 2, 8, 2, False, 1),  # a TP ring across servers: ranks not symmetric
    ("hier:4@nvswitch:1e+10,2@ib:4e+9", 2, 2, 1, 8, False, 1),  # T = 1, replica pipelines sharing the node link
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-pp{c[1]}dp{c[2]}tp{c[3]}")
def test_a_folded_run_gives_the_trace_of_a_run_of_every_worker(case):
    topology, pp, dp, tp, m, tp_folded, per_stage = case
    folded, full = _both(topology, pp, dp, tp, m)
    sym = folded.meta["symmetry"]
    assert sym["used"] and sym["folded"] and sym["tp_folded"] is tp_folded
    assert sym["replicas_simulated_per_stage"] == per_stage
    assert folded.meta["workers_simulated"] == pp * per_stage * (1 if tp_folded else tp) < pp * dp * tp
    assert not full.meta["symmetry"]["used"] and full.meta["workers_simulated"] == pp * dp * tp
    _same_trace(folded, full)


def test_no_folding_with_jitter_and_the_reason_is_said():
    topo = load_topology("hier:8@nvswitch:1e+10")
    p = plan_from_flags("m", 2, pp=1, dp=2, tp=2, microbatches=2, devices=topo.devices[:4])
    t = simulate_plan(p, _profile(2, 2), topo, SimParams(jitter=0.1))
    assert t.meta["symmetry"]["used"] is False and "jitter" in t.meta["symmetry"]["reason"]


def test_weighted_flows_share_a_link_max_min_fairly_as_that_many_flows():
    """A flow of weight 3 on a link stands for 3 flows: beside one flow of weight 1, each of the 4 gets a quarter
    of the link until the light one drains, then the heavy one's 3 share it all."""
    topo = load_topology("hier:2@nvswitch:1e+9")
    env = simpy.Environment()
    hop = ("d0", "sw0.0")
    net = Network(env, topo, {hop: (hop, 3), ("sw0.0", "d1"): (("sw0.0", "d1"), 1),
                              ("d1", "sw0.0"): (hop, 1), ("sw0.0", "d0"): (("sw0.0", "d0"), 1)})
    done = {}
    lat = topo.graph.edges[hop]["link"].latency_s * 2
    net.transfer("d0", "d1", 3e6, lambda k: done.setdefault(k, env.now), "heavy")   # weight 3 on d0->sw0.0
    net.transfer("d1", "d0", 1e6, lambda k: done.setdefault(k, env.now), "light")   # folded onto d0->sw0.0, weight 1
    env.run()
    # both at 1e9 / 4 per flow: the light one's 1e6 bytes take 4 ms; the heavy one has 2e6 left at 1e9 / 3
    assert done["light"] == pytest.approx(4e-3 + lat, rel=1e-9)
    assert done["heavy"] == pytest.approx(4e-3 + 2e6 / (1e9 / 3) + lat, rel=1e-9)


def test_symmetry_and_fold_share_one_copy_check_that_refuses_a_replica_whose_actions_differ():
    """Replica 1 of stage 0 sends one activation of another size: not a copy of replica 0. The one check
    (``sim.symmetry.exact_copies``) says so, and whole-pipeline copying and folding both refuse through it."""
    from dataclasses import replace

    from planner.profile import uniform_profile
    from planner.schedules import generate, make_spec
    from sim.engine import _Run
    from sim.fold import fold
    from sim.symmetry import exact_copies, symmetry

    prog = generate(make_spec("1f1b", 2, 4, replicas=(2, 2)), lambda s: 1e6, lambda s: 8e6, check_program=False)
    topo = load_topology("ideal:4")
    devices = {w: f"d{w}" for w in prog.workers}
    prof = uniform_profile(2, 1e-3, 2e-3, act=1e6, params=8e6)
    run = lambda p: _Run(p, prof, topo, devices, 1, SimParams(use_symmetry=False), [(0, 0), (1, 1)])
    (r0, r1), _ = prog.stage_workers
    to_r1 = {ws[0]: ws[1] for ws in prog.stage_workers}
    assert exact_copies(run(prog), to_r1, dict.fromkeys(to_r1, 1)) == ""  # the generated replicas are copies
    assert symmetry(run(prog))[0] == 2 and fold(run(prog))[0] is not None

    acts = list(prog[r1])
    i = next(i for i, a in enumerate(acts) if a.kind is Kind.SEND)
    acts[i] = replace(acts[i], nbytes=acts[i].nbytes + 1)
    bad = replace(prog, actions={**prog.actions, r1: acts})
    why = exact_copies(run(bad), to_r1, dict.fromkeys(to_r1, 1))
    assert why == f"worker {r1} differs from worker {r0} at {acts[i]}"
    R, sym_why = symmetry(run(bad))
    assert R == 1 and why in sym_why
    f, fold_why = fold(run(bad))
    assert f is None and fold_why == why
