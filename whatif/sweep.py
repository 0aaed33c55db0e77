"""A sweep end to end: plan every point (cache first, then a process pool), find the front, simulate what was asked.

A sweep is the product of device counts × device kinds × interconnects × schedules × microbatch
sizes (``SweepConfig.points``). Planning uses the cost model only (``whatif.points.plan_point``).
The simulator is not imported here: ``run_sweep`` is handed it as ``simulate``, a module-level
function (plan, profile, topology, optimizer) → {"throughput_samples_per_s", "bubble_fraction",
"peak_memory_bytes"}, the way ``planner.search.plan_model`` takes ``score``; the face passes sim's.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from planner.partition import PartitionCache
from planner.plan import Plan
from planner.families import FAMILY
from planner.profile import ModelProfile
from topologies.topology import Topology
from whatif.errors import WhatIfError
from whatif.front import cost_per_sample, fewest_devices_for, pareto_front
from whatif.points import SweepConfig, SweepPoint, SweepRecord, plan_point, point_cluster, point_profile
from whatif.pool import map_in_order, open_cache, read_cache

__all__ = ["Simulate", "Progress", "run_sweep", "SweepResult", "simulated_plan", "simulate_record", "finite"]

#: The simulator as a sweep takes it: (plan, profile, topology, optimizer name) → figures.
Simulate = Callable[[Plan, ModelProfile, Topology, str], dict]
#: Progress as a sweep reports it: (phase, done, total), e.g. ("planning", 3, 200).
Progress = Callable[[str, int, int], None]


def simulated_plan(plan: Plan, batches: int) -> Plan:
    """The plan as simulated: ``batches`` flushes of a flush schedule (each pays its fill and drain, so one
    batch already shows the bubble); a stream long enough for a steady second half (PipeDream's minibatch
    count does not change its steady state, so it is set to four per device)."""
    # a stream's steady second half must hold several rounds of every replica (they finish in bursts)
    need = max(2 * plan.pipeline_depth + 4, 4 * len(plan.devices))
    fam = FAMILY[plan.schedule]
    if not fam.batched:  # PipeDream: M is the stream's length
        return replace(plan, batches=1, microbatches=need)
    if fam.stream:
        return replace(plan, batches=max(1, math.ceil(need / plan.microbatches)))
    return replace(plan, batches=max(1, batches))


def simulate_record(rec: SweepRecord, simulate: Simulate, batches: int = 1) -> dict:
    """The simulator's figures for a planned record (``simulated_plan`` of its plan, on its cluster)."""
    plan = simulated_plan(Plan.from_dict(rec.plan), batches)
    return simulate(plan, point_profile(rec.model, rec.device_kind, plan.tensor_parallel, rec.point.calibration,
                                        plan.microbatch_size),
                    point_cluster(rec.interconnect, rec.devices, rec.device_kind), rec.point.optimizer)


@dataclass
class SweepResult:
    """A finished sweep.

    Attributes:
        config: what was swept.
        records: one per point, in point order.
        pareto: indices into records of the front.
        cached: how many records came from the cache.
        prices: dollars per device-hour by kind, when given.
        partition_hits: partition searches read back from a shared cache instead of run (work saved;
            the records are the same either way).
    """

    config: SweepConfig
    records: list[SweepRecord]
    pareto: list[int]
    cached: int = 0
    prices: dict[str, float] | None = None
    partition_hits: int = 0

    def to_json(self, target: float | None = None) -> dict:
        """The stable ``--json`` document: points, pareto, and the target answer when asked."""
        pts = [_public(r, self.prices) for r in self.records]
        doc = {"model": self.config.model, "points": pts, "pareto": [pts[i] for i in self.pareto],
               "feasible": sum(r.ok for r in self.records), "cached": self.cached}
        if target is not None:
            hit, best = fewest_devices_for(self.records, target, self.prices)
            doc["target"] = {"throughput_samples_per_s": target, "reached": hit is not None,
                             "answer": _public(hit, self.prices) if hit else None,
                             "best_reachable": _public(best, self.prices) if best else None}
        return finite(doc)


def finite(x):
    """Infinities and NaNs become None, so the document is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _public(rec: SweepRecord, prices: dict[str, float] | None) -> dict:
    out = rec.to_dict()
    del out["key"]
    out["cost_per_sample"] = cost_per_sample(rec, prices)
    return out


def _plan_group(task: tuple[tuple[SweepPoint, ...], bool]) -> tuple[list[SweepRecord], int]:
    """plan_point over points of one interconnect and device kind, in one worker, with one partition cache
    (unless ``share`` is off): at one microbatch size the partition search over the first N devices reads
    the same inputs on every cluster size of such a group (the presets lay devices out alike at every
    size), so each is run once; the cache compares the inputs themselves, so points that do not share them
    only lose the reuse. Points on one cluster also share its topology and routes (``point_cluster``).
    Returns the records and the cache's hits."""
    points, share = task
    if not share:
        return [plan_point(p) for p in points], 0
    cache = PartitionCache()
    return [plan_point(p, cache) for p in points], cache.hits


