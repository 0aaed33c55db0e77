"""``schedule="auto"`` chooses among every family by time and by per-stage memory, and the simulator agrees.

A uniform 16-layer model on 4 ideal devices, no optimizer state: a device holds its stages'
weights and gradients (2·W per layer) and the activations its schedule keeps (S per layer
per microbatch). With 4 layers per device, ZB-V, 1F1B and ZB-H1 keep 4 microbatches' worth
(16 S), V-Half 3 (⌊(P + 2)/2⌋), V-Min 2 (⌊(P + 4)/3⌋); ZB-H2 and 2BW more. So a tight limit
leaves V-Min, a looser one V-Half, and a roomy one a zero-bubble family. Each choice is
cross-checked against the simulator: the chosen plan's simulated peak fits the limit on every
device, and the faster families the planner passed over, simulated on the same shape, do not.
"""
from __future__ import annotations

import re

import pytest

from planner.costmodel import CostOptions, evaluate
from planner.lowering import plan_to_program
from planner.plan import plan_from_flags
from planner.profile import uniform_profile
from planner.families import FAMILY
from planner.search import AUTO_FAMILIES, plan_model
from sim import peak_memory, simulate_plan
from sim.params import SimParams
from planner.trace import time_per_batch_s
from topologies.presets import load_topology

