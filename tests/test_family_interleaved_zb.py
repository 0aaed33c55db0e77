"""Interleaved zero bubble (torch's ScheduleInterleavedZeroBubble): looped placement, V chunks, split backward.

Device d holds virtual stages d, d + P, ...; forwards cycle the chunks group by group
as in interleaved 1F1B, the backward is split and device d's weight gradients lag d
steady steps, which fills its wait for the first gradient. What the family promises,
each checked here against an independent truth:

* at tF = tBI = tBW (a chunk costs 1/V of them) the makespan is 3M + (P − 1)/V for
  every M ≥ P: a 1/V of ZB-H1's bubble (P − 1), recomputed from the dry run's timeline;
* torch's own program for the same (P, M, V) is the same action order, so its unit-cost
  dry run is ours (torch's step timer differs by a step or two on the same order: its
  lowering places sends around the idle cells its IR pads with; benchmarks/ prints both);
* every device holds (V − 1)·g + P chunk-microbatches awaiting their weight gradient at
  its peak (g the first microbatch group, P when P divides M): 1F1B's peak, P whole
  microbatches, on every device rather than on the first one only — the simulator's
  activation memory says the same.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from planner.check import ProgramError, UnitCosts, dry_run, measured_bounds
from planner.program import Action, Kind
from planner.schedulespec import interleaved_groups
from planner.profile import uniform_profile
from planner.schedules import ORDERS, generate, lower, make_spec, stage_workers
from planner.trace import makespan_s
from sim.engine import peak_memory

U = UnitCosts(f=1, b=2, bi=1, bw=1)


def _idle_on_busiest(prog) -> float:
    """Makespan minus the busiest worker's compute time, from the dry run's own events."""
    t = dry_run(prog, U)
    busy: dict[int, float] = {}
    for e in t.events:
        busy[e.lane] = busy.get(e.lane, 0.0) + (e.end_s - e.start_s)
    return makespan_s(t) - max(busy.values())


@settings(max_examples=200, deadline=None)
@given(P=st.integers(1, 8), V=st.integers(1, 4), extra=st.integers(0, 20))
def test_the_bubble_is_one_vth_of_zb_h1s_for_every_m_at_least_p(P, V, extra):
    M = P + extra
    prog = generate(make_spec("interleaved-zb", P, M, chunks=V))
    assert _idle_on_busiest(prog) == pytest.approx((P - 1) / V, abs=1e-6)
    assert makespan_s(dry_run(prog, U)) == pytest.approx(3 * M + (P - 1) / V, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(P=st.integers(1, 8), V=st.integers(1, 4), M=st.integers(1, 40))
def test_every_device_holds_v_minus_1_groups_plus_p_chunks_awaiting_their_weight_gradient(P, V, M):
    """Counted from the action lists (forward done, BW not), independently of check's cap."""
    prog = generate(make_spec("interleaved-zb", P, M, chunks=V))
    g = interleaved_groups(P, M)[0]
    want = min((V - 1) * g + P, M * V)
    for w in prog.workers:
        cur = peak = 0
        for a in prog[w]:
            cur += a.kind is Kind.F
            cur -= a.kind is Kind.BW
            peak = max(peak, cur)
        assert peak == want
    if M % P == 0:
        assert want == P * V  # 1F1B's peak: P whole microbatches
    assert measured_bounds(prog)["backward"] == "split"


@pytest.mark.parametrize("P,M,V", [(2, 8, 2), (4, 4, 2), (4, 8, 2), (4, 8, 3), (4, 6, 2), (8, 16, 2), (8, 24, 4)])
def test_peak_activation_memory_per_device_in_the_simulator(P, M, V):
    """The same P·V-layer model: 1F1B on P stages of V layers, interleaved zero bubble on P·V one-layer chunks.

    Saved-activation bytes only, so the simulator's peak per worker is its activation memory: (V − 1)·g + P
    layers' worth on every device; 1F1B holds P·V on its first stage and less after, interleaved 1F1B more.
    """
    saved = 1000.0
    prof = uniform_profile(P * V, 1e-3, 2e-3, act=0.0, params=0.0, saved=saved)
    zb = peak_memory(generate(make_spec("interleaved-zb", P, M, chunks=V)), prof)
    one = peak_memory(generate(make_spec("1f1b", P, M)), prof, stage_layers=[(V * s, V * s + V - 1) for s in range(P)])
    il = peak_memory(generate(make_spec("interleaved", P, M, chunks=V)), prof)
    g = interleaved_groups(P, M)[0]
    assert max(one.values()) == pytest.approx(min(P, M) * V * saved)
    for d in range(P):
        assert zb[d] == pytest.approx(min((V - 1) * g + P, M * V) * saved)
        if M % P == 0:
            assert zb[d] <= max(one.values()) + 1e-9
    assert zb[0] <= il[0] + 1e-9  # never above interleaved 1F1B's first device


@pytest.mark.parametrize("P,M,V", [(4, 8, 2), (8, 16, 3)])
def test_beats_interleaved_1f1b_and_zb_h1(P, M, V):
    zb = makespan_s(dry_run(generate(make_spec("interleaved-zb", P, M, chunks=V)), U))
    assert zb < makespan_s(dry_run(generate(make_spec("interleaved", P, M, chunks=V)), U))
    assert zb < makespan_s(dry_run(generate(make_spec("zb-h1", P, M)), U))


