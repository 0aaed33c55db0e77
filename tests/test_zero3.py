"""ZeRO-3 (FSDP full shard) timed in the simulator and the cost model, against hand-computed closed forms.

Truth here is written out by hand: a ring all-gather or reduce-scatter of an S-byte tensor over D ranks on a
star of links of bandwidth BW and per-hop latency LAT takes (D − 1)/D·S/BW + (D − 1)·2·LAT (every ring step
crosses two hops); a unit's gathered tensor is its 16-bit weights, half a profile's 4-byte parameter count.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from planner.costmodel import CostOptions, evaluate
from planner.plan import Plan, PlanError, plan_from_flags
from planner.profile import Layer, ModelProfile, uniform_profile
from planner.sharding import fsdp_pass_s, ring_bytes_per_rank, ring_time_s
from planner.trace import makespan_s, peak_memory_bytes, time_per_batch_s
from sim import SimParams, simulate_plan
from topologies.presets import load_topology

BW, LAT = 1e9, 1e-5
PARAM_BYTES = 4e6           # per layer: 1e6 parameters at the profile's 4 bytes
GATHERED = 2e6              # their 16-bit weights (or gradients): what one collective moves


def _star(D: int):
    return load_topology(f"hier:{D}@ideal:{BW:g}:{LAT:g}")


def _ring_s(D: int, nbytes: float = GATHERED) -> float:
    """One ring all-gather or reduce-scatter on the star, by hand."""
    return (D - 1) / D * nbytes / BW + (D - 1) * 2 * LAT


def _dp_plan(topo, L: int, D: int, M: int, schedule: str = "1f1b", pp: int = 1) -> Plan:
    plan = plan_from_flags("m", L, pp=pp, dp=D, schedule=schedule, microbatches=M, devices=topo.devices)
    return replace(plan, zero_stage=3)


def _events(trace, kind: str):
    return [e for e in trace.events if e.lane == 0 and e.kind == kind]


# --- the collectives: ring closed forms -------------------------------------------------------------
@pytest.mark.parametrize("D", [2, 4, 8])
def test_a_simulated_gather_and_reduce_scatter_take_the_ring_closed_form(D):
    """One layer without compute, one DP group, one microbatch per rank: the forward is one all-gather, the
    backward an all-gather and a reduce-scatter, one after the other (one communicator)."""
    topo = _star(D)
    prof = uniform_profile(1, 0.0, 0.0, params=PARAM_BYTES)
    trace = simulate_plan(_dp_plan(topo, 1, D, D), prof, topo)
    (f,), (b,) = _events(trace, "F"), _events(trace, "B")
    assert f.end_s - f.start_s == pytest.approx(_ring_s(D), rel=1e-12)
    assert b.end_s - b.start_s == pytest.approx(2 * _ring_s(D), rel=1e-12)
    # planner.sharding's own closed form says the same
    assert _ring_s(D) == pytest.approx(ring_time_s(ring_bytes_per_rank(GATHERED, D), BW, D, 2 * LAT), rel=1e-12)


@pytest.mark.parametrize("zero", [1, 2])
def test_zero_1_and_2_reduce_scatter_then_all_gather_the_16_bit_tensors(zero):
    """The all-reduce point becomes two ring passes of half the profile's bytes; stage 0 keeps its all-reduce."""
    D, L = 4, 3
    topo = _star(D)
    prof = uniform_profile(L, 1e-3, 2e-3, params=PARAM_BYTES)
    plan = replace(_dp_plan(topo, L, D, D), zero_stage=zero)
    (ar,) = _events(simulate_plan(plan, prof, topo), "ALLREDUCE")
    assert ar.end_s - ar.start_s == pytest.approx(2 * _ring_s(D, L * GATHERED), rel=1e-12)
    (ar0,) = _events(simulate_plan(replace(plan, zero_stage=0), prof, topo, SimParams(allreduce="ring")), "ALLREDUCE")
    assert ar0.end_s - ar0.start_s == pytest.approx(2 * _ring_s(D, L * PARAM_BYTES), rel=1e-12)
    cand = evaluate(plan, prof, topo)
    assert cand.stages[0].allreduce_s * plan.microbatches == pytest.approx(2 * _ring_s(D, L * GATHERED), rel=1e-12)


