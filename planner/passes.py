"""The lowering passes: a compute order (a generator's, or an imported program's) → steps → versions →
communication → ``check``, each a pure function over the per-worker action dict and testable alone.

One module because ``lower`` runs the passes in this order and each relies on the one before (versions
read the STEPs ``add_steps`` put in, communication copies the versions); the family orders that feed
them live in ``planner.schedules``, which re-exports these names.
"""
from __future__ import annotations

import math
from typing import Callable

from planner.check import check
from planner.program import COMPUTE, Action, Kind, Program, ScheduleSpec

__all__ = ["add_steps", "add_versions", "add_communication", "lower"]


def _finishes_weight_grad(a: Action) -> bool:
    return a.kind in (Kind.B, Kind.BW)


def add_steps(spec: ScheduleSpec, sw: tuple[tuple[int, ...], ...], actions: dict[int, list[Action]]) -> dict[int, list[Action]]:
    """Insert ALLREDUCE (when a stage is replicated) and STEP after each update point.

    Flush schedules and 2BW: after a replica's last backward of each batch.
    PipeDream: after every backward (round k = the replica's k-th backward);
    replicas with fewer minibatches join the last rounds with no gradient.
    """
    out: dict[int, list[Action]] = {}
    per_backward = not spec.traits.batched
    for w, acts in actions.items():
        new: list[Action] = []
        if per_backward:
            rounds: dict[int, int] = {}
            for a in acts:
                new.append(a)
                if _finishes_weight_grad(a):
                    k = rounds.get(a.stage, 0)
                    rounds[a.stage] = k + 1
                    new += _update(a.stage, k, len(sw[a.stage]) > 1)
            for s in (s for s, ws in enumerate(sw) if w in ws):
                r = len(sw[s])
                total_rounds = math.ceil(spec.microbatches / r)
                for k in range(rounds.get(s, 0), total_rounds):
                    new += _update(s, k, r > 1)
        else:
            last: dict[tuple[int, int], int] = {}
            for idx, a in enumerate(acts):
                if _finishes_weight_grad(a):
                    last[(a.stage, spec.batch_of(a.mb))] = idx
            after = {idx: key for key, idx in last.items()}
            for idx, a in enumerate(acts):
                new.append(a)
                if idx in after:
                    s, b = after[idx]
                    new += _update(s, b, len(sw[s]) > 1)
        out[w] = new
    return out


def _update(stage: int, k: int, replicated: bool) -> list[Action]:
    acts = [Action(stage, Kind.ALLREDUCE, k)] if replicated else []
    return acts + [Action(stage, Kind.STEP, k, version=k + 1)]


def add_versions(spec: ScheduleSpec, actions: dict[int, list[Action]]) -> dict[int, list[Action]]:
    """Tag each compute action with the weight version it uses.

    Flush schedules: the batch index. 2BW: max(0, batch − 1) (one-step-stale
    gradients). PipeDream: the version current at the forward (steps done so far
    on that stage), kept by the backward (weight stashing); with vertical sync,
    the version stage 0 used for that minibatch.
    """
    versions = spec.traits.versions
    if versions == "batch":
        rule = lambda a, steps, fv: spec.batch_of(a.mb)
    elif versions == "stale":
        rule = lambda a, steps, fv: max(0, spec.batch_of(a.mb) - 1)
    else:
        rule = None
    out: dict[int, list[Action]] = {}
    fwd_version: dict[tuple[int, int], int] = {}
    if rule is None:
        # PipeDream: stage-0 versions first (vertical sync reads them)
        order = sorted(actions, key=lambda w: min((a.stage for a in actions[w]), default=0))
        for w in order:
            steps: dict[int, int] = {}
            new = []
            for a in actions[w]:
                if a.kind is Kind.STEP:
                    steps[a.stage] = a.version
                    new.append(a)
                elif a.kind is Kind.F:
                    v = fwd_version[(0, a.mb)] if spec.vertical_sync and a.stage > 0 else steps.get(a.stage, 0)
                    fwd_version[(a.stage, a.mb)] = v
                    new.append(_with_version(a, v))
                elif a.is_compute:
                    new.append(_with_version(a, fwd_version[(a.stage, a.mb)]))
                else:
                    new.append(a)
            out[w] = new
        return out
    for w, acts in actions.items():
        new = []
        for a in acts:
            if a.kind in COMPUTE:
                v = rule(a, None, None)
                if v != a.version:  # an equal action is the action itself: no copy
                    a = _with_version(a, v)
            new.append(a)
        out[w] = new
    return out


