"""Tensor parallelism and recomputation in the plan, the lowering and the checker; planner.recompute's arithmetic."""
from __future__ import annotations

import json

import pytest

from planner.check import ProgramError, check
from planner.lowering import plan_to_program, tensor_expand, worker_devices
from planner.plan import Plan, PlanError, StagePlan, even_plan, plan_from_flags
from planner.profile import Layer, ModelProfile, uniform_profile
from planner.program import Action, Kind, Program
from topologies.presets import load_topology
from planner.recompute import extra_forward_s, kept_bytes, rebuilt_bytes, recompute_mode

FAMILIES = ("gpipe", "1f1b", "pipedream", "2bw", "zb-h1")


def test_a_plan_without_tensor_parallelism_or_recomputation_writes_the_json_it_always_wrote():
    d = even_plan("m", 8, 2, microbatches=4).to_dict()
    assert list(d) == ["model", "stages", "schedule", "microbatch_size", "microbatches", "chunks", "vertical_sync",
                       "batches", "lr", "topology", "predicted"]
    assert d["stages"] == [{"layers": [0, 3], "replicas": 1, "devices": ["d0"]},
                           {"layers": [4, 7], "replicas": 1, "devices": ["d1"]}]


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_a_tensor_parallel_plan_round_trips_through_json(recompute, tmp_path):
    plan = plan_from_flags("m", 8, pp=2, dp=2, tp=4, recompute=recompute, microbatches=4,
                           sequence_parallel=recompute == "selective")
    path = tmp_path / "plan.json"
    plan.save(path)
    back = Plan.load(path)
    assert back == plan and back.tensor_parallel == 4 and back.recompute == recompute
    assert back.sequence_parallel == (recompute == "selective")
    assert json.loads(path.read_text()).get("tensor_parallel") == 4


def test_the_device_grid_is_tensor_rank_fastest_then_replica_then_stage():
    plan = plan_from_flags("m", 8, pp=2, dp=2, tp=2, microbatches=4)
    assert [s.devices for s in plan.stages] == [("d0", "d1", "d2", "d3"), ("d4", "d5", "d6", "d7")]
    assert plan.stages[1].tensor_group(1, 2) == ("d6", "d7")


def test_bad_grids_are_one_line_plan_errors():
    with pytest.raises(PlanError, match="2 replicas x 2 tensor-parallel ranks = 4 devices but names 2 devices"):
        Plan("m", (StagePlan(0, 3, 2, ("a", "b")),), tensor_parallel=2)
    with pytest.raises(PlanError, match="tensor_parallel must be"):
        Plan("m", (StagePlan(0, 3),), tensor_parallel=0)
    with pytest.raises(PlanError, match="sequence parallelism .* needs tensor_parallel >= 2"):
        Plan("m", (StagePlan(0, 3),), sequence_parallel=True)
    with pytest.raises(PlanError, match="recompute mode 'some'"):
        Plan("m", (StagePlan(0, 3),), recompute="some")
    with pytest.raises(PlanError, match="needs 8 devices .* only 4"):
        plan_from_flags("m", 8, pp=2, dp=2, tp=2, devices=["a", "b", "c", "d"])
    with pytest.raises(PlanError, match="--vp 2 .* needs --schedule interleaved"):
        plan_from_flags("m", 8, pp=2, vp=2)
    assert Plan("m", (StagePlan(0, 3),), recompute=True).recompute == "full"  # the old boolean


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_rank_runs_its_replicas_actions_and_talks_to_the_same_rank(family):
    prof = uniform_profile(8, 1e-3, 2e-3, act=100, params=1000)
    T = 3
    base = plan_from_flags("m", 8, pp=2, dp=2, schedule=family, microbatches=4)
    tp = plan_from_flags("m", 8, pp=2, dp=2, tp=T, schedule=family, microbatches=4)
    p1, pt = plan_to_program(base, prof), plan_to_program(tp, prof)
    assert pt.tensor_parallel == T and len(pt.workers) == T * len(p1.workers)
    for w in p1.workers:
        group = pt.tp_group(w * T)
        assert group == tuple(w * T + t for t in range(T))
        for t, wt in enumerate(group):
            assert pt.tp_rank(wt) == t
            for a, b in zip(pt[wt], p1[w], strict=True):
                assert (a.stage, a.kind, a.mb, a.version, a.grad, a.nbytes) == (b.stage, b.kind, b.mb, b.version, b.grad, b.nbytes)
                assert a.peer == (None if b.peer is None else b.peer * T + t)
    for s in range(len(p1.stage_workers)):
        assert pt.replica_workers(s, 1) == tuple(w * T + 1 for w in p1.stage_workers[s])
    devs = worker_devices(tp, pt)
    assert [devs[w] for w in pt.workers] == tp.devices


