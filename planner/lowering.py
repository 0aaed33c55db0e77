"""Plan → Program: the bridge both interpreters cross, with payload bytes from the profile."""
from __future__ import annotations

from planner.plan import Plan, PlanError
from planner.profile import ModelProfile
from planner.program import Program, ScheduleSpec
from planner.schedules import generate


def plan_spec(plan: Plan) -> ScheduleSpec:
    """The schedule spec a plan asks for."""
    return ScheduleSpec(
        family=plan.schedule,
        stages=plan.pipeline_depth,
        microbatches=plan.microbatches,
        replicas=plan.replicas,
        chunks=plan.chunks,
        vertical_sync=plan.vertical_sync,
        batches=plan.batches,
    )


def plan_to_program(plan: Plan, profile: ModelProfile | None = None) -> Program:
    """Generate and check the plan's program; SEND/RECV/ALLREDUCE carry byte counts when a profile is given.

    Activation bytes are per microbatch (profile bytes per sample × microbatch
    size); all-reduce bytes are the stage's parameter (= gradient) bytes.
    """
    if profile is not None and plan.num_layers > len(profile):
        raise PlanError(f"the plan covers {plan.num_layers} layers but the profile {profile.name!r} has {len(profile)}; re-plan for this model")
    act = ar = None
    if profile is not None:
        act = lambda s: profile.boundary_bytes(plan.stages[s].last_layer) * plan.microbatch_size
        ar = lambda s: profile.param_bytes(*plan.stages[s].layers)
    return generate(plan_spec(plan), act, ar)


def worker_devices(plan: Plan, program: Program) -> dict[int, str]:
    """Worker id → topology device name (``d<worker>`` when the plan names no devices)."""
    out: dict[int, str] = {}
    for s, ws in enumerate(program.stage_workers):
        devs = plan.stages[s].devices
        for r, w in enumerate(ws):
            name = devs[r] if devs else f"d{w}"
            if out.get(w, name) != name:
                raise PlanError(f"worker {w} would sit on both {out[w]} and {name}; give each stage replica its own device")
            out[w] = name
    if len(set(out.values())) != len(out):
        raise PlanError("two workers share one device; give each stage replica its own device (interleaving is the only sharing)")
    return out