def test_replicas_each_run_their_own_pipeline():
    prog = generate(make_spec("interleaved-zb", 2, 8, replicas=(2,) * 4, chunks=2))
    assert prog.stage_workers == ((0, 1), (2, 3), (0, 1), (2, 3))
    for w in prog.workers:
        assert {a.mb % 2 for a in prog[w] if a.is_compute} == {w % 2}


# --- torch's own program ----------------------------------------------------------------------
torch_schedules = pytest.importorskip("tests.torch_schedules")


@pytest.mark.parametrize("P,M,V", [(2, 2, 2), (2, 8, 2), (4, 4, 2), (4, 16, 2), (8, 16, 2), (16, 32, 2), (4, 8, 3),
                                   (8, 8, 4)])
def test_torchs_program_is_ours_action_for_action(P, M, V):
    from planner.torch_interop import program_from_torch, read_torch_csv

    sch = torch_schedules.torch_schedule("InterleavedZeroBubble", P, M, V)
    theirs = program_from_torch(read_torch_csv(torch_schedules.order_csv(sch.pipeline_order)))
    ours = generate(make_spec("interleaved-zb", P, M, chunks=V))
    assert theirs.actions == ours.actions
    assert makespan_s(dry_run(theirs, U)) == pytest.approx(makespan_s(dry_run(ours, U)))


# --- mutations: the family's cap and the laws name the action that breaks them ------------------
def weight_grad_pushed_past_a_forward_at_the_peak(compute: dict, cap: int) -> tuple[int, Action]:
    """Swap, on the first worker where it happens, a weight-gradient action (B or BW) reached at ``cap``
    chunk-microbatches awaiting BW with the forward after it: that forward then makes cap + 1."""
    for w, acts in sorted(compute.items()):
        cur = 0
        for j, a in enumerate(acts[:-1]):
            if a.kind in (Kind.B, Kind.BW) and cur == cap and acts[j + 1].kind is Kind.F:
                acts[j], acts[j + 1] = acts[j + 1], acts[j]
                return w, acts[j]
            cur += (a.kind is Kind.F) - (a.kind in (Kind.B, Kind.BW))
    raise AssertionError(f"no worker reaches {cap} with a weight gradient before a forward")


@pytest.mark.parametrize("P,M,V", [(2, 4, 2), (4, 8, 2), (4, 6, 3), (8, 16, 2)])
def test_a_forward_past_the_weight_gradient_cap_is_rejected_naming_it(P, M, V):
    spec = make_spec("interleaved-zb", P, M, chunks=V)
    compute = ORDERS["interleaved-zb"](spec)
    w, f = weight_grad_pushed_past_a_forward_at_the_peak(compute, min((V - 1) * interleaved_groups(P, M)[0] + P, M * V))
    with pytest.raises(ProgramError, match="await their weight gradient") as err:
        lower(spec, stage_workers(spec), compute)
    assert err.value.worker == w and (err.value.action.stage, err.value.action.kind, err.value.action.mb) == (f.stage, f.kind, f.mb)


def test_a_full_backward_does_not_belong_to_a_split_family():
    spec = make_spec("interleaved-zb", 2, 4, chunks=2)
    compute = ORDERS["interleaved-zb"](spec)
    acts = compute[0]
    j = next(j for j, a in enumerate(acts) if a.kind is Kind.BI)
    bw = next(k for k, a in enumerate(acts) if a.kind is Kind.BW and (a.stage, a.mb) == (acts[j].stage, acts[j].mb))
    acts[j] = Action(acts[j].stage, Kind.B, acts[j].mb)
    del acts[bw]
    with pytest.raises(ProgramError, match="B does not belong to a interleaved-zb program"):
        lower(spec, stage_workers(spec), compute)


# --- the cost model's memory ------------------------------------------------------------------
@pytest.mark.parametrize("P,M,V,R", [(4, 8, 2, 1), (4, 6, 2, 1), (4, 6, 3, 1), (4, 7, 3, 1), (2, 3, 2, 1), (3, 5, 2, 1),
                                     (2, 6, 2, 2), (2, 10, 3, 2), (2, 7, 2, 2), (3, 11, 2, 2)])
def test_the_cost_models_peak_per_device_is_the_simulators(P, M, V, R):
    """one layer per chunk, saved bytes only: the planner charges each device what the simulator holds,
    (V − 1)·g + P chunks when P does not divide M (charging P·V there let the planner pick plans that overflow)."""
    from planner.costmodel import CostOptions, evaluate
    from planner.lowering import plan_to_program
    from planner.plan import plan_from_flags
    from sim.params import SimParams
    from topologies.presets import load_topology

    prof = uniform_profile(P * V, 1e-3, 2e-3, act=0.0, params=0.0, saved=1e6)
    topo = load_topology(f"ideal:{P * R}")
    plan = plan_from_flags("m", P * V, pp=P, dp=R, vp=V, schedule="interleaved-zb", microbatches=M, devices=topo.devices)
    cand = evaluate(plan, prof, topo, CostOptions(optimizer="none"))
    sim = peak_memory(plan_to_program(plan, prof), prof, params=SimParams(optimizer_state_factor=0.0),
                      stage_layers=[s.layers for s in plan.stages])
    assert max(cand.peak_memory_bytes.values()) == pytest.approx(max(sim.values()), rel=1e-9)
