"""Gradient accumulation in measured traces: which backwards add into their round's gradient, and what that cost them.

A backward after the first of its optimizer round on its worker adds its gradients into the round's
(flush schedules and 2BW: M/r − 1 of a worker's M/r; PipeDream: none). The fits take that cost off
those backwards and the simulator adds it back (``SimParams.accumulate_s_per_byte``).
"""
from __future__ import annotations

from planner.lowering import plan_to_program
from planner.plan import Plan
from planner.program import Action
from planner.trace import Trace
from sim.memory import round_function


def accumulating_backwards(trace: Trace, plan: Plan) -> set[tuple]:
    """(worker, action) of every B and BW that adds its gradients into its round's, as the executor and the
    simulator count them: each one after the first of its optimizer round on its worker and stage."""
    round_of = round_function(plan_to_program(plan))
    seen: set[tuple] = set()
    out: set[tuple] = set()
    for e in sorted((e for e in trace.events if e.kind in ("B", "BW") and isinstance(e.lane, int)),
                    key=lambda e: e.start_s):
        a = Action.parse(e.action)
        key = (e.lane, a.stage, round_of(a.stage, a.mb))
        if key in seen:
            out.add((e.lane, e.action))
        seen.add(key)
    return out


def accumulation_s(trace: Trace, plan: Plan, per_stage_s: list[float] | None) -> dict[tuple, float]:
    """(worker, action) → what each backward that adds into its round's gradient paid for that (``per_stage_s``
    of its stage); empty without a cost."""
    if not per_stage_s or not any(per_stage_s):
        return {}
    return {(w, act): per_stage_s[Action.parse(act).stage] for w, act in accumulating_backwards(trace, plan)}

