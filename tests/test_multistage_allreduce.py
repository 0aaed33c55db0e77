"""Several stages per device with data parallelism: the cost model charges each chunk's gradient all-reduce as
the simulator runs it.

The simulator all-reduces a chunk's gradients among its replicas after the chunk's last backward of the batch,
one ring per chunk, and a device's collectives run one after another. On links of finite bandwidth and no
latency, with a uniform model, the batch takes the run without parameters plus the sum of a device's rings:
V · 2(R − 1)/R · chunk bytes / bandwidth (the ring closed form). The cost model must give the simulator's time.
The V families (zb-v, v-half, v-min, dualpipe-v) do not replicate stages, so only the looped ones are here.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from planner.costmodel import CostOptions, evaluate
from planner.plan import plan_from_flags
from planner.profile import uniform_profile
from planner.sharding import collective_bytes
from planner.trace import time_per_batch_s
from sim import simulate_plan
from topologies.presets import load_topology

BW = 1e11
PARAMS = 4e6  # bytes per layer


@pytest.mark.parametrize("family,P,R,M,zero", [("interleaved", 4, 2, 8, 0), ("looped-bfs", 4, 2, 8, 0),
                                               ("interleaved-zb", 2, 4, 8, 0), ("interleaved", 2, 2, 4, 2)])
def test_a_replicated_multi_stage_plan_costs_the_simulators_all_reduces(family, P, R, M, zero):
    L = 4 * P
    topo = load_topology(f"hier:{P * R}@nvswitch:{BW}:0")
    plan = replace(plan_from_flags("m", L, pp=P, dp=R, schedule=family, microbatches=M, devices=topo.devices),
                   zero_stage=zero)
    V = plan.chunks
    assert V > 1 and set(plan.replicas) == {R}
    prof = uniform_profile(L, 1e-3, 2e-3, params=PARAMS)
    bare = uniform_profile(L, 1e-3, 2e-3)
    chunk = L // (P * V) * PARAMS
    moved = chunk if zero == 0 else collective_bytes(chunk)
    rings = V * 2 * (R - 1) / R * moved / BW
    simulated = time_per_batch_s(simulate_plan(plan, prof, topo))
    assert simulated == pytest.approx(time_per_batch_s(simulate_plan(plan, bare, topo)) + rings, rel=1e-9)
    predicted = evaluate(plan, prof, topo, CostOptions())
    assert predicted.time_per_batch_s == pytest.approx(simulated, rel=1e-9)
    assert all(s.allreduce_s * M == pytest.approx(rings, rel=1e-12) for s in predicted.stages)


def test_without_replicas_a_multi_stage_plan_charges_no_all_reduce():
    topo = load_topology(f"hier:4@nvswitch:{BW}:0")
    plan = plan_from_flags("m", 16, pp=4, schedule="interleaved", microbatches=8, devices=topo.devices)
    cand = evaluate(plan, uniform_profile(16, 1e-3, 2e-3, params=PARAMS), topo)
    assert cand.time_per_batch_s == pytest.approx(evaluate(plan, uniform_profile(16, 1e-3, 2e-3), topo).time_per_batch_s)
    assert all(s.allreduce_s == 0.0 for s in cand.stages)