def test_check_rejects_a_tensor_rank_that_strays_from_its_group():
    prof = uniform_profile(4, 1e-3, 2e-3, act=100)
    prog = plan_to_program(plan_from_flags("m", 4, pp=2, tp=2, microbatches=2), prof)
    acts = {w: list(a) for w, a in prog.actions.items()}
    i = next(i for i, a in enumerate(acts[1]) if a.kind is Kind.SEND)
    a = acts[1][i]
    acts[1][i] = Action(a.stage, a.kind, a.mb, a.version, 2, a.grad, a.nbytes)  # rank 1 sends to rank 0 of the peer
    with pytest.raises(ProgramError, match="TP rank 1 of group \\[0, 1\\] runs 0SEND0a>w2"):
        check(prog.with_actions(acts))
    acts = {w: list(a) for w, a in prog.actions.items()}
    acts[3] = acts[3][:-1]
    with pytest.raises(ProgramError, match="runs .* actions, rank 0"):
        check(prog.with_actions(acts))


def test_a_tensor_rank_slice_is_the_plain_program_relabelled():
    prof = uniform_profile(4, 1e-3, 2e-3, act=100)
    p1 = plan_to_program(plan_from_flags("m", 4, pp=2, dp=2, microbatches=4), prof)
    pt = tensor_expand(p1, 2)
    sl = pt.tp_slice(1)
    assert sl.tensor_parallel == 1 and sl.stage_workers == tuple(tuple(w * 2 + 1 for w in ws) for ws in p1.stage_workers)
    check(sl)
    assert Program.from_json(pt.to_json()).tensor_parallel == 2 and "tensor_parallel" not in p1.to_json()


# --- planner.recompute ------------------------------------------------------------------------
def _profile():
    """Three layers with different inputs, saved bytes and attention cores (bytes per sample)."""
    return ModelProfile("p", (
        Layer("a", 1.0, 2.0, activation_bytes=10, saved_bytes=30, param_bytes=0),
        Layer("b", 2.0, 4.0, activation_bytes=20, saved_bytes=100, param_bytes=0, attention_saved_bytes=60,
              attention_forward_s=0.5),
        Layer("c", 3.0, 6.0, activation_bytes=5, saved_bytes=50, param_bytes=0, attention_saved_bytes=10,
              attention_forward_s=0.25),
    ))


def test_recomputation_modes_keep_and_rebuild_what_the_closed_forms_say():
    p = _profile()
    assert (extra_forward_s(p, 0, 2, "none"), kept_bytes(p, 0, 2, "none"), rebuilt_bytes(p, 0, 2, "none")) == (0.0, 180, 0.0)
    # full: each layer keeps its input (layer 0: its own saved bytes), its backward re-runs its forward and
    # rebuilds its saved bytes less that input, one layer at a time
    assert extra_forward_s(p, 0, 2, "full") == 6.0
    assert kept_bytes(p, 0, 2, "full") == 30 + 10 + 20
    assert rebuilt_bytes(p, 0, 2, "full") == max(0, 100 - 10, 50 - 20)
    assert kept_bytes(p, 1, 2, "full") == 10 + 20
    # selective: the attention cores are dropped and re-run
    assert extra_forward_s(p, 0, 2, "selective") == 0.75
    assert kept_bytes(p, 0, 2, "selective") == 30 + 40 + 40
    assert rebuilt_bytes(p, 0, 2, "selective") == 60
    assert recompute_mode(True) == "full" and recompute_mode(False) == "none"


def test_a_profile_without_attention_cores_recomputes_nothing_selectively():
    p = uniform_profile(4, 1e-3, 2e-3, act=7, saved=9)
    assert (extra_forward_s(p, 0, 3, "selective"), kept_bytes(p, 0, 3, "selective"), rebuilt_bytes(p, 0, 3, "selective")) \
        == (0.0, kept_bytes(p, 0, 3, "none"), 0.0)


def test_attention_fields_survive_json_and_old_profiles_write_unchanged():
    p = _profile()
    assert ModelProfile.from_dict(p.to_dict()) == p
    assert "attention_saved_bytes" not in p.to_dict()["layers"][0]
    assert p.scaled(4).layers[1].attention_forward_s == 2.0