# --- whole iterations: hand closed forms -------------------------------------------------------------
@pytest.mark.parametrize("schedule,k", [("1f1b", 1), ("gpipe", 2), ("1f1b", 3)])
def test_without_overlap_an_fsdp_iteration_is_compute_plus_two_gathers_and_a_scatter_per_unit(schedule, k):
    """PP = 1, D replicas, k microbatches each: every unit of every microbatch gathers before its forward and
    its backward and reduce-scatters after its backward, nothing overlapped."""
    D, L, f, b = 4, 3, 1e-3, 2e-3
    topo = _star(D)
    prof = uniform_profile(L, f, b, params=PARAM_BYTES)
    plan = _dp_plan(topo, L, D, k * D, schedule)
    want = k * L * (f + b + 2 * _ring_s(D) + _ring_s(D))
    trace = simulate_plan(plan, prof, topo, SimParams(fsdp_overlap=False))
    assert makespan_s(trace) == pytest.approx(want, rel=1e-12)
    assert evaluate(plan, prof, topo, CostOptions(fsdp_overlap=False)).time_per_batch_s == pytest.approx(want, rel=1e-12)


def test_with_prefetch_only_the_first_gather_of_a_pass_and_the_last_scatter_are_exposed():
    """Compute longer than two collectives: the next unit's gather runs under the current unit's compute, a
    reduce-scatter under the next unit's; what shows is the first gather of each pass and the last scatter."""
    D, L, f, b = 4, 5, 4e-3, 8e-3
    g = _ring_s(D)
    assert f > g and b > 2 * g  # the regime the closed form is for (a backward's window carries a scatter and a gather)
    topo = _star(D)
    prof = uniform_profile(L, f, b, params=PARAM_BYTES)
    want = (g + L * f) + (g + L * b + g)
    assert fsdp_pass_s([f] * L, [g] * L, [0.0] * L) + fsdp_pass_s([b] * L, [g] * L, [g] * L) == pytest.approx(want)
    plan = _dp_plan(topo, L, D, 2 * D)
    assert makespan_s(simulate_plan(plan, prof, topo)) == pytest.approx(2 * want, rel=1e-12)
    assert evaluate(plan, prof, topo).time_per_batch_s == pytest.approx(2 * want, rel=1e-12)


def test_with_slow_links_the_passes_are_bound_by_the_one_communicator():
    """Collectives longer than compute: the communicator is busy end to end, 2 gathers and 1 scatter per unit
    back to back, plus the compute of the last unit of the forward (nothing left to overlap it with)."""
    D, L, f, b = 4, 4, 1e-5, 2e-5
    g = _ring_s(D)
    topo = _star(D)
    prof = uniform_profile(L, f, b, params=PARAM_BYTES)
    want = (L * g + f) + (L * g + L * g)  # forward: gathers + last compute; backward: every gather and scatter
    trace = simulate_plan(_dp_plan(topo, L, D, D), prof, topo)
    assert makespan_s(trace) == pytest.approx(want, rel=1e-9)


def test_a_unit_without_parameters_gathers_nothing():
    D = 4
    topo = _star(D)
    layers = (Layer("w", 1e-3, 2e-3, 0.0, 0.0, PARAM_BYTES), Layer("act", 1e-3, 2e-3, 0.0, 0.0, 0.0))
    prof = ModelProfile("m", layers)
    trace = simulate_plan(_dp_plan(topo, 2, D, D), prof, topo, SimParams(fsdp_overlap=False))
    assert makespan_s(trace) == pytest.approx(2 * 3e-3 + 3 * _ring_s(D), rel=1e-12)


