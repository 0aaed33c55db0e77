"""What-if sweeps: plan one model on many candidate clusters, find the Pareto front and the smallest cluster for a target.

A sweep is the product of device counts × device kinds × interconnects ×
schedules × microbatch sizes. Each point builds its cluster from a preset
(:func:`build_cluster`), plans the model on it with the planner's cost model
(:func:`plan_point`, the only place the planner is called) and keeps a
JSON-ready record. Points are independent, so they run in a process pool;
records are ordered by the point list, never by completion, so the output
does not depend on ``jobs``. A cache file (JSON lines, one finished point per
line keyed by its parameters) lets an interrupted sweep resume.

After planning, the Pareto front — throughput up; devices, peak memory per
device and, with prices, cost per sample down — is simulated
(:func:`simulate_record`, a few batches on the SimPy model) so every answer
carries the simulator's figure beside the cost model's.

Interconnect vocabulary (``parse_interconnect``)::

    dgx-ib<G>       8-GPU NVSwitch servers, one InfiniBand NIC of G Gbit/s each, one IB switch
    pcie-eth<G>     4-GPU PCIe servers (12 GB/s), one Ethernet link of G Gbit/s each, one switch
    pcie8-eth<G>    the same with 8 GPUs per server
    fattree-ib<G>   8-GPU NVSwitch servers, 4 per leaf, non-blocking two-level IB fat tree, G Gbit/s
    ideal           every device on one switch, infinite bandwidth (an upper bound)

A device count that is not whole servers (above one server) is an invalid
point, reported as such, not an error.
"""
from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

from planner.analytic import load_model, min_memory_per_device_bytes, on_device
from planner.plan import Plan
from planner.profile import ModelProfile
from pipetwin.errors import UserError
from topologies.devices import device_kind
from topologies.presets import dgx, fattree, ideal, pcie
from topologies.topology import Topology, TopologyError

__all__ = ["WhatIfError", "Interconnect", "parse_interconnect", "build_cluster", "SweepPoint", "SweepConfig",
           "plan_point", "simulate_record", "pareto_front", "cost_per_sample", "fewest_devices_for",
           "run_sweep", "SweepResult", "stage_table", "INTERCONNECT_HELP", "CACHE_VERSION", "search", "SearchResult",
           "simulate_candidate", "explain_difference", "search_profile", "plot_sweep"]

#: Bumped when a record's meaning changes, so old cache lines are not reused.
CACHE_VERSION = 1

INTERCONNECT_HELP = ("dgx-ib<Gbit/s> (8-GPU NVSwitch servers on InfiniBand), pcie-eth<Gbit/s> (4-GPU PCIe servers "
                     "on Ethernet; pcie8-eth<G> for 8), fattree-ib<Gbit/s> (NVSwitch servers in a fat tree), ideal")


class WhatIfError(UserError):
    """Bad what-if input: the message says what to change."""


# ---------------------------------------------------------------------- clusters
@dataclass(frozen=True)
class Interconnect:
    """A named way of joining devices into a cluster.

    Attributes:
        name: the spelling the user gave (normalised to lower case).
        family: "dgx", "pcie", "fattree" or "ideal".
        gbps: the inter-server link in Gbit/s (0 for ideal).
        per_server: devices per server.
    """

    name: str
    family: str
    gbps: float
    per_server: int


_IC_RE = re.compile(r"^(dgx|pcie|pcie8|fattree)-(ib|eth)(\d+(?:\.\d+)?)$")
_IC_FABRIC = {"dgx": "ib", "fattree": "ib", "pcie": "eth", "pcie8": "eth"}


def parse_interconnect(name: str) -> Interconnect:
    """``dgx-ib200`` -> Interconnect("dgx-ib200", "dgx", 200, 8); see the module docstring for the vocabulary."""
    text = str(name).strip().lower()
    if text == "ideal":
        return Interconnect(text, "ideal", 0.0, 1)
    m = _IC_RE.match(text)
    if not m or _IC_FABRIC[m.group(1)] != m.group(2) or float(m.group(3)) <= 0:
        raise WhatIfError(f"unknown interconnect {name!r}; use {INTERCONNECT_HELP}")
    fam = m.group(1)
    per = {"dgx": 8, "fattree": 8, "pcie": 4, "pcie8": 8}[fam]
    return Interconnect(text, "pcie" if fam == "pcie8" else fam, float(m.group(3)), per)


def build_cluster(interconnect: str | Interconnect, devices: int, kind: str) -> Topology:
    """The topology of ``devices`` devices of ``kind`` joined by ``interconnect``.

    Raises:
        WhatIfError: the count is not a whole number of servers (above one server).
    """
    ic = interconnect if isinstance(interconnect, Interconnect) else parse_interconnect(interconnect)
    if devices < 1:
        raise WhatIfError(f"device count must be >= 1 (got {devices})")
    k = device_kind(kind).name
    if ic.family == "ideal":
        return _with_kind(ideal(devices, name=f"ideal:{devices}"), k)
    gpus = min(devices, ic.per_server)
    if devices % gpus:
        raise WhatIfError(f"{devices} devices are not whole {ic.per_server}-device servers of {ic.name}")
    servers = devices // gpus
    if ic.family == "dgx":
        return dgx(servers, gpus, k, ic.gbps)
    if ic.family == "pcie":
        return pcie(servers, gpus, k, ic.gbps)
    return fattree(devices, gpus, k, ic.gbps, leaf=4)


def _with_kind(topo: Topology, kind: str) -> Topology:
    """An ideal topology whose devices are of catalogue ``kind``."""
    import networkx as nx

    from topologies.devices import make_device

    g = nx.Graph(topo.graph)
    for n in topo.devices:
        g.nodes[n]["device"] = make_device(n, kind)
    return Topology(g, f"{topo.name},kind={kind}", [[list(topo.devices)]])


