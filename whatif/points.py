"""One point of a sweep: a cluster and the planning choices for it, planned by the cost model into a typed record.

``plan_point`` is the only place the planner is called. It is pure: the same point always gives the
same record, alone or inside a sweep. A record is JSON-ready through ``SweepRecord.to_dict``, whose
keys (and their order) are the ``--json`` document's and the cache file's.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

from planner.analytic import load_model, min_memory_per_device_bytes, on_device
from planner.efficiency import DeviceCalibration
from planner.partition import PartitionCache
from planner.plan import Plan, fill_degrees
from planner.profile import ModelProfile
from planner.search import plan_model
from topologies.clusters import build_cluster, parse_interconnect
from topologies.devices import device_kind
from topologies.errors import TopologyError
from topologies.topology import Topology
from whatif.errors import WhatIfError

__all__ = ["CACHE_VERSION", "SweepPoint", "SweepConfig", "SweepRecord", "plan_point", "point_profile",
           "point_cluster", "is_analytic"]

#: Bumped when a record's meaning changes, so old cache lines are not reused.
CACHE_VERSION = 1


@dataclass(frozen=True)
class SweepPoint:
    """One configuration of a sweep: a cluster and the planning choices for it.

    Attributes:
        model: the model spec (``planner.analytic.load_model``).
        devices: devices in the cluster.
        device_kind: catalogue kind of every device.
        interconnect: interconnect name (``topologies.clusters.parse_interconnect``).
        schedule: schedule family, or "auto" to let the planner choose.
        microbatch_size: samples per microbatch.
        global_batch: samples per optimizer step (None: the planner chooses).
        optimizer: optimizer whose state the memory accounting carries.
        recompute: activation recomputation.
        top_k: candidates the planner keeps (the record keeps the best).
        grid: (tp, pp, dp, vp), a fixed plan instead of the planner's search (``plan_model(grid=...)``);
            None: search.
        calibration: a device calibration of ``device_kind`` (``--device-calibration``): an analytic
            transformer is then timed by its efficiency model at ``microbatch_size``; None: a fixed
            fraction of the kind's peak.
        zero_stage: ZeRO sharding the plans are costed with (``plan_model(zero_stage=...)``; 0: none).
    """

    model: str
    devices: int
    device_kind: str
    interconnect: str
    schedule: str = "auto"
    microbatch_size: int = 1
    global_batch: int | None = None
    optimizer: str = "adam"
    recompute: bool | str = False  # False/True: none/full; or a mode name (planner.recompute.MODES)
    top_k: int = 1
    grid: tuple[int, int, int, int] | None = None
    calibration: DeviceCalibration | None = None
    zero_stage: int = 0

    def __post_init__(self) -> None:
        if self.grid is not None:  # a cache key's JSON list
            object.__setattr__(self, "grid", tuple(int(x) for x in self.grid))

    def key(self) -> str:
        """The cache key: every parameter that changes the answer, as canonical JSON (no grid, no calibration:
        the keys points had before them; no zero_stage at 0)."""
        d = asdict(self)
        if d["grid"] is None:
            del d["grid"]
        if not d["zero_stage"]:
            del d["zero_stage"]
        if self.calibration is None:
            del d["calibration"]
        else:
            d["calibration"] = self.calibration.to_dict()
        return json.dumps({"v": CACHE_VERSION, **d}, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> "SweepPoint":
        """The point a cache key was made from."""
        d = {k: v for k, v in json.loads(key).items() if k != "v"}
        if d.get("calibration") is not None:
            d["calibration"] = DeviceCalibration.from_dict(d["calibration"], where="a cached point's calibration")
        return cls(**d)


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
        grid: (tp, pp, dp, vp) of a fixed plan, a missing degree None (filled from each device count by
            ``planner.plan.fill_degrees``); None: the planner searches.
        calibration: a device calibration (``SweepPoint.calibration``); every kind swept must be its kind.
        zero_stage: ZeRO sharding (``SweepPoint.zero_stage``).
    """

    model: str
    devices: tuple[int, ...]
    device_kinds: tuple[str, ...] = ("a100-80gb",)
    interconnects: tuple[str, ...] = ("dgx-ib200",)
    schedules: tuple[str, ...] = ("auto",)
    microbatch_sizes: tuple[int, ...] = (1,)
    global_batch: int | None = None
    optimizer: str = "adam"
    recompute: bool | str = False  # False/True: none/full; or a mode name (planner.recompute.MODES)
    simulate: str = "pareto"
    sim_batches: int = 1
    grid: tuple[int | None, int | None, int | None, int | None] | None = None
    calibration: DeviceCalibration | None = None
    zero_stage: int = 0

    def points(self) -> list[SweepPoint]:
        """Every point, in a fixed order: interconnect, kind, devices, schedule, microbatch size."""
        for ic in self.interconnects:
            parse_interconnect(ic)
        for k in self.device_kinds:
            device_kind(k)
        if self.simulate not in ("pareto", "all", "none"):
            raise WhatIfError(f"simulate must be pareto, all or none (got {self.simulate!r})")
        grids = {n: None if self.grid is None else fill_degrees(n, *self.grid) for n in self.devices}
        return [SweepPoint(self.model, n, device_kind(k).name, parse_interconnect(ic).name, s, mb,
                           self.global_batch, self.optimizer, self.recompute, grid=grids[n],
                           calibration=self.calibration, zero_stage=self.zero_stage)
                for ic in self.interconnects for k in self.device_kinds for n in self.devices
                for s in self.schedules for mb in self.microbatch_sizes]


