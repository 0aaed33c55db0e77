"""PipeDream's hierarchy over levels: the recurrence solved level by level (innermost first), the answer read
back into stages, a chain profile for the plan, and ``to_plan`` (the stages placed on devices)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from planner.pipedream.recurrence import KERNELS, _analyze, _Problem, _solve_level
from planner.pipedream.reduction import _prefix_states, pipedream_states
from planner.pipedream.states import PipeDreamError, States, _clean_dag
from planner.profile import ModelProfile


#: Past this many (min, max) steps (the dense count: rows x states^2 / 6 per (m, m') pair of each level) the
#: states are reduced to a chain of cut points that fits; PipeDream's GNMT-16 on 4x4 (3.3e9) stays exact.
MAX_DP_WORK = 5e9


def _dp_work(n: int, levels, straight: bool) -> float:
    work = 0.0
    for i, (M, _) in enumerate(levels):
        pairs = (M - 1) if straight else M * (M - 1) / 2
        rows = 1 if i == len(levels) - 1 else n + 1
        work += rows * n * n / (2 if rows == 1 else 6) * pairs
    return work


# ====================================================================== the optimizer
@dataclass(frozen=True)
class PipeDreamStage:
    """One stage of a PipeDream plan.

    Attributes:
        first_state: the stage covers the states after ``first_state - 1`` up to ``last_state`` (PipeDream's (start, end) is (first_state, last_state + 1)).
        last_state: the last state of the stage.
        replicas: data-parallel replicas in all (multiplied across levels).
        nodes: the model's node ids the stage holds, in the profile's topological order.
    """

    first_state: int
    last_state: int
    replicas: int
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class PipeDreamResult:
    """What PipeDream's optimizer answers.

    Attributes:
        pipeline_time_s: the bottleneck seconds per minibatch at the profiled batch size ("time per stage in pipeline").
        stages: the stages, innermost level's partition, in pipeline order.
        num_states: states the dynamic program ran over.
        reduction: None, or the state reduction used (``"cut-points"``) when the antichains were too many.
        levels: the hierarchy, innermost first, as (workers, bandwidth bytes/s).
        elapsed_s: wall seconds the optimizer took (states included).
        message: a human sentence (states, reduction).
        data_parallel_time_s: PipeDream's figure for plain data parallelism over all workers.
    """

    pipeline_time_s: float
    stages: tuple[PipeDreamStage, ...]
    num_states: int
    reduction: str | None
    levels: tuple[tuple[int, float], ...]
    elapsed_s: float
    message: str = ""
    data_parallel_time_s: float = float("nan")


def _stage_nodes(st: States, stages: list[tuple[int, int, int]], profile: ModelProfile) -> list[tuple[str, ...]]:
    """Nodes per stage as PipeDream assigns them: each stage takes the not-yet-assigned members of its last state."""
    ids = [l.name.partition(":")[0] for l in profile.layers] if profile.graph is None else list(profile.graph.nodes)
    owner: dict[int, int] = {}
    for s, (_, last, _) in enumerate(stages):
        for v in st.members[last]:
            owner.setdefault(v, s)
    # nodes no state covers (removed inputs, dropped getitem sinks): inputs to the first stage, others beside
    # their latest predecessor
    if len(owner) < len(ids):
        preds: dict[int, list[int]] = {i: [] for i in range(len(ids))}
        if profile.graph is not None:
            pos = {nid: i for i, nid in enumerate(ids)}
            for a, b in profile.graph.edges:
                preds[pos[b]].append(pos[a])
        else:
            for i in range(1, len(ids)):
                preds[i].append(i - 1)
        for v in range(len(ids)):  # topological order
            if v not in owner:
                owner[v] = max((owner[p] for p in preds[v] if p in owner), default=0)
    per = [[] for _ in stages]
    for v in range(len(ids)):
        per[owner[v]].append(ids[v])
    return [tuple(p) for p in per]


def _check_levels(levels) -> tuple[tuple[int, float], ...]:
    out = []
    for lv in levels:
        try:
            w, b = lv
            w, b = int(w), float(b)
        except (TypeError, ValueError):
            raise PipeDreamError(f"a level must be (workers, bandwidth bytes/s), got {lv!r}") from None
        if w < 1 or not b > 0:
            raise PipeDreamError(f"level {lv!r}: need workers >= 1 and bandwidth > 0 bytes/s")
        out.append((w, b))
    if not out:
        raise PipeDreamError("give at least one level (workers, bandwidth bytes/s)")
    return tuple(out)


def _solve(st: States, levels: tuple[tuple[int, float], ...], straight: bool, acr, mem, kernel: str = "auto"):
    pb = _Problem(st, straight, acr, mem)
    Tc = pb.Tc
    solved = []
    n_in = 1
    for li, (M, B) in enumerate(levels):
        lv = _solve_level(pb, Tc, M, B, n_in, final=(li == len(levels) - 1),
                          need_all=(li < len(levels) - 2), kernel=kernel)
        solved.append(lv)
        if not lv.final:
            Tc = lv.A[:, :, M - 1]
        n_in = M
    return pb, solved


def optimize_pipedream(
    profile: ModelProfile,
    levels: list[tuple[int, float]],
    *,
    memory_size: float | None = None,
    straight: bool = False,
    activation_compression_ratio: float | None = None,
    max_states: int = 20000,
    max_dp_work: float = MAX_DP_WORK,
    kernel: str = "auto",
) -> PipeDreamResult:
    """Run PipeDream's hierarchical optimizer on ``profile``.

    Args:
        levels: the hierarchy, innermost first, as (workers, bandwidth bytes/s); PipeDream's ``-n`` and ``-b``
            (its bandwidth flag is bytes/s; 1 GB/s is 1e9).
        memory_size: bytes per worker; given, PipeDream's memory constraint applies (``--use_memory_constraint``).
        straight: no replication (``--straight_pipeline``).
        activation_compression_ratio: given, stage-boundary transfers count (``--activation_compression_ratio``).
        max_states: the antichain cap past which the states are reduced (see ``pipedream_states``).
        max_dp_work: the dynamic program's size (see ``MAX_DP_WORK``) past which the states are reduced to a
            chain of cut points that fits; ``float("inf")`` always solves PipeDream's full problem.
        kernel: how each level's recurrence is computed (``planner.pipedream.recurrence.KERNELS``): "auto"
            (default), "fast" or "reference"; every kernel gives the same floats.
    """
    t0 = time.perf_counter()
    lv = _check_levels(levels)
    if activation_compression_ratio is not None and not activation_compression_ratio > 0:
        raise PipeDreamError(f"activation compression ratio {activation_compression_ratio!r}: give a ratio > 0 "
                             "(1 counts activations as they are)")
    if memory_size is not None and not memory_size > 0:
        raise PipeDreamError(f"memory size {memory_size!r}: give a positive number of bytes per worker")
    if kernel not in KERNELS:
        raise PipeDreamError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    st = pipedream_states(profile, max_states=max_states)
    work = _dp_work(len(st), lv, straight)
    if work > max_dp_work:
        n_fit = len(st)
        while n_fit > 8 and _dp_work(n_fit, lv, straight) > max_dp_work:
            n_fit = int(n_fit * 0.9)
        why = (f"{profile.name}: {len(st):,} states on {'x'.join(str(w) for w, _ in lv)} workers would be "
               f"{work:.2g} (min, max) steps (the budget is {max_dp_work:.2g})")
        st = _prefix_states(_clean_dag(profile), n_fit, why)
    pb, solved = _solve(st, lv, straight, activation_compression_ratio, memory_size, kernel)
    top = solved[-1]
    n = pb.n
    t = float(top.A[0, n - 1, top.M - 1])
    if math.isinf(t):
        why = []
        if straight and n < math.prod(w for w, _ in lv):
            why.append(f"a straight pipeline needs a state per worker and there are {n} states")
        if memory_size is not None:
            why.append(f"no split fits in {memory_size:.3g} bytes per worker")
        raise PipeDreamError(f"{profile.name}: no feasible PipeDream plan on {[w for w, _ in lv]} workers"
                             + (f" ({'; '.join(why)})" if why else "") + "; give more memory or fewer workers")
    # stages: top level first, then each range split on one machine of the level below
    ranges = [(0, n, 1)]
    for lvl in reversed(solved):
        new = []
        for start, end, mult in ranges:
            for a, b, w in _analyze(pb, lvl, start, end):
                new.append((a, b + 1, mult * w))
        ranges = new
    stage_list = [(a, b - 1, w) for a, b, w in ranges]
    nodes = _stage_nodes(st, stage_list, profile)
    stages = tuple(PipeDreamStage(a, b, w, nd) for (a, b, w), nd in zip(stage_list, nodes))
    # PipeDream's data-parallel comparison figure
    total, total_p = float(st.compute_s[-1]), float(st.param_bytes[-1])
    dpt, n_in = total, 1
    for w, b in lv:
        comm = ((4 * (w - 1) * total_p) / (b * w)) / n_in
        dpt = sum([dpt, comm]) / w
        n_in = w
    msg = st.message
    return PipeDreamResult(
        pipeline_time_s=t,
        stages=stages,
        num_states=n,
        reduction=st.reduction,
        levels=lv,
        elapsed_s=time.perf_counter() - t0,
        message=msg,
        data_parallel_time_s=dpt,
    )


# ====================================================================== a plan's chain
def pipedream_chain_profile(profile: ModelProfile, result: PipeDreamResult) -> tuple[ModelProfile, list[tuple[int, int]]]:
    """A chain profile whose layer order keeps each stage's nodes contiguous, and each stage's [first, last] layer.

    The order is stage by stage, nodes in the profile's topological order within a stage; it is itself a
    topological order of the model's DAG, so ``planner.plan.StagePlan`` ranges can describe the plan. Each
    layer's ``activation_bytes`` is recomputed for the new order (what a cut after it must send).
    """
    if profile.graph is None:
        ids = [l.name.partition(":")[0] for l in profile.layers]
    else:
        ids = list(profile.graph.nodes)
    index = {nid: i for i, nid in enumerate(ids)}
    order: list[int] = []
    ranges: list[tuple[int, int]] = []
    for s in result.stages:
        first = len(order)
        order.extend(sorted(index[nid] for nid in s.nodes))
        ranges.append((first, len(order) - 1))
    if sorted(order) != list(range(len(ids))):
        raise PipeDreamError(f"{profile.name}: the result's stages do not cover the profile's layers once each "
                             "(was it made for another profile?)")
    if profile.graph is None:
        if order != list(range(len(ids))):
            raise PipeDreamError("stages of a chain profile must be in chain order")
        return profile, ranges
    pos = {v: p for p, v in enumerate(order)}
    succ: dict[int, list[int]] = {i: [] for i in range(len(ids))}
    for a, b in profile.graph.edges:
        ia, ib = index[a], index[b]
        if pos[ia] > pos[ib]:
            raise PipeDreamError(f"{profile.name}: stage order puts {b} before its input {a}; "
                                 "the plan cannot be written as contiguous layer ranges")
        succ[ia].append(ib)
    last_use = {v: max((pos[s] for s in succ[v]), default=pos[v]) for v in range(len(ids))}
    layers = []
    live: list[int] = []
    for p, v in enumerate(order):
        live = [u for u in live if last_use[u] > p] + ([v] if last_use[v] > p else [])
        crossing = sum(profile.layers[u].saved_bytes for u in live)
        if p == len(order) - 1:
            crossing = profile.layers[v].saved_bytes
        layers.append(replace(profile.layers[v], activation_bytes=crossing))
    graph = replace(profile.graph, nodes=tuple(ids[v] for v in order),
                    raw_ms=tuple(profile.graph.raw_ms[v] for v in order) if profile.graph.raw_ms else ())
    return replace(profile, layers=tuple(layers), graph=graph), ranges


def to_plan(result: PipeDreamResult, profile: ModelProfile, devices, *, model: str | None = None,
            microbatch_size: int = 1, microbatches: int | None = None, topology: str | None = None,
            predicted: dict | None = None):
    """``result`` as a ``planner.plan.Plan`` (schedule ``pipedream``) over ``profile``'s chain, stages placed in order
    on ``devices`` (each stage's replicas on the next devices; where the list runs out, ``d{i}`` names).

    Returns (plan, chain profile): the plan's layer ranges index the chain profile
    (``pipedream_chain_profile``), which keeps each stage's nodes contiguous.
    """
    from planner.plan import Plan, StagePlan

    chain, ranges = pipedream_chain_profile(profile, result)
    devices = list(devices or ())
    stages, used = [], 0
    for st, (a, b) in zip(result.stages, ranges):
        r = int(st.replicas)
        devs = tuple(devices[used:used + r]) if used + r <= len(devices) else tuple(f"d{w}" for w in range(used, used + r))
        used += r
        stages.append(StagePlan(int(a), int(b), r, devs))
    plan = Plan(model=model or profile.name, stages=tuple(stages), schedule="pipedream", microbatch_size=microbatch_size,
                microbatches=microbatches or max(4, used), topology=topology, predicted=predicted or {})
    return plan, chain
