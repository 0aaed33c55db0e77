"""The V families' batch time in the cost model (planner.vpath) against the simulator, which interprets the program.

Their generators fix each rank's order at unit costs, so with F, BI and BW unequal (a backward twice or four times
the forward, recomputation) the batch is the longest path through that fixed order: the cost model must match the
simulator's batch time on an ideal topology (free sends) to rounding, on every (family, P, M, F/B, recompute)."""
import itertools

import pytest

from planner.costmodel import CostOptions, evaluate
from planner.plan import plan_from_flags
from planner.profile import Layer, ModelProfile
from planner.trace import time_per_batch_s
from planner.vpath import batch_time
from sim import simulate_plan
from topologies import load_topology

FAMILIES = ("zb-v", "dualpipe-v", "v-half", "v-min")


def _pair(family, P, M, layers, mode):
    prof = ModelProfile("m", tuple(layers))
    topo = load_topology(f"ideal:{P}")
    plan = plan_from_flags("m", len(layers), pp=P, schedule=family, microbatches=M, recompute=mode,
                           devices=topo.devices)
    sim = time_per_batch_s(simulate_plan(plan, prof, topo))
    model = evaluate(plan, prof, topo, CostOptions(optimizer="none", link_load=False)).time_per_batch_s
    return sim, model


def _layer(F, B, name="l"):
    return Layer(name, F, B, 0.0, 1.0, 0.0, attention_saved_bytes=0.5, attention_forward_s=0.3)


def _microbatches(family, P):
    """Down to the family's minimum: DualPipeV needs 2P, the others run from one microbatch."""
    return (2 * P, 2 * P + 3) if family == "dualpipe-v" else (1, P, 2 * P, 2 * P + 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_v_family_batch_time_is_the_simulators(family):
    cases = 0
    ratios = ((1, 2), (1, 4), (1, 1), (2, 1))
    for P, (F, B), mode in itertools.product((2, 3, 4), ratios, ("none", "selective", "full")):
        for M in _microbatches(family, P):
            sim, model = _pair(family, P, M, [_layer(F, B)] * (2 * P), mode)
            assert model == pytest.approx(sim, rel=1e-9), (family, P, M, F, B, mode, sim, model)
            cases += 1
    assert cases == sum(12 * len(_microbatches(family, P)) for P in (2, 3, 4))


@pytest.mark.parametrize("family", FAMILIES)
def test_uneven_stages_too(family):
    """Each virtual stage its own layer times: the path reads every stage's own passes."""
    P = 3
    layers = [_layer(1 + 0.25 * i, 2 + 0.5 * (i % 3), f"l{i}") for i in range(2 * P)]
    for mode in ("none", "full"):
        sim, model = _pair(family, P, 2 * P + 1, layers, mode)
        assert model == pytest.approx(sim, rel=1e-9), (family, mode, sim, model)


def test_unequal_passes_stretch_the_steady_state():
    """Review2's finding, from the path itself: ZB-V's order at unit costs, run with BI = BW = 2F, adds more than
    a rank's two chunks' F + BI + BW per extra microbatch (its ranks wait where the order no longer fits): 12, not
    10; at unit costs exactly the 6 of the work."""
    unit = ((1.0, 2.0, 1.0, 1.0),) * 8
    assert batch_time("zb-v", 4, 12, unit) - batch_time("zb-v", 4, 8, unit) == pytest.approx(4 * 6)
    heavy = ((1.0, 4.0, 2.0, 2.0),) * 8
    assert batch_time("zb-v", 4, 12, heavy) - batch_time("zb-v", 4, 8, heavy) == pytest.approx(4 * 12)


def test_large_pipelines_keep_the_equal_time_bubble(monkeypatch):
    """Above V_PATH_MAX_PM the longest path is not walked (its graph grows with P·M): the cost model gives the
    equal-time bubble's batch, which at equal passes is the path's too, and at unequal ones is the shorter."""
    import planner.costmodel as cm

    P, M = 4, 12
    layers = [_layer(1, 4)] * (2 * P)
    sim, exact = _pair("zb-v", P, M, layers, "full")
    assert exact == pytest.approx(sim, rel=1e-9)
    monkeypatch.setattr(cm, "V_PATH_MAX_PM", P * M - 1)
    _, capped = _pair("zb-v", P, M, layers, "full")
    assert capped < exact * 0.99  # the old formula: the stretch of the fixed order is not charged
    _, capped_equal = _pair("zb-v", P, M, [_layer(1, 2)] * (2 * P), "none")
    sim_equal, _ = _pair("zb-v", P, M, [_layer(1, 2)] * (2 * P), "none")
    assert capped_equal == pytest.approx(sim_equal, rel=1e-9)  # F = BI = BW: the bubble formula is exact
