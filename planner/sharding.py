"""Data-parallel sharding (ZeRO-1/2/3, FSDP full shard): per-GPU state bytes and the collectives it implies.

Mixed-precision training state per parameter is the project's one accounting
(``planner.closedforms.STATE_BYTES_PER_PARAM``: 16 bytes with Adam): a 16-bit weight and a 16-bit
gradient (``planner.efficiency.BYTES_PER_ELEMENT`` each) and the optimizer's fp32 state — the
master copy and the moments, the remaining 12 bytes with Adam (8 with SGD + momentum, 4 with
none). Rajbhandari et al. 2020 (ZeRO) shard it over the D ranks of a data-parallel group:

=========  ==========  ==========  ==========  ==========================================
stage      weights     gradients   optimizer   bytes per GPU for N parameters (Adam)
=========  ==========  ==========  ==========  ==========================================
0 (DDP)    full        full        full        16·N
1          full        full        1/D         4·N + 12·N/D
2          full        1/D         1/D         2·N + 14·N/D
3 (FSDP)   1/D         1/D         1/D         16·N/D
=========  ==========  ==========  ==========  ==========================================

PyTorch's FSDP full shard keeps the fp32 parameter itself as the shard (no separate master copy)
and an fp32 gradient shard: 4 + 4 + 8 = the same 16 bytes / D, split differently, which is
all :func:`sharded_state` reports at stage 3's total.

Collectives, each a ring over the D ranks (per rank: send and receive (D − 1)/D of the
gathered or reduced tensor; an all-reduce is a reduce-scatter then an all-gather, twice that):

* stage 0: all-reduce of the gradients;
* stages 1 and 2: reduce-scatter of the gradients, then all-gather of the updated weights —
  with gradients and weights of one width, the same bytes as the all-reduce;
* stage 3: all-gather of the weights before the forward and again before the backward
  (the weights are freed after the forward), reduce-scatter of the gradients: 1.5× the all-reduce.

Every figure is per GPU and per optimizer step (one gradient reduction per step: gradient
accumulation over microbatches reduces once, as FSDP's no-sync and ZeRO do).

The cost model and the simulator read the same bytes (:func:`zero_state_bytes`, in a profile's
``param_bytes``, 4 per parameter) through ``CostOptions.zero_stage`` and ``SimParams.zero_stage``
(or a plan's ``zero_stage``): the weights and the optimizer state held from the start, the gradients
from a round's first backward to its step. Stage 0 there keeps the project's unsharded count (a 4-byte
weight and gradient, the optimizer's moments: 16 bytes with Adam) and its all-reduce of the stage's
``param_bytes``. Stages ≥ 1 move 16-bit tensors (:func:`collective_bytes`: half a profile's
``param_bytes``):

* stages 1 and 2: the stage's one all-reduce point per step becomes a ring reduce-scatter of the
  16-bit gradients, then a ring all-gather of the updated 16-bit weights;
* stage 3 (FSDP full shard), per unit (one profile layer with parameters; the unit FSDP wraps, a
  transformer block): an all-gather of its weights before every pass that needs them (F, B, BI) and a
  reduce-scatter of its gradients after every pass that makes them (B, BW) — per microbatch, FSDP's
  default (``reshard_after_forward``, no ``no_sync``: the gradients stay sharded, so M microbatches
  gather 2·M times and reduce-scatter M times per step). A pass ends when its compute and its
  collectives are done (FSDP's backward waits for its reduce-scatters); the stage's all-reduce point
  costs nothing more. Overlap (:func:`fsdp_pass_s`, FSDP's prefetch): a replica group's collectives run
  one at a time in the order issued (one communicator); the gather of unit j + 1 is issued when unit
  j's compute starts, unit j's reduce-scatter when its compute ends; the first unit's gather is
  exposed. Without overlap every collective waits for the compute before it and blocks the next.
  Memory (:func:`fsdp_transient_bytes`): the sharded state, plus while a pass runs the gathered 16-bit
  weights of the unit computing and the one prefetched (with overlap), and in a pass that reduces the
  unit's unsharded 16-bit gradient.

Not modelled: FSDP keeping weights gathered across microbatches (``reshard_after_forward=False``, the
pipeline's choice in torchtitan) or accumulating unsharded gradients (``no_sync``), hierarchical or
tree collectives (every one a ring over the group in placement order), weight-stashing schedules
(one weight version is what ZeRO shards: refused), several stages per device with stage 3 (refused
with a line saying so). With tensor parallelism each TP rank's shard is gathered over its own DP group
(the profile is per TP rank) and a unit's TP all-reduces run inside its compute.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.closedforms import BYTES_PER_PARAM, STATE_BYTES_PER_PARAM
from planner.efficiency import BYTES_PER_ELEMENT
from planner.plan import PlanError

__all__ = ["ZERO_STAGES", "PLANNED_ZERO_STAGES", "ShardedState", "ShardingTraffic", "sharded_state",
           "sharding_traffic", "optimizer_bytes_per_param", "ring_bytes_per_rank", "ring_time_s", "zero_state_bytes",
           "check_planned_zero", "collective_bytes", "fsdp_collectives", "fsdp_pass_s", "fsdp_transient_bytes",
           "FSDP_PASSES", "zero3_refusal", "weight_versions_refusal", "shard_numel", "fsdp_pass_collectives"]

#: ZeRO stages: 0 (none: every rank holds everything), 1 (optimizer state), 2 (+ gradients), 3 (+ weights; FSDP).
ZERO_STAGES = (0, 1, 2, 3)
#: The stages the cost model and the simulator take (see the module docstring).
PLANNED_ZERO_STAGES = (0, 1, 2, 3)
#: ZeRO-3 per compute action kind (F, B, BI, BW): (gathers the weights first, reduce-scatters the gradients after).
FSDP_PASSES = {"F": (True, False), "B": (True, True), "BI": (True, False), "BW": (False, True)}


def optimizer_bytes_per_param(optimizer: str = "adam") -> float:
    """The optimizer's fp32 state per parameter (master copy and moments): the training state less the
    16-bit weight and gradient (12 with Adam)."""
    try:
        return STATE_BYTES_PER_PARAM[optimizer] - 2.0 * BYTES_PER_ELEMENT
    except KeyError:
        raise PlanError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(STATE_BYTES_PER_PARAM)}") from None


def _check(degree: int, stage: int) -> None:
    if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
        raise PlanError(f"shard degree must be a positive integer (got {degree!r})")
    if stage not in ZERO_STAGES:
        raise PlanError(f"unknown ZeRO stage {stage!r}; choose one of {', '.join(map(str, ZERO_STAGES))}")


@dataclass(frozen=True)
class ShardedState:
    """Bytes one GPU holds of its parameters' training state between steps."""

    weights_bytes: float
    gradients_bytes: float
    optimizer_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.weights_bytes + self.gradients_bytes + self.optimizer_bytes