# --- memory ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlap,units", [(True, 3), (False, 2)])
def test_memory_is_the_shard_plus_the_gathered_units_in_flight(overlap, units):
    """No activations: a device holds its training state over D (SGD: 2 + 2 + 4 + 4, as the sharded state
    counts a profile's 4-byte parameter with momentum: 12 bytes), plus in a backward the unit computing, the one prefetched
    and the unit's unsharded gradient (without prefetch: the unit and its gradient)."""
    D, L = 4, 3
    topo = _star(D)
    prof = uniform_profile(L, 1e-3, 2e-3, params=PARAM_BYTES)
    plan = _dp_plan(topo, L, D, D)
    shard = L * 1e6 * (2 + 2 + 4 + 4) / D  # 16-bit weight and gradient, fp32 master copy and momentum, over D
    want = shard + units * GATHERED
    sim = max(peak_memory_bytes(simulate_plan(plan, prof, topo, SimParams(fsdp_overlap=overlap))).values())
    model = max(evaluate(plan, prof, topo, CostOptions(fsdp_overlap=overlap)).peak_memory_bytes.values())
    assert sim == pytest.approx(want, rel=1e-12) and model == pytest.approx(want, rel=1e-12)


# --- plan, whatif and simulate cost a ZeRO-3 plan the same ------------------------------------------------
@pytest.mark.parametrize("recompute", [False, True])
def test_plan_whatif_and_simulate_cost_a_zero_3_plan_the_same(recompute, tmp_path):
    """`pipetwin plan --zero 3` (planner.search.plan_model), `whatif --zero 3` (whatif.plan_point, then the
    simulator on its plan) and `simulate` (sim.simulate_plan) on one FSDP plan on an NVSwitch server, whose
    gathers are comparable to the compute (partly hidden by prefetch). Layers send no activations, so the cost
    model's figures are exact (as in tests/test_tensor_parallel.py's agreement test)."""
    from planner.costmodel import OPTIMIZER_STATE
    from planner.search import plan_model
    from whatif.points import SweepPoint, plan_point, point_cluster, point_profile

    layer = Layer("l", 1e-3, 2e-3, 0.0, 5e8, 1e9, attention_saved_bytes=3e8, attention_forward_s=4e-4)
    path = tmp_path / "model.json"
    ModelProfile("m", (layer,) * 8).save(path)
    grid = (1, 1, 4, 1)
    point = SweepPoint(str(path), 4, "a100-80gb", "dgx-ib200", schedule="1f1b", global_batch=8, optimizer="sgd",
                       recompute=recompute, grid=grid, zero_stage=3)
    profile, topo = point_profile(point.model, point.device_kind), point_cluster("dgx-ib200", 4, "a100-80gb")
    best = plan_model(profile, topo, schedule="1f1b", global_batch=8, recompute=recompute, optimizer="sgd", grid=grid,
                      zero_stage=3).best_candidate
    plan = best.plan
    assert plan.zero_stage == 3 and plan.replicas == (4,)
    trace = simulate_plan(plan, profile, topo, SimParams(optimizer_state_factor=OPTIMIZER_STATE["sgd"]))
    sim_peak = max(peak_memory_bytes(trace).values())
    assert time_per_batch_s(trace) == pytest.approx(best.time_per_batch_s, rel=1e-9)
    assert sim_peak == pytest.approx(max(best.peak_memory_bytes.values()), rel=1e-12)
    # the gathers cost something and prefetch hides part of them; sharding saves memory
    exposed = evaluate(plan, profile, topo, CostOptions(optimizer="sgd", fsdp_overlap=False)).time_per_batch_s
    compute = 2 * 8 * (layer.forward_s + layer.backward_s + (layer.forward_s if recompute else 0.0))
    assert compute < best.time_per_batch_s < exposed
    unsharded = evaluate(replace(plan, zero_stage=0), profile, topo, CostOptions(optimizer="sgd"))
    assert max(unsharded.peak_memory_bytes.values()) > sim_peak
    rec = plan_point(point)
    assert Plan.from_dict(rec.plan) == plan
    assert rec.throughput_samples_per_s == pytest.approx(best.throughput_samples_per_s, rel=1e-12)
    assert rec.peak_memory_bytes == pytest.approx(sim_peak, rel=1e-12)
    assert point.key() != replace(point, zero_stage=0).key() and "zero_stage" not in replace(point, zero_stage=0).key()


