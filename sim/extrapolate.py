"""Long runs without simulating them in full: a plan's figures from shorter simulations, when their shape allows.

The figures are throughput, bubble fraction and peak memory (``figures``, planner.trace's metrics of
a trace). ``long_run_figures`` gives them for a plan as ``simulate_plan`` would, but:

* a one-batch flush schedule with many microbatches: its figures are affine in the microbatch count
  M along M ≡ M_real (mod the replicas' round-robin period), once the pipeline is full, so two
  shorter runs fix them (``flush_extrapolated``);
* a one-batch stream (2BW, PipeDream) much longer than its pipeline: its steady state repeats every
  lcm(replicas) microbatches, so one shorter run, its steady block repeated, gives the long run's
  completions, busy time, makespan and peak (``stream_extrapolated``).

Either falls back to the full run when the short runs do not have the expected shape.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import replace

import numpy as np

from planner.plan import Plan
from planner.profile import ModelProfile
from planner.families import FAMILY
from planner.trace import bubble_fraction, busy_s, peak_memory_bytes, span_s, step_times_s, throughput_samples_per_s
from sim.engine import simulate_plan
from sim.params import SimParams
from topologies.topology import Topology

__all__ = ["figures", "long_run_figures", "extrapolation_pair", "flush_extrapolated", "splice_length",
           "stream_extrapolated", "PERIOD_TOL", "AFFINE_FAMILIES", "STREAM_FAMILIES"]

#: Flush schedules whose one-batch figures are affine in the microbatch count once the pipeline is full.
AFFINE_FAMILIES = ("gpipe", "1f1b", "zb-h1", "interleaved")
#: Streams (``Family.stream``: no flush), so the steady state runs from the fill to the drain.
STREAM_FAMILIES = frozenset(n for n, f in FAMILY.items() if f.stream)
#: Steady blocks a stream's short run measures its period over.
_SPLICE_BLOCKS = 2
#: Block lengths tried, in periods of the round-robin (contention can make a stream repeat only every
#: few of them); the short run is made long enough for the longest that keeps it short.
_SPLICE_MULTIPLES = (1, 2, 4)
#: The largest difference between two consecutive steady blocks, as a share of the period, for which a
#: stream counts as periodic. Exactly periodic streams (most on uncontended links) splice to the full
#: run's figures within rounding; contended ones settle into nearly periodic states, and within this
#: bound their spliced throughput stays within 1% of the full run's (tests/test_whatif.py).
PERIOD_TOL = 1e-2


def figures(trace) -> dict:
    """Throughput, bubble fraction and the largest worker's peak memory of a trace (planner.trace's metrics)."""
    peaks = peak_memory_bytes(trace)
    return {"throughput_samples_per_s": throughput_samples_per_s(trace),
            "bubble_fraction": bubble_fraction(trace),
            "peak_memory_bytes": max(peaks.values()) if peaks else None}


def long_run_figures(plan: Plan, profile: ModelProfile, topology: Topology, params: SimParams) -> dict:
    """``figures(simulate_plan(plan, ...))``, from shorter runs where the module docstring says they suffice."""
    out = None
    if plan.schedule in STREAM_FAMILIES:
        out = stream_extrapolated(plan, profile, topology, params)
    else:
        pair = extrapolation_pair(plan, params.recv_lookahead)
        if pair is not None:
            out = flush_extrapolated(plan, profile, topology, params, pair)
    return out if out is not None else figures(simulate_plan(plan, profile, topology, params=params))


# ---------------------------------------------------------------------- flush schedules: two short runs
def extrapolation_pair(plan: Plan, lookahead: int = 0) -> tuple[int, int] | None:
    """(M1, M2), both ≡ M (mod the round-robin period) and past the fill, when two runs there are cheaper
    than one at M; else None (simulate M itself).

    Period: every stage's replicas take microbatches round-robin, so the schedule repeats every
    lcm(replicas) microbatches (interleaved: every P, its group size). Fill: a replicated pipeline keeps
    about as many microbatches in flight as it has workers; M1 and M2 are each at least twice that apart,
    and M1 is ``lookahead`` more (receives are posted that many ahead into a buffer pool that only grows,
    so memory levels off that much later).
    """
    if plan.schedule not in AFFINE_FAMILIES or plan.batches != 1:
        return None
    M = plan.microbatches
    looped = FAMILY[plan.schedule].placement == "looped"  # a loop walks its microbatches in groups of P
    period = plan.pipeline_depth if looped else math.lcm(*plan.replicas)
    fill = 2 * max(sum(plan.replicas) // max(1, plan.chunks), plan.pipeline_depth)
    m1 = _at_least(fill + lookahead, M, period)
    m2 = _at_least(m1 + fill, M, period)
    if m2 >= M or m1 + m2 > 0.75 * M:
        return None
    return m1, m2


def _at_least(lo: int, M: int, period: int) -> int:
    """The least m >= lo with m ≡ M (mod period)."""
    return lo + (M - lo) % period


def _stage0_done(trace) -> list[float]:
    """Stage 0's backward ends: one per microbatch it finished."""
    return [e.end_s for e in trace.events if isinstance(e.lane, int) and e.kind in ("B", "BW")
            and e.action.split("B")[0] == "0"]