@dataclass(frozen=True)
class SweepRecord:
    """What a sweep knows about one point: the planner's answer (or why there is none) and, once simulated,
    the simulator's figures.

    Attributes:
        key: the point's cache key (``SweepPoint.key``).
        model, devices, device_kind, interconnect, schedule, microbatch_size, global_batch: the point.
        status: "ok", "no-fit" (nothing fits in memory) or "invalid" (not a cluster or plan).
        reason: why not ok, one line.
        plan: the best plan (``Plan.to_dict``), when ok.
        topology: the cluster's name.
        throughput_samples_per_s, time_per_sample_s, bubble_fraction: the cost model's figures.
        peak_memory_bytes: the largest device's peak; memory_limit_bytes: a device's memory;
            memory_needed_bytes: when nothing fits, the least per-device peak a plan would need.
        devices_used: devices the plan uses (a plan may leave some idle).
        binding: what bounds the bottleneck stage (compute, communication, ...).
        stages: the plan's stages with their costs (``StageCost.to_dict``).
        explanation: the planner's one paragraph.
        simulated: the simulator's figures (throughput, bubble, peak memory), None when not simulated
            or when the simulation failed (then ``simulation_error`` says why).
    """

    key: str
    model: str
    devices: int
    device_kind: str
    interconnect: str
    schedule: str
    microbatch_size: int
    global_batch: int | None
    status: str = "invalid"
    reason: str | None = None
    plan: dict | None = None
    topology: str | None = None
    throughput_samples_per_s: float = 0.0
    time_per_sample_s: float = math.inf
    peak_memory_bytes: float | None = None
    memory_limit_bytes: float = 0.0
    memory_needed_bytes: float | None = None
    devices_used: int = 0
    bubble_fraction: float | None = None
    binding: str | None = None
    stages: tuple[dict, ...] = ()
    explanation: str | None = None
    simulated: dict | None = None
    simulation_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def point(self) -> SweepPoint:
        return SweepPoint.from_key(self.key)

    def to_dict(self) -> dict:
        """The JSON-ready record: its fields in order; ``simulated`` only once a simulation was tried."""
        out = {f.name: getattr(self, f.name) for f in _FIELDS[:-2]}
        out["stages"] = list(self.stages)
        if self.simulated is not None or self.simulation_error is not None:
            out["simulated"] = self.simulated
        if self.simulation_error is not None:
            out["simulation_error"] = self.simulation_error
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "SweepRecord":
        """The record ``to_dict`` wrote (a cache line)."""
        rec = cls(**{k: d[k] for k in _NAMES if k in d})
        return replace(rec, stages=tuple(rec.stages))


_FIELDS = fields(SweepRecord)
_NAMES = tuple(f.name for f in _FIELDS)


@lru_cache(maxsize=64)
def point_profile(model: str, kind: str, tensor_parallel: int = 1, calibration: DeviceCalibration | None = None,
                  microbatch_size: int = 1) -> ModelProfile:
    """The model timed on ``kind`` (a measured profile file is read as it is), per TP rank of ``tensor_parallel``;
    with a ``calibration`` of that kind, an analytic transformer is timed by its efficiency model at
    ``microbatch_size``."""
    return on_device(load_model(model, kind if is_analytic(model) else None, tensor_parallel=tensor_parallel,
                                calibration=calibration,
                                microbatch_size=microbatch_size if calibration is not None else 1), kind)