def test_a_model_that_fits_no_unsharded_plan_is_planned_sharded_and_the_simulator_agrees_it_fits():
    from planner.analytic import load_model
    from planner.search import plan_model
    from sim.engine import peak_memory
    from planner.lowering import plan_to_program

    prof = load_model("gpt3-6.7b")
    topo = load_topology("dgx:servers=2,gpus=8")
    kw = dict(schedule="1f1b", global_batch=16, optimizer="adam", recompute=True, memory_limit_bytes=10e9)
    with pytest.raises(PlanError, match="no plan fits"):
        plan_model(prof, topo, **kw)
    best = plan_model(prof, topo, zero_stage=3, **kw).best_candidate
    assert best.plan.zero_stage == 3 and max(best.plan.replicas) > 1 and best.fits
    sim = peak_memory(plan_to_program(best.plan, prof), prof, params=SimParams(optimizer_state_factor=2.0, zero_stage=3),
                      stage_layers=[s.layers for s in best.plan.stages], recompute=best.plan.recompute)
    assert max(sim.values()) <= 10e9


@pytest.mark.parametrize("zero", [1, 3])
@pytest.mark.parametrize("pp,dp", [(2, 8), (1, 16)])
def test_folding_the_replicas_gives_the_full_runs_trace_times(zero, pp, dp):
    """ZeRO's rings over replicas that span two servers cross the InfiniBand switch twice, so the replicas are not
    images of each other on the ring's links: the folding must check the rings the run runs (it checked the
    hierarchical all-reduce's, and a 16-replica ZeRO-3 plan of gpt3-13b simulated in 1.84 s what takes 3.80)."""
    topo = load_topology("dgx:servers=4,gpus=4")
    prof = uniform_profile(4, 1e-3, 2e-3, act=1e6, params=4e8)
    plan = replace(_dp_plan(topo, 4, dp, 16, pp=pp), zero_stage=zero)
    folded = simulate_plan(plan, prof, topo)
    full = simulate_plan(plan, prof, topo, SimParams(use_symmetry=False))
    assert full.meta["workers_simulated"] == pp * dp
    assert makespan_s(folded) == pytest.approx(makespan_s(full), rel=1e-12)
    assert peak_memory_bytes(folded) == peak_memory_bytes(full)


def test_tensor_parallel_ranks_gather_their_own_shards_and_contend_with_the_tp_rings():
    """TP 2 × DP 4 on one star: each TP rank's shard is gathered over its own DP group while the TP rings run inside
    the units' compute, on the same device links. The cost model times every collective on free links, a lower
    bound the simulation (where they share the links) can only exceed; memory is counted alike; folding the TP
    ranks and replicas is exact."""
    from planner.analytic import load_model

    topo = load_topology("hier:8@ideal:1e10:1e-6")
    prof = load_model("gpt:layers=4,hidden=512,heads=8,seq=256,vocab=1024", tensor_parallel=2)
    plan = replace(plan_from_flags("m", len(prof), tp=2, pp=1, dp=4, microbatches=4, devices=topo.devices), zero_stage=3)
    folded = simulate_plan(plan, prof, topo)
    full = simulate_plan(plan, prof, topo, SimParams(use_symmetry=False))
    assert folded.meta["symmetry"]["tp_folded"] and makespan_s(folded) == pytest.approx(makespan_s(full), rel=1e-12)
    free = evaluate(plan, prof, topo, CostOptions(link_load=False)).time_per_batch_s
    cand = evaluate(plan, prof, topo)
    assert free < time_per_batch_s(full) and time_per_batch_s(full) == pytest.approx(cand.time_per_batch_s, rel=0.15)
    assert max(peak_memory_bytes(full).values()) == pytest.approx(max(cand.peak_memory_bytes.values()), rel=1e-12)
    unsharded = simulate_plan(replace(plan, zero_stage=0), prof, topo)
    assert max(peak_memory_bytes(unsharded).values()) > max(peak_memory_bytes(full).values())


