"""Why a simulated figure differs from the cost model's: where a simulated trace's time goes, against the model's shares.

``breakdown`` reads a simulated trace (with link lanes) into figures, per-worker shares of the steady
window (compute, all-reduce, idle) and the mean slowdown of point-to-point transfers over their
uncontended time; ``explain_difference`` compares that with the cost model's candidate and names
the largest cause in a few words (memory, all-reduce, bubbles, contention).
"""
from __future__ import annotations

import math

from planner.program import FAMILY
from planner.trace import bubble_fraction, peak_memory_bytes, span_s, step_times_s, throughput_samples_per_s
from topologies.errors import TopologyError
from topologies.topology import Topology

__all__ = ["breakdown", "steady_window", "shares", "p2p_slowdown", "explain_difference"]


def breakdown(trace, topology: Topology) -> dict:
    """A simulated trace's figures and where its time goes; a JSON-ready dict."""
    peaks = peak_memory_bytes(trace)
    return {"throughput_samples_per_s": throughput_samples_per_s(trace), "bubble_fraction": bubble_fraction(trace),
            "peak_memory_bytes": max(peaks.values()) if peaks else 0.0,
            "shares": {str(w): s for w, s in sorted(shares(trace, steady_window(trace)).items())},
            "p2p_slowdown": p2p_slowdown(trace, topology)}


def steady_window(trace) -> tuple[float, float]:
    """The window throughput_samples_per_s measures over (flush: first to last step; stream: second half)."""
    steps = step_times_s(trace)
    fam = FAMILY.get(trace.meta.get("family"))
    if (fam is None or fam.flush) and len(steps) >= 3:
        return steps[0], steps[-1]
    done = sorted(e.end_s for e in trace.events if isinstance(e.lane, int) and e.kind in ("B", "BW")
                  and e.action.split("B")[0] == "0")
    if len(done) >= 4:
        return done[len(done) // 2 - 1], done[-1]
    return span_s(trace)


def shares(trace, window: tuple[float, float]) -> dict[int, dict[str, float]]:
    """Per worker, the share of the window spent computing, in all-reduce, and idle (waiting or bubbles)."""
    t0, t1 = window
    span = max(t1 - t0, 1e-30)
    out: dict[int, dict[str, float]] = {}
    for e in trace.events:
        if not isinstance(e.lane, int):
            continue
        d = max(0.0, min(e.end_s, t1) - max(e.start_s, t0))
        if d <= 0:
            continue
        s = out.setdefault(e.lane, {"compute": 0.0, "all-reduce": 0.0})
        if e.is_compute:
            s["compute"] += d / span
        elif e.kind == "ALLREDUCE":
            s["all-reduce"] += d / span
    for s in out.values():
        s["idle"] = max(0.0, 1.0 - s["compute"] - s["all-reduce"])
    return out


def p2p_slowdown(trace, topology: Topology) -> float:
    """Mean ratio of simulated to uncontended duration over point-to-point transfers (1.0: no contention)."""
    groups: dict[tuple, list[str]] = {}
    for e in trace.events:
        if isinstance(e.lane, str) and "SEND" in e.action and e.nbytes > 0:
            groups.setdefault((e.action, e.start_s, e.end_s, e.nbytes), []).append(e.lane)
    ratios = []
    for (_, a, b, nbytes), lanes in groups.items():
        try:
            hops = [topology.link(*lane.split("->")) for lane in lanes]
        except (TopologyError, TypeError):
            continue
        bw = min(h.bandwidth_bytes_per_s for h in hops)
        ideal = sum(h.latency_s for h in hops) + (nbytes / bw if math.isfinite(bw) else 0.0)
        if ideal > 0:
            ratios.append((b - a) / ideal)
    return sum(ratios) / len(ratios) if ratios else 1.0


def _analytic_shares(cand: dict) -> dict[int, dict[str, float]]:
    """The cost model's shares per stage: compute and all-reduce per batch over the batch time."""
    T = cand["predicted"]["time_per_batch_s"]
    M = cand["microbatches"]
    out = {}
    for s in cand["stages"]:
        c = min(1.0, s["compute_s"] * M / T) if T > 0 else 0.0
        a = min(1.0 - c, s["allreduce_s"] * M / T) if T > 0 else 0.0
        out[s["stage"]] = {"compute": c, "all-reduce": a, "idle": max(0.0, 1.0 - c - a)}
    return out


def explain_difference(cand: dict, sim: dict) -> str:
    """Why the simulated figure differs from the cost model's, in a few words (memory, all-reduce, bubbles, contention).

    ``cand`` is the cost model's candidate (``Candidate.to_dict``), ``sim`` its ``breakdown`` (or {"error"}).
    """
    if "error" in sim:
        return f"simulation failed: {sim['error']}"
    lim = min(s["memory_limit_bytes"] for s in cand["stages"])
    if sim["peak_memory_bytes"] > lim * (1 + 1e-9):
        return f"memory: the simulation peaks at {sim['peak_memory_bytes'] / 1e9:.1f} GB > {lim / 1e9:.0f} GB"
    ana_thr = cand["predicted"]["throughput_samples_per_s"]
    ratio = sim["throughput_samples_per_s"] / ana_thr if ana_thr > 0 else 1.0
    if abs(ratio - 1) < 0.02:
        return "agrees (within 2%)"
    # the simulated bottleneck: the worker with the largest compute share is the busiest; compare its stage
    ana = _analytic_shares(cand)
    stage_of = {}
    for s in cand["stages"]:
        for r, _ in enumerate(s["devices"]):
            stage_of.setdefault(len(stage_of), s["stage"])
    sim_shares = {int(w): v for w, v in sim["shares"].items()}
    if not sim_shares:
        return f"simulated {ratio - 1:+.0%}"
    w = max(sim_shares, key=lambda k: (sim_shares[k]["compute"], -k))
    st = stage_of.get(w, 0)
    a, s = ana.get(st, {"compute": 0, "all-reduce": 0, "idle": 0}), sim_shares[w]
    d_ar, d_idle = s["all-reduce"] - a["all-reduce"], s["idle"] - a["idle"]
    slow = sim["p2p_slowdown"]
    if abs(d_ar) >= abs(d_idle):
        what = "all-reduce contention" if d_ar > 0 else "all-reduce faster (hierarchical/overlapped)"
        return f"{what}: stage {st} in all-reduce {s['all-reduce']:.0%} vs {a['all-reduce']:.0%}"
    if d_idle > 0 and slow > 1.5:
        return f"p2p contention: transfers {slow:.1f}× slower; stage {st} idle {s['idle']:.0%} vs {a['idle']:.0%}"
    what = "bubbles" if d_idle > 0 else "fewer bubbles"
    return f"{what}: stage {st} idle {s['idle']:.0%} vs {a['idle']:.0%}"
