"""Planning: search partitions, placements, schedule families and microbatch counts; rank; answer capacity queries.

Two entry points:

* ``plan_model(profile, topology, ...)`` → ``PlanResult`` (the best plan, the ranked
  candidates with their cost breakdowns, and a sentence on why);
* ``capacity(profile, topology, target_throughput, ...)`` → ``CapacityResult`` (the
  fewest devices, in placement order, that reach a throughput).

The planner never imports the simulator: pass ``score`` (a plan → seconds per
sample, lower is better) to re-rank the cost model's top-k by simulation.

Why one module of ~520 lines: ``capacity`` bisects over ``plan_model``, and ``plan_model`` is one
enumeration (families × microbatch counts × grids, multi-stage and regular partitions, refinement)
ranked by one key; the private helpers are that enumeration's steps, with no caller outside it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

from planner import hierarchical as hier
from planner import partition as part
from planner import refine
from planner.costmodel import Candidate, CostOptions, evaluate, zero_family_refusal, zero_refusal
from planner.plan import Plan, PlanError, StagePlan
from planner.profile import ModelProfile
from planner.families import FAMILIES, FAMILY

#: Plans a search refines by local search under the full cost model when the exhaustive search does not apply:
#: each family's best, and the best of other shapes up to this many.
LOCAL_SEEDS = 3

#: Families ``schedule="auto"`` scores, in the order ties are broken (the cost model prices each one's time and
#: per-stage memory from its registry traits, so a family whose activations do not fit is never chosen).
AUTO_FAMILIES = ("1f1b", "zb-h1", "interleaved", "gpipe", "2bw", "pipedream", "zb-h2", "zb-v", "v-half", "v-min",
                 "looped-bfs", "interleaved-zb", "dualpipe-v")

#: Pipeline depths (devices) ``schedule="auto"`` tries for the families that place several stages per device:
#: their plans are even splits costed one by one, and deeper V or looped pipelines than this only add bubble
#: and cut traffic on the clusters the planner sees (the partition search covers deeper linear pipelines).
MULTI_STAGE_MAX_DEPTH = 64


@dataclass(frozen=True)
class PlanResult:
    """What ``plan_model`` found.

    Attributes:
        best: the chosen plan (its ``predicted`` holds the cost model's figures).
        candidates: the ranked candidates, best first (at most top_k), the best included.
        explanation: one paragraph: why this plan, and what the runner-up would cost.
        elapsed_s: seconds the search took.
    """

    best: Plan
    candidates: list[Candidate]
    explanation: str
    elapsed_s: float = 0.0

    @property
    def best_candidate(self) -> Candidate:
        return self.candidates[0]


@dataclass(frozen=True)
class CapacityResult:
    """The answer to "how many devices reach X samples/s".

    Attributes:
        target_samples_per_s: what was asked.
        reachable: whether some prefix of the devices reaches it.
        devices: the fewest devices that do (or, when unreachable, the count of the best plan).
        candidate: the plan on that many devices.
        memory_per_device_bytes: the largest per-device memory that plan needs.
        best_samples_per_s: the best throughput found with all the devices.
    """

    target_samples_per_s: float
    reachable: bool
    devices: int
    candidate: Candidate
    memory_per_device_bytes: float
    best_samples_per_s: float


def plan_model(
    profile: ModelProfile,
    topology,
    *,
    schedule: str = "auto",
    microbatch_size: int = 1,
    global_batch: int | None = None,
    microbatches: int | None = None,
    memory_limit_bytes: float | None = None,
    cost_model: str = "pipetwin",
    top_k: int = 5,
    score: Callable[[Plan], float] | None = None,
    overlap_comm: bool = True,
    recompute: bool = False,
    optimizer: str = "sgd",
    stages: int | None = None,
    devices: list[str] | None = None,
    model_name: str | None = None,
    partition_cache: part.PartitionCache | None = None,
    grid: tuple[int, int, int, int] | None = None,
    zero_stage: int = 0,
) -> PlanResult:
    """Plan ``profile`` on ``topology``: the best plan that fits memory, with runner-ups.

    Args:
        schedule: a family of planner.families.FAMILIES, or "auto" to score them all.
        microbatch_size: samples per microbatch.
        global_batch: samples per batch (fixes microbatches = global_batch / microbatch_size).
        microbatches: microbatches per batch; when neither this nor global_batch is given,
            several counts (at least the device count) are tried.
        memory_limit_bytes: per-device limit (default: each device's memory).
        cost_model: "pipetwin" (PipeDream's own model lives in planner.pipedream).
        top_k: candidates kept (and, with ``score``, re-ranked by it).
        score: plan → seconds per sample (lower is better), e.g. a simulation.
        stages: fix the pipeline depth (no replication, layers split by work).
        devices: the devices to plan on, in placement order (default: all of the topology's).
        model_name: what the plan's ``model`` field records (default: the profile's name).
        partition_cache: partition answers to reuse and add to (a sweep passes one to every point it
            plans); the result is the same with or without it.
        grid: (tp, pp, dp, vp), a fixed plan (``planner.plan.plan_from_flags`` on the first tp·pp·dp
            devices, layers split evenly) instead of the partition search; each family and microbatch
            count the search would try is costed, combinations the schedule refuses left out. The
            profile must be per TP rank of tp.
        zero_stage: ZeRO sharding (``CostOptions.zero_stage``) every plan is costed with; families and shapes it
            cannot run (weight stashing; at stage 3 several stages per device, tensor parallelism, replicas that
            split the microbatches unevenly) are left out, and a fixed ``schedule`` it refuses is a PlanError.

    Raises:
        PlanError: an unknown schedule or cost model, inconsistent batch sizes, more stages
            than layers, or no plan fitting in memory (the message says the smallest memory
            that would fit).
    """
    t0 = time.perf_counter()
    if cost_model != "pipetwin":
        raise PlanError(f"plan_model costs plans with the pipetwin model; for cost_model={cost_model!r} "
                        "use planner.pipedream.optimize_pipedream (pipetwin plan --cost-model pipedream)")
    families = _families(schedule)
    if schedule != "auto" and zero_family_refusal(schedule, zero_stage):
        raise PlanError(zero_family_refusal(schedule, zero_stage))
    families = tuple(f for f in families if not zero_family_refusal(f, zero_stage))
    if microbatch_size < 1:
        raise PlanError("--microbatch-size must be >= 1")
    devs = tuple(devices) if devices is not None else tuple(topology.devices)
    if not devs:
        raise PlanError("no devices to plan on")
    for d in devs:
        topology.device(d)
    L = len(profile)
    if stages is not None and stages < 1:
        raise PlanError(f"--stages {stages}: a pipeline has at least 1 stage")
    if stages is not None and stages > L:
        raise PlanError(f"{stages} stages but the model {profile.name!r} has only {L} layers: use at most {L} stages")
    if stages is not None and stages > len(devs):
        raise PlanError(f"{stages} stages but only {len(devs)} devices: use at most {len(devs)} stages or a larger topology")
    opts = CostOptions(overlap_comm=overlap_comm, recompute=recompute, optimizer=optimizer,
                       memory_limit_bytes=memory_limit_bytes, zero_stage=zero_stage)
    prof = profile.scaled(microbatch_size) if microbatch_size != profile.microbatch_size else profile
    name = model_name or profile.name
    mcounts = _microbatch_counts(global_batch, microbatch_size, microbatches, len(devs))
    cands: list[Candidate] = []
    cache: dict = {}
    exact: set[tuple[str, int]] = set()
    refused: list[str] = []  # why the fixed grid's schedules turned it down
    for fam in families:
        for M in mcounts:
            plans = (_grid_plans(grid, fam, M, profile, devs, opts, name, microbatch_size, topology.name, refused)
                     if grid is not None else
                     _plans_for(fam, M, prof, topology, devs, opts, stages, name, microbatch_size, cache, partition_cache))
            for plan in plans:
                if zero_refusal(plan, zero_stage):
                    continue
                if not _linear(fam) or refine.schedulable(fam, M, tuple(st.replicas for st in plan.stages)):
                    cands.append(evaluate(plan, profile, topology, opts))
            if grid is None and stages is None and _linear(fam) and len(devs) <= part.FLAT_MAX_DEVICES:
                base = dict(model=name, schedule=fam, microbatch_size=microbatch_size, microbatches=M,
                            topology=topology.name)
                found = refine.exhaustive(prof, topology, devs, fam, M, opts, base)
                if found is not None:
                    cands.extend(found)
                    exact.add((fam, M))
    if grid is not None and not cands:
        raise PlanError(f"no schedule of {', '.join(families)} runs --tp {grid[0]} --pp {grid[1]} --dp {grid[2]}"
                        + (f" --vp {grid[3]}" if grid[3] > 1 else "") + f" with microbatch counts {mcounts}: "
                        + ("; ".join(dict.fromkeys(refused)) if refused else
                           "give --microbatches a multiple of pp x dp, or another --schedule"))
    if grid is None and stages is None and len(devs) <= part.FLAT_MAX_DEVICES:
        cands.extend(_refined(cands, prof, topology, devs, opts, exact))
    fitting = [c for c in cands if c.fits]
    if not fitting:
        raise PlanError(_nothing_fits(prof, topology, devs, opts, families, mcounts, memory_limit_bytes, cands,
                                      partition_cache))
    fitting = _dedupe(sorted(fitting, key=_rank_key))
    top = fitting[:max(1, top_k)]
    if score is not None:
        top = sorted((replace(c, score=float(score(c.plan))) for c in top),
                     key=lambda c: (c.score if c.score is not None and math.isfinite(c.score) else math.inf,
                                    c.time_per_sample_s))
        top = [replace(c, plan=replace(c.plan, predicted=c.predicted())) for c in top]
    text = _explain(top, score is not None)
    if len(devs) > part.FLAT_MAX_DEVICES:
        text += f" Planned level by level over the topology's hierarchy ({len(devs)} devices), layers in at most {hier.HIER_MAX_BLOCKS} blocks."
    elif "reduction" in cache:
        text += f" State space reduced: {cache['reduction']}."
    return PlanResult(top[0].plan, top, text, time.perf_counter() - t0)


def capacity(profile: ModelProfile, topology, target_samples_per_s: float, **kw) -> CapacityResult:
    """The fewest devices (a prefix of the placement order) whose best plan reaches the target throughput.

    Keywords are ``plan_model``'s. Device counts are searched by bisection over
    the candidate counts (every count up to 16, then powers of two, domain sizes
    and all devices), taking the best plan on *at most* that many devices.
    """
    if not target_samples_per_s > 0:
        raise PlanError("--target-throughput must be a positive number of samples/s")
    order = list(kw.pop("devices", None) or topology.devices)
    kw.pop("top_k", None)
    counts = part.device_counts(topology, tuple(order))

    def best_on(n: int) -> Candidate | None:
        try:
            return plan_model(profile, topology, devices=order[:n], top_k=1, **kw).best_candidate
        except PlanError:
            return None

    full = best_on(len(order))
    if full is None:
        plan_model(profile, topology, devices=order, top_k=1, **kw)  # raises the clear memory error
    if full.throughput_samples_per_s < target_samples_per_s:
        return CapacityResult(target_samples_per_s, False, len(full.plan.devices), full,
                              max(full.peak_memory_bytes.values()), full.throughput_samples_per_s)
    lo, hi = 0, len(counts) - 1
    found = full
    while lo < hi:
        mid = (lo + hi) // 2
        c = best_on(counts[mid])
        if c is not None and c.throughput_samples_per_s >= target_samples_per_s:
            hi, found = mid, c
        else:
            lo = mid + 1
    if counts[hi] == len(order):
        found = full
    return CapacityResult(target_samples_per_s, True, len(found.plan.devices), found,
                          max(found.peak_memory_bytes.values()), full.throughput_samples_per_s)


def best_data_parallel(profile: ModelProfile, topology, *, microbatch_size: int = 1,
                       memory_limit_bytes: float | None = None, optimizer: str = "sgd", recompute=False,
                       overlap_comm: bool = True, overlap_allreduce: bool = False,
                       devices: list[str] | None = None, model_name: str | None = None,
                       zero_stage: int = 0) -> Candidate:
    """The cluster's best pure data-parallel plan under the same cost model: the whole model as one stage
    replicated on the first n devices (n over the counts the planner tries), each replica one microbatch per
    step, synchronous (one all-reduce per step, on the real links, its load on every shared link counted).

    ``overlap_allreduce`` runs the all-reduce under the backward pass, as PyTorch DDP's gradient buckets do;
    without it the all-reduce follows the backward pass. ``zero_stage``: the replicas shard as ``plan_model``'s.
    Raises PlanError when no replica fits in memory.
    """
    if microbatch_size < 1:
        raise PlanError("--microbatch-size must be >= 1")
    devs = tuple(devices) if devices is not None else tuple(topology.devices)
    opts = CostOptions(overlap_comm=overlap_comm, recompute=recompute, optimizer=optimizer,
                       memory_limit_bytes=memory_limit_bytes, overlap_allreduce=overlap_allreduce, zero_stage=zero_stage)
    best = None
    for n in part.device_counts(topology, devs):
        plan = Plan(model=model_name or profile.name, stages=(StagePlan(0, len(profile) - 1, n, devs[:n]),),
                    schedule="1f1b", microbatch_size=microbatch_size, microbatches=n, topology=topology.name)
        c = evaluate(plan, profile, topology, opts)
        if c.fits and (best is None or _rank_key(c) < _rank_key(best)):
            best = c
    if best is None:
        what = (f"the whole model's state sharded over the replicas (ZeRO {zero_stage})" if zero_stage else
                "the whole model on every device")
        raise PlanError(f"data parallelism needs {what} and it does not fit "
                        f"({profile.name!r}); raise --memory-limit or use smaller microbatches")
    return best


# --- helpers ---------------------------------------------------------------------------------
def _grid_plans(grid: tuple[int, int, int, int], fam: str, M: int, profile: ModelProfile, devs: tuple[str, ...],
                opts: CostOptions, name: str, mb: int, topology: str | None = None,
                why: list[str] | None = None) -> list[Plan]:
    """The fixed plan ``grid`` = (tp, pp, dp, vp) asks for under family ``fam`` and M microbatches, if the schedule
    takes it; when it does not, the reason is appended to ``why`` (for the one line the command prints)."""
    from planner.lowering import plan_spec
    from planner.plan import plan_from_flags
    from planner.schedules import ScheduleError, validate_spec

    tp, pp, dp, vp = grid
    if profile.tensor_parallel != tp:
        raise PlanError(f"tensor parallelism {tp} needs the profile per TP rank of {tp} (planner.analytic builds it "
                        f"for transformers); {profile.name!r} is per rank of {profile.tensor_parallel}")
    f = FAMILY[fam]  # vp is the chunks per device the family runs: a V's own 2, a loop's any V > 1, else 1
    if not (vp == f.chunks if f.chunks else vp > 1 if f.multi_stage else vp == 1):
        if why is not None:
            need = f"--vp {f.chunks}" if f.chunks else "--vp 2 or more" if f.multi_stage else "--vp 1"
            why.append(f"{fam} runs {need} (chunks per device), not --vp {vp}")
        return []
    plan = plan_from_flags(name, len(profile), pp=pp, dp=dp, tp=tp, vp=vp, schedule=fam, microbatches=M,
                           microbatch_size=mb, recompute=opts.recompute, devices=list(devs), topology=topology)
    try:
        validate_spec(plan_spec(plan))
    except ScheduleError as e:
        if why is not None:
            why.append(f"{fam} with {M} microbatches: {e}")
        return []
    return [plan]


def _families(schedule: str) -> tuple[str, ...]:
    if schedule == "auto":
        return AUTO_FAMILIES
    if schedule not in FAMILIES:
        raise PlanError(f"unknown schedule {schedule!r}; choose auto or one of {', '.join(FAMILIES)}")
    return (schedule,)


def _microbatch_counts(global_batch: int | None, mb: int, microbatches: int | None, n_devices: int) -> list[int]:
    if global_batch is not None:
        if global_batch < 1 or global_batch % mb:
            raise PlanError(f"--global-batch {global_batch} is not a positive multiple of --microbatch-size {mb}")
        M = global_batch // mb
        if microbatches is not None and microbatches != M:
            raise PlanError(f"--global-batch {global_batch} / --microbatch-size {mb} = {M} microbatches, "
                            f"but --microbatches says {microbatches}; give one of them")
        return [M]
    if microbatches is not None:
        if microbatches < 1:
            raise PlanError("--microbatches must be >= 1")
        return [microbatches]
    base = max(4, 1 << max(0, math.ceil(math.log2(n_devices))))
    return [base, 2 * base, 4 * base]


def _plans_for(fam: str, M: int, prof: ModelProfile, topology, devs: tuple[str, ...], opts: CostOptions,
               stages: int | None, name: str, mb: int, cache: dict,
               pcache: part.PartitionCache | None = None) -> list[Plan]:
    kw = dict(schedule=fam, microbatch_size=mb, microbatches=M, topology=topology.name)
    L, D = len(prof), len(devs)
    if not _linear(fam) and fam != "interleaved":
        return _multi_stage_plans(fam, M, prof, topology, devs, stages, name, kw, cache, pcache)
    if fam == "interleaved":
        out = []
        depths = [stages] if stages else sorted({p for p in part.device_counts(topology, devs) if 2 <= p <= L // 2})
        for P in depths:
            if P < 2 or M % P:
                continue
            for V in (2, 4):
                if P * V > L:
                    continue
                ranges = hier.split_even(prof, P * V, pcache)
                sp = tuple(StagePlan(a, b, 1, (devs[x % P],)) for x, (a, b) in enumerate(ranges))
                out.append(Plan(model=name, stages=sp, chunks=V, **kw))
        return out
    if stages is not None:
        ranges = hier.split_even(prof, stages, pcache)
        return [Plan(model=name, stages=tuple(StagePlan(a, b, 1, (devs[x],)) for x, (a, b) in enumerate(ranges)), **kw)]
    # each family's own flat search (its stages hold what the cost model says they hold), across M when the stage
    # figures do not read it (PipeDream); the hierarchical search reads less of a family, so families share it
    key = (fam, M if part.reads_microbatches(fam) else None)
    if D > part.FLAT_MAX_DEVICES:
        key = ("hier", *hier.hierarchical_reads(fam, M))
    if key not in cache:
        if D > part.FLAT_MAX_DEVICES:
            sol = hier.solve_hierarchical(part.Problem(prof, devs, fam, M, opts), topology, cache=pcache)
            sols, bounds = ([sol] if sol is not None else []), None
        else:
            blocked, bounds = hier.coarsen(prof, part.FLAT_MAX_BLOCKS)
            # the DP's best plan for every device count: the full cost model (shared links included) ranks them
            sols = part.solve_flat_per_count(part.Problem(blocked, devs, fam, M, opts), topology, cache=pcache)
            if len(blocked) == len(prof):
                bounds = None
            else:
                cache["reduction"] = f"layers grouped into {len(blocked)} blocks of near-equal work"
        cache[key] = (sols, bounds)
    sols, bounds = cache[key]
    out = []
    for sol in sols:
        if bounds is not None:
            sol = part.Partition(sol.value, tuple((bounds[a], bounds[b + 1] - 1, idx) for a, b, idx in sol.stages), sol.devices_used)
        sp = tuple(StagePlan(a, b, len(idx), tuple(devs[x] for x in idx)) for a, b, idx in sol.stages)
        if FAMILY[fam].batched and max(s.replicas for s in sp) > M:
            continue
        out.append(Plan(model=name, stages=sp, **kw))
    out += _regular_plans(fam, M, prof, topology, devs, name, kw, cache, pcache)
    return out


def _multi_stage_plans(fam: str, M: int, prof: ModelProfile, topology, devs: tuple[str, ...], stages: int | None,
                       name: str, kw: dict, cache: dict, pcache: part.PartitionCache | None = None) -> list[Plan]:
    """Plans of a family with several stages per device (V shapes: ZB-V, V-Half, V-Min, DualPipeV; loops: looped BFS,
    interleaved zero bubble): P devices (the depths the search tries, at most ``MULTI_STAGE_MAX_DEPTH``) holding
    P·V equal-work stages where the family's placement puts them, for every V it takes (2 for a V; 2 and 4 for a
    loop), and only the (P, V, M) its generator accepts."""
    from planner.lowering import plan_spec
    from planner.families import FAMILY
    from planner.families import rank_of
    from planner.schedules import REQUIRES, ScheduleError, validate_spec

    f = FAMILY[fam]
    L = len(prof)
    # searching, a depth needs M ≥ P: below it the cost model's bubble for these families undercharges (ZB-V at
    # P = 4, M = 1: 9 units against the simulator's 17); a depth the user fixes is costed as asked
    depths = [stages] if stages else [p for p in part.device_counts(topology, devs)
                                      if 2 <= p <= MULTI_STAGE_MAX_DEPTH and p <= M]
    splits = cache.setdefault(("split",), {})
    out = []
    for P in depths:
        for V in ((f.chunks,) if f.chunks else (2, 4)):
            if P * V > L:
                continue
            if P * V not in splits:
                splits[P * V] = hier.split_even(prof, P * V, pcache)
            sp = tuple(StagePlan(a, b, 1, (devs[rank_of(f, P, x)],)) for x, (a, b) in enumerate(splits[P * V]))
            plan = Plan(model=name, stages=sp, chunks=V, **kw)
            try:
                spec = plan_spec(plan)
                validate_spec(spec)
                REQUIRES.get(fam, lambda _s: None)(spec)
            except ScheduleError:
                continue
            out.append(plan)
    return out


def _regular_plans(fam: str, M: int, prof: ModelProfile, topology, devs: tuple[str, ...], name: str, kw: dict,
                   cache: dict, pcache: part.PartitionCache | None = None) -> list[Plan]:
    """Plans the bottleneck programme never prefers but shared links may: P equal-work stages, each replicated
    r times on a block of consecutive devices, for the device counts the search tries (r = 1: straight
    pipelines; P = 1: pure data parallelism, whose only traffic is the all-reduce)."""
    L = len(prof)
    if len(devs) > part.FLAT_MAX_DEVICES:
        return []
    key = ("regular-shapes",)
    if key not in cache:
        shapes = []
        counts = part.device_counts(topology, devs)
        for n in counts:
            for P in range(1, min(n, L, 32) + 1):
                if n % P:
                    continue
                r = n // P
                if P > 8 and r > 1:
                    continue
                shapes.append((P, r))
        cache[key] = shapes
        cache[("split",)] = {}
    splits = cache[("split",)]
    out = []
    for P, r in cache[key]:
        if FAMILY[fam].batched and r > M:
            continue
        if P not in splits:
            splits[P] = hier.split_even(prof, P, pcache)
        sp = tuple(StagePlan(a, b, r, tuple(devs[x * r + y] for y in range(r))) for x, (a, b) in enumerate(splits[P]))
        out.append(Plan(model=name, stages=sp, **kw))
    return out


def _linear(family: str) -> bool:
    """A family whose stages sit one per device set (the refinement's plans), not several per rank."""
    from planner.families import FAMILY

    return family in FAMILY and FAMILY[family].placement == "linear"


def _refined(cands: list[Candidate], prof: ModelProfile, topology, devs: tuple[str, ...], opts: CostOptions,
             exact: set[tuple[str, int]], seeds: int = LOCAL_SEEDS) -> list[Candidate]:
    """Local search under the full cost model (``planner.refine.local_search``) from the best fitting plan of each
    family the exhaustive search did not settle, and from the next best plans of other shapes up to ``seeds``."""
    picked: list[Candidate] = []
    shapes: set = set()
    families: set[str] = set()
    ranked = sorted((c for c in cands if c.fits and _linear(c.plan.schedule)
                     and (c.plan.schedule, c.plan.microbatches) not in exact), key=_rank_key)
    for c in ranked:
        shape = tuple((s.first_layer, s.last_layer, s.devices) for s in c.plan.stages)
        if c.plan.schedule not in families or (len(picked) < seeds and shape not in shapes):
            families.add(c.plan.schedule)
            shapes.add(shape)
            picked.append(c)
    out = []
    for c in picked:  # one budget for the whole search, shared by the seeds
        out += refine.local_search([c], prof, topology, devs, c.plan.schedule, c.plan.microbatches, opts,
                                   budget=max(1, refine.LOCAL_PLANS // len(picked)))
    return out


def _rank_key(c: Candidate):
    return (c.time_per_sample_s, len(c.plan.devices), AUTO_FAMILIES.index(c.plan.schedule), c.plan.microbatches)


def _dedupe(cands: list[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for c in cands:
        key = (c.plan.schedule, c.plan.microbatches, c.plan.chunks,
               tuple((s.first_layer, s.last_layer, s.devices) for s in c.plan.stages))
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def _nothing_fits(prof, topology, devs, opts, families, mcounts, limit, cands, pcache=None) -> str:
    """The one line for "no plan fits": the smallest per-device memory any plan needs."""
    need = math.inf
    for fam in families:
        if not _linear(fam):  # several stages per device: the partition search does not model them; cands has them
            continue
        if any(part.needs_no_less_than(fam, g, opts.zero_stage) for g in families if _linear(g)):  # not the least
            continue
        for M in mcounts:
            pb = part.Problem(prof, devs, fam, M, replace(opts, memory_limit_bytes=None))
            if len(devs) <= part.FLAT_MAX_DEVICES:
                sol = part.solve_flat(pb, topology, objective="memory", cache=pcache)
                if sol is not None:
                    need = min(need, sol.value)
    for c in cands:
        need = min(need, max(c.peak_memory_bytes.values()))
    what = f"{limit:.4g} bytes per device" if limit is not None else "the devices' memory"
    hint = "" if not math.isfinite(need) else f"; the smallest per-device memory any plan needs is {need:.4g} bytes ({need / 2**30:.2f} GiB)"
    more = "" if opts.recompute == "full" else ", or use --recompute"
    return f"no plan fits in {what}{hint} — raise --memory-limit, use more devices or smaller microbatches{more}"


def _explain(top: list[Candidate], scored: bool) -> str:
    best = top[0]
    p = best.plan
    worst = max(best.stages, key=lambda s: s.time_s)
    text = (f"{p.schedule} with {p.microbatches} microbatches of {p.microbatch_size} on {len(p.devices)} devices, "
            f"{p.pipeline_depth} pipeline stages: {best.throughput_samples_per_s:.4g} samples/s; the bottleneck is "
            f"stage {worst.stage} (layers {worst.layers[0]}-{worst.layers[1]}, {worst.replicas} replicas), bound by "
            f"{best.binding if best.binding.startswith('communication (link') else worst.binding}; "
            f"bubble {best.bubble_fraction:.1%}")
    if len(top) > 1:
        nxt = top[1]
        slower = nxt.time_per_sample_s / best.time_per_sample_s - 1 if best.time_per_sample_s > 0 else 0.0
        text += (f". Runner-up: {nxt.plan.schedule} with {nxt.plan.microbatches} microbatches on "
                 f"{len(nxt.plan.devices)} devices, {slower:+.1%} time per sample")
    if scored:
        text += ". Ranked by the scoring function (e.g. simulation) over the cost model's top candidates"
    return text + "."
