"""ZeRO-1/2 in the planner's memory: the cost model and the simulator read one closed form (planner.sharding)."""
from __future__ import annotations

import pytest

from planner.costmodel import CostOptions, evaluate
from planner.lowering import plan_to_program
from planner.plan import PlanError, plan_from_flags
from planner.profile import uniform_profile
from sim.engine import peak_memory
from sim.params import SimError, SimParams
from topologies.presets import load_topology

PARAMS = 4e6  # parameter bytes per layer: 1e6 parameters at the profile's 4 bytes each


def _both(schedule, P, R, M, zero, saved=3e5, act=0.0, optimizer="adam", factor=2.0, layers=None):
    """(cost model's peak per device, simulator's peak per device) of an even P-stage, R-replica plan."""
    L = layers or 2 * P
    prof = uniform_profile(L, 1e-3, 2e-3, act=act, params=PARAMS, saved=saved)
    topo = load_topology(f"ideal:{P * R}")
    plan = plan_from_flags("m", L, pp=P, dp=R, schedule=schedule, microbatches=M, devices=topo.devices)
    cand = evaluate(plan, prof, topo, CostOptions(optimizer=optimizer, zero_stage=zero))
    sim = peak_memory(plan_to_program(plan, prof), prof, params=SimParams(optimizer_state_factor=factor, zero_stage=zero),
                      stage_layers=[s.layers for s in plan.stages])
    return max(cand.peak_memory_bytes.values()), max(sim.values())


#: Training-state bytes per parameter on one of 4 replicas with Adam, by ZeRO stage.
PER_PARAM_4 = {0: 16.0, 1: 2 + 2 + 12 / 4, 2: 2 + 14 / 4}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", [(2, 4), (3, 8), (1, 4)])
@pytest.mark.parametrize("zero", [1, 2])
def test_zero_takes_the_same_bytes_off_the_cost_models_peak_and_the_simulators(schedule, P, M, zero):
    """With activations in flight (where the two count them differently), ZeRO moves both peaks by the sharded
    state's closed form: two layers of 1e6 parameters per stage, on 4 replicas."""
    m0, s0 = _both(schedule, P, 4, M, 0)
    mz, sz = _both(schedule, P, 4, M, zero)
    expected = 2 * 1e6 * (PER_PARAM_4[zero] - PER_PARAM_4[0])
    assert mz - m0 == pytest.approx(expected, rel=1e-9) and sz - s0 == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("zero,per_param", [
    (0, 16.0),                 # weights 4 + gradients 4 + Adam's moments 8 (the unsharded count)
    (1, 2 + 2 + 12 / 4),       # bf16 weight and gradient, fp32 master + moments over 4 replicas
    (2, 2 + 14 / 4),
])
def test_with_no_activations_a_device_holds_the_sharded_state(zero, per_param):
    model, sim = _both("1f1b", 2, 4, 4, zero, saved=0.0, act=0.0)
    expected = 2 * 1e6 * per_param  # two layers of 1e6 parameters per stage
    assert model == pytest.approx(expected, rel=1e-12) and sim == pytest.approx(expected, rel=1e-12)


def test_sgd_state_shards_too():
    model, sim = _both("1f1b", 2, 2, 4, 1, saved=0.0, act=0.0, optimizer="sgd", factor=1.0)
    assert model == sim == pytest.approx(2 * 1e6 * (2 + 2 + 8 / 2))


def test_sharding_never_adds_memory():
    peaks = [_both("1f1b", 3, 4, 8, z)[1] for z in (0, 1, 2)]
    assert peaks[0] > peaks[1] > peaks[2]


def test_an_unknown_stage_and_weight_stashing_are_refused():
    with pytest.raises(PlanError, match="unknown ZeRO stage 4"):
        CostOptions(zero_stage=4)
    with pytest.raises(SimError, match="unknown ZeRO stage 4"):
        SimParams(zero_stage=4)
    prof = uniform_profile(4, 1e-3, 2e-3, params=PARAMS)
    topo = load_topology("ideal:4")
    plan = plan_from_flags("m", 4, pp=2, dp=2, schedule="pipedream", microbatches=4, devices=topo.devices)
    with pytest.raises(PlanError, match="shards one weight version"):
        evaluate(plan, prof, topo, CostOptions(zero_stage=1))
    with pytest.raises(SimError, match="shards one weight version"):
        peak_memory(plan_to_program(plan, prof), prof, params=SimParams(zero_stage=1),
                    stage_layers=[s.layers for s in plan.stages])
