"""Peak memory: the simulator's model (sim.memory) and the executor's count, against closed forms and each other.

The model is ``uniform`` (emulated layers): every layer keeps its input for
backward (A bytes per sample) and has PB parameter bytes; the MSE loss keeps
its input and the target. The plans' optimizer is "sgd", SGD with momentum: one buffer of the stage's
parameter bytes from the start, in the executor as in the simulator (``OPTIMIZER_STATE["sgd"]`` = 1); the
optimizer "none" (plain SGD) keeps none, and peaks exactly that much lower on both sides.
"""
from __future__ import annotations

from dataclasses import replace

import pytest

from executor.launch import run_plan
from planner.costmodel import OPTIMIZER_STATE
from planner.lowering import plan_to_program
from planner.plan import even_plan
from planner.profile import parse_uniform_spec
from planner.trace import peak_memory_bytes
from sim.engine import simulate_plan
from sim.memory import memory_levels, round_function, stage_bytes
from sim.params import SimParams
from topologies.presets import load_topology

pytestmark = pytest.mark.dist
A, PB = 4096, 40000
LAYERS = 4
SPEC = f"uniform:layers={LAYERS},fwd=1e-4,bwd=2e-4,act={A},params={PB}"
MOMENTUM = SimParams(optimizer_state_factor=OPTIMIZER_STATE["sgd"])


def _profile():
    """The profile as the executor runs the model: the last layer also holds what the loss keeps (2A)."""
    prof = parse_uniform_spec(SPEC)
    last = prof.layers[-1]
    return replace(prof, layers=prof.layers[:-1] + (replace(last, saved_bytes=last.saved_bytes + 2 * A),))


def _plan(schedule, P, M, reps=None, chunks=1, batches=1):
    return even_plan(SPEC, LAYERS, P * chunks, reps, schedule=schedule, microbatches=M, microbatch_size=1,
                     batches=1 if schedule == "pipedream" else batches, chunks=chunks)


# 1F1B, 2 stages, 4 microbatches; gradient receives (stage 0) and activation receives (stage 1) are 4 each,
# all posted at the start (lookahead 8), so each worker's pool holds 4A from the start.
#  stage 0: after F2 (B0 has opened the gradients): weights 2PB + gradients 2PB + momentum 2PB + 2 microbatches in
#           flight, each keeping 3A (the data input, layer 1's input, the stage output) + pool 4A
#  stage 1: after F1: 2PB + 2PB + 2PB + one in flight, 3A (layer 3's input, the loss's input and target; layer 2's
#           input is its receive buffer) + pool 4A
# PipeDream, 2 stages, 8 minibatches; 8 receives each, all posted at the start: pool 8A.
#  stage 0: after B_k (k >= 1): the version minibatch k+1 uses and the one B_k freed (kept for the next STEP:
#           2 x 2PB) + gradients 2PB + momentum 2PB (one buffer, not stashed) + one in flight 3A + pool 8A
#  stage 1: steps in place; after B_k: 2PB + 2PB + 2PB + its input gradient waiting for the SEND, A + pool 8A
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule,M,want", [
    ("1f1b", 4, {0: 6 * PB + 2 * 3 * A + 4 * A, 1: 6 * PB + 3 * A + 4 * A}),
    ("pipedream", 8, {0: 8 * PB + 3 * A + 8 * A, 1: 6 * PB + A + 8 * A}),
])
def test_peak_memory_closed_form_is_what_the_simulator_predicts_and_the_executor_measures(schedule, M, want):
    plan = _plan(schedule, 2, M)
    topo = load_topology("ideal:2")
    predicted = peak_memory_bytes(simulate_plan(plan.with_devices([(d,) for d in topo.devices]), _profile(), topo,
                                                MOMENTUM))
    measured = peak_memory_bytes(run_plan(plan, timeout_s=60).trace)
    assert predicted == want
    assert measured == want
    plain = replace(plan, optimizer="none")  # plain SGD: no buffer, 2PB lower on both workers, on both sides
    none = peak_memory_bytes(simulate_plan(plain.with_devices([(d,) for d in topo.devices]), _profile(), topo,
                                           SimParams(optimizer_state_factor=OPTIMIZER_STATE["none"])))
    assert none == {w: b - 2 * PB for w, b in want.items()}
    assert peak_memory_bytes(run_plan(plain, timeout_s=60).trace) == none


def _distinct(levels):
    out = []
    for x in levels:
        if not out or out[-1] != x:
            out.append(x)
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule,P,M,kw", [
    ("gpipe", 2, 4, {}), ("1f1b", 4, 8, {}), ("zb-h1", 4, 8, {}), ("interleaved", 2, 4, {"chunks": 2}),
    ("pipedream", 4, 8, {}), ("2bw", 2, 4, {"batches": 2}), ("1f1b", 2, 4, {"reps": (2, 2), "batches": 2}),
    ("pipedream", 2, 8, {"reps": (2, 2)}),
])
def test_measured_memory_goes_through_the_simulated_levels_action_by_action(schedule, P, M, kw):
    """Every level the executor holds, in order, is a level the simulator's model predicts, and the other way
    round: the same accounting, not two that happen to meet at the peak."""
    plan = _plan(schedule, P, M, **kw)
    prof = _profile()
    program = plan_to_program(plan, prof)
    sbytes = stage_bytes(prof, [s.layers for s in plan.stages], 1)
    res = run_plan(plan, timeout_s=60)
    for w in program.workers:
        initial, levels = memory_levels(program[w], {s: sbytes[s] for s in program.stages_of(w)},
                                        OPTIMIZER_STATE[plan.optimizer], round_function(program))
        predicted = _distinct([initial] + [x for pair in levels for x in pair])
        measured = _distinct([m.nbytes for m in res.trace.memory if m.worker == w])
        assert measured == predicted, w