def sharded_state(params: float, degree: int, stage: int, optimizer: str = "adam") -> ShardedState:
    """Weights, gradients and optimizer state of ``params`` parameters on one of ``degree`` ranks under ZeRO
    ``stage`` (see the module's table)."""
    _check(degree, stage)
    return _shard(BYTES_PER_ELEMENT * params, BYTES_PER_ELEMENT * params, optimizer_bytes_per_param(optimizer) * params,
                  degree, stage)


def _shard(w: float, g: float, o: float, degree: int, stage: int) -> ShardedState:
    return ShardedState(w / degree if stage >= 3 else w, g / degree if stage >= 2 else g,
                        o / degree if stage >= 1 else o)


def zero_state_bytes(param_bytes: float, degree: int, stage: int, optimizer_state_factor: float) -> ShardedState:
    """What a stage's ``param_bytes`` (a profile's, ``BYTES_PER_PARAM`` = 4 per parameter) hold on one of its
    ``degree`` replicas, with the optimizer's moments ``optimizer_state_factor`` × ``param_bytes`` (SGD with
    momentum 1, Adam 2): stage 0 as the cost model and the simulator always counted it (weights and gradients
    1× each, the moments); stages ≥ 1 as :func:`sharded_state` (16-bit weight and gradient, the fp32 master
    copy with the moments), the same total at degree 1."""
    _check(degree, stage)
    if stage == 0:
        return ShardedState(param_bytes, param_bytes, param_bytes * optimizer_state_factor)
    half = param_bytes * BYTES_PER_ELEMENT / BYTES_PER_PARAM
    return _shard(half, half, param_bytes * (1.0 + optimizer_state_factor), degree, stage)