# ---------------------------------------------------------------------- points
@dataclass(frozen=True)
class SweepPoint:
    """One configuration of a sweep: a cluster and the planning choices for it.

    Attributes:
        model: the model spec (``planner.analytic.load_model``).
        devices: devices in the cluster.
        device_kind: catalogue kind of every device.
        interconnect: interconnect name (``parse_interconnect``).
        schedule: schedule family, or "auto" to let the planner choose.
        microbatch_size: samples per microbatch.
        global_batch: samples per optimizer step (None: the planner chooses).
        optimizer: optimizer whose state the memory accounting carries.
        recompute: activation recomputation.
        top_k: candidates the planner keeps (the record keeps the best).
    """

    model: str
    devices: int
    device_kind: str
    interconnect: str
    schedule: str = "auto"
    microbatch_size: int = 1
    global_batch: int | None = None
    optimizer: str = "adam"
    recompute: bool = False
    top_k: int = 1

    def key(self) -> str:
        """The cache key: every parameter that changes the answer, as canonical JSON."""
        return json.dumps({"v": CACHE_VERSION, **asdict(self)}, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class SweepConfig:
    """What to sweep.

    Attributes:
        model: model spec.
        devices: device counts.
        device_kinds: catalogue kinds.
        interconnects: interconnect names.
        schedules: schedule families or "auto".
        microbatch_sizes: microbatch sizes.
        global_batch: samples per optimizer step (None: the planner chooses).
        optimizer: "adam", "sgd" (with momentum) or "none".
        recompute: activation recomputation.
        simulate: "pareto" (simulate the front), "all" or "none".
        sim_batches: optimizer steps each simulation runs.
    """

    model: str
    devices: tuple[int, ...]
    device_kinds: tuple[str, ...] = ("a100-80gb",)
    interconnects: tuple[str, ...] = ("dgx-ib200",)
    schedules: tuple[str, ...] = ("auto",)
    microbatch_sizes: tuple[int, ...] = (1,)
    global_batch: int | None = None
    optimizer: str = "adam"
    recompute: bool = False
    simulate: str = "pareto"
    sim_batches: int = 1

    def points(self) -> list[SweepPoint]:
        """Every point, in a fixed order: interconnect, kind, devices, schedule, microbatch size."""
        for ic in self.interconnects:
            parse_interconnect(ic)
        for k in self.device_kinds:
            device_kind(k)
        if self.simulate not in ("pareto", "all", "none"):
            raise WhatIfError(f"simulate must be pareto, all or none (got {self.simulate!r})")
        return [SweepPoint(self.model, n, device_kind(k).name, parse_interconnect(ic).name, s, mb,
                           self.global_batch, self.optimizer, self.recompute)
                for ic in self.interconnects for k in self.device_kinds for n in self.devices
                for s in self.schedules for mb in self.microbatch_sizes]


@lru_cache(maxsize=64)
def _profile(model: str, kind: str) -> ModelProfile:
    return on_device(load_model(model, kind if _is_analytic(model) else None), kind)


def _is_analytic(model: str) -> bool:
    """Whether the spec is a name or family spec (timed on a kind), not a measured profile file."""
    return not (model.startswith("uniform") or Path(model.split("@")[0]).exists())


@lru_cache(maxsize=64)
def _cluster(interconnect: str, devices: int, kind: str) -> Topology:
    return build_cluster(interconnect, devices, kind)


# ---------------------------------------------------------------------- the planner call
def _plan_model(profile: ModelProfile, topology: Topology, point: SweepPoint, partition_cache=None):
    """The one call into the planner (its cost model ranks; no simulation here)."""
    from planner.search import plan_model

    return plan_model(profile, topology, schedule=point.schedule, microbatch_size=point.microbatch_size,
                      global_batch=point.global_batch, top_k=point.top_k, recompute=point.recompute,
                      optimizer=point.optimizer, partition_cache=partition_cache)


def plan_point(point: SweepPoint, partition_cache=None) -> dict:
    """Plan one point; a JSON-ready record (``status`` ok, no-fit or invalid, and why).

    Pure: the same point always gives the same record, alone or inside a sweep. ``partition_cache``
    (a ``planner.partition.PartitionCache``) only saves work: partition searches another point already
    ran on the same inputs are read back, bit for bit what they would compute.
    """
    rec: dict = {"key": point.key(), "model": point.model, "devices": point.devices, "device_kind": point.device_kind,
                 "interconnect": point.interconnect, "schedule": point.schedule,
                 "microbatch_size": point.microbatch_size, "global_batch": point.global_batch,
                 "status": "invalid", "reason": None, "plan": None, "topology": None,
                 "throughput_samples_per_s": 0.0, "time_per_sample_s": math.inf, "peak_memory_bytes": None,
                 "memory_limit_bytes": device_kind(point.device_kind).memory_bytes, "memory_needed_bytes": None,
                 "devices_used": 0, "bubble_fraction": None, "binding": None, "stages": [], "explanation": None}
    try:
        topo = _cluster(point.interconnect, point.devices, point.device_kind)
        profile = _profile(point.model, point.device_kind)
    except (WhatIfError, TopologyError) as e:
        rec["reason"] = e.args[0] if e.args else str(e)
        return rec
    rec["topology"] = topo.name
    try:
        result = _plan_model(profile, topo, point, partition_cache)
    except ValueError as e:  # the planner's bad-input errors (PlanError and friends) are ValueErrors
        msg = e.args[0] if e.args else str(e)
        nofit = "fit" in msg.lower()
        rec["status"], rec["reason"] = ("no-fit" if nofit else "invalid"), msg
        if nofit:
            m = re.search(r"needs is ([0-9.eE+-]+) bytes", msg)
            rec["memory_needed_bytes"] = float(m.group(1)) if m else _memory_needed(profile, point, None)
        return rec
    return _fill(rec, result, profile, point)


def _fill(rec: dict, result, profile: ModelProfile, point: SweepPoint) -> dict:
    """Copy the planner's best candidate (or why nothing fits) into the record."""
    cands = list(getattr(result, "candidates", ()) or ())
    best = next((c for c in cands if getattr(c, "fits", True)), None)
    expl = getattr(result, "explanation", None)
    rec["explanation"] = expl if isinstance(expl, (str, type(None))) else str(expl)
    if best is None:
        rec["status"] = "no-fit"
        rec["memory_needed_bytes"] = _memory_needed(profile, point, cands)
        need = rec["memory_needed_bytes"]
        rec["reason"] = (f"{point.model} fits on no plan of {point.devices}×{point.device_kind}: it would need "
                         f"{_gb(need)} per device, the device has {_gb(rec['memory_limit_bytes'])}")
        return rec
    plan: Plan = best.plan
    peak = max(best.peak_memory_bytes.values()) if best.peak_memory_bytes else 0.0
    rec.update(status="ok", plan=plan.to_dict(), throughput_samples_per_s=best.throughput_samples_per_s,
               time_per_sample_s=best.time_per_sample_s, peak_memory_bytes=peak,
               devices_used=len(plan.devices), bubble_fraction=best.bubble_fraction,
               stages=[s.to_dict() for s in best.stages])
    bott = max(best.stages, key=lambda s: s.time_s)
    rec["binding"] = bott.binding
    return rec


def _memory_needed(profile: ModelProfile, point: SweepPoint, cands) -> float:
    """The least peak memory per device any candidate needed, else a lower bound from the profile."""
    peaks = [max(c.peak_memory_bytes.values()) for c in (cands or ()) if getattr(c, "peak_memory_bytes", None)]
    bound = min_memory_per_device_bytes(profile, point.devices, point.optimizer, point.microbatch_size)
    return min(peaks) if peaks else bound


def _gb(x: float | None) -> str:
    return "?" if x is None else f"{x / 1e9:.1f} GB"


# ---------------------------------------------------------------------- simulation
def simulate_record(rec: dict, batches: int = 1) -> dict:
    """The simulator's figures for a planned record: throughput, bubble and peak memory, a few batches long.

    Long runs are not simulated at their full count:

    * a one-batch flush schedule with many microbatches: its figures are affine in the microbatch count
      M along M ≡ M_real (mod the replicas' round-robin period), once the pipeline is full, so two
      shorter runs fix them (:func:`_flush_extrapolated`);
    * a one-batch stream (2BW, PipeDream) much longer than its pipeline: its steady state repeats every
      lcm(replicas) microbatches, so one shorter run, its steady block repeated, gives the long run's
      completions, busy time, makespan and peak (:func:`_stream_extrapolated`).

    Either falls back to the full run when the short runs do not have the expected shape.
    """
    from sim.params import SimParams
    from planner.costmodel import OPTIMIZER_STATE

    plan = _sim_plan(Plan.from_dict(rec["plan"]), batches)
    profile = _profile(rec["model"], rec["device_kind"])
    topo = _cluster(rec["interconnect"], rec["devices"], rec["device_kind"])
    params = SimParams(optimizer_state_factor=OPTIMIZER_STATE.get(_optimizer_of(rec), 1.0), link_events=False)
    out = None
    if plan.schedule in _STREAM_FAMILIES:
        out = _stream_extrapolated(plan, profile, topo, params)
    else:
        pair = _extrapolation_pair(plan, params.recv_lookahead)
        if pair is not None:
            out = _flush_extrapolated(plan, profile, topo, params, pair)
    return out if out is not None else _figures(_simulate(plan, profile, topo, params))


def _simulate(plan: Plan, profile: ModelProfile, topo: Topology, params):
    from sim import simulate_plan

    return simulate_plan(plan, profile, topo, params=params)


def _figures(trace) -> dict:
    from planner.trace import bubble_fraction, peak_memory_bytes, throughput_samples_per_s

    peaks = peak_memory_bytes(trace)
    return {"throughput_samples_per_s": throughput_samples_per_s(trace),
            "bubble_fraction": bubble_fraction(trace),
            "peak_memory_bytes": max(peaks.values()) if peaks else None}


#: Flush schedules whose one-batch figures are affine in the microbatch count once the pipeline is full.
_AFFINE_FAMILIES = ("gpipe", "1f1b", "zb-h1", "interleaved")


def _extrapolation_pair(plan: Plan, lookahead: int = 0) -> tuple[int, int] | None:
    """(M1, M2), both ≡ M (mod the round-robin period) and past the fill, when two runs there are cheaper
    than one at M; else None (simulate M itself).

    Period: every stage's replicas take microbatches round-robin, so the schedule repeats every
    lcm(replicas) microbatches (interleaved: every P, its group size). Fill: a replicated pipeline keeps
    about as many microbatches in flight as it has workers; M1 and M2 are each at least twice that apart,
    and M1 is ``lookahead`` more (receives are posted that many ahead into a buffer pool that only grows,
    so memory levels off that much later).
    """
    if plan.schedule not in _AFFINE_FAMILIES or plan.batches != 1:
        return None
    M = plan.microbatches
    period = plan.pipeline_depth if plan.schedule == "interleaved" else math.lcm(*plan.replicas)
    fill = 2 * max(sum(plan.replicas) // max(1, plan.chunks), plan.pipeline_depth)
    m1 = _at_least(fill + lookahead, M, period)
    m2 = _at_least(m1 + fill, M, period)
    if m2 >= M or m1 + m2 > 0.75 * M:
        return None
    return m1, m2


def _at_least(lo: int, M: int, period: int) -> int:
    """The least m >= lo with m ≡ M (mod period)."""
    return lo + (M - lo) % period


def _flush_quantities(trace) -> dict | None:
    """What the figures are made of, each affine in M: the completion window, makespan, busy time and peak
    memory per worker; None when the trace is not the one-batch kind ``_figures`` reads that way."""
    from planner.trace import busy_s, peak_memory_bytes, span_s, step_times_s

    if len(step_times_s(trace)) >= 3 or trace.meta.get("family") in ("pipedream", "2bw"):
        return None
    start, end = span_s(trace)
    done = [e.end_s for e in trace.events if isinstance(e.lane, int) and e.kind in ("B", "BW")
            and e.action.split("B")[0].isdigit() and int(e.action.split("B")[0]) == 0]
    if not done:
        return None
    return {"window": max(done) - start, "makespan": end - start, "busy": busy_s(trace),
            "peak": peak_memory_bytes(trace), "done": len(done)}


def _flush_extrapolated(plan: Plan, profile: ModelProfile, topo: Topology, params, pair: tuple[int, int]) -> dict | None:
    """The one-batch figures at plan.microbatches from runs at M1 and M2 (see ``_extrapolation_pair``).

    Throughput is M × microbatch size over the completion window, bubble is 1 − busy / makespan averaged
    over workers, peak memory the largest worker's peak: each piece is fitted as a + b·M from the two
    runs and evaluated at M; a worker whose peak is the same in both runs has levelled off and keeps it
    (1F1B-like schedules), one whose peak grows keeps growing with M (GPipe). None (simulate in full)
    when a run does not have the expected shape.
    """
    M = plan.microbatches
    (m1, m2), qs = pair, []
    for m in pair:
        trace = _simulate(replace(plan, microbatches=m), profile, topo, params)
        q = _flush_quantities(trace)
        if q is None or q["done"] != m:
            return None
        if not qs:  # the pieces must give the simulator's own figures at M1
            got = _combine(q, m, plan.microbatch_size)
            ref = _figures(trace)
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


def _combine(q: dict, M: int, mb: int) -> dict:
    """``_figures`` from its pieces (the same arithmetic as planner.trace's metrics)."""
    fr = [1.0 - b / q["makespan"] if q["makespan"] > 0 else 0.0 for b in q["busy"].values()]
    return {"throughput_samples_per_s": M * mb / q["window"] if q["window"] > 0 else 0.0,
            "bubble_fraction": sum(fr) / len(fr) if fr else 0.0,
            "peak_memory_bytes": max(q["peak"].values()) if q["peak"] else None}


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


#: Streams: no flush, so the steady state runs from the fill to the drain.
_STREAM_FAMILIES = ("2bw", "pipedream")
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


def _splice_length(plan: Plan, lookahead: int = 0) -> tuple[int, int] | None:
    """(N1, q): the short run's microbatch count for a one-batch stream and the most periods q a block
    may span in it; None when a short run would not save much.

    Period K = lcm(replicas): microbatch i goes to replica i mod r of each stage, so the stream's steady
    state repeats every K microbatches, or every few K when links are contended. The short run holds
    the fill (about one microbatch per worker, plus ``lookahead``: memory levels off that much later),
    ``_SPLICE_BLOCKS`` + 1 steady blocks of q·K, and the drain (what stage 0 holds in flight: its
    replicas × ⌈workers / replicas⌉); it is ≡ N (mod q·K), so the full run is the short one with whole
    blocks added.
    """
    if plan.schedule not in _STREAM_FAMILIES or plan.batches != 1 or plan.chunks != 1:
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
    from planner.trace import busy_s, peak_memory_bytes, span_s

    done = sorted(e.end_s for e in trace.events if isinstance(e.lane, int) and e.kind in ("B", "BW")
                  and e.action.split("B")[0] == "0")
    mem: dict[int, list[tuple[float, float]]] = {}
    for m in trace.memory:
        mem.setdefault(m.worker, []).append((m.time_s, m.nbytes))
    for v in mem.values():
        v.sort(key=lambda x: x[0])
    return {"done": done, "span": span_s(trace), "busy": busy_s(trace), "peak": peak_memory_bytes(trace), "mem": mem}


def _stream_figures(done, makespan: float, busy: dict, peak: dict, mb: int) -> dict:
    """``_figures`` of a stream from its pieces, with planner.trace's arithmetic: the least-squares rate
    over the second half of the completions, 1 − busy / makespan averaged over workers, the largest peak."""
    import numpy as np

    tail = np.asarray(done[len(done) // 2:], dtype=float)
    thr = 0.0
    if len(done) >= 4 and tail[-1] > tail[0]:
        thr = float(np.polyfit(tail - tail[0], np.arange(len(tail), dtype=float), 1)[0]) * mb
    fr = [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy.values()]
    return {"throughput_samples_per_s": thr, "bubble_fraction": sum(fr) / len(fr) if fr else 0.0,
            "peak_memory_bytes": max(peak.values()) if peak else None}


def _level_max(samples: list[tuple[float, float]], t0: float, t1: float) -> float:
    """The highest memory level of a worker over [t0, t1] (the level entering the window included)."""
    import bisect

    i = max(0, bisect.bisect_right(samples, (t0, math.inf)) - 1)
    j = bisect.bisect_right(samples, (t1, math.inf))
    return max((b for _, b in samples[i:j]), default=0.0)


def _stream_extrapolated(plan: Plan, profile: ModelProfile, topo: Topology, params) -> dict | None:
    """A one-batch stream's figures at plan.microbatches = N from one run at N1 < N (``_splice_length``).

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
    import numpy as np

    size = _splice_length(plan, params.recv_lookahead)
    if size is None or params.jitter:
        return None
    n1, q_max = size
    N, reps, mb = plan.microbatches, plan.replicas, plan.microbatch_size
    W, m = sum(reps), _SPLICE_BLOCKS
    drain = reps[0] * math.ceil(W / reps[0])
    trace = _simulate(replace(plan, microbatches=n1), profile, topo, params)
    q = _stream_pieces(trace)
    d = np.asarray(q["done"], dtype=float)
    if len(d) != n1 or len(q["busy"]) != W:
        return None
    a, b = q["span"]
    got, ref = _stream_figures(d, b - a, q["busy"], q["peak"], mb), _figures(trace)
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


def _sim_plan(plan: Plan, batches: int) -> Plan:
    """The plan as simulated: ``batches`` flushes of a flush schedule (each pays its fill and drain, so one
    batch already shows the bubble); a stream long enough for a steady second half (PipeDream's minibatch
    count does not change its steady state, so it is set to four per device)."""
    # a stream's steady second half must hold several rounds of every replica (they finish in bursts)
    need = max(2 * plan.pipeline_depth + 4, 4 * len(plan.devices))
    if plan.schedule == "pipedream":
        return replace(plan, batches=1, microbatches=need)
    if plan.schedule == "2bw":
        return replace(plan, batches=max(1, math.ceil(need / plan.microbatches)))
    return replace(plan, batches=max(1, batches))


def _optimizer_of(rec: dict) -> str:
    return json.loads(rec["key"]).get("optimizer", "adam")


# ---------------------------------------------------------------------- the front and the answers
def cost_per_sample(rec: dict, prices: dict[str, float] | None) -> float | None:
    """Dollars per sample: devices × price per device-hour / 3600 / throughput (None without a price)."""
    if not prices or rec["device_kind"] not in prices or rec["throughput_samples_per_s"] <= 0:
        return None
    return rec["devices"] * prices[rec["device_kind"]] / 3600.0 / rec["throughput_samples_per_s"]


def _objectives(rec: dict, prices: dict[str, float] | None) -> tuple[float, ...]:
    """Smaller is better in every coordinate."""
    obj = (-rec["throughput_samples_per_s"], float(rec["devices"]), float(rec["peak_memory_bytes"] or 0.0))
    c = cost_per_sample(rec, prices)
    return obj + ((c,) if c is not None else ())


def pareto_front(records: list[dict], prices: dict[str, float] | None = None) -> list[int]:
    """Indices of the feasible records no other feasible record dominates; equal ones keep the first."""
    ok = [i for i, r in enumerate(records) if r["status"] == "ok"]
    objs = {i: _objectives(records[i], prices) for i in ok}
    front = []
    for i in ok:
        oi = objs[i]
        dominated = False
        for j in ok:
            if j == i:
                continue
            oj = objs[j]
            if len(oj) != len(oi):
                continue
            if all(a <= b for a, b in zip(oj, oi)) and (oj != oi or j < i):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def fewest_devices_for(records: list[dict], target: float, prices: dict[str, float] | None = None) -> tuple[dict | None, dict | None]:
    """(the smallest cluster reaching ``target`` samples/s, or None; the highest-throughput record, or None).

    Ties on devices go to the higher throughput, then the cheaper, then the earlier point.
    """
    ok = [r for r in records if r["status"] == "ok"]
    best = max(ok, key=lambda r: r["throughput_samples_per_s"], default=None)
    hits = [(r["devices"], -r["throughput_samples_per_s"], cost_per_sample(r, prices) or 0.0, k)
            for k, r in enumerate(ok) if r["throughput_samples_per_s"] >= target]
    if not hits:
        return None, best
    return ok[min(hits)[3]], best


@dataclass
class SweepResult:
    """A finished sweep.

    Attributes:
        config: what was swept.
        records: one per point, in point order.
        pareto: indices into records of the front.
        cached: how many records came from the cache.
    """

    config: SweepConfig
    records: list[dict]
    pareto: list[int]
    cached: int = 0
    prices: dict[str, float] | None = None

    def to_json(self, target: float | None = None) -> dict:
        """The stable ``--json`` document: points, pareto, and the target answer when asked."""
        pts = [_public(r, self.prices) for r in self.records]
        doc = {"model": self.config.model, "points": pts, "pareto": [pts[i] for i in self.pareto],
               "feasible": sum(r["status"] == "ok" for r in self.records), "cached": self.cached}
        if target is not None:
            hit, best = fewest_devices_for(self.records, target, self.prices)
            doc["target"] = {"throughput_samples_per_s": target, "reached": hit is not None,
                             "answer": _public(hit, self.prices) if hit else None,
                             "best_reachable": _public(best, self.prices) if best else None}
        return _finite(doc)


def _finite(x):
    """Infinities and NaNs become None, so the document is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _public(rec: dict, prices: dict[str, float] | None) -> dict:
    out = {k: v for k, v in rec.items() if k != "key"}
    out["cost_per_sample"] = cost_per_sample(rec, prices)
    return out


# ---------------------------------------------------------------------- the engine
def _read_cache(path: Path | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if path is None or not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            item = json.loads(line)
            out[item["key"]] = item["record"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut short by an interrupted run
    return out


def _open_cache(path: Path):
    """Open the cache for appending, finishing a line an interrupted run left cut short."""
    cut = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    sink = path.open("a")
    if cut:
        sink.write("\n")
    return sink


def _map(fn: Callable[[object], dict], items: list, jobs: int, on_done: Callable[[int, dict], None],
         work: Callable[[object], float] | None = None) -> list[dict]:
    """fn over items, in a process pool when jobs > 1; results in item order.

    ``work`` estimates an item's cost: the pool is handed the largest first, so that it ends on small
    items instead of one worker finishing a long one while the other idles. Only the order of
    submission changes; each result is fn(item), whichever process computes it.
    """
    out: list[dict | None] = [None] * len(items)
    if jobs <= 1 or len(items) <= 1:
        for i, it in enumerate(items):
            out[i] = fn(it)
            on_done(i, out[i])
        return out  # type: ignore[return-value]
    order = list(range(len(items)))
    if work is not None:
        order.sort(key=lambda i: -work(items[i]))  # stable: equal estimates keep item order
    with ProcessPoolExecutor(max_workers=min(jobs, len(items))) as pool:
        futures = {pool.submit(fn, items[i]): i for i in order}
        for f in as_completed(futures):
            i = futures[f]
            out[i] = f.result()
            on_done(i, out[i])
    return out  # type: ignore[return-value]


def _plan_group(points: tuple[SweepPoint, ...]) -> list[dict]:
    """plan_point over points of one interconnect and device kind, in one worker, with one partition cache:
    at one microbatch size the partition search over the first N devices reads the same inputs on every
    cluster size of such a group (the presets lay devices out alike at every size), so each is run once; the
    cache compares the inputs themselves, so points that do not share them only lose the reuse. Points on one
    cluster also share its topology and routes (``_cluster``)."""
    from planner.partition import PartitionCache

    cache = PartitionCache()
    return [plan_point(p, cache) for p in points]


def _plan_work(points: tuple[SweepPoint, ...]) -> float:
    """A rough planning cost for ordering the pool: the devices to plan over, per point."""
    return float(sum(p.devices for p in points))


def _sim_work(task: tuple[dict, int]) -> float:
    """A rough simulation cost for ordering the pool: the actions of the simulated program, about
    microbatches × stages (an extrapolated run simulates fewer; the estimate only orders the work)."""
    rec, batches = task
    plan = _sim_plan(Plan.from_dict(rec["plan"]), batches)
    return float(plan.microbatches * plan.batches * len(plan.stages))


def _sim_task(args: tuple[dict, int]) -> dict:
    rec, batches = args
    try:
        return {"simulated": simulate_record(rec, batches)}
    except ValueError as e:
        return {"simulated": None, "simulation_error": e.args[0] if e.args else str(e)}


def run_sweep(config: SweepConfig, *, jobs: int | None = None, cache: str | Path | None = None,
              prices: dict[str, float] | None = None, progress: bool = False) -> SweepResult:
    """Plan every point (cached ones are read back), find the front, simulate it.

    Args:
        config: the sweep.
        jobs: worker processes (default: all cores); the result does not depend on it.
        cache: JSON-lines file of finished points, read first and appended to.
        prices: dollars per device-hour by device kind (adds cost per sample to the front).
        progress: draw a rich progress bar on stderr.
    """
    jobs = jobs or os.cpu_count() or 1
    points = config.points()
    if not points:
        raise WhatIfError("the sweep is empty: give at least one device count, kind and interconnect")
    cache_path = Path(cache) if cache else None
    known = _read_cache(cache_path)
    todo = [i for i, p in enumerate(points) if p.key() not in known]
    sim_keys = {}
    records: list[dict | None] = [known.get(p.key()) for p in points]
    cached = len(points) - len(todo)
    sink = _open_cache(cache_path) if cache_path else None
    # points of one interconnect and device kind are planned together, smallest clusters first, in groups
    # small enough to leave every worker several: their partition searches share a cache, and the points of
    # one cluster (other microbatch sizes or schedules) its topology and routes
    groups: dict[tuple, list[int]] = {}
    for i in sorted(todo, key=lambda i: points[i].devices):
        p = points[i]
        groups.setdefault((p.model, p.interconnect, p.device_kind), []).append(i)
    cap = max(1, len(todo) // (4 * jobs))
    group_idx = [g[k:k + cap] for g in groups.values() for k in range(0, len(g), cap)]
    bar = _Bar(progress, len(todo), "planning")
    try:
        def done(k: int, recs_k: list[dict]) -> None:
            for i, rec in zip(group_idx[k], recs_k):
                records[i] = rec
                if sink:
                    sink.write(json.dumps({"key": rec["key"], "record": rec}) + "\n")
                bar.advance()
            if sink:
                sink.flush()

        _map(_plan_group, [tuple(points[i] for i in g) for g in group_idx], jobs, done, work=_plan_work)
        bar.close()
        recs: list[dict] = records  # type: ignore[assignment]
        front = pareto_front(recs, prices)
        chosen = (front if config.simulate == "pareto" else
                  [i for i, r in enumerate(recs) if r["status"] == "ok"] if config.simulate == "all" else [])
        for i in chosen:
            sim_keys[i] = f"sim:{config.sim_batches}:" + recs[i]["key"]
        sim_todo = [i for i in chosen if sim_keys[i] not in known]
        for i in chosen:
            if sim_keys[i] in known:
                recs[i] = {**recs[i], **known[sim_keys[i]]}
        bar = _Bar(progress, len(sim_todo), "simulating")

        def sim_done(k: int, extra: dict) -> None:
            i = sim_todo[k]
            recs[i] = {**recs[i], **extra}
            if sink:
                sink.write(json.dumps({"key": sim_keys[i], "record": extra}) + "\n")
                sink.flush()
            bar.advance()

        _map(_sim_task, [(recs[i], config.sim_batches) for i in sim_todo], jobs, sim_done, work=_sim_work)
    finally:
        bar.close()
        if sink:
            sink.close()
    return SweepResult(config, recs, front, cached, prices)


class _Bar:
    """A rich progress bar on stderr, or nothing."""

    def __init__(self, on: bool, total: int, what: str):
        self._p = None
        if on and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               console=Console(stderr=True), transient=True)
            self._p.start()
            self._t = self._p.add_task(what, total=total)

    def advance(self) -> None:
        if self._p:
            self._p.advance(self._t)

    def close(self) -> None:
        if self._p:
            self._p.stop()
            self._p = None


# ---------------------------------------------------------------------- explanations
def console():
    """A rich console; wide when the output is not a terminal, so piped tables stay readable."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def stage_table(stages: Iterable[dict], title: str = ""):
    """A rich table of a plan's stages: layers, replicas, compute, communication, all-reduce, memory, slack, binding."""
    from rich.table import Table

    t = Table(title=title or None, title_justify="left")
    for col in ("stage", "layers", "replicas", "compute ms", "comm ms", "all-reduce ms", "memory GB", "slack", "binding"):
        t.add_column(col, justify="right" if col not in ("binding", "layers") else "left")
    for s in stages:
        t.add_row(str(s["stage"]), f"{s['layers'][0]}–{s['layers'][1]}", str(s["replicas"]),
                  f"{s['compute_s'] * 1e3:.2f}", f"{s['comm_s'] * 1e3:.2f}", f"{s['allreduce_s'] * 1e3:.2f}",
                  f"{s['memory_bytes'] / 1e9:.1f}/{s['memory_limit_bytes'] / 1e9:.0f}", f"{s['slack']:.0%}",
                  s["binding"])
    return t


def plot_sweep(result: SweepResult, path: str | Path) -> None:
    """Throughput against devices for every feasible point, one series per kind × interconnect, front ringed;
    and peak memory per device against devices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list[dict]] = {}
    for r in result.records:
        if r["status"] == "ok":
            series.setdefault(f"{r['device_kind']} / {r['interconnect']}", []).append(r)
    for label, rs in sorted(series.items()):
        best: dict[int, dict] = {}
        for r in rs:
            if r["devices"] not in best or r["throughput_samples_per_s"] > best[r["devices"]]["throughput_samples_per_s"]:
                best[r["devices"]] = r
        xs = sorted(best)
        ax1.plot(xs, [best[x]["throughput_samples_per_s"] for x in xs], marker="o", ms=3, label=label)
        ax2.plot(xs, [best[x]["peak_memory_bytes"] / 1e9 for x in xs], marker="o", ms=3, label=label)
    front = [result.records[i] for i in result.pareto]
    ax1.scatter([r["devices"] for r in front], [r["throughput_samples_per_s"] for r in front], s=70,
                facecolors="none", edgecolors="black", label="Pareto front")
    sims = [r for r in front if r.get("simulated")]
    if sims:
        ax1.scatter([r["devices"] for r in sims], [r["simulated"]["throughput_samples_per_s"] for r in sims],
                    marker="x", color="black", label="simulated")
    for ax, ylab in ((ax1, "samples/s (cost model)"), (ax2, "peak memory per device (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    ax1.set_title(f"{result.config.model}: throughput")
    ax2.set_title("memory per device")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------- search: re-rank by simulation
@lru_cache(maxsize=8)
def _topology(spec: str) -> Topology:
    from topologies.presets import load_topology

    topo = load_topology(spec)
    topo.validate()
    return topo


def search_profile(model: str, topology: Topology, device_kind_name: str | None = None) -> ModelProfile:
    """The model timed on the cluster's device kind (``@kind`` or ``device_kind_name`` override it)."""
    from planner.analytic import split_device_suffix

    _, suffix = split_device_suffix(model)
    kind = device_kind_name or suffix
    if kind is None:
        try:
            kind = device_kind(topology.device(topology.devices[0]).kind).name
        except TopologyError:
            kind = None
    return load_model(model, None if suffix else kind) if _is_analytic(model) or suffix else load_model(model)


def _steady_window(trace) -> tuple[float, float]:
    """The window throughput_samples_per_s measures over (flush: first to last step; stream: second half)."""
    from planner.trace import span_s, step_times_s

    steps = step_times_s(trace)
    if trace.meta.get("family") not in ("pipedream", "2bw") and len(steps) >= 3:
        return steps[0], steps[-1]
    done = sorted(e.end_s for e in trace.events if isinstance(e.lane, int) and e.kind in ("B", "BW")
                  and e.action.split("B")[0].isdigit() and int(e.action.split("B")[0]) == 0)
    if len(done) >= 4:
        return done[len(done) // 2 - 1], done[-1]
    return span_s(trace)


def _shares(trace, window: tuple[float, float]) -> dict[int, dict[str, float]]:
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


def _p2p_slowdown(trace, topology: Topology) -> float:
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


def simulate_candidate(task: tuple) -> dict:
    """Simulate one candidate plan (a few batches) and say where its time goes; a JSON-ready dict.

    ``task`` is (plan dict, model spec, device kind or None, topology spec, optimizer, batches).
    """
    from planner.costmodel import OPTIMIZER_STATE
    from planner.trace import bubble_fraction, peak_memory_bytes, throughput_samples_per_s
    from sim import simulate_plan
    from sim.params import SimParams

    plan_d, model, kind, topo_spec, optimizer, batches = task
    topo = _topology(topo_spec)
    profile = _search_profile_cached(model, topo_spec, kind)
    plan = _sim_plan(Plan.from_dict(plan_d), batches)
    params = SimParams(optimizer_state_factor=OPTIMIZER_STATE.get(optimizer, 1.0), link_events=True)
    try:
        trace = simulate_plan(plan, profile, topo, params=params)
    except ValueError as e:
        return {"error": e.args[0] if e.args else str(e)}
    peaks = peak_memory_bytes(trace)
    window = _steady_window(trace)
    return {"throughput_samples_per_s": throughput_samples_per_s(trace), "bubble_fraction": bubble_fraction(trace),
            "peak_memory_bytes": max(peaks.values()) if peaks else 0.0,
            "shares": {str(w): s for w, s in sorted(_shares(trace, window).items())},
            "p2p_slowdown": _p2p_slowdown(trace, topo)}


@lru_cache(maxsize=8)
def _search_profile_cached(model: str, topo_spec: str, kind: str | None) -> ModelProfile:
    return search_profile(model, _topology(topo_spec), kind)


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
    """Why the simulated figure differs from the cost model's, in a few words (memory, all-reduce, bubbles, contention)."""
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
    shares = {int(w): v for w, v in sim["shares"].items()}
    if not shares:
        return f"simulated {ratio - 1:+.0%}"
    w = max(shares, key=lambda k: (shares[k]["compute"], -k))
    st = stage_of.get(w, 0)
    a, s = ana.get(st, {"compute": 0, "all-reduce": 0, "idle": 0}), shares[w]
    d_ar, d_idle = s["all-reduce"] - a["all-reduce"], s["idle"] - a["idle"]
    slow = sim["p2p_slowdown"]
    if abs(d_ar) >= abs(d_idle):
        what = "all-reduce contention" if d_ar > 0 else "all-reduce faster (hierarchical/overlapped)"
        return f"{what}: stage {st} in all-reduce {s['all-reduce']:.0%} vs {a['all-reduce']:.0%}"
    if d_idle > 0 and slow > 1.5:
        return f"p2p contention: transfers {slow:.1f}× slower; stage {st} idle {s['idle']:.0%} vs {a['idle']:.0%}"
    what = "bubbles" if d_idle > 0 else "fewer bubbles"
    return f"{what}: stage {st} idle {s['idle']:.0%} vs {a['idle']:.0%}"


@dataclass
class SearchResult:
    """Candidates ranked by the cost model and by simulation.

    Attributes:
        model: the model spec.
        topology: the topology name.
        rows: per candidate (analytic order): analytic and simulated rank and figures, the plan, the cause.
        explanation: the planner's explanation of its own best.
    """

    model: str
    topology: str
    rows: list[dict]
    explanation: str

    def to_json(self) -> dict:
        best_sim = min(self.rows, key=lambda r: r["simulated_rank"]) if self.rows else None
        return _finite({"model": self.model, "topology": self.topology, "candidates": self.rows,
                        "best_analytic": self.rows[0] if self.rows else None, "best_simulated": best_sim,
                        "explanation": self.explanation,
                        "rank_changes": sum(r["analytic_rank"] != r["simulated_rank"] for r in self.rows)})


def _plan_task(task: tuple) -> dict:
    """plan_model for one (schedule, microbatch size) of a search; {"candidates", "explanation"} or {"error"}."""
    from planner.plan import PlanError
    from planner.search import plan_model

    model, topo_spec, kind, sched, mb, global_batch, optimizer, recompute, top_k, limit = task
    try:
        res = plan_model(_search_profile_cached(model, topo_spec, kind), _topology(topo_spec), schedule=sched,
                         microbatch_size=mb, global_batch=global_batch, top_k=top_k, optimizer=optimizer,
                         recompute=recompute, memory_limit_bytes=limit, model_name=model)
    except PlanError as e:
        return {"error": e.args[0] if e.args else str(e)}
    return {"candidates": list(res.candidates), "explanation": res.explanation}


def _candidates(model: str, topo_spec: str, kind: str | None, schedules: tuple[str, ...],
                microbatch_sizes: tuple[int, ...], global_batch: int | None, optimizer: str, recompute: bool,
                top_k: int, memory_limit_bytes: float | None, jobs: int = 1) -> tuple[list, str]:
    """The cost model's candidates over schedules × microbatch sizes, merged and ranked, at most top_k."""
    topo = _topology(topo_spec)
    tasks = [(model, topo_spec, kind, sched, mb, global_batch, optimizer, recompute, top_k, memory_limit_bytes)
             for sched in schedules for mb in microbatch_sizes]
    cands, expl, errors = [], "", []
    for res in _map(_plan_task, tasks, jobs, lambda i, r: None):
        if "error" in res:
            errors.append(res["error"])
            continue
        cands.extend(res["candidates"])
        expl = expl or res["explanation"]
    if not cands:
        raise WhatIfError(errors[0] if errors else f"no candidate plans for {model} on {topo.name}")
    seen, out = set(), []
    for c in sorted(cands, key=lambda c: (c.time_per_sample_s, len(c.plan.devices), c.plan.schedule,
                                          c.plan.microbatch_size, c.plan.microbatches)):
        k = json.dumps(c.plan.to_dict(), sort_keys=True, default=str)
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out[:top_k], expl


def search(model: str, topology: str, *, top_k: int = 50, schedules: tuple[str, ...] = ("auto",),
           microbatch_sizes: tuple[int, ...] = (1, 2, 4), global_batch: int | None = None, optimizer: str = "sgd",
           recompute: bool = False, device_kind_name: str | None = None, memory_limit_bytes: float | None = None,
           sim_batches: int = 1, jobs: int | None = None, progress: bool = False) -> SearchResult:
    """Topology-aware plan search: the cost model's top-k candidates re-ranked by simulation.

    Candidates come from ``planner.search.plan_model`` for each schedule × microbatch
    size; every one is simulated (in a process pool; the result does not depend on
    ``jobs``) and ranked by simulated throughput. Each row says what most explains
    the difference between the two figures.
    """
    if top_k < 1:
        raise WhatIfError("--top-k must be >= 1")
    topo = _topology(topology)
    jobs = jobs or os.cpu_count() or 1
    search_profile(model, topo, device_kind_name)  # a bad model fails here, in one line
    cands, expl = _candidates(model, topology, device_kind_name, tuple(schedules), tuple(microbatch_sizes),
                              global_batch, optimizer, recompute, top_k, memory_limit_bytes, jobs)
    tasks = [(c.plan.to_dict(), model, device_kind_name, topology, optimizer, sim_batches) for c in cands]
    bar = _Bar(progress, len(tasks), "simulating")
    try:
        sims = _map(simulate_candidate, tasks, jobs, lambda i, r: bar.advance())
    finally:
        bar.close()
    rows = []
    for i, (c, s) in enumerate(zip(cands, sims)):
        cd = c.to_dict()
        rows.append({"analytic_rank": i + 1, "plan": c.plan.to_dict(), "schedule": c.plan.schedule,
                     "microbatch_size": c.plan.microbatch_size, "microbatches": c.plan.microbatches,
                     "chunks": c.plan.chunks, "replicas": list(c.plan.replicas), "devices_used": len(c.plan.devices),
                     "analytic_throughput_samples_per_s": c.throughput_samples_per_s,
                     "analytic_bubble_fraction": c.bubble_fraction,
                     "analytic_peak_memory_bytes": max(c.peak_memory_bytes.values()),
                     "simulated_throughput_samples_per_s": s.get("throughput_samples_per_s", 0.0),
                     "simulated_bubble_fraction": s.get("bubble_fraction"),
                     "simulated_peak_memory_bytes": s.get("peak_memory_bytes"),
                     "stages": [st.to_dict() for st in c.stages],
                     "cause": explain_difference(cd, s), "simulation": s})
    fits = lambda r: r["simulated_peak_memory_bytes"] is not None and r["simulated_peak_memory_bytes"] <= \
        min(st["memory_limit_bytes"] for st in r["stages"]) * (1 + 1e-9)
    order = sorted(range(len(rows)), key=lambda i: (not fits(rows[i]), -rows[i]["simulated_throughput_samples_per_s"], i))
    for rank, i in enumerate(order, 1):
        rows[i]["simulated_rank"] = rank
    return SearchResult(model, topo.name, rows, expl)