def _plan_work(task: tuple[tuple[SweepPoint, ...], bool]) -> float:
    """A rough planning cost for ordering the pool: the devices to plan over, per point."""
    return float(sum(p.devices for p in task[0]))


def _sim_work(task: tuple[Simulate, SweepRecord, int]) -> float:
    """A rough simulation cost for ordering the pool: the actions of the simulated program, about
    microbatches × stages (an extrapolated run simulates fewer; the estimate only orders the work)."""
    _, rec, batches = task
    plan = simulated_plan(Plan.from_dict(rec.plan), batches)
    return float(plan.microbatches * plan.batches * len(plan.stages))


def _sim_task(task: tuple[Simulate, SweepRecord, int]) -> dict:
    simulate, rec, batches = task
    try:
        return {"simulated": simulate_record(rec, simulate, batches)}
    except ValueError as e:
        return {"simulated": None, "simulation_error": e.args[0] if e.args else str(e)}


def run_sweep(config: SweepConfig, *, simulate: Simulate | None = None, jobs: int | None = None,
              cache: str | Path | None = None, prices: dict[str, float] | None = None,
              progress: Progress | None = None, share_partition_cache: bool = True) -> SweepResult:
    """Plan every point (cached ones are read back), find the front, simulate it.

    Args:
        config: the sweep.
        simulate: the simulator (see the module docstring); needed unless ``config.simulate`` is "none".
        jobs: worker processes (default: all cores); the result does not depend on it.
        cache: JSON-lines file of finished points, read first and appended to.
        prices: dollars per device-hour by device kind (adds cost per sample to the front).
        progress: told (phase, done, total) as points are planned and simulated.
        share_partition_cache: plan the points of one interconnect and kind with one partition cache (the
            records are the same without it; only the work differs).
    """
    jobs = jobs or os.cpu_count() or 1
    points = config.points()
    if not points:
        raise WhatIfError("the sweep is empty: give at least one device count, kind and interconnect")
    if simulate is None and config.simulate != "none":
        raise WhatIfError(f"simulate={config.simulate!r} needs a simulator; pass simulate= or use simulate='none'")
    report = progress or (lambda what, done, total: None)
    cache_path = Path(cache) if cache else None
    known = read_cache(cache_path)
    todo = [i for i, p in enumerate(points) if p.key() not in known]
    records: list[SweepRecord | None] = [SweepRecord.from_dict(known[p.key()]) if p.key() in known else None
                                         for p in points]
    cached = len(points) - len(todo)
    # points of one interconnect, device kind and microbatch size are planned together, smallest clusters
    # first, in groups small enough to leave every worker several: their partition searches share a cache
    # (an answer is only ever read back at the microbatch size it was found at, so splitting the groups by
    # it loses no reuse and halves the pool's tail), and the points of one cluster its topology and routes
    groups: dict[tuple, list[int]] = {}
    for i in sorted(todo, key=lambda i: points[i].devices):
        p = points[i]
        groups.setdefault((p.model, p.interconnect, p.device_kind, p.microbatch_size), []).append(i)
    cap = max(1, len(todo) // (4 * jobs))
    group_idx = [g[k:k + cap] for g in groups.values() for k in range(0, len(g), cap)]
    hits, planned = 0, 0
    sink = open_cache(cache_path) if cache_path else None
    try:
        def done(k: int, out: tuple[list[SweepRecord], int]) -> None:
            nonlocal hits, planned
            recs_k, hits_k = out
            hits += hits_k
            for i, rec in zip(group_idx[k], recs_k):
                records[i] = rec
                if sink:
                    sink.write(json.dumps({"key": rec.key, "record": rec.to_dict()}) + "\n")
                planned += 1
                report("planning", planned, len(todo))
            if sink:
                sink.flush()

        map_in_order(_plan_group, [(tuple(points[i] for i in g), share_partition_cache) for g in group_idx], jobs,
                     done, work=_plan_work)
        recs: list[SweepRecord] = records  # type: ignore[assignment]
        front = pareto_front(recs, prices)
        chosen = (front if config.simulate == "pareto" else
                  [i for i, r in enumerate(recs) if r.ok] if config.simulate == "all" else [])
        sim_keys = {i: f"sim:{config.sim_batches}:" + recs[i].key for i in chosen}
        sim_todo = [i for i in chosen if sim_keys[i] not in known]
        for i in chosen:
            if sim_keys[i] in known:
                recs[i] = replace(recs[i], **known[sim_keys[i]])

        def sim_done(k: int, extra: dict) -> None:
            nonlocal simulated
            i = sim_todo[k]
            recs[i] = replace(recs[i], **extra)
            if sink:
                sink.write(json.dumps({"key": sim_keys[i], "record": extra}) + "\n")
                sink.flush()
            simulated += 1
            report("simulating", simulated, len(sim_todo))

        simulated = 0
        map_in_order(_sim_task, [(simulate, recs[i], config.sim_batches) for i in sim_todo], jobs, sim_done,
                     work=_sim_work)
    finally:
        if sink:
            sink.close()
    return SweepResult(config, recs, front, cached, prices, hits)