# --- the simulator ------------------------------------------------------------------------------
def _tp_profile(T, layers=1, fwd=1.0, bwd=2.0, tp_bytes=4e6, act=0.0, params=0.0, attn_s=0.0, attn_bytes=0.0):
    """Per-TP-rank layers like a Megatron block: 2 TP all-reduces in forward and 2 in backward."""
    layer = Layer("block", fwd, bwd, act, act, params, tp_allreduce_bytes=tp_bytes, tp_forward_allreduces=2,
                  tp_backward_allreduces=2, attention_saved_bytes=attn_bytes, attention_forward_s=attn_s)
    return ModelProfile("tp", (layer,) * layers, tensor_parallel=T)


def _ring_s(n, nbytes, bw=1e9, hop_latency=1e-6):
    """Ring all-reduce on a star: 2(n − 1) phases, each a device → switch → device hop pair and S/n bytes."""
    return 2 * (n - 1) * (2 * hop_latency + nbytes / n / bw)


def _compute_events(trace):
    return [e for e in trace.events if isinstance(e.lane, int) and e.is_compute]


@pytest.mark.parametrize("T", [2, 3, 4, 8])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("tp_ring", ["fused", "phases"])
def test_tp_all_reduces_inside_compute_cost_the_ring_closed_form(T, recompute, tp_ring):
    from sim import SimParams, simulate_plan
    from tests.test_sim import star

    S = 4e6
    prof = _tp_profile(T, attn_s=0.25, attn_bytes=10.0)
    topo = star(T, bandwidth=1e9, latency=1e-6)
    plan = plan_from_flags("m", 1, pp=1, tp=T, microbatches=2, recompute=recompute, devices=topo.devices)
    trace = simulate_plan(plan, prof, topo, SimParams(tp_ring=tp_ring))
    ar = _ring_s(T, S)
    redo = {"none": 0.0, "selective": 0.25, "full": 1.0 + 2 * ar}  # full re-runs the forward with its all-reduces
    events = _compute_events(trace)
    assert len(events) == 2 * 2 * T
    for e in events:
        want = 1.0 + 2 * ar if e.kind == "F" else 2.0 + 2 * ar + redo[recompute]
        assert e.duration_s == pytest.approx(want, rel=1e-9), e
    assert trace.meta["tensor_parallel"] == T
    # the flows are on the links: each device sends 2(T − 1)/T · S per all-reduce, 4 + (2 under full) per microbatch
    n_ar = 2 * (4 + (2 if recompute == "full" else 0))
    from sim import bytes_per_link

    assert bytes_per_link(trace)["d0->sw"] == pytest.approx(n_ar * 2 * (T - 1) / T * S)


@pytest.mark.parametrize("T", [2, 4])
@pytest.mark.parametrize("tp_ring", ["fused", "phases"])
def test_all_gathers_reduce_scatters_and_small_all_reduces_cost_their_own_ring_in_sim_and_cost_model(T, tp_ring):
    """A layer issuing Megatron's sequence-parallel mix: forward all-gather + reduce-scatter of S bytes and three
    small (4 kB) all-reduces, backward all-gather + all-gather + reduce-scatter. By hand, on a star (each ring step
    a device → switch → device hop pair): an all-gather or reduce-scatter takes (n − 1) steps of S/n bytes, an
    all-reduce 2(n − 1). The simulator's compute events and the cost model's TP seconds both equal it."""
    from planner.costmodel import tp_collective_s
    from planner.tpcollectives import TPCollective
    from sim import SimParams, bytes_per_link, simulate_plan
    from tests.test_sim import star

    S, small = 4e6, 4e3
    AG, RS, AR = "all-gather", "reduce-scatter", "all-reduce"
    cols = ((TPCollective("forward", AG, S, 1), TPCollective("forward", RS, S, 1))
            + tuple(TPCollective("forward", AR, small, 1) for _ in range(3))
            + tuple(TPCollective("backward", k, S, 1) for k in (AG, AG, RS)))
    prof = ModelProfile("tp", (Layer("block", 1.0, 2.0, 0.0, 0.0, 0.0, tp_collectives=cols),), tensor_parallel=T)
    topo = star(T, bandwidth=1e9, latency=1e-6)
    step = lambda nbytes: 2e-6 + nbytes / T / 1e9
    half, whole = (T - 1) * step(S), 2 * (T - 1) * step(small)
    want = {"F": 1.0 + 2 * half + 3 * whole, "B": 2.0 + 3 * half}
    plan = plan_from_flags("m", 1, pp=1, tp=T, microbatches=2, devices=topo.devices)
    trace = simulate_plan(plan, prof, topo, SimParams(tp_ring=tp_ring))
    events = _compute_events(trace)
    assert len(events) == 2 * 2 * T
    for e in events:
        assert e.duration_s == pytest.approx(want[e.kind], rel=1e-9), e
    group = tuple(topo.devices[:T])
    assert tp_collective_s(prof, 0, 0, "none", topo, group, 1) == pytest.approx(want["F"] + want["B"] - 3.0, rel=1e-12)
    # on the links: per microbatch 5 ring passes of S and 3 all-reduces of 4 kB, (T − 1)/T of each pass per device
    assert bytes_per_link(trace)["d0->sw"] == pytest.approx(2 * (T - 1) / T * (5 * S + 3 * 2 * small))


