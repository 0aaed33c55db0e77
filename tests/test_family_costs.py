"""The cost model reads each family's traits: its time per batch equals the simulator's where both are exact.

On an ideal topology with no bytes on the wire, a uniform model's simulated time per batch
is the dry run's closed form; the analytic T_batch = t·(M + (P − 1)·f) with the family's
bubble factor f must give the same number, and the memory model must see the V's
placement (rank r holds stages r and 2P − 1 − r) and its 2P-chunk activation cap.
"""
from __future__ import annotations

import pytest

from planner.costmodel import CostOptions, evaluate
from planner.plan import plan_from_flags
from planner.profile import uniform_profile
from sim import simulate_plan
from planner.trace import time_per_batch_s
from topologies.presets import load_topology


@pytest.mark.parametrize("family,P,M", [("zb-v", 4, 8), ("zb-v", 2, 8), ("looped-bfs", 4, 8), ("interleaved", 4, 8),
                                        ("zb-h1", 4, 8), ("1f1b", 4, 8)])
def test_cost_model_time_per_batch_is_the_simulators_for_one_batch(family, P, M):
    prof = uniform_profile(4 * P, 1e-3, 2e-3)
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", len(prof), pp=P, schedule=family, microbatches=M, devices=topo.devices)
    predicted = evaluate(plan, prof, topo, CostOptions()).time_per_batch_s
    simulated = time_per_batch_s(simulate_plan(plan, prof, topo))
    assert predicted == pytest.approx(simulated, rel=1e-9)


def test_zb_h2_costs_no_bubble_batch_after_batch():
    P, M = 4, 8
    prof = uniform_profile(4 * P, 1e-3, 2e-3)
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", len(prof), pp=P, schedule="zb-h2", microbatches=M, batches=3, devices=topo.devices)
    per_stage = 4 * 3e-3
    assert evaluate(plan, prof, topo, CostOptions()).time_per_batch_s == pytest.approx(M * per_stage)
    assert time_per_batch_s(simulate_plan(plan, prof, topo)) == pytest.approx(M * per_stage)


def test_the_cost_model_sees_zb_vs_placement_and_balanced_activations():
    P, M = 4, 16
    prof = uniform_profile(2 * P, 1e-3, 2e-3, act=0.0, saved=1e6)
    topo = load_topology(f"ideal:{P}")
    v = evaluate(plan_from_flags("m", 2 * P, pp=P, schedule="zb-v", microbatches=M, devices=topo.devices), prof, topo)
    one = evaluate(plan_from_flags("m", 2 * P, pp=P, schedule="1f1b", microbatches=M, devices=topo.devices), prof, topo)
    v_mem = [s.memory_bytes for s in v.stages]
    one_mem = [s.memory_bytes for s in one.stages]
    assert v_mem[0] == v_mem[-1]  # stages 0 and 2P - 1 share rank 0
    assert max(v_mem) <= max(one_mem) + 1e-6


# (family, P, M): the cases the simulator shows at the bound's two ends — ZB-V and DualPipeV exact on every rank,
# V-Half below P microbatches and V-Min's lighter ranks (P = 2, 5, 8: ranks 0, 3, 6) a whole microbatch over
V_BOUND_CASES = [("zb-v", 4, 8), ("zb-v", 5, 7), ("zb-v", 4, 3), ("dualpipe-v", 4, 8), ("dualpipe-v", 3, 6),
                 ("v-half", 4, 8), ("v-half", 4, 3), ("v-half", 4, 2), ("v-min", 2, 4), ("v-min", 5, 7), ("v-min", 8, 16)]


@pytest.mark.parametrize("family,P,M", V_BOUND_CASES)
def test_v_families_memory_is_at_least_the_simulators_and_at_most_one_microbatch_more_per_rank(family, P, M):
    """Uniform chunks, saved bytes only (no weights, no boundary activations): on every rank the cost model's
    held activations are between the simulator's peak (``sim.engine.peak_memory``, from the program's action
    lists) and that plus one microbatch of the rank's kept bytes (both its chunks)."""
    from planner.lowering import plan_to_program
    from sim.engine import peak_memory
    from sim.params import SimParams

    saved = 1e6
    prof = uniform_profile(2 * P, 1e-3, 2e-3, act=0.0, params=0.0, saved=saved)
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", 2 * P, pp=P, vp=2, schedule=family, microbatches=M, devices=topo.devices)
    cost = evaluate(plan, prof, topo, CostOptions(optimizer="none")).peak_memory_bytes
    sim = peak_memory(plan_to_program(plan, prof), prof, params=SimParams(optimizer_state_factor=0.0),
                      stage_layers=[s.layers for s in plan.stages])
    one_microbatch = 2 * saved  # a rank's two chunks of one layer each
    over = [cost[topo.devices[d]] - sim[d] for d in range(P)]
    assert all(-1e-6 <= x <= one_microbatch + 1e-6 for x in over), over
    if family in ("zb-v", "dualpipe-v"):
        assert max(over) == pytest.approx(0.0, abs=1e-6)  # the registry's cap is every rank's peak


@pytest.mark.parametrize("family,P,M,heavy_first", [("dualpipe-v", 8, 16, True), ("dualpipe-v", 4, 8, False),
                                                     ("zb-v", 4, 8, True), ("v-half", 4, 8, True),
                                                     ("v-min", 5, 7, False), ("interleaved-zb", 4, 8, True),
                                                     ("interleaved", 4, 8, True), ("looped-bfs", 4, 8, True)])
def test_chunks_keeping_different_bytes_are_never_undercharged(family, P, M, heavy_first):
    """Stages 0..P−1 keep 3 MB per sample and P..2P−1 keep 1 MB (or the reverse): on every rank the cost model's
    held activations are at least the simulator's peak (the rank's depth at its heaviest chunk's bytes); the
    mean of the two chunks, which the model charged before, undercharged a heavier first chunk by up to 15 MB."""
    from dataclasses import replace

    from planner.lowering import plan_to_program
    from planner.profile import ModelProfile
    from sim.engine import peak_memory
    from sim.params import SimParams

    heavy, light = (3e6, 1e6) if heavy_first else (1e6, 3e6)
    base = uniform_profile(2 * P, 1e-3, 2e-3, act=0.0, params=0.0, saved=1.0)
    prof = ModelProfile(name="two-weights", layers=tuple(replace(l, saved_bytes=heavy if i < P else light)
                                                         for i, l in enumerate(base.layers)))
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", 2 * P, pp=P, vp=2, schedule=family, microbatches=M, devices=topo.devices)
    cost = evaluate(plan, prof, topo, CostOptions(optimizer="none")).peak_memory_bytes
    sim = peak_memory(plan_to_program(plan, prof), prof, params=SimParams(optimizer_state_factor=0.0),
                      stage_layers=[s.layers for s in plan.stages])
    short = [sim[d] - cost[topo.devices[d]] for d in range(P)]
    assert max(short) <= 1e-6, short
    if family == "looped-bfs":  # M microbatches of every chunk: the mean is exact
        assert min(short) == pytest.approx(0.0, abs=1e-6)