def check_planned_zero(stage: int, error: type[Exception] = PlanError) -> None:
    """Refuse a ZeRO stage the cost model and the simulator do not take (``error``: the caller's error type)."""
    if stage not in PLANNED_ZERO_STAGES:
        raise error(f"unknown ZeRO stage {stage!r}; choose one of {', '.join(map(str, PLANNED_ZERO_STAGES))}")


def ring_bytes_per_rank(total_bytes: float, degree: int) -> float:
    """Bytes each rank sends (and receives) in a ring all-gather or reduce-scatter of a ``total_bytes``
    tensor over ``degree`` ranks: (D − 1)/D of it."""
    return (degree - 1) / degree * total_bytes


@dataclass(frozen=True)
class ShardingTraffic:
    """Bytes one rank sends per optimizer step, by collective (ring; see the module docstring)."""

    allgather_bytes: float
    reduce_scatter_bytes: float
    allreduce_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.allgather_bytes + self.reduce_scatter_bytes + self.allreduce_bytes


def sharding_traffic(params: float, degree: int, stage: int, gradient_bytes: float = BYTES_PER_ELEMENT,
                     weight_bytes: float = BYTES_PER_ELEMENT, weight_gathers: int = 2) -> ShardingTraffic:
    """Per-rank bytes of the data-parallel collectives of one step over ``params`` parameters.

    ``gradient_bytes``: width of a reduced gradient element (2: 16-bit; 4: fp32 reduction, FSDP's
    ``reduce_dtype=float32``); ``weight_bytes``: of a gathered weight. ``weight_gathers`` (stage 3): how
    often the weights are gathered per step — 2 when they are freed after the forward (FSDP's
    ``reshard_after_forward``), 1 when they stay gathered until the backward.
    """
    _check(degree, stage)
    g = ring_bytes_per_rank(params * gradient_bytes, degree)
    w = ring_bytes_per_rank(params * weight_bytes, degree)
    if stage == 0:
        return ShardingTraffic(0.0, 0.0, 2.0 * g)
    if stage in (1, 2):
        return ShardingTraffic(w, g, 0.0)
    return ShardingTraffic(weight_gathers * w, g, 0.0)


def ring_time_s(bytes_per_rank: float, bandwidth_bytes_per_s: float, degree: int, latency_s: float = 0.0) -> float:
    """Seconds of one ring all-gather or reduce-scatter whose ranks each send ``bytes_per_rank``
    (:func:`ring_bytes_per_rank`) at ``bandwidth_bytes_per_s`` (the slowest hop's share per rank), with
    ``latency_s`` per ring step (D − 1 steps)."""
    if degree < 2 or bytes_per_rank <= 0:
        return 0.0
    return bytes_per_rank / bandwidth_bytes_per_s + (degree - 1) * latency_s


def collective_bytes(param_bytes: float) -> float:
    """The 16-bit tensor a ZeRO collective (stages ≥ 1) gathers or reduces for ``param_bytes`` of a profile
    (``BYTES_PER_PARAM`` = 4 per parameter): ``BYTES_PER_ELEMENT`` per parameter."""
    return param_bytes * BYTES_PER_ELEMENT / BYTES_PER_PARAM


def fsdp_collectives(kind: str) -> tuple[bool, bool]:
    """(gathers the weights before, reduce-scatters the gradients after) of a ZeRO-3 compute pass ``kind``
    (F, B, BI, BW): the input gradient needs the weights, the weight gradient makes the gradients."""
    return FSDP_PASSES[kind]