def test_data_parallel_all_reduce_runs_among_the_replicas_of_one_tp_rank():
    from sim import simulate_plan
    from tests.test_sim import star

    P_BYTES = 8e6
    prof = _tp_profile(2, tp_bytes=0.0, params=P_BYTES)
    topo = star(4, bandwidth=1e9, latency=1e-6)
    plan = plan_from_flags("m", 1, pp=1, dp=2, tp=2, microbatches=2, devices=topo.devices)
    trace = simulate_plan(plan, prof, topo)
    ar = [e for e in trace.events if e.kind == "ALLREDUCE"]
    assert sorted(e.lane for e in ar) == [0, 1, 2, 3]
    for e in ar:  # two concurrent rings of 2 (w0-w2, w1-w3) on disjoint links: each the closed form
        assert e.duration_s == pytest.approx(_ring_s(2, P_BYTES), rel=1e-9)


def test_tp_all_reduces_contend_with_pipeline_sends_on_shared_links():
    from sim import simulate_plan
    from tests.test_sim import star

    T, S = 2, 4e6
    topo = star(4, bandwidth=1e9, latency=1e-6)
    durations = {}
    for act in (0.0, 400e6):  # stage 1's device links carry the next microbatch's activation (0.4 s) while it computes
        prof = _tp_profile(T, layers=2, fwd=0.1, bwd=0.2, tp_bytes=S, act=act)
        plan = plan_from_flags("m", 2, pp=2, tp=T, microbatches=4, devices=topo.devices)
        trace = simulate_plan(plan, prof, topo)
        durations[act] = max(e.duration_s for e in _compute_events(trace) if e.lane == 2 and e.kind == "F")
    assert durations[0.0] == pytest.approx(0.1 + 2 * _ring_s(T, S), rel=1e-9)
    assert durations[400e6] > durations[0.0] * 1.01


def test_a_profile_for_another_tp_degree_is_refused():
    from sim import SimError, simulate_plan

    plan = plan_from_flags("m", 1, pp=1, tp=2, microbatches=1)
    with pytest.raises(SimError, match="tensor parallelism 2 but the profile 'tp' is per rank of tensor parallelism 4"):
        simulate_plan(plan, _tp_profile(4), load_topology("ideal:2"))


def test_recomputation_changes_simulated_memory_as_planner_recompute_says():
    from sim import simulate_plan

    # 4 layers, each keeps 100 bytes and rebuilds 60 under selective; its input (activation of the previous layer) is 10
    layer = Layer("l", 1.0, 2.0, 10.0, 100.0, 0.0, attention_saved_bytes=60.0, attention_forward_s=0.5)
    prof = ModelProfile("m", (layer,) * 4)
    topo = load_topology("ideal:1")
    peaks = {}
    for mode in ("none", "selective", "full"):
        plan = plan_from_flags("m", 4, pp=1, microbatches=3, schedule="gpipe", recompute=mode, devices=topo.devices)
        peaks[mode] = max(m.nbytes for m in simulate_plan(plan, prof, topo).memory)
    # GPipe on one device: 3 microbatches in flight, then one layer's rebuild during a backward
    assert peaks == {"none": 3 * 400, "selective": 3 * 4 * 40 + 60, "full": 3 * (100 + 3 * 10) + (100 - 10)}