def is_analytic(model: str) -> bool:
    """Whether the spec is a name or family spec (timed on a kind), not a measured profile file."""
    return not (model.startswith("uniform") or Path(model.split("@")[0]).exists())


@lru_cache(maxsize=64)
def point_cluster(interconnect: str, devices: int, kind: str) -> Topology:
    """The point's cluster (built once per process: points on one cluster share its topology and routes)."""
    return build_cluster(interconnect, devices, kind)


def plan_point(point: SweepPoint, partition_cache: PartitionCache | None = None) -> SweepRecord:
    """Plan one point with the planner's cost model (no simulation): status ok, no-fit or invalid, and why.

    ``partition_cache`` only saves work: partition searches another point already ran on the same
    inputs are read back, bit for bit what they would compute.
    """
    rec = SweepRecord(point.key(), point.model, point.devices, point.device_kind, point.interconnect,
                      point.schedule, point.microbatch_size, point.global_batch,
                      memory_limit_bytes=device_kind(point.device_kind).memory_bytes)
    try:
        topo = point_cluster(point.interconnect, point.devices, point.device_kind)
        profile = point_profile(point.model, point.device_kind, point.grid[0] if point.grid else 1, point.calibration,
                                point.microbatch_size)
    except (WhatIfError, TopologyError) as e:
        return replace(rec, reason=e.args[0] if e.args else str(e))
    rec = replace(rec, topology=topo.name)
    try:
        result = plan_model(profile, topo, schedule=point.schedule, microbatch_size=point.microbatch_size,
                            global_batch=point.global_batch, top_k=point.top_k, recompute=point.recompute,
                            optimizer=point.optimizer, partition_cache=partition_cache, zero_stage=point.zero_stage,
                            **({"grid": point.grid} if point.grid else {}))
    except ValueError as e:  # the planner's bad-input errors (PlanError and friends) are ValueErrors
        msg = e.args[0] if e.args else str(e)
        if "fit" not in msg.lower():
            return replace(rec, reason=msg)
        m = re.search(r"needs is ([0-9.eE+-]+) bytes", msg)
        need = float(m.group(1)) if m else _memory_needed(profile, point, None)
        return replace(rec, status="no-fit", reason=msg, memory_needed_bytes=need)
    return _fill(rec, result, profile, point)


def _fill(rec: SweepRecord, result, profile: ModelProfile, point: SweepPoint) -> SweepRecord:
    """Copy the planner's best candidate (or why nothing fits) into the record."""
    cands = list(result.candidates or ())
    best = next((c for c in cands if getattr(c, "fits", True)), None)
    expl = result.explanation
    rec = replace(rec, explanation=expl if isinstance(expl, (str, type(None))) else str(expl))
    if best is None:
        need = _memory_needed(profile, point, cands)
        return replace(rec, status="no-fit", memory_needed_bytes=need,
                       reason=f"{point.model} fits on no plan of {point.devices}×{point.device_kind}: it would need "
                              f"{_gb(need)} per device, the device has {_gb(rec.memory_limit_bytes)}")
    plan: Plan = best.plan
    peak = max(best.peak_memory_bytes.values()) if best.peak_memory_bytes else 0.0
    return replace(rec, status="ok", plan=plan.to_dict(), throughput_samples_per_s=best.throughput_samples_per_s,
                   time_per_sample_s=best.time_per_sample_s, peak_memory_bytes=peak, devices_used=len(plan.devices),
                   bubble_fraction=best.bubble_fraction, stages=tuple(s.to_dict() for s in best.stages),
                   binding=max(best.stages, key=lambda s: s.time_s).binding)


def _memory_needed(profile: ModelProfile, point: SweepPoint, cands) -> float:
    """The least peak memory per device any candidate needed, else a lower bound from the profile."""
    peaks = [max(c.peak_memory_bytes.values()) for c in (cands or ()) if getattr(c, "peak_memory_bytes", None)]
    bound = min_memory_per_device_bytes(profile, point.devices, point.optimizer, point.microbatch_size)
    return min(peaks) if peaks else bound


def _gb(x: float | None) -> str:
    return "?" if x is None else f"{x / 1e9:.1f} GB"
