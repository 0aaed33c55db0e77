"""Plan → Program: the bridge both interpreters cross, with payload bytes from the profile.

Tensor parallelism: the schedule is generated for the stage replicas, then every
replica worker w becomes T workers w·T + t (``tensor_expand``), each running the
replica's action list, its SEND/RECV peers the peer replica's TP rank t. The TP
collectives are no actions of their own: they run inside each compute action of
a TP group, and the interpreters read their bytes from the (per-TP-rank) profile.
"""
from __future__ import annotations

from dataclasses import replace

from planner.plan import Plan, PlanError
from planner.profile import ModelProfile
from planner.program import Action, Program
from planner.schedulespec import ScheduleSpec
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
    """Generate and check the plan's program, its stages' layers the plan's; SEND/RECV/ALLREDUCE carry byte
    counts when a profile is given.

    Activation bytes are per microbatch (profile bytes per sample × microbatch
    size); all-reduce bytes are the stage's parameter (= gradient) bytes.
    """
    if profile is not None and plan.num_layers > len(profile):
        raise PlanError(f"the plan covers {plan.num_layers} layers but the profile {profile.name!r} has {len(profile)}; re-plan for this model")
    act = ar = None
    if profile is not None:
        act = lambda s: profile.boundary_bytes(plan.stages[s].last_layer) * plan.microbatch_size
        ar = lambda s: profile.param_bytes(*plan.stages[s].layers)
    T = plan.tensor_parallel
    program = generate(plan_spec(plan), act, ar, check_program=T == 1)
    program = replace(program, stage_layers=tuple(s.layers for s in plan.stages))
    if T == 1:
        return program
    from planner.check import check

    program = tensor_expand(program, T)
    check(program)
    return program


def tensor_expand(program: Program, T: int) -> Program:
    """Each worker w of a (T = 1) program becomes the TP group w·T, ..., w·T + T − 1 running w's actions;
    a SEND/RECV of TP rank t goes to TP rank t of its peer."""
    if program.tensor_parallel != 1:
        raise PlanError("tensor_expand takes a program without tensor parallelism")
    if T == 1:
        return program
    actions: dict[int, list[Action]] = {}
    for w, acts in program.actions.items():
        for t in range(T):
            actions[w * T + t] = [a if a.peer is None else
                                  Action(a.stage, a.kind, a.mb, a.version, a.peer * T + t, a.grad, a.nbytes) for a in acts]
    sw = tuple(tuple(w * T + t for w in ws for t in range(T)) for ws in program.stage_workers)
    return Program(program.spec, sw, actions, tensor_parallel=T, stage_layers=program.stage_layers)


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