def _flush_quantities(trace) -> dict | None:
    """What the figures are made of, each affine in M: the completion window, makespan, busy time and peak
    memory per worker; None when the trace is not the one-batch kind ``figures`` reads that way."""
    if len(step_times_s(trace)) >= 3 or trace.meta.get("family") in STREAM_FAMILIES:
        return None
    start, end = span_s(trace)
    done = _stage0_done(trace)
    if not done:
        return None
    return {"window": max(done) - start, "makespan": end - start, "busy": busy_s(trace),
            "peak": peak_memory_bytes(trace), "done": len(done)}


def flush_extrapolated(plan: Plan, profile: ModelProfile, topology: Topology, params: SimParams,
                       pair: tuple[int, int]) -> dict | None:
    """The one-batch figures at plan.microbatches from runs at M1 and M2 (see ``extrapolation_pair``).

    Throughput is M × microbatch size over the completion window, bubble is 1 − busy / makespan averaged
    over workers, peak memory the largest worker's peak: each piece is fitted as a + b·M from the two
    runs and evaluated at M; a worker whose peak is the same in both runs has levelled off and keeps it
    (1F1B-like schedules), one whose peak grows keeps growing with M (GPipe). None (simulate in full)
    when a run does not have the expected shape.
    """
    M = plan.microbatches
    (m1, m2), qs = pair, []
    for m in pair:
        trace = simulate_plan(replace(plan, microbatches=m), profile, topology, params=params)
        q = _flush_quantities(trace)
        if q is None or q["done"] != m:
            return None
        if not qs:  # the pieces must give the simulator's own figures at M1
            got = _combine(q, m, plan.microbatch_size)
            ref = figures(trace)
            if not all(_close(got[k], ref[k]) for k in ref):
                return None
        qs.append(q)
    q1, q2 = qs
    if set(q1["busy"]) != set(q2["busy"]) or set(q1["peak"]) != set(q2["peak"]):
        return None
    fit = lambda a, b: a + (b - a) * (M - m1) / (m2 - m1)
    q = {"window": fit(q1["window"], q2["window"]), "makespan": fit(q1["makespan"], q2["makespan"]),
         "busy": {w: fit(q1["busy"][w], q2["busy"][w]) for w in q1["busy"]},
         "peak": {w: q1["peak"][w] if q1["peak"][w] == q2["peak"][w] else fit(q1["peak"][w], q2["peak"][w])
                  for w in q1["peak"]}}
    return _combine(q, M, plan.microbatch_size)


def _bubble(makespan: float, busy: dict) -> float:
    """1 − busy / makespan averaged over workers (planner.trace's bubble fraction)."""
    fr = [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy.values()]
    return sum(fr) / len(fr) if fr else 0.0


def _combine(q: dict, M: int, mb: int) -> dict:
    """``figures`` from its pieces (the same arithmetic as planner.trace's metrics)."""
    return {"throughput_samples_per_s": M * mb / q["window"] if q["window"] > 0 else 0.0,
            "bubble_fraction": _bubble(q["makespan"], q["busy"]),
            "peak_memory_bytes": max(q["peak"].values()) if q["peak"] else None}


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


# ---------------------------------------------------------------------- streams: one short run, spliced
def splice_length(plan: Plan, lookahead: int = 0) -> tuple[int, int] | None:
    """(N1, q): the short run's microbatch count for a one-batch stream and the most periods q a block
    may span in it; None when a short run would not save much.

    Period K = lcm(replicas): microbatch i goes to replica i mod r of each stage, so the stream's steady
    state repeats every K microbatches, or every few K when links are contended. The short run holds
    the fill (about one microbatch per worker, plus ``lookahead``: memory levels off that much later),
    ``_SPLICE_BLOCKS`` + 1 steady blocks of q·K, and the drain (what stage 0 holds in flight: its
    replicas × ⌈workers / replicas⌉); it is ≡ N (mod q·K), so the full run is the short one with whole
    blocks added.
    """
    if plan.schedule not in STREAM_FAMILIES or plan.batches != 1 or plan.chunks != 1:
        return None
    N, reps = plan.microbatches, plan.replicas
    K, W = math.lcm(*reps), sum(reps)
    drain = reps[0] * math.ceil(W / reps[0])
    best = None
    for q in _SPLICE_MULTIPLES:
        n1 = _at_least(W + lookahead + drain + (_SPLICE_BLOCKS + 1) * q * K, N, q * K)
        if n1 <= 0.6 * N:
            best = (n1, q)
    return best


