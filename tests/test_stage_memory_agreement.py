"""Peak memory per device: the cost model's closed form (``planner.costmodel.evaluate``) against the simulator's
replay of the program (``sim.simulate_plan`` → ``planner.trace.peak_memory_bytes``), both over
``planner.stagememory``'s per-stage figures.

The replay is the independent truth here: it walks every worker's action list (``tests/test_memory_agreement.py``
holds it to the executor's own count, byte for byte). The groups:

* exact (rel 1e-9) where layers send nothing (activation bytes 0: no receive buffers, no stage outputs, no
  outgoing gradients) and a stage's gradient buffer is open at its peak: 1F1B and 2BW whose batch share is deeper
  than the pipeline, interleaved 1F1B past M = P (no recomputation or selective), with replicas, SGD and Adam;
* bounded by one gradient buffer: the replay opens a round's gradients as its first backward ends; where a stage
  reaches its depth only before that backward (GPipe; PipeDream, which steps after every backward; 1F1B and 2BW
  on a batch no deeper than the stage) the closed form, which holds them open throughout, is over by at most the
  stage's gradient bytes (exact form on branch cmmem-warmup: ``warmup_peak_bytes``, which the partition search
  would have to charge too);
* bounded from above on a short batch: PipeDream on at most P minibatches per replica, interleaved at M = P;
* where layers send activations, both count the stage outputs kept as the roots of the backward, the receive
  pool and the outgoing gradients (``planner.stagememory.transfer_bytes``, ``CostOptions.transfers``): exact for 1F1B, 2BW and ZB-H1 (and
  GPipe and PipeDream move by exactly what the replay moves by), an upper bound for ZB-H2 and the multi-stage
  families;
* split backward (ZB-H1, ZB-H2, ZB-V) with recomputation: a BI and a BW each hold one layer's rebuild while they
  run and nothing rebuilt between them, as the executor does (``tests/test_recompute_split_memory.py`` measures
  it): exact, but where ZB-V's chunks keep different bytes (its depth is charged at the heavier chunk).
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from planner.costmodel import OPTIMIZER_STATE, CostOptions, evaluate
from planner.plan import even_plan
from planner.profile import Layer, ModelProfile
from planner.trace import peak_memory_bytes
from sim import SimParams, simulate_plan
from topologies.presets import load_topology

LAYERS = 8
SAVED, PARAMS, ATTN = 5e4, 4e4, 1e4


def _profile(act: float) -> ModelProfile:
    """Eight equal layers; ``act``: the activation each sends to the next (0: nothing crosses a cut)."""
    layer = Layer("l", 1e-4, 2e-4, act, SAVED, PARAMS, attention_saved_bytes=ATTN, attention_forward_s=4e-5)
    return ModelProfile("m", (layer,) * LAYERS)


def _plan(schedule: str, P: int, M: int, recompute: str, reps: int = 1, chunks: int = 1):
    plan = even_plan("m", LAYERS, P * chunks, (reps,) * (P * chunks), schedule=schedule, microbatches=M,
                     microbatch_size=1, chunks=chunks, batches=1 if schedule == "pipedream" else 2)
    return replace(plan, recompute=recompute)


def _peaks(plan, profile: ModelProfile, optimizer: str) -> tuple[list[float], list[float]]:
    """(cost model's per-device peaks, simulator's per-worker peaks), each sorted (one worker per device)."""
    topo = load_topology(f"ideal:{len({d for s in plan.stages for d in s.devices})}")
    cost = evaluate(plan, profile, topo, CostOptions(optimizer=optimizer, link_load=False, transfers=True)).peak_memory_bytes
    sim = peak_memory_bytes(simulate_plan(plan, profile, topo,
                                          SimParams(optimizer_state_factor=OPTIMIZER_STATE[optimizer])))
    assert len(cost) == len(sim)
    return sorted(cost.values()), sorted(sim.values())


_GRID = [(s, P, M, rec, reps, ch)
         for s, ch in (("gpipe", 1), ("1f1b", 1), ("2bw", 1), ("pipedream", 1), ("interleaved", 2))
         for P, M in ((2, 4), (2, 8), (3, 6), (4, 4), (4, 8))
         for rec in (("none", "selective") if s == "interleaved" else ("none", "selective", "full"))
         for reps in ((1, 2) if P == 2 and s != "interleaved" else (1,))]
_EXACT = [g for g in _GRID if (g[0] in ("1f1b", "2bw") and g[2] // g[4] > g[1]) or (g[0] == "interleaved" and g[2] > g[1])]
_GRADIENTS = [g for g in _GRID if g[0] in ("gpipe", "1f1b", "2bw") and g not in _EXACT
              or g[0] == "pipedream" and g[2] // g[4] > g[1]]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("schedule,P,M,recompute,reps,chunks", _EXACT)
def test_cost_model_peak_is_the_simulators_where_layers_send_nothing(schedule, P, M, recompute, reps, chunks,
                                                                      optimizer):
    cost, sim = _peaks(_plan(schedule, P, M, recompute, reps, chunks), _profile(0.0), optimizer)
    assert cost == pytest.approx(sim, rel=1e-9)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("schedule,P,M,recompute,reps,chunks", _GRADIENTS)
def test_cost_model_peak_is_over_by_at_most_the_gradient_buffer_where_the_depth_comes_before_a_backward(
        schedule, P, M, recompute, reps, chunks, optimizer):
    cost, sim = _peaks(_plan(schedule, P, M, recompute, reps, chunks), _profile(0.0), optimizer)
    grads = PARAMS * -(-LAYERS // P)  # the largest stage's gradient buffer (ZeRO off: its parameter bytes)
    assert all(s * (1 - 1e-9) <= c <= (s + grads) * (1 + 1e-9) for c, s in zip(cost, sim))
    assert any(c > s * (1 + 1e-9) for c, s in zip(cost, sim))  # and not exact: the bound is what is claimed


@pytest.mark.parametrize("schedule,P,M,reps,chunks", [("pipedream", 4, 4, 1, 1), ("pipedream", 2, 4, 2, 1),
                                                     ("interleaved", 4, 4, 1, 2), ("interleaved", 2, 2, 1, 2)])
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_cost_model_peak_bounds_the_simulators_on_a_short_batch(schedule, P, M, reps, chunks, recompute):
    """Where the closed form cannot be exact, it bounds from above: PipeDream charges the steady state's stash
    (P − s in flight, as many weight versions), which a stream of at most P minibatches per replica never
    reaches; interleaved at M = P charges the whole batch of chunk-microbatches, which its drain starts freeing
    before the last forward. On each device the simulator holds no more than the cost model says, and at least
    its weights and momentum, which it always holds."""
    plan = _plan(schedule, P, M, recompute, reps, chunks)
    cost, sim = _peaks(plan, _profile(0.0), "sgd")
    params = PARAMS * LAYERS / (P * chunks) * chunks
    assert all(params * 2 <= s <= c * (1 + 1e-9) for c, s in zip(cost, sim))
    assert any(s < c * (1 - 1e-9) for c, s in zip(cost, sim))  # not exact: the bound is what is claimed


_FAMILIES = [("gpipe", 1), ("1f1b", 1), ("2bw", 1), ("pipedream", 1), ("interleaved", 2), ("zb-h1", 1), ("zb-h2", 1),
             ("zb-v", 2)]
ACT = 4096.0


@pytest.mark.parametrize("schedule,chunks", _FAMILIES)
@pytest.mark.parametrize("P,M", [(2, 8), (4, 8)])
def test_sent_activations_move_both_peaks_and_the_cost_model_bounds_the_simulators(schedule, chunks, P, M):
    """The same plan, its layers sending 4 KB each (``ACT``) or nothing: what each layer keeps is the same (no
    recomputation: ``saved_bytes``), so everything the replay adds is transfer memory, at least one activation
    per microbatch in flight on every worker (the stage output off the last stage, the receive buffer of its input
    on the others); the cost model adds at least as much on every device."""
    plan = _plan(schedule, P, M, "none", chunks=chunks)
    cost0, sim0 = _peaks(plan, _profile(0.0), "sgd")
    cost1, sim1 = _peaks(plan, _profile(ACT), "sgd")
    assert all(b - a >= ACT for a, b in zip(sim0, sim1))
    assert all(c >= s * (1 - 1e-9) for c, s in zip(cost1, sim1))
    assert all(c1 - c0 >= (s1 - s0) * (1 - 1e-9) for c0, c1, s0, s1 in zip(cost0, cost1, sim0, sim1))


_SENDING = [(s, P, M, reps) for s in ("1f1b", "2bw", "zb-h1")
            for P, M, reps in ((2, 8, 1), (4, 8, 1), (3, 6, 1), (4, 16, 1), (2, 4, 1), (2, 8, 2))]


@pytest.mark.parametrize("schedule,P,M,reps", _SENDING)
@pytest.mark.parametrize("recompute", ["none", "full"])
def test_cost_model_peak_is_the_simulators_where_layers_send(schedule, P, M, reps, recompute):
    """Outputs, the receive pool (receives posted 8 ahead, ``planner.stagememory.RECV_LOOKAHEAD``) and outgoing gradients, to the byte."""
    cost, sim = _peaks(_plan(schedule, P, M, recompute, reps), _profile(ACT), "sgd")
    assert cost == pytest.approx(sim, rel=1e-9)


def test_the_receive_pool_is_what_the_closed_form_says_on_a_hand_worked_1f1b():
    """1F1B, P = 2, M = 8, two batches (16 receives a worker), 4 KB cuts: stage 0 holds two microbatches, each its
    output beyond its kept bytes, and 8 + 1 gradient buffers (the lookahead and the one received before its B);
    stage 1 holds one microbatch, its input in a receive buffer, and 8 + 1 activation buffers."""
    plan = _plan("1f1b", 2, 8, "none")
    cost0, _ = _peaks(plan, _profile(0.0), "sgd")
    cost1, _ = _peaks(plan, _profile(ACT), "sgd")
    assert sorted(round((b - a) / ACT, 9) for a, b in zip(cost0, cost1)) == [9 - 1, 2 + 9]


@pytest.mark.parametrize("schedule,P,M", [("gpipe", 2, 8), ("gpipe", 4, 8), ("pipedream", 2, 8), ("pipedream", 4, 16)])
def test_cost_model_moves_by_what_the_simulator_moves_by_where_layers_send(schedule, P, M):
    """GPipe and PipeDream stay over by their gradient buffers (above), and the transfers add the same on both."""
    plan = _plan(schedule, P, M, "none")
    cost0, sim0 = _peaks(plan, _profile(0.0), "sgd")
    cost1, sim1 = _peaks(plan, _profile(ACT), "sgd")
    assert [c1 - c0 for c0, c1 in zip(cost0, cost1)] == pytest.approx([s1 - s0 for s0, s1 in zip(sim0, sim1)], rel=1e-9)


@pytest.mark.parametrize("schedule,chunks,recompute", [(s, c, r) for s, c in (("zb-h1", 1), ("zb-h2", 1), ("zb-v", 2))
                                                        for r in ("selective", "full")
                                                        if (s, r) != ("zb-v", "full")])
def test_cost_model_peak_is_the_simulators_for_a_recomputed_split_backward(schedule, chunks, recompute):
    cost, sim = _peaks(_plan(schedule, 2, 8, recompute, chunks=chunks), _profile(0.0), "sgd")
    assert cost == pytest.approx(sim, rel=1e-9)


def test_zb_v_with_full_recomputation_is_bounded_by_its_heavier_chunk():
    """Full recomputation keeps each layer's input; with nothing crossing a cut only stage 0's first layer keeps
    anything (its data input, SAVED), so rank 0's two chunks keep different bytes and its depth is charged at the
    heavier: over by at most one microbatch of it, never under."""
    cost, sim = _peaks(_plan("zb-v", 2, 8, "full", chunks=2), _profile(0.0), "sgd")
    assert all(s * (1 - 1e-9) <= c <= s + SAVED * (1 + 1e-9) for c, s in zip(cost, sim))
    assert cost != pytest.approx(sim, rel=1e-9)


def test_without_transfers_the_cost_model_does_not_move_where_layers_send():
    """``CostOptions.transfers`` off (the default, as the partition search charges): boundary bytes count nothing."""
    plan = _plan("1f1b", 2, 8, "none")
    topo = load_topology("ideal:2")
    peaks = [evaluate(plan, _profile(act), topo, CostOptions(link_load=False)).peak_memory_bytes for act in (0.0, ACT)]
    assert peaks[0] == peaks[1]
