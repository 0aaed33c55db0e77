"""The simulator's pending collectives: a DP all-reduce, a TP all-reduce and a ZeRO-3 collective never share an entry.

Each kind numbers its collectives its own way: a DP all-reduce by (stage, round, TP rank), kept after it starts; a TP
all-reduce by (leader worker, action index, piece); a ZeRO-3 gather or scatter by (stage, TP rank, collective
number). The same tuple can name one of each. Here a collective of one kind is joined under a key that a collective
of another kind holds (or held), and it must still wait for its own ranks and then run on the links: were the kinds
one table, the TP all-reduce would take the finished DP all-reduce's event (skipped, taking no time), and the
ZeRO-3 collective would complete the TP all-reduce's group instead of its own.
"""
from __future__ import annotations

from dataclasses import replace

from planner.lowering import plan_to_program, worker_devices
from planner.plan import plan_from_flags
from planner.profile import Layer, ModelProfile
from sim import SimParams
from sim.engine import _Run, _stage_layers
from topologies.presets import load_topology

NBYTES = 4e6
BW, LAT = 1e9, 1e-5


def _finished_run(zero: int) -> _Run:
    """A run of TP 2 × DP 2 × PP 1 (every worker simulated), walked to its end."""
    layer = Layer("block", 1e-4, 2e-4, 2e6, 2e6, 8e6, tp_allreduce_bytes=NBYTES, tp_forward_allreduces=2,
                  tp_backward_allreduces=2)
    prof = ModelProfile("m", (layer,) * 2, tensor_parallel=2)
    topo = load_topology(f"hier:4@ideal:{BW:g}:{LAT:g}")
    plan = replace(plan_from_flags("m", 2, pp=1, dp=2, tp=2, microbatches=2, devices=topo.devices), zero_stage=zero)
    program = plan_to_program(plan, prof)
    params = SimParams(use_symmetry=False, zero_stage=zero)
    run = _Run(program, prof, topo, worker_devices(plan, program), 1, params,
               _stage_layers(program, prof, [s.layers for s in plan.stages]))
    run.run(None)
    return run


def test_a_tp_all_reduce_under_a_finished_dp_all_reduces_key_still_waits_for_its_ranks_and_takes_time():
    run = _finished_run(zero=0)
    assert run.dp_groups, "the DP all-reduces' entries stay after they start"
    leader = run.p.tp_group(0)[0]
    for key, (arrived, done, _start) in list(run.dp_groups.items()):
        assert done.processed and arrived == 2  # both replicas arrived, it ran
        t0 = run.env.now
        first = run.tp_join(key, leader, key[1], NBYTES, "probe", 2)
        assert first is not None and not first.triggered, f"the TP all-reduce {key} joined the DP all-reduce's entry"
        second = run.tp_join(key, leader, key[1], NBYTES, "probe", 2)
        run.env.run()
        assert second is None or second is first
        assert first.processed and run.env.now > t0  # it ran on the links: a ring of 4 MB takes time
    assert not run.tp_groups


def test_a_zero3_collective_and_a_pending_tp_all_reduce_under_the_same_key_each_wait_for_their_own_ranks():
    run = _finished_run(zero=3)
    assert run.zero3 is not None and not run.zero3.pending and not run.tp_groups
    leader = run.p.tp_group(0)[0]
    key = (0, 0, 0)  # (leader 0, action 0, piece 0) for TP; (stage 0, TP rank 0, collective 0) for ZeRO-3
    tp = run.tp_join(key, leader, 0, NBYTES, "probe", 2)
    z3 = run.zero3.issue(*key[:2], 2, key[2], NBYTES, "AG")
    assert tp is not z3 and not tp.triggered and not z3.triggered
    run.env.run()
    assert not tp.triggered and not z3.triggered  # each still waits for its second rank
    t0 = run.env.now
    assert run.zero3.issue(*key[:2], 2, key[2], NBYTES, "AG") is z3
    run.env.run()
    assert z3.processed and not tp.triggered and run.env.now > t0
    t1 = run.env.now
    assert run.tp_join(key, leader, 0, NBYTES, "probe", 2) in (None, tp)
    run.env.run()
    assert tp.processed and run.env.now > t1
    assert not run.zero3.pending and not run.tp_groups