def _stream_pieces(trace) -> dict:
    """What a stream's figures are made of: stage 0's completions (sorted), the span, busy time and peak
    memory per worker, and every worker's memory samples in time order."""
    mem: dict[int, list[tuple[float, float]]] = {}
    for m in trace.memory:
        mem.setdefault(m.worker, []).append((m.time_s, m.nbytes))
    for v in mem.values():
        v.sort(key=lambda x: x[0])
    return {"done": sorted(_stage0_done(trace)), "span": span_s(trace), "busy": busy_s(trace),
            "peak": peak_memory_bytes(trace), "mem": mem}


def _stream_figures(done, makespan: float, busy: dict, peak: dict, mb: int) -> dict:
    """``figures`` of a stream from its pieces, with planner.trace's arithmetic: the least-squares rate
    over the second half of the completions, 1 − busy / makespan averaged over workers, the largest peak."""
    tail = np.asarray(done[len(done) // 2:], dtype=float)
    thr = 0.0
    if len(done) >= 4 and tail[-1] > tail[0]:
        thr = float(np.polyfit(tail - tail[0], np.arange(len(tail), dtype=float), 1)[0]) * mb
    return {"throughput_samples_per_s": thr, "bubble_fraction": _bubble(makespan, busy),
            "peak_memory_bytes": max(peak.values()) if peak else None}


def _level_max(samples: list[tuple[float, float]], t0: float, t1: float) -> float:
    """The highest memory level of a worker over [t0, t1] (the level entering the window included)."""
    i = max(0, bisect.bisect_right(samples, (t0, math.inf)) - 1)
    j = bisect.bisect_right(samples, (t1, math.inf))
    return max((b for _, b in samples[i:j]), default=0.0)


def stream_extrapolated(plan: Plan, profile: ModelProfile, topology: Topology, params: SimParams) -> dict | None:
    """A one-batch stream's figures at plan.microbatches = N from one run at N1 < N (``splice_length``).

    In the short run's completions d (stage 0's backward ends, sorted) the drain is the last ``drain``;
    just before it, ``_SPLICE_BLOCKS`` blocks of K (the shortest of q·lcm(replicas) that repeats) give
    the period T (seconds per K completions). The full run is the short one with (N − N1) / K copies of
    the last steady block inserted before the drain, each T later than the one before, and everything
    after shifted by as much: completions, and so the makespan; each worker computes for
    n_w(N) / n_w(N1) times as long (its microbatches, round-robin over its stage's replicas); memory
    repeats the steady block's levels, so the peak is the short run's. None (simulate in full) when the
    run is not periodic to ``PERIOD_TOL``, memory still grows from block to block, or the pieces do not
    give the simulator's own figures at N1.
    """
    size = splice_length(plan, params.recv_lookahead)
    if size is None or params.jitter:
        return None
    n1, q_max = size
    N, reps, mb = plan.microbatches, plan.replicas, plan.microbatch_size
    W, m = sum(reps), _SPLICE_BLOCKS
    drain = reps[0] * math.ceil(W / reps[0])
    trace = simulate_plan(replace(plan, microbatches=n1), profile, topology, params=params)
    q = _stream_pieces(trace)
    d = np.asarray(q["done"], dtype=float)
    if len(d) != n1 or len(q["busy"]) != W:
        return None
    a, b = q["span"]
    got, ref = _stream_figures(d, b - a, q["busy"], q["peak"], mb), figures(trace)
    if not all(_close(got[k], ref[k]) for k in ref):  # the pieces must give the simulator's own figures
        return None
    c = n1 - drain  # the drain's first completion
    for mult in (x for x in _SPLICE_MULTIPLES if x <= q_max):  # the shortest block that repeats
        K = mult * math.lcm(*reps)
        T = (d[c - 1] - d[c - 1 - m * K]) / m
        if T > 0 and float(np.max(np.abs(d[c - K:c] - d[c - 2 * K:c - K] - T))) <= PERIOD_TOL * T:
            break
    else:
        return None
    t_prev, t_mid, t_last = d[c - 1 - 2 * K], d[c - 1 - K], d[c - 1]
    for samples in q["mem"].values():  # memory must have levelled off: the last block peaks no higher
        if _level_max(samples, t_mid, t_last) > _level_max(samples, t_prev, t_mid):
            return None
    n = (N - n1) // K
    block = d[c - K:c]
    done = np.concatenate([d[:c], *(block + j * T for j in range(1, n + 1)), d[c:] + n * T])
    workers = [(r, j) for r in reps for j in range(r)]  # worker ids run stage by stage, replica by replica
    busy = {w: q["busy"][w] * len(range(j, N, r)) / len(range(j, n1, r)) for w, (r, j) in enumerate(workers)}
    return _stream_figures(done, b - a + n * T, busy, q["peak"], mb)