# --- refusals: one line, exit 2 --------------------------------------------------------------------------
@pytest.mark.parametrize("zero", [1, 3])
@pytest.mark.parametrize("schedule,kept", [("pipedream", "several"), ("2bw", "2")])
def test_zero_with_a_weight_stashing_schedule_is_refused_in_the_same_line_by_every_command(schedule, kept, zero):
    """plan (the cost model), simulate (the simulator) and whatif (the search) refuse it with one line, the one
    planner.sharding writes: what is wrong (ZeRO shards one version, the schedule keeps more) and what to do."""
    argvs = {"plan": ["--topology", "ideal:4"], "simulate": ["--topology", "ideal:4", "--stages", "2", "--replicas", "2,2"],
             "whatif": ["--devices", "4", "--tp", "1", "--pp", "2", "--global-batch", "8", "--simulate", "none",
                        "--jobs", "1"]}
    lines = {}
    for command, extra in argvs.items():
        model = "gpt:layers=4,hidden=64,heads=8,seq=32,vocab=128" if command == "whatif" else "uniform:layers=8"
        flag = "--schedules" if command == "whatif" else "--schedule"
        r = subprocess.run([sys.executable, "-m", "pipetwin", command, "--model", model, flag, schedule,
                            "--zero", str(zero), *extra], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, (command, r.stderr)
        err = [x for x in r.stderr.strip().splitlines() if "error:" in x]
        assert len(err) == 1 and "Traceback" not in r.stderr, (command, r.stderr)
        lines[command] = err[0]
    want = (f"ZeRO-{zero} shards one weight version but {schedule} keeps {kept}: use a flush schedule "
            f"(gpipe, 1f1b, zb-h1, ...) or --zero 0")
    assert all(x.endswith(want) for x in lines.values()), lines


def test_a_backward_holds_its_units_in_its_own_order():
    """Units of unequal size: a backward walks them last to first, so with prefetch it holds unit j, unit j − 1
    (prefetched) and unit j's gradient — 2·u_j + u_(j−1) at the most, not the forward's pairing."""
    D = 4
    topo = _star(D)
    sizes = (4e6, 16e6, 4e6, 40e6)  # profile bytes; gathered: half
    prof = ModelProfile("m", tuple(Layer(f"l{i}", 1e-3, 2e-3, 0.0, 0.0, p) for i, p in enumerate(sizes)))
    plan = _dp_plan(topo, len(sizes), D, D)
    u = [p / 2 for p in sizes]
    backward = max(2 * u[j] + (u[j - 1] if j else 0.0) for j in range(len(u)))   # 2·20e6 + 2e6
    forward = max(u[j] + (u[j + 1] if j + 1 < len(u) else 0.0) for j in range(len(u)))
    assert backward == 42e6 and forward == 22e6
    shard = sum(sizes) / 4 * (2 + 2 + 4 + 4) / D
    sim = max(peak_memory_bytes(simulate_plan(plan, prof, topo)).values())
    model = max(evaluate(plan, prof, topo).peak_memory_bytes.values())
    assert sim == pytest.approx(shard + backward, rel=1e-12) and model == pytest.approx(shard + backward, rel=1e-12)


def test_zero_3_shapes_it_does_not_time_are_refused_by_both_interpreters():
    topo = load_topology("ideal:8")
    prof = uniform_profile(8, 1e-3, 2e-3, params=PARAM_BYTES)
    from sim import SimError

    uneven = replace(plan_from_flags("m", 8, pp=1, dp=4, microbatches=6, devices=topo.devices), zero_stage=3)
    with pytest.raises(PlanError, match="unevenly"):
        evaluate(uneven, prof, topo)
    with pytest.raises(SimError, match="unevenly"):
        simulate_plan(uneven, prof, topo)
    looped = replace(plan_from_flags("m", 8, pp=2, dp=2, vp=2, schedule="interleaved", microbatches=4,
                                     devices=topo.devices), zero_stage=3)
    with pytest.raises(PlanError, match="one stage per device"):
        evaluate(looped, prof, topo)


def test_plan_and_whatif_take_zero(capsys, tmp_path):
    from pipetwin.cli import main

    out = tmp_path / "plan.json"
    base = ["--model", "uniform:layers=8,params=4e8", "--global-batch", "8", "--schedule", "1f1b", "--tp", "1", "--pp", "1", "--dp", "4"]
    assert main(["plan", "--topology", "dgx:servers=1,gpus=4", *base, "--zero", "3", "-o", str(out), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert Plan.load(out).zero_stage == 3
    assert main(["simulate", "--plan", str(out), "--json"]) == 0
    sim = json.loads(capsys.readouterr().out)
    assert sim["time_per_batch_s"] == pytest.approx(doc["predicted"]["time_per_batch_s"], rel=1e-9)
    assert main(["whatif", "--model", "gpt:layers=4,hidden=64,heads=8,seq=32,vocab=128", "--devices", "4",
                 "--tp", "1", "--pp", "1", "--global-batch", "8", "--schedules", "1f1b", "--simulate", "none",
                 "--jobs", "1", "--zero", "3", "--json"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)["points"]
    assert rec["plan"]["zero_stage"] == 3
    assert main(["run", "--plan", str(out), "--recompute"]) == 2  # refused before any process starts
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "ZeRO-3 without recomputation" in err and "--zero 2" in err, err
    assert main(["plan", "--model", "uniform:layers=8", "--topology", "ideal:4", "--cost-model", "pipedream",
                 "--zero", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--zero" in err, err


def test_simulate_no_prefetch_needs_a_zero3_plan(capsys, tmp_path):
    """--no-prefetch only changes ZeRO-3's gathers: without them it is refused in one line, not silently ignored;
    on a ZeRO-3 plan file it exposes every gather, so the batch takes longer."""
    from pipetwin.cli import main

    out = tmp_path / "plan.json"
    shape = ["--model", "uniform:layers=8,params=4e8", "--schedule", "1f1b", "--tp", "1", "--pp", "1", "--dp", "4"]
    base = [*shape, "--microbatches", "8"]
    assert main(["simulate", "--topology", "dgx:servers=1,gpus=4", *base, "--no-prefetch"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--no-prefetch" in err and "no ZeRO" in err and len(err.splitlines()) == 1
    assert main(["simulate", "--topology", "dgx:servers=1,gpus=4", *base, "--zero", "1", "--no-prefetch"]) == 2
    assert "ZeRO-1" in capsys.readouterr().err
    assert main(["plan", "--topology", "dgx:servers=1,gpus=4", *shape, "--global-batch", "8", "--zero", "3",
                 "-o", str(out)]) == 0
    capsys.readouterr()
    times = []
    for extra in ([], ["--no-prefetch"]):
        assert main(["simulate", "--plan", str(out), "--json", *extra]) == 0  # the plan file's ZeRO-3 counts
        times.append(json.loads(capsys.readouterr().out)["time_per_batch_s"])
    assert times[1] > times[0]


@pytest.mark.parametrize("act,sim_over_free", [(1e7, 1.3), (4e6, 1.1)])
def test_a_zero_3_stage_whose_rings_share_its_links_with_the_pipeline_sends_is_costed_as_simulated(act, sim_over_free):
    """PP 2 × DP 2 on one star: each replica's FSDP rings and its activations and gradients cross the same device
    link, where the simulator shares them max-min fairly and the waiting passes stall. The cost model charges the
    stage at least that link's time per microbatch (ZeRO's ring bytes with the sends, planner.linkload), the fill
    and drain included: within 6% of the simulation, where timing the rings on free links was 25% (12%) short."""
    topo = _star(4)
    prof = uniform_profile(4, 1e-3, 2e-3, act=act, params=PARAM_BYTES * 10)
    plan = _dp_plan(topo, 4, 2, 8, pp=2)
    sim = time_per_batch_s(simulate_plan(plan, prof, topo))
    free = evaluate(plan, prof, topo, CostOptions(link_load=False)).time_per_batch_s
    cand = evaluate(plan, prof, topo)
    assert sim > sim_over_free * free                      # the sharing is real: free links are well short
    assert cand.time_per_batch_s == pytest.approx(sim, rel=0.06)
    assert cand.time_per_batch_s <= sim * (1 + 1e-9)       # and still no more than what the simulator runs