def shard_numel(numel: int, degree: int) -> int:
    """Elements each of ``degree`` ranks holds of a flat ``numel``-element tensor: ⌈numel / D⌉ (the last
    shards padded with zeros, so every rank's piece of a gather or reduce-scatter is the same size: the
    gathered and reduced tensors are ``D·⌈numel / D⌉`` elements)."""
    _check(degree, 0)
    return -(-int(numel) // degree)


def fsdp_pass_collectives(kind: str, unit_numels, degree: int,
                          element_bytes: float = BYTES_PER_ELEMENT) -> list[tuple[str, int, float]]:
    """The collectives one ZeRO-3 pass ``kind`` (F, B, BI, BW) of a stage runs without prefetch, in the order it
    issues them: ``(op, unit, bytes)``, op ``"all_gather"`` or ``"reduce_scatter"``, ``unit`` the index of the
    unit in forward order (``unit_numels``: each unit's parameter count), ``bytes`` the padded gathered or
    reduced tensor (``degree · shard_numel · element_bytes``). A forward walks the units first to last, a
    backward last to first; each unit gathers before its compute and reduce-scatters after it
    (:func:`fsdp_collectives`). A unit without parameters, or a stage of one replica, runs none."""
    gathers, scatters = fsdp_collectives(kind)
    if degree < 2:
        return []
    order = range(len(unit_numels)) if kind == "F" else range(len(unit_numels) - 1, -1, -1)
    out = []
    for j in order:
        n = unit_numels[j]
        if n <= 0:
            continue
        nbytes = degree * shard_numel(n, degree) * element_bytes
        if gathers:
            out.append(("all_gather", j, nbytes))
        if scatters:
            out.append(("reduce_scatter", j, nbytes))
    return out


def fsdp_pass_s(compute_s, gather_s, scatter_s, overlap: bool = True) -> float:
    """Seconds of one ZeRO-3 pass over units in the order it runs them (forward: first to last layer; backward:
    last to first): ``compute_s[j]`` unit j's compute, ``gather_s[j]`` its all-gather (0: none), ``scatter_s[j]``
    its reduce-scatter (0: none), each on free links. The module docstring's rule: collectives one at a
    time in issue order; with ``overlap`` the gather of j + 1 is issued when j's compute starts and j's
    reduce-scatter when it ends; without, each collective waits for the compute before it and blocks what
    follows. The pass ends when its compute and its collectives are done."""
    n = len(compute_s)
    if not overlap:
        return float(sum(compute_s) + sum(gather_s) + sum(scatter_s))
    queue = 0.0                       # when the group's communicator is free
    ready = gather_s[0] if n else 0.0  # when unit j's weights are gathered
    queue = ready
    end = 0.0                         # when unit j − 1's compute ended
    for j in range(n):
        start = max(end, ready)
        if j + 1 < n:
            if gather_s[j + 1] > 0:
                queue = max(start, queue) + gather_s[j + 1]
                ready = queue
            else:
                ready = start
        end = start + compute_s[j]
        if scatter_s[j] > 0:
            queue = max(end, queue) + scatter_s[j]
    return max(end, queue)


def fsdp_transient_bytes(unit_bytes, gathers: bool, scatters: bool, overlap: bool = True) -> float:
    """The most a ZeRO-3 pass holds beyond the sharded state: over its units (``unit_bytes``: each unit's
    16-bit weights, :func:`collective_bytes`, in the pass's order) the gathered weights of the unit computing
    and, with ``overlap``, of the next one prefetched, plus in a pass that reduces the unit's unsharded
    16-bit gradient (freed by its reduce-scatter)."""
    best = 0.0
    n = len(unit_bytes)
    for j in range(n):
        held = 0.0
        if gathers:
            held += unit_bytes[j] + (unit_bytes[j + 1] if overlap and j + 1 < n else 0.0)
        if scatters:
            held += unit_bytes[j]
        best = max(best, held)
    return best


def weight_versions_refusal(stage: int, schedule: str, versions: int | None = None) -> str:
    """The one line every interpreter refuses ZeRO ``stage`` ≥ 1 with when ``schedule`` keeps ``versions`` weight
    versions (None: several; weight stashing, 2BW's double buffer): ZeRO shards one version."""
    kept = "several" if versions is None else str(versions)
    return (f"ZeRO-{stage} shards one weight version but {schedule} keeps {kept}: use a flush schedule "
            f"(gpipe, 1f1b, zb-h1, ...) or --zero 0")


def zero3_refusal(multi_stage: bool, microbatches: int, replicas, batched: bool = True) -> str:
    """Why ZeRO-3 cannot be timed for this shape ('' when it can): every replica of a group must run the same
    passes (each gather is one collective over the group), and stage 3 is timed for one stage per device."""
    if multi_stage:
        return ("ZeRO stage 3 is timed for one stage per device; this schedule places several per device: use "
                "gpipe, 1f1b, zb-h1 or zb-h2, or --zero 2")
    if batched:
        for r in replicas:
            if r > 1 and microbatches % r:
                return (f"ZeRO stage 3: a stage of {r} replicas splits {microbatches} microbatches unevenly, so its "
                        f"ranks would gather a different number of times; give --microbatches a multiple of {r}")
    return ""
