"""Topology-aware plan search: the cost model's top-k candidates on one cluster, re-ranked by simulation.

Candidates come from ``planner.search.plan_model`` for each schedule × microbatch size, merged and
deduplicated. Every one is simulated by the ``simulate`` it is handed (plan, profile, topology,
optimizer) → a trace with link lanes (the face passes sim's), in a process pool whose result does
not depend on ``jobs``, and ranked by simulated throughput among those that fit; each row says what
most explains the difference between the two figures (``whatif.explain``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

from planner.analytic import load_model, split_device_suffix
from planner.efficiency import DeviceCalibration
from planner.plan import Plan, PlanError
from planner.profile import ModelProfile
from planner.search import plan_model
from topologies.devices import device_kind
from topologies.presets import load_topology
from topologies.errors import TopologyError
from topologies.topology import Topology
from whatif.errors import WhatIfError
from whatif.explain import breakdown, explain_difference
from whatif.points import is_analytic
from whatif.pool import map_in_order
from whatif.sweep import Progress, finite, simulated_plan

__all__ = ["SimulateTrace", "search", "SearchResult", "simulate_candidate", "search_profile"]

#: The simulator as a search takes it: (plan, profile, topology, optimizer name) → a trace with link lanes.
SimulateTrace = Callable[[Plan, ModelProfile, Topology, str], object]


@lru_cache(maxsize=8)
def _topology(spec: str) -> Topology:
    topo = load_topology(spec)
    topo.validate()
    return topo


def search_profile(model: str, topology: Topology, device_kind_name: str | None = None,
                   calibration: DeviceCalibration | None = None, microbatch_size: int = 1) -> ModelProfile:
    """The model timed on the cluster's device kind (``@kind`` or ``device_kind_name`` override it); with a device
    ``calibration``, an analytic transformer is timed by its efficiency model on its kind at ``microbatch_size``
    (the face checks the cluster's devices are of that kind)."""
    _, suffix = split_device_suffix(model)
    kind = device_kind_name or suffix
    if calibration is not None:
        return load_model(model, None if suffix else kind, calibration=calibration, microbatch_size=microbatch_size)
    if kind is None:
        try:
            kind = device_kind(topology.device(topology.devices[0]).kind).name
        except TopologyError:
            kind = None
    return load_model(model, None if suffix else kind) if is_analytic(model) or suffix else load_model(model)


@lru_cache(maxsize=8)
def _search_profile_cached(model: str, topo_spec: str, kind: str | None, calibration: DeviceCalibration | None = None,
                           microbatch_size: int = 1) -> ModelProfile:
    return search_profile(model, _topology(topo_spec), kind, calibration,
                          microbatch_size if calibration is not None else 1)


def simulate_candidate(task: tuple) -> dict:
    """Simulate one candidate plan (a few batches) and say where its time goes (``whatif.explain.breakdown``).

    ``task`` is (simulate, plan dict, model spec, device kind or None, topology spec, optimizer, batches,
    device calibration or None).
    """
    simulate, plan_d, model, kind, topo_spec, optimizer, batches, calibration = task
    topo = _topology(topo_spec)
    profile = _search_profile_cached(model, topo_spec, kind, calibration, int(plan_d["microbatch_size"]))
    plan = simulated_plan(Plan.from_dict(plan_d), batches)
    try:
        trace = simulate(plan, profile, topo, optimizer)
    except ValueError as e:
        return {"error": e.args[0] if e.args else str(e)}
    return breakdown(trace, topo)


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
        return finite({"model": self.model, "topology": self.topology, "candidates": self.rows,
                       "best_analytic": self.rows[0] if self.rows else None, "best_simulated": best_sim,
                       "explanation": self.explanation,
                       "rank_changes": sum(r["analytic_rank"] != r["simulated_rank"] for r in self.rows)})


def _plan_task(task: tuple) -> dict:
    """plan_model for one (schedule, microbatch size) of a search; {"candidates", "explanation"} or {"error"}."""
    model, topo_spec, kind, sched, mb, global_batch, optimizer, recompute, top_k, limit, calibration = task
    try:
        res = plan_model(_search_profile_cached(model, topo_spec, kind, calibration, mb), _topology(topo_spec), schedule=sched,
                         microbatch_size=mb, global_batch=global_batch, top_k=top_k, optimizer=optimizer,
                         recompute=recompute, memory_limit_bytes=limit, model_name=model)
    except PlanError as e:
        return {"error": e.args[0] if e.args else str(e)}
    return {"candidates": list(res.candidates), "explanation": res.explanation}


def _candidates(model: str, topo_spec: str, kind: str | None, schedules: tuple[str, ...],
                microbatch_sizes: tuple[int, ...], global_batch: int | None, optimizer: str, recompute: bool | str,
                top_k: int, memory_limit_bytes: float | None, jobs: int = 1,
                calibration: DeviceCalibration | None = None) -> tuple[list, str]:
    """The cost model's candidates over schedules × microbatch sizes, merged and ranked, at most top_k."""
    topo = _topology(topo_spec)
    tasks = [(model, topo_spec, kind, sched, mb, global_batch, optimizer, recompute, top_k, memory_limit_bytes,
              calibration)
             for sched in schedules for mb in microbatch_sizes]
    cands, errors = [], []  # cands: (candidate, the explanation of the task that found it)
    for res in map_in_order(_plan_task, tasks, jobs, lambda i, r: None):
        if "error" in res:
            errors.append(res["error"])
            continue
        cands.extend((c, res["explanation"]) for c in res["candidates"])
    if not cands:
        raise WhatIfError(errors[0] if errors else f"no candidate plans for {model} on {topo.name}")
    seen, out = set(), []
    for c, expl in sorted(cands, key=lambda ce: (ce[0].time_per_sample_s, len(ce[0].plan.devices), ce[0].plan.schedule,
                                                 ce[0].plan.microbatch_size, ce[0].plan.microbatches)):
        k = json.dumps(c.plan.to_dict(), sort_keys=True, default=str)
        if k not in seen:
            seen.add(k)
            out.append((c, expl))
    # the explanation printed is the one of the task whose best is the merged best, not of the first task
    return [c for c, _ in out[:top_k]], out[0][1]


def _row(rank: int, c, s: dict) -> dict:
    """One candidate's row: the cost model's figures beside the simulation's, and the cause."""
    return {"analytic_rank": rank, "plan": c.plan.to_dict(), "schedule": c.plan.schedule,
            "microbatch_size": c.plan.microbatch_size, "microbatches": c.plan.microbatches,
            "chunks": c.plan.chunks, "replicas": list(c.plan.replicas), "devices_used": len(c.plan.devices),
            "analytic_throughput_samples_per_s": c.throughput_samples_per_s,
            "analytic_bubble_fraction": c.bubble_fraction,
            "analytic_peak_memory_bytes": max(c.peak_memory_bytes.values()),
            "simulated_throughput_samples_per_s": s.get("throughput_samples_per_s", 0.0),
            "simulated_bubble_fraction": s.get("bubble_fraction"),
            "simulated_peak_memory_bytes": s.get("peak_memory_bytes"),
            "stages": [st.to_dict() for st in c.stages],
            "cause": explain_difference(c.to_dict(), s), "simulation": s}


def _fits(row: dict) -> bool:
    peak = row["simulated_peak_memory_bytes"]
    return peak is not None and peak <= min(st["memory_limit_bytes"] for st in row["stages"]) * (1 + 1e-9)


def search(model: str, topology: str, *, simulate: SimulateTrace, top_k: int = 50,
           schedules: tuple[str, ...] = ("auto",), microbatch_sizes: tuple[int, ...] = (1, 2, 4),
           global_batch: int | None = None, optimizer: str = "sgd", recompute: bool | str = False,
           device_kind_name: str | None = None, memory_limit_bytes: float | None = None, sim_batches: int = 1,
           jobs: int | None = None, progress: Progress | None = None,
           calibration: DeviceCalibration | None = None) -> SearchResult:
    """The cost model's top-k candidates for ``model`` on the ``topology`` spec, re-ranked by ``simulate``.

    ``calibration``: a device calibration (``search_profile``); each microbatch size gets its own profile.

    ``progress`` is told ("simulating", done, total) as candidates finish.
    """
    if top_k < 1:
        raise WhatIfError("--top-k must be >= 1")
    topo = _topology(topology)
    jobs = jobs or os.cpu_count() or 1
    search_profile(model, topo, device_kind_name, calibration)  # a bad model fails here, in one line
    cands, expl = _candidates(model, topology, device_kind_name, tuple(schedules), tuple(microbatch_sizes),
                              global_batch, optimizer, recompute, top_k, memory_limit_bytes, jobs, calibration)
    tasks = [(simulate, c.plan.to_dict(), model, device_kind_name, topology, optimizer, sim_batches, calibration)
             for c in cands]
    finished = 0

    def done(i: int, r: dict) -> None:
        nonlocal finished
        finished += 1
        if progress:
            progress("simulating", finished, len(tasks))

    sims = map_in_order(simulate_candidate, tasks, jobs, done)
    rows = [_row(i + 1, c, s) for i, (c, s) in enumerate(zip(cands, sims))]
    order = sorted(range(len(rows)), key=lambda i: (not _fits(rows[i]), -rows[i]["simulated_throughput_samples_per_s"], i))
    for rank, i in enumerate(order, 1):
        rows[i]["simulated_rank"] = rank
    return SearchResult(model, topo.name, rows, expl)