# --- plan, whatif and simulate cost a recomputed plan the same -------------------------------------
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
@pytest.mark.parametrize("recompute", [True, "selective"])
def test_plan_whatif_and_simulate_cost_a_recomputed_plan_the_same(recompute, schedule, tmp_path):
    """The functions behind `pipetwin plan` (planner.search.plan_model), `pipetwin whatif` (whatif.plan_point,
    then the simulator on its plan) and `pipetwin simulate` (sim.simulate_plan) on one recomputed plan.

    Layers send no activations (no receive buffers or stage outputs, which only the simulator counts), so the
    cost model's closed forms are exact here: time t·(M + (P − 1)·f) with t the stage's forward, backward and
    what recomputation adds (1F1B: f = 1, the re-run forward in the B; ZB-H1: f = F/t, a checkpoint's forward and
    backward in the BI and again in the BW, selective's core in both); memory weights, gradients, momentum and
    what planner.recompute keeps and rebuilds."""
    from planner.costmodel import OPTIMIZER_STATE
    from planner.search import plan_model
    from planner.trace import peak_memory_bytes, time_per_batch_s
    from sim import SimParams, simulate_plan
    from whatif.points import SweepPoint, plan_point, point_cluster, point_profile

    layer = Layer("l", 1e-3, 2e-3, 0.0, 5e8, 1e9, attention_saved_bytes=3e8, attention_forward_s=4e-4)
    path = tmp_path / "model.json"
    ModelProfile("m", (layer,) * 8).save(path)
    point = SweepPoint(str(path), 4, "a100-80gb", "ideal", schedule=schedule, global_batch=16, optimizer="sgd",
                       recompute=recompute)
    profile, topo = point_profile(point.model, point.device_kind), point_cluster("ideal", 4, "a100-80gb")
    planned = plan_model(profile, topo, schedule=schedule, global_batch=16, recompute=recompute, optimizer="sgd")
    best = planned.best_candidate
    plan = best.plan
    assert plan.recompute == ("full" if recompute is True else "selective")
    trace = simulate_plan(plan, profile, topo, SimParams(optimizer_state_factor=OPTIMIZER_STATE["sgd"]))
    sim_peak = max(peak_memory_bytes(trace).values())
    assert time_per_batch_s(trace) == pytest.approx(best.time_per_batch_s, rel=1e-9)
    assert sim_peak == pytest.approx(max(best.peak_memory_bytes.values()), rel=1e-9)
    # whatif's own planning of the point (either mode, as `whatif --recompute [MODE]` passes it)
    rec = plan_point(point)
    assert Plan.from_dict(rec.plan) == plan
    assert rec.throughput_samples_per_s == pytest.approx(best.throughput_samples_per_s, rel=1e-9)
    assert rec.peak_memory_bytes == pytest.approx(sim_peak, rel=1e-9)
    # the planner's choice there is data parallel; a pipeline (plan --stages 4) is costed the same way too
    piped = plan_model(profile, topo, schedule=schedule, global_batch=16, recompute=recompute, optimizer="sgd",
                       stages=4).best_candidate
    assert piped.plan.pipeline_depth == 4 and piped.plan.recompute == plan.recompute
    assert piped.plan.schedule == schedule
    trace = simulate_plan(piped.plan, profile, topo, SimParams(optimizer_state_factor=OPTIMIZER_STATE["sgd"]))
    assert time_per_batch_s(trace) == pytest.approx(piped.time_per_batch_s, rel=1e-9)
    assert max(peak_memory_bytes(trace).values()) == pytest.approx(max(piped.peak_memory_bytes.values()), rel=1e-9)


def test_full_recomputation_leaves_layers_that_are_not_recomputable_alone():
    """Megatron checkpoints the blocks; the embedding and the head keep their activations (planner.analytic)."""
    from dataclasses import replace

    p = _profile()
    q = replace(p, layers=(replace(p.layers[0], recomputable=False),) + p.layers[1:])
    assert extra_forward_s(q, 0, 2, "full") == 5.0
    assert kept_bytes(q, 0, 2, "full") == 30 + 10 + 20
    assert kept_bytes(q, 0, 0, "full") == 30 and rebuilt_bytes(q, 0, 0, "full") == 0.0
    assert ModelProfile.from_dict(q.to_dict()) == q and "recomputable" not in p.to_dict()["layers"][0]
    from planner.analytic import load_model

    gpt = load_model("gpt3-125m")
    assert [l.recomputable for l in (gpt.layers[0], gpt.layers[1], gpt.layers[-1])] == [False, True, False]


