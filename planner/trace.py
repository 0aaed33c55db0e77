"""Trace: what ran where and when, and every metric computed from it.

Both interpreters (and the dry run) write a ``Trace``; metrics are functions of a
trace, never stored beside it. On disk a trace is Chrome trace JSON (Perfetto
opens it): one process per trace source, one thread lane per worker (and per
link when a simulator records them), memory as counter tracks.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from planner.families import FAMILY
from planner.program import COMPUTE, Action, Kind
from topologies.files import output_path


_COMPUTE_KINDS = frozenset(k.value for k in COMPUTE)


class Event(NamedTuple):
    """One action's execution: ``lane`` is a worker id (int) or a link name (str).

    An immutable record (a named tuple, so that simulators can write hundreds of
    thousands of them cheaply: ``tuple.__new__(Event, (lane, action, start_s, end_s, kind, nbytes))``).
    """

    lane: int | str
    action: str
    start_s: float
    end_s: float
    kind: str = ""
    nbytes: int = 0

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def is_compute(self) -> bool:
        return self.kind in _COMPUTE_KINDS


@dataclass(frozen=True)
class MemorySample:
    worker: int
    time_s: float
    nbytes: float


@dataclass
class Trace:
    """Events plus memory samples; ``meta`` holds what produced it (source, samples per microbatch, ...)."""

    events: list[Event] = field(default_factory=list)
    memory: list[MemorySample] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def add(self, lane: int | str, action: Action | str, start_s: float, end_s: float, nbytes: int = 0) -> None:
        """Record one event; ``action`` is an Action (worker lanes) or a label (link lanes)."""
        if isinstance(action, Action):
            self.events.append(Event(lane, str(action), start_s, end_s, action.kind.value, nbytes or action.nbytes))
        else:
            self.events.append(Event(lane, action, start_s, end_s, "", nbytes))

    # --- Chrome trace JSON -----------------------------------------------------------
    def to_chrome(self, pid: int = 0, process_name: str | None = None) -> list[dict]:
        name = process_name or self.meta.get("source", "pipetwin")
        out: list[dict] = [{"ph": "M", "name": "process_name", "pid": pid, "args": {"name": name}}]
        lanes = sorted({e.lane for e in self.events}, key=lambda l: (isinstance(l, str), str(l) if isinstance(l, str) else l))
        tids = {}
        for i, lane in enumerate(lanes):
            tids[lane] = i
            label = f"worker {lane}" if isinstance(lane, int) else f"link {lane}"
            out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": i, "args": {"name": label}})
            out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": i, "args": {"sort_index": i}})
        for e in self.events:
            out.append({
                "ph": "X", "pid": pid, "tid": tids[e.lane], "name": e.action, "cat": e.kind or "link",
                "ts": e.start_s * 1e6, "dur": max(e.duration_s, 0.0) * 1e6,
                "args": {"lane": e.lane, "kind": e.kind, "bytes": e.nbytes},
            })
        for m in self.memory:
            out.append({"ph": "C", "pid": pid, "name": f"memory w{m.worker}", "ts": m.time_s * 1e6,
                        "args": {"bytes": m.nbytes}})
        return out

    def save(self, path: str | Path) -> None:
        doc = {"traceEvents": self.to_chrome(), "displayTimeUnit": "ms", "otherData": self.meta}
        output_path(path).write_text(json.dumps(doc))

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        doc = json.loads(Path(path).read_text())
        t = cls(meta=doc.get("otherData", {}))
        for ev in doc["traceEvents"]:
            if ev.get("ph") == "X":
                a = ev["args"]
                t.events.append(Event(a["lane"], ev["name"], ev["ts"] / 1e6, (ev["ts"] + ev["dur"]) / 1e6, a.get("kind", ""), a.get("bytes", 0)))
            elif ev.get("ph") == "C" and ev["name"].startswith("memory w"):
                t.memory.append(MemorySample(int(ev["name"][8:]), ev["ts"] / 1e6, ev["args"]["bytes"]))
        return t


def save_side_by_side(traces: dict[str, Trace], path: str | Path) -> None:
    """Several traces in one Chrome trace file, one process group each (e.g. predicted and measured)."""
    events: list[dict] = []
    for pid, (name, tr) in enumerate(traces.items()):
        events += tr.to_chrome(pid=pid, process_name=name)
    output_path(path).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))


# --- metrics -------------------------------------------------------------------------
def worker_events(trace: Trace) -> dict[int, list[Event]]:
    out: dict[int, list[Event]] = {}
    for e in trace.events:
        if isinstance(e.lane, int):
            out.setdefault(e.lane, []).append(e)
    return out


def span_s(trace: Trace) -> tuple[float, float]:
    """(first start, last end) over the worker lanes; (0.0, 0.0) without worker events."""
    lo = hi = None
    for e in trace.events:  # one pass; the first of equal extremes is kept, as min() and max() keep it
        if isinstance(e[0], int):
            if lo is None:
                lo, hi = e[2], e[3]
            else:
                if e[2] < lo:
                    lo = e[2]
                if e[3] > hi:
                    hi = e[3]
    return (0.0, 0.0) if lo is None else (lo, hi)


def makespan_s(trace: Trace) -> float:
    a, b = span_s(trace)
    return b - a


def busy_s(trace: Trace) -> dict[int, float]:
    """Seconds each worker spent in compute actions (summed in event order, from 0, as ``sum`` adds them)."""
    acc: dict[int, float] = {}
    compute, get = _COMPUTE_KINDS, acc.get
    for e in trace.events:
        w = e[0]
        if isinstance(w, int):
            if e[4] in compute:
                acc[w] = get(w, 0) + (e[3] - e[2])
            elif w not in acc:
                acc[w] = 0
    return {w: acc[w] for w in sorted(acc)}


def bubble_fractions(trace: Trace) -> dict[int, float]:
    """Per worker: 1 − compute busy time / makespan."""
    total = makespan_s(trace)
    if total <= 0:
        return {w: 0.0 for w in busy_s(trace)}
    return {w: 1.0 - b / total for w, b in busy_s(trace).items()}


def bubble_fraction(trace: Trace) -> float:
    fr = bubble_fractions(trace)
    return sum(fr.values()) / len(fr) if fr else 0.0


def peak_memory_bytes(trace: Trace) -> dict[int, float]:
    out: dict[int, float] = {}
    for m in trace.memory:
        out[m.worker] = max(out.get(m.worker, 0.0), m.nbytes)
    return out


def step_times_s(trace: Trace) -> list[float]:
    """End time of each optimizer step round (the last STEP of each step number across workers)."""
    ends: dict[int, float] = {}
    for e in trace.events:
        if e.kind == Kind.STEP.value:
            n = Action.parse(e.action).mb
            ends[n] = max(ends.get(n, 0.0), e.end_s)
    return [ends[k] for k in sorted(ends)]


def throughput_samples_per_s(trace: Trace, samples_per_microbatch: int | None = None, exclude_warmup: bool = True) -> float:
    """Samples per second, in steady state where the trace allows it.

    A microbatch is finished when stage 0 finishes its backward (B, or BW when
    split; with tensor parallelism, on the last of its TP ranks). Flush schedules with three or more steps: the rate between the end
    of the first and of the last step (warm-up and the first flush excluded).
    A stream (PipeDream, 2BW): the least-squares rate over the second half of completions.
    Otherwise: all samples over the whole makespan.
    """
    spm = samples_per_microbatch or trace.meta.get("microbatch_size", 1)
    finished: dict[int, float] = {}  # microbatch -> when stage 0 finished it (the last of its TP ranks)
    for e in trace.events:
        # stage 0's text starts with a 0 (after any blanks): only those are parsed
        if e[4] in ("B", "BW") and isinstance(e[0], int) and e[1].lstrip()[:1] == "0":
            a = Action.parse(e.action)
            if a.stage == 0 and e.end_s > finished.get(a.mb, -math.inf):
                finished[a.mb] = e.end_s
    done = sorted(finished.values())
    if not done:
        return 0.0
    start, _ = span_s(trace)
    steps = step_times_s(trace)
    fam = FAMILY.get(trace.meta.get("family"))
    streaming = fam is not None and fam.stream
    if exclude_warmup and not streaming and len(steps) >= 3:
        t0, t1 = steps[0], steps[-1]
        n = sum(1 for t in done if t0 < t <= t1)
        return n * spm / (t1 - t0) if t1 > t0 else 0.0
    if exclude_warmup and streaming and len(done) >= 4:
        # least-squares slope of completions against time over the second half: robust to
        # replicas that finish in bursts (an endpoint difference over-reads there)
        import numpy as np

        tail = np.asarray(done[len(done) // 2:])
        if tail[-1] > tail[0]:
            n = np.arange(len(tail), dtype=float)
            slope = np.polyfit(tail - tail[0], n, 1)[0]
            return float(slope) * spm
        return 0.0
    total = done[-1] - start
    return len(done) * spm / total if total > 0 else 0.0


def time_per_batch_s(trace: Trace) -> float:
    """Seconds per optimizer step in steady state (between step ends); the makespan with one step."""
    steps = step_times_s(trace)
    if len(steps) >= 2:
        return (steps[-1] - steps[0]) / (len(steps) - 1)
    return makespan_s(trace)


def summary(trace: Trace) -> dict:
    """The metric keys every command's ``--json`` shares."""
    bf = bubble_fractions(trace)
    busy = busy_s(trace)
    peak = peak_memory_bytes(trace)
    per = {
        str(w): {"busy_s": busy[w], "bubble_fraction": bf[w], "peak_memory_bytes": peak.get(w, 0.0)}
        for w in sorted(busy)
    }
    return {
        "throughput_samples_per_s": throughput_samples_per_s(trace),
        "time_per_batch_s": time_per_batch_s(trace),
        "makespan_s": makespan_s(trace),
        "bubble_fraction": bubble_fraction(trace),
        "per_device": per,
        "events": len(trace.events),
    }


def steady_bubble_fraction(trace: Trace) -> float:
    """Idle fraction inside the steady window: from the last worker's first backward to the first worker's last forward.

    Warm-up and drain are outside the window, so an asynchronous PipeDream
    stream scores 0 while flushed schedules keep their per-batch bubbles.
    Returns 0.0 when the window is empty.
    """
    per = worker_events(trace)
    comp = {w: [e for e in evs if e.is_compute] for w, evs in per.items()}
    comp = {w: evs for w, evs in comp.items() if evs}
    if not comp:
        return 0.0
    t0 = max(min(e.start_s for e in evs if e.kind in ("B", "BI")) for evs in comp.values())
    t1 = min(max(e.end_s for e in evs if e.kind == "F") for evs in comp.values())
    if t1 <= t0:
        return 0.0
    busy = sum(max(0.0, min(e.end_s, t1) - max(e.start_s, t0)) for evs in comp.values() for e in evs)
    return 1.0 - busy / ((t1 - t0) * len(comp))
