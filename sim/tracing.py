"""What a simulation run leaves behind: the actions' compact text, and the trace written from the run's records.

A run (``sim.engine``) records the workers it simulated; where ``sim.symmetry`` copied replica pipelines or
``sim.fold`` folded TP ranks and replicas, each record stands for several workers, and :func:`trace_of` writes it
out for every one of them (the k-th record of a simulated worker is its k-th action; its images copy its times),
its link log mirrored onto them alike.
"""
from __future__ import annotations

from planner.program import Action, Kind
from planner.trace import Event, MemorySample, Trace
from sim.network import link_events

_KSEND, _KRECV = Kind.SEND, Kind.RECV
_tnew = tuple.__new__  # _tnew(Event, (lane, action, start_s, end_s, kind, nbytes)) builds an Event without __new__'s call


def trace_of(run) -> Trace:
    """The trace of a finished run (``sim.engine``'s): its records as events and memory samples of every worker they
    stand for, its link log (mirrored alike) as link events, and its meta."""
    p, sw = run.p, run.p.stage_workers
    image = {w: [w] for w in run.workers}
    if run.replicas > 1:
        image = {ws[0]: list(ws) for ws in sw}
    elif run.fold is not None:
        image = run.fold.images
    acts = p.actions
    if run.replicas == 1 and run.fold is None:
        events = run.rec  # already the events, in the order they finished
    else:
        # the k-th record of worker w0 is its k-th action; replicas copy its times
        events, pos = [], dict.fromkeys(run.workers, 0)
        append = events.append
        for e in run.rec:
            w0 = e[0]
            i = pos[w0]
            pos[w0] = i + 1
            for w in image[w0]:
                a = acts[w][i]
                append(_tnew(Event, (w, action_text(a), e[2], e[3], a.kind._value_, a.nbytes)))
    memory = [MemorySample(w, t, b) for w0, t, b in run.mem for w in image[w0]]
    if run.params.link_events:
        log = run.net.log
        if run.replicas > 1:
            log = _mirror_log(run, log, image)
        elif run.fold is not None:
            log = _mirror_folded_log(run, log)
        events += link_events(run.topology, log, lambda lab: _label(run, lab))
    run.meta["allreduce"] = sorted(run.algorithms)
    run.meta["workers_simulated"] = len(run.workers)
    return Trace(events=events, memory=memory, meta=run.meta)


def _label(run, lab) -> str:
    """A link event's action: the text of the action a transfer's label names (plus its suffix), else the label."""
    if isinstance(lab, tuple):
        return action_text(run.p[lab[0]][lab[1]]) + (lab[2] if len(lab) > 2 else "")
    return str(lab)


def _mirror_log(run, log, image):
    """Point-to-point transfers of pipeline 0 copied onto every replica pipeline."""
    out = []
    for entry in log:
        lab = entry[5]
        if not isinstance(lab, tuple):
            out.append(entry)
            continue
        w0, i = lab
        for w in image[w0]:
            a = run.p[w][i]
            out.append((run.dev[w], run.dev[a.peer], entry[2], entry[3], entry[4], (w, i)))
    return out


def _mirror_folded_log(run, log):
    """Every logged transfer of a folded run copied onto each of its images under the group."""
    dev_of = {d: w for w, d in run.dev.items()}
    out = []
    for src, dst, t0, t1, nbytes, lab in log:
        for e in run.fold.device_maps:
            img = (dev_of[e[run.dev[lab[0]]]],) + lab[1:] if isinstance(lab, tuple) else lab
            out.append((e[src], e[dst], t0, t1, nbytes, img))
    return out


def action_text(a: Action) -> str:
    """``str(a)`` (planner.program's compact form), without the enum lookups: traces hold one per action."""
    k = a.kind
    t = f"{a.stage}{k._value_}{a.mb}"
    if a.version:
        t += f"v{a.version}"
    if k is _KSEND:
        t += f"{'g' if a.grad else 'a'}>w{a.peer}"
    elif k is _KRECV:
        t += f"{'g' if a.grad else 'a'}<w{a.peer}"
    return t


def action_head(stage: int, k: Kind, version: int, grad: bool, peer) -> tuple[str, str]:
    """``action_text`` of an action of these fields split around its microbatch number."""
    tail = f"v{version}" if version else ""
    if k is _KSEND:
        tail += f"{'g' if grad else 'a'}>w{peer}"
    elif k is _KRECV:
        tail += f"{'g' if grad else 'a'}<w{peer}"
    return f"{stage}{k._value_}", tail