# --- interleaved 1F1B with replicas --------------------------------------------------------------
@pytest.mark.parametrize("P,V,R,M", [(2, 2, 2, 8), (4, 2, 2, 16), (2, 3, 3, 12)])
def test_interleaved_replicas_each_run_the_unreplicated_schedule_on_their_own_microbatches(P, V, R, M):
    from planner.schedules import generate, make_spec

    one = generate(make_spec("interleaved", P, M // R, chunks=V))
    rep = generate(make_spec("interleaved", P, M, replicas=(R,) * (P * V), chunks=V))
    for d in range(P):
        for r in range(R):
            got = [(a.stage, a.kind, a.mb) for a in rep[d * R + r] if a.is_compute]
            want = [(a.stage, a.kind, a.mb * R + r) for a in one[d] if a.is_compute]
            assert got == want
            assert sum(a.kind is Kind.ALLREDUCE for a in rep[d * R + r]) == V  # one per chunk per batch


def test_interleaved_with_replicas_and_tp_simulates_as_its_replica_pipeline_alone():
    from dataclasses import replace

    from planner.trace import time_per_batch_s
    from sim import simulate_plan

    prof = uniform_profile(8, 1e-3, 2e-3)
    topo = load_topology("ideal:8")
    one = plan_from_flags("m", 8, pp=2, vp=2, schedule="interleaved", microbatches=4, devices=topo.devices)
    grid = plan_from_flags("m", 8, pp=2, dp=2, tp=2, vp=2, schedule="interleaved", microbatches=8, devices=topo.devices)
    assert time_per_batch_s(simulate_plan(grid, replace(prof, tensor_parallel=2), topo)) == \
        pytest.approx(time_per_batch_s(simulate_plan(one, prof, topo)), rel=1e-12)


def test_interleaved_refuses_uneven_replicas_in_one_line():
    from planner.schedules import ScheduleError, generate, make_spec

    with pytest.raises(ScheduleError, match="same replica count"):
        generate(make_spec("interleaved", 2, 8, replicas=(2, 1, 2, 1), chunks=2))
    # interleaved takes any M now (h3): 6 microbatches over 2 replicas of a 2-deep pipeline run, 3 per replica
    prog = generate(make_spec("interleaved", 2, 6, replicas=(2,) * 4, chunks=2))
    assert sorted(a.mb for a in prog[1] if a.kind is Kind.F and a.stage == 0) == [1, 3, 5]


@pytest.mark.parametrize("recompute", ["none", "full"])
def test_the_cost_model_prices_tp_all_reduces_as_the_simulator_runs_them(recompute):
    """Two stages of two TP ranks on a star, no activations crossing: each stage's TP rings use their own
    device links, so the simulator is the cost model's closed form t·(M + P − 1), t with the rings in it."""
    from planner.costmodel import CostOptions, evaluate
    from planner.trace import peak_memory_bytes, time_per_batch_s
    from sim import SimParams, simulate_plan
    from tests.test_sim import star

    prof = _tp_profile(2, layers=4, fwd=1e-3, bwd=2e-3, tp_bytes=4e6, params=1e6)
    topo = star(4, bandwidth=1e9, latency=1e-6)
    plan = plan_from_flags("m", 4, pp=2, tp=2, microbatches=6, recompute=recompute, devices=topo.devices)
    cand = evaluate(plan, prof, topo, CostOptions(optimizer="none", link_load=False))
    trace = simulate_plan(plan, prof, topo, SimParams(optimizer_state_factor=0.0))
    # the pipeline's (empty) messages still pay their 2 us route latency on the fill and drain, which the
    # cost model's bubble leaves out: 12 us of 266 ms
    assert time_per_batch_s(trace) == pytest.approx(cand.time_per_batch_s, abs=12.5e-6)
    ar = _ring_s(2, 4e6)
    per_stage = 2 * (3e-3 + 4 * ar) + (2 * (1e-3 + 2 * ar) if recompute == "full" else 0.0)  # 2 layers
    assert cand.time_per_batch_s == pytest.approx(per_stage * (6 + 1), rel=1e-9)
    assert max(peak_memory_bytes(trace).values()) == pytest.approx(max(cand.peak_memory_bytes.values()), rel=1e-9)


def test_tp_all_reduces_on_free_links_cost_nothing_and_every_rank_goes_on():
    from planner.trace import time_per_batch_s
    from sim import simulate_plan

    topo = load_topology("ideal:8")
    plan = plan_from_flags("m", 2, pp=2, dp=2, tp=2, microbatches=4, devices=topo.devices)
    trace = simulate_plan(plan, _tp_profile(2, layers=2), topo)
    assert time_per_batch_s(trace) == pytest.approx((4 // 2 + 1) * 3.0)  # 1F1B of 2 microbatches per replica


def test_plan_model_costs_a_fixed_grid_for_every_family_the_schedule_takes():
    from planner.analytic import load_model
    from planner.costmodel import CostOptions, evaluate
    from planner.search import plan_model

    prof = load_model("gpt:layers=4,hidden=64,heads=8,seq=32,vocab=128", tensor_parallel=2)
    topo = load_topology("dgx:servers=2,gpus=4")
    res = plan_model(prof, topo, grid=(2, 2, 2, 1), microbatches=4, recompute="full", optimizer="adam", top_k=10)
    fams = {c.plan.schedule for c in res.candidates}
    assert fams == {"gpipe", "1f1b", "pipedream", "2bw", "zb-h1", "zb-h2"}  # the one-stage-per-device families
    for c in res.candidates:
        want = plan_from_flags(prof.name, len(prof), pp=2, dp=2, tp=2, schedule=c.plan.schedule, microbatches=4,
                               recompute="full", devices=topo.devices)
        assert c.plan.stages == want.stages and c.plan.tensor_parallel == 2 and c.plan.recompute == "full"
        assert c.time_per_batch_s == evaluate(want, prof, topo, CostOptions(recompute="full", optimizer="adam")).time_per_batch_s
    inter = plan_model(prof, topo, grid=(2, 2, 2, 2), microbatches=4, schedule="auto")
    assert {c.plan.schedule for c in inter.candidates} == {"interleaved", "interleaved-zb", "looped-bfs"}  # the loops
    assert inter.best.chunks == 2
    with pytest.raises(PlanError, match="no schedule of interleaved runs --tp 2 --pp 2 --dp 2 --vp 2"):
        plan_model(prof, topo, grid=(2, 2, 2, 2), microbatches=1, schedule="interleaved")  # 2 replicas, 1 microbatch (any M >= replicas runs since h3)
    # the line says why each schedule turned the grid down: the loop at one chunk per device, the V at four
    with pytest.raises(PlanError, match=r"microbatch counts \[4\]: interleaved runs --vp 2 or more \(chunks per device\), not --vp 1$"):
        plan_model(prof, topo, grid=(2, 2, 2, 1), microbatches=4, schedule="interleaved")
    with pytest.raises(PlanError, match=r"zb-v runs --vp 2 \(chunks per device\), not --vp 4"):
        plan_model(prof, topo, grid=(2, 2, 1, 4), microbatches=4, schedule="zb-v")
    with pytest.raises(PlanError, match="per rank of 1"):
        plan_model(load_model("gpt:layers=4,hidden=64,heads=8,seq=32,vocab=128"), topo, grid=(2, 2, 2, 1))


def test_throughput_counts_each_microbatch_once_whatever_the_tp_degree():
    from planner.trace import summary
    from sim import simulate_plan

    topo = load_topology("ideal:8")
    base = summary(simulate_plan(plan_from_flags("m", 2, pp=2, dp=1, microbatches=4, devices=topo.devices),
                                 _tp_profile(1, layers=2, tp_bytes=0.0), topo))
    tp = summary(simulate_plan(plan_from_flags("m", 2, pp=2, tp=4, microbatches=4, devices=topo.devices),
                               _tp_profile(4, layers=2, tp_bytes=0.0), topo))
    assert tp["throughput_samples_per_s"] == base["throughput_samples_per_s"] == pytest.approx(4 / ((4 + 1) * 3.0))


def test_missing_degrees_are_filled_from_the_device_count():
    from planner.plan import fill_degrees

    assert fill_degrees(64, tp=8) == (8, 8, 1, 1)
    assert fill_degrees(64, tp=8, pp=2) == (8, 2, 4, 1)
    assert fill_degrees(64, tp=8, dp=2, vp=3) == (8, 4, 2, 3)
    assert fill_degrees(None, pp=2) == (1, 2, 1, 1)
    with pytest.raises(PlanError, match="--tp 3 x --pp \\? x --dp 1 does not make 64 devices"):
        fill_degrees(64, tp=3)


@pytest.mark.parametrize("family", ["gpipe", "1f1b", "zb-h1"])
def test_a_replicated_pipeline_pays_its_fill_and_drain_once_per_replica_in_the_cost_model_as_simulated(family):
    """Each of r replicas runs M/r microbatches through a P-stage pipeline: (M/r + (P − 1)·f) stage times."""
    from planner.costmodel import CostOptions, evaluate
    from planner.trace import time_per_batch_s
    from sim import simulate_plan

    prof = uniform_profile(8, 1e-3, 2e-3)
    topo = load_topology("ideal:8")
    for dp in (1, 2, 4):
        plan = plan_from_flags("m", 8, pp=2, dp=dp, schedule=family, microbatches=16, devices=topo.devices)
        cand = evaluate(plan, prof, topo, CostOptions(link_load=False))
        assert cand.time_per_batch_s == pytest.approx(time_per_batch_s(simulate_plan(plan, prof, topo)), rel=1e-9)


def test_tensor_parallel_ranks_and_replicas_are_folded_and_the_makespan_is_the_full_runs():
    from planner.trace import makespan_s
    from sim import SimParams, simulate_plan

    topo = load_topology("ideal:8")
    plan = plan_from_flags("m", 2, pp=2, dp=2, tp=2, microbatches=4, devices=topo.devices)
    folded = simulate_plan(plan, _tp_profile(2, layers=2), topo)
    full = simulate_plan(plan, _tp_profile(2, layers=2), topo, SimParams(use_symmetry=False))
    assert folded.meta["symmetry"] == {"used": True, "replicas": 4, "folded": True, "tp_folded": True,
                                       "replicas_simulated_per_stage": 1}
    assert folded.meta["workers_simulated"] == 2 and full.meta["workers_simulated"] == 8
    assert makespan_s(folded) == makespan_s(full)
def test_whatif_sweeps_a_fixed_grid_filling_the_missing_degree_per_device_count():
    from planner.analytic import load_model
    from planner.search import plan_model
    from whatif.points import SweepConfig, plan_point, point_cluster

    model = "gpt:layers=4,hidden=64,heads=8,seq=32,vocab=128"
    cfg = SweepConfig(model, devices=(8, 16), interconnects=("dgx-ib200",), schedules=("1f1b",), global_batch=16,
                      grid=(2, 2, None, None))
    points = cfg.points()
    assert [p.grid for p in points] == [(2, 2, 2, 1), (2, 2, 4, 1)]
    rec = plan_point(points[1])
    topo = point_cluster("dgx-ib200", 16, "a100-80gb")
    want = plan_model(load_model(model, "a100-80gb", tensor_parallel=2), topo, schedule="1f1b", global_batch=16,
                      optimizer="adam", grid=(2, 2, 4, 1)).best_candidate
    assert Plan.from_dict(rec.plan).stages == want.plan.stages and rec.throughput_samples_per_s == want.throughput_samples_per_s
    with pytest.raises(PlanError, match="does not make 8 devices"):
        SweepConfig(model, devices=(8,), grid=(3, None, None, None)).points()


def test_plan_and_whatif_take_the_same_grid_flags_as_simulate(capsys, tmp_path):
    from pipetwin.cli import main

    model = "gpt:layers=4,hidden=64,heads=8,seq=32,vocab=128"
    out = tmp_path / "plan.json"
    assert main(["plan", "--model", model, "--topology", "dgx:servers=2,gpus=4", "--tp", "2", "--pp", "2",
                 "--microbatches", "4", "--schedule", "1f1b", "--recompute", "selective", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    plan = Plan.load(out)
    assert (plan.tensor_parallel, plan.pipeline_depth, plan.replicas, plan.recompute) == (2, 2, (2, 2), "selective")
    from planner.analytic import load_model
    from planner.costmodel import CostOptions, evaluate
    from topologies.presets import load_topology as _load

    want = evaluate(plan, load_model(model, tensor_parallel=2), _load("dgx:servers=2,gpus=4"),
                    CostOptions(recompute="selective"))
    assert doc["predicted"]["time_per_batch_s"] == pytest.approx(want.time_per_batch_s, rel=1e-12)
    assert main(["whatif", "--model", model, "--devices", "8", "--tp", "2", "--pp", "2", "--global-batch", "4",
                 "--schedules", "1f1b", "--simulate", "none", "--jobs", "1", "--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["points"][0]
    assert rec["plan"]["tensor_parallel"] == 2 and [s["replicas"] for s in rec["plan"]["stages"]] == [2, 2]
    for argv in (["plan", "--model", model, "--topology", "ideal:8", "--tp", "3"],
                 ["whatif", "--model", model, "--devices", "8", "--tp", "3", "--jobs", "1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "does not make 8 devices" in err, err


def test_whatif_takes_every_recomputation_mode_plan_takes(capsys):
    """`whatif --recompute selective` plans and simulates selective recomputation (it was full or nothing):
    the chosen plan records the mode, and selective keeps less than none and re-runs less than full."""
    from pipetwin.cli import main

    base = ["whatif", "--model", "gpt3-1.3b", "--devices", "8", "--global-batch", "16", "--schedules", "1f1b",
            "--pp", "8", "--dp", "1", "--tp", "1", "--simulate", "all", "--jobs", "1", "--no-progress", "--json"]
    recs = {}
    for mode in ("none", "selective", "full"):
        assert main(base + ["--recompute", mode]) == 0
        (rec,) = json.loads(capsys.readouterr().out)["points"]
        assert rec["plan"].get("recompute", "none") == mode
        recs[mode] = rec
    mem = {m: r["peak_memory_bytes"] for m, r in recs.items()}
    thr = {m: r["throughput_samples_per_s"] for m, r in recs.items()}
    assert mem["full"] < mem["selective"] < mem["none"] and thr["full"] < thr["selective"] < thr["none"]
    with pytest.raises(SystemExit) as bad:  # argparse's one line, exit 2
        main(base[:-1] + ["--recompute", "some"])
    assert bad.value.code == 2 and "invalid choice: 'some'" in capsys.readouterr().err