def _with_version(a: Action, v: int) -> Action:
    return Action(a.stage, a.kind, a.mb, v, a.peer, a.grad, a.nbytes)


def add_communication(
    spec: ScheduleSpec,
    sw: tuple[tuple[int, ...], ...],
    actions: dict[int, list[Action]],
    act_bytes: Callable[[int], int] | None = None,
    allreduce_bytes: Callable[[int], int] | None = None,
) -> dict[int, list[Action]]:
    """Insert RECV right before each consumer and SEND right after each producer.

    A forward of stage s > 0 receives stage s − 1's activation; a backward (or
    BI) of stage s < S − 1 receives stage s + 1's gradient. Nothing is sent when
    producer and consumer share a worker. ``act_bytes(s)`` gives the bytes
    crossing the boundary after stage s; ``allreduce_bytes(s)`` the gradient
    bytes of stage s.
    """
    S = len(sw)
    of = lambda s, i: sw[s][i % len(sw[s])]
    # the byte counts depend on the stage alone: each asked once per stage, not once per action
    act: dict[int, int] = {}
    ab: dict[int, int] = {}

    def nb(s: int) -> int:
        x = act.get(s)
        if x is None:
            x = act[s] = int(act_bytes(s)) if act_bytes else 0
        return x

    F, B, BI, RECV, SEND, ALLREDUCE = Kind.F, Kind.B, Kind.BI, Kind.RECV, Kind.SEND, Kind.ALLREDUCE
    out: dict[int, list[Action]] = {}
    for w, acts in actions.items():
        new: list[Action] = []
        append = new.append
        for a in acts:
            s, i, v, k = a.stage, a.mb, a.version, a.kind
            if k is F:
                if s > 0 and (src := of(s - 1, i)) != w:
                    append(Action(s, RECV, i, v, src, False, nb(s - 1)))
                append(a)
                if s < S - 1 and (dst := of(s + 1, i)) != w:
                    append(Action(s, SEND, i, v, dst, False, nb(s)))
            elif k is B or k is BI:
                if s < S - 1 and (src := of(s + 1, i)) != w:
                    append(Action(s, RECV, i, v, src, True, nb(s)))
                append(a)
                if s > 0 and (dst := of(s - 1, i)) != w:
                    append(Action(s, SEND, i, v, dst, True, nb(s - 1)))
            elif k is ALLREDUCE:
                x = ab.get(s)
                if x is None:
                    x = ab[s] = int(allreduce_bytes(s)) if allreduce_bytes else 0
                append(Action(s, k, a.mb, a.version, None, False, x))
            else:
                append(a)
        out[w] = new
    return out


def lower(
    spec: ScheduleSpec,
    sw: tuple[tuple[int, ...], ...],
    compute: dict[int, list[Action]],
    act_bytes: Callable[[int], int] | None = None,
    allreduce_bytes: Callable[[int], int] | None = None,
    check_program: bool = True,
) -> Program:
    """Compute orders (a generator's, or an imported program's) → steps → versions → communication → check."""
    acts = add_steps(spec, sw, compute)
    acts = add_versions(spec, acts)
    acts = add_communication(spec, sw, acts, act_bytes, allreduce_bytes)
    prog = Program(spec=spec, stage_workers=sw, actions=acts)
    if check_program:
        check(prog)
    return prog
