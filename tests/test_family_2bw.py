"""2BW over several batches with replicated stages: every spec the generator accepts is a program check accepts,
and every one it refuses (M meeting the in-flight rule) is one whose unchecked order check refuses (batch b + 2 would start before batch b's step).

Exhaustive over small pipelines (P ≤ 3, 1–3 replicas per stage, M ≤ 7, 1–4 batches): where M meets 2BW's
in-flight rule, check, not a formula, is the oracle both ways, so the generator's rule is neither too loose nor
too strict; below that rule the generator refuses every spec (2BW's own precondition), though check would pass
some of the programs (92 of the 136 here), so there it is not the oracle.
"""
from __future__ import annotations

import itertools

from planner.check import ProgramError, check
from planner.families import ScheduleError
from planner.schedulespec import make_spec
from planner.schedules import ORDERS, REQUIRES, lower, stage_workers, validate_spec


def test_2bw_accepts_exactly_the_specs_whose_program_keeps_the_laws():
    accepted = refused = 0
    for P in (1, 2, 3):
        for reps in itertools.product((1, 2, 3), repeat=P):
            for M in range(1, 8):
                for B in (1, 2, 3, 4):
                    spec = make_spec("2bw", P, M, reps, batches=B)
                    try:
                        validate_spec(spec)
                    except ScheduleError:
                        continue
                    try:
                        REQUIRES["2bw"](spec)
                        ok = True
                    except ScheduleError:
                        ok = False
                    prog = lower(spec, stage_workers(spec), ORDERS["2bw"](spec), check_program=False)
                    try:
                        check(prog)
                        keeps = True
                    except ProgramError:
                        keeps = False
                    if M >= max(-(-sum(reps[s:]) // reps[s]) for s in range(P)):  # the in-flight rule, unchanged
                        assert ok == keeps, (spec, ok, keeps)
                        accepted += ok
                        refused += not ok  # the three-batch rule's refusals, above the in-flight rule
                    else:  # below it the generator refuses (REQUIRES["2bw"]), whatever check says
                        assert not ok, spec
    assert accepted > 500 and refused > 50


def test_the_planners_feasibility_rules_are_the_generators_over_many_batches():
    """refine.schedulable and the partition search's vectorised rule accept exactly the (M, replicas) whose 2BW
    program generates over three batches: otherwise the planner picks a replicated 2BW plan `simulate --steps 3`
    refuses."""
    import numpy as np

    from planner import refine
    from planner.partition import _schedulable
    from planner.schedulespec import inflight_limit
    from planner.schedules import generate

    refused = 0
    for P in (1, 2, 3, 4):
        for reps in itertools.product((1, 2, 3), repeat=P):
            for M in range(1, 10):
                spec = make_spec("2bw", P, M, reps, batches=3)
                try:
                    generate(spec)
                    runs = True
                except ScheduleError:
                    runs = False
                refused += not runs
                assert refine.schedulable("2bw", M, reps) == runs, (M, reps)
                per_stage = [bool(_schedulable("2bw", M, np.int64(reps[s]), inflight_limit(spec, s)))
                             for s in range(P)]
                assert all(per_stage) == runs, (M, reps, per_stage)
    assert refused > 100