L, P, M = 16, 4, 8
S = W = 1e6
PROF = uniform_profile(L, 1e-3, 2e-3, act=0.0, params=W, saved=S)
TOPO = load_topology(f"ideal:{P}")
NO_STATE = SimParams(optimizer_state_factor=0.0)
STATIC = 2 * (L // P) * W  # weights + gradients per device on an even 4-way split
ZERO_BUBBLE = {"zb-h2", "zb-v", "interleaved-zb", "dualpipe-v"}


def _even(family: str, chunks: int = 1):
    return plan_from_flags("m", L, pp=P, vp=chunks, schedule=family, microbatches=M, devices=TOPO.devices)


def _simulated_peak(plan) -> float:
    return max(peak_memory(plan_to_program(plan, PROF), PROF, params=NO_STATE,
                           stage_layers=[s.layers for s in plan.stages]).values())


def _auto(limit: float):
    return plan_model(PROF, TOPO, memory_limit_bytes=limit, microbatches=M, optimizer="none", top_k=5)


def test_auto_scores_the_new_families():
    assert {"zb-h2", "zb-v", "v-half", "v-min", "looped-bfs", "interleaved-zb", "dualpipe-v"} <= set(AUTO_FAMILIES)


@pytest.mark.parametrize("family,whole", [("1f1b", 4), ("zb-h1", 4), ("zb-h2", 7), ("zb-v", 4), ("v-half", 3), ("v-min", 2)])
def test_the_cost_models_memory_per_device_is_the_simulators_on_an_even_split(family, whole):
    """Activations held until the weight gradient: ZB-H1 and ZB-H2 on every stage, not 1F1B's P − s."""
    plan = _even(family, 2 if family in ("zb-v", "v-half", "v-min") else 1)
    cand = evaluate(plan, PROF, TOPO, CostOptions(optimizer="none"))
    sim = peak_memory(plan_to_program(plan, PROF), PROF, params=NO_STATE, stage_layers=[s.layers for s in plan.stages])
    assert max(cand.peak_memory_bytes.values()) == pytest.approx(STATIC + whole * (L // P) * S)
    assert max(sim.values()) == pytest.approx(max(cand.peak_memory_bytes.values()))
    if family.startswith("v-"):  # the model charges every rank the block's busiest: never below the simulator's
        assert all(cand.peak_memory_bytes[d] >= sim[w] - 1e-6 for w, d in enumerate(TOPO.devices))
    else:
        assert sorted(cand.peak_memory_bytes.values()) == pytest.approx(sorted(sim.values()))


@pytest.mark.parametrize("limit,want,over,faster", [
    (STATIC + 2.2 * (L // P) * S, "v-min", ["v-half", "zb-v", "1f1b", "zb-h1", "zb-h2"], ["v-half", "zb-v", "zb-h1"]),
    (STATIC + 3.2 * (L // P) * S, "v-half", ["zb-v", "1f1b", "zb-h1", "zb-h2"], ["zb-v", "zb-h1"]),
])
def test_under_a_tight_limit_auto_picks_the_lower_memory_v_and_the_simulator_agrees(limit, want, over, faster):
    best = _auto(limit).best
    assert best.schedule == want and best.pipeline_depth == P
    assert _simulated_peak(best) <= limit
    t_best = time_per_batch_s(simulate_plan(best, PROF, TOPO, NO_STATE))
    for fam in over:  # on the same shape the simulator holds more than the limit too
        assert _simulated_peak(_even(fam, 2 if fam in ("zb-v", "v-half") else 1)) > limit
    for fam in faster:  # and these would have been faster
        plan = _even(fam, 2 if fam in ("zb-v", "v-half") else 1)
        assert time_per_batch_s(simulate_plan(plan, PROF, TOPO, NO_STATE)) < t_best


def test_with_room_for_1f1bs_activations_auto_picks_a_zero_bubble_family_and_the_simulator_agrees():
    limit = STATIC + 4.5 * (L // P) * S  # 2BW's second weight copy and ZB-H2's 7 microbatches do not fit
    best = _auto(limit).best
    assert best.schedule in ZERO_BUBBLE
    assert _simulated_peak(best) <= limit
    t_best = time_per_batch_s(simulate_plan(best, PROF, TOPO, NO_STATE))
    for fam in ("1f1b", "zb-h1", "v-half", "v-min"):  # they fit, and are slower in the simulator as well
        plan = _even(fam, 2 if fam in ("v-half", "v-min") else 1)
        assert _simulated_peak(plan) <= limit
        assert time_per_batch_s(simulate_plan(plan, PROF, TOPO, NO_STATE)) > t_best
    assert _simulated_peak(_even("zb-h2")) > limit


@pytest.mark.parametrize("family,P,M", [("v-half", 4, 8), ("v-half", 6, 12), ("v-half", 2, 4), ("v-min", 4, 8),
                                        ("v-min", 6, 12), ("v-min", 3, 5)])
def test_the_cost_models_time_per_batch_is_the_simulators_for_the_v_blocks(family, P, M):
    """T = t·(M + (P − 1)·f) with f the block's unit-cost bubble over 1F1B's: the simulator's on an ideal cluster."""
    prof = uniform_profile(2 * P, 1e-3, 2e-3)
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", 2 * P, pp=P, schedule=family, microbatches=M, devices=topo.devices)
    predicted = evaluate(plan, prof, topo, CostOptions()).time_per_batch_s
    assert predicted == pytest.approx(time_per_batch_s(simulate_plan(plan, prof, topo)), rel=1e-9)


def test_below_v_mins_need_nothing_fits_and_the_message_names_v_mins_figure():
    from planner.plan import PlanError

    need = STATIC + 2 * (L // P) * S  # V-Min's two whole microbatches per device: the least any family holds here
    with pytest.raises(PlanError, match=re.escape(f"needs is {need:.4g} bytes")):
        _auto(0.6 * need)


def test_a_search_offers_a_several_stages_per_device_family_only_at_depths_its_microbatches_fill():
    """Below M = P the cost model undercharges these families' bubble (ZB-V at P = 4, M = 1: 9 units against the
    simulator's 17), so the search keeps their depths ≤ M; each one it offers costs what the simulator runs."""
    res = plan_model(PROF, TOPO, schedule="auto", microbatches=2, top_k=50)
    multi = [c for c in res.candidates if FAMILY[c.plan.schedule].multi_stage]
    assert multi and all(len(set(c.plan.devices)) <= 2 for c in multi)
    for c in multi[:3]:
        sim = time_per_batch_s(simulate_plan(c.plan, PROF, TOPO, params=NO_STATE))
        assert c.time_per_batch_s == pytest.approx(sim, rel=0.02), c.plan.schedule


@pytest.mark.parametrize("argv,msg", [
    (["--kind", "v-min", "--chunks", "3"], "v-min runs 2 stages per device; --chunks/--vp 3 does not apply"),
    (["--kind", "interleaved-zb", "--chunks", "0"], "--chunks/--vp must be a whole number >= 1"),
])
def test_a_chunk_count_a_family_cannot_run_is_refused_not_replaced(capsys, argv, msg):
    from pipetwin.cli import main

    assert main(["schedule", "--stages", "4", "--microbatches", "8"] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err
