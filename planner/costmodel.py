"""pipetwin's analytic cost model: schedule-aware time per batch and full memory per device of a placed plan.

The model, per stage s of a plan (replicas r, devices in placement order):

* compute_s   = (forward + backward [+ what recomputation re-runs, ``planner.recompute``: a B's re-run forwards,
  or, where the family splits the backward, what it adds to BI and BW together, a checkpoint run whole in
  each: ``microbatch_recompute_s``]) seconds of the stage's layers at the plan's microbatch size, on its
  slowest replica (``Device.speed``), divided by r (replicas take microbatches round-robin);
* allreduce_s = ring all-reduce of the stage's parameter bytes over its devices
  (``Topology.ring_allreduce_time_s``), once per update: per microbatch that is
  ``/ r`` for PipeDream (a replica updates after each of its minibatches) and ``/ M``
  for the flush schedules and 2BW (one update per batch). Several stages per device (interleaved,
  looped BFS, interleaved zero bubble; the V families do not replicate): one ring per chunk after its
  last backward, a device's rings one after another, so the device's allreduce_s is the sum over
  its chunks, and it runs after the drain: ``T_batch`` adds it once, the bubble does not stretch it
  (``tests/test_multistage_allreduce.py``: the simulator's time);
* comm_s      = (cut in + cut out) / r, where a cut's time is ``Topology.p2p_time_s``
  from the last device of the sending stage to the first device of the receiving one
  for one microbatch's boundary activation (the gradient goes the other way on the
  full-duplex link at the same time);
* time_s      = max(compute + allreduce, comm) when communication overlaps compute,
  else their sum.

Shared links (``planner.linkload``): every microbatch's activation (replica i mod r_s of stage s to
replica i mod r_{s+1} of stage s + 1) and gradient, and every all-reduce (the simulator's
ring or hierarchical collective), is routed hop by hop; bytes per batch add up on each
directed link. The busiest link's bytes / bandwidth is a lower bound on the batch time
(``Candidate.link_bound_s``); the plan is charged that plus ``CostOptions.link_serial_*`` of
the opposite direction's time on the same link, and ``T_batch = max(compute bound, link time)``.
When the link binds, the plan and the stages using the link say "communication (link u->v)".

The bottleneck t = max time_s. Flush schedules pay their bubble:
``T_batch = t·(M + (P − 1)·f·r)`` (r: the bottleneck stage's replicas, each of which fills and
drains the pipeline with its own M/r microbatches) with f = 1 (GPipe, 1F1B), 1/V (interleaved) and
max(F, BI)/(F + B) for ZB-H1 (one third at F = BI = BW; Qi et al.'s (F + BI − BW)/(F + B) where F ≥ BI = BW, but
stage 0 waits for microbatch 0's round trip, P − 1 BIs, after its P forwards: the simulator's), B the backward
with what recomputation adds to it and BI = BW = B/2 (recomputation adds a checkpoint's forward + backward to
each, selective's core forward to each: BI = BW still); interleaved zero bubble a V-th of ZB-H1's, max(F, BI)/V over
the rank's chunks. PipeDream and 2BW pay
none in steady state: ``T_batch = t·M``.

Memory per device: weights × stashed versions (flush 1, 2BW 2, PipeDream its in-flight
count), gradients 1×, optimizer state (SGD with momentum 1×, Adam 2× of the parameter
bytes), and in-flight activations (GPipe: its ⌈M/r⌉ microbatches; 1F1B, 2BW and
PipeDream: ``planner.schedules.inflight_limit``, P − s without replication; ZB-H1 and ZB-H2:
their weight-gradient backlog cap on every stage, P and 2P − 1, as activations wait for BW;
interleaved: Megatron's warm-up depth in chunk-microbatches; the V families and the zero-bubble
loop: their registry cap a·PV + b in chunk-microbatches, rounded down (ZB-V 2P), V-Half and V-Min
their blocks' ⌊(P + 2)/2⌋ and ⌊(P + 4)/3⌋ whole microbatches) of saved bytes — or, with
recomputation, of what ``planner.recompute`` keeps (full: every layer's input;
selective: all but the attention core), plus what one layer's backward rebuilds. The byte figures are
``planner.stagememory``'s, which the simulator's replay reads too. The closed form holds the gradient buffer open
throughout; the replay opens it at a round's first backward, so where a stage reaches its depth only before that
backward (GPipe, PipeDream, a flush family on a batch no deeper than the stage) it is over by at most the
gradients. What a stage holds for its boundaries (stage outputs kept as the roots of the backward, the receive
buffers posted ahead, outgoing gradients: ``planner.stagememory.transfer_bytes``) is charged with
``CostOptions.transfers``: to the byte on 1F1B, 2BW and ZB-H1, an upper bound on ZB-H2 and the multi-stage
families (``tests/test_stage_memory_agreement.py``); off by default until the partition search charges it too.
A split backward with recomputation holds one layer's rebuild in its BI and in its BW, as a B does, and nothing
rebuilt between them (the executor rebuilds again in the BW: ``tests/test_recompute_split_memory.py``).

How close the V families' activations are (ZB-V, V-Half, V-Min, DualPipeV): every rank is charged
one depth, the registry's, which is the heaviest rank's peak; the simulator holds each rank's own.
With chunks that keep equal bytes the figure is at least the simulator's and at most one microbatch
of the rank's kept bytes more: exact on every rank of ZB-V and DualPipeV; V-Half below P microbatches
and V-Min's lighter ranks (P = 8: ranks 0, 3 and 6 hold 6 chunk-microbatches, not 8) one microbatch
over (``tests/test_family_costs.py`` holds the bound). Exact per rank means walking the family's compute
order for each (P, M) the search tries: counted on the order at min(M, 4P) (the peaks stop changing past a
few P) and cached, that made ``pipetwin plan --model gpt3-1.3b --topology dgx:servers=2`` take 5.2 s
instead of 3.0 s, so it does not.
Where a rank's chunks keep different bytes, the depth is charged at the heaviest chunk's bytes (looped
BFS, which holds M microbatches of every chunk, at their mean, exactly): a rank's peak holds mostly its
first chunk (ZB-V P = 4: 7 or 6 of stage r's against 1 or 2 of stage 2P − 1 − r), and depth × the mean
undercharged a heavier first chunk (DualPipeV P = 8, M = 16, stages 0–7 keeping 3 MB per sample and
8–15 1 MB: 34 MB charged, rank 0 holds 49; interleaved zero bubble P = 4, V = 2, M = 8, stages 0–3
keeping 3 MB and 4–7 1 MB: 16 charged, 24 held). The heaviest chunk bounds every rank from above
(51 and 24 MB there; ``tests/test_family_costs.py``), at most (heaviest / mean − 1) × depth over.

Why one module of ~680 lines: time (bubbles per family trait included), memory, all-reduce and ZeRO
pricing are one evaluation that the partitioner reproduces term by term (``stage_counts``,
``stage_bytes``, ``allreduce_bytes``) and the search ranks by; the shared-link bound, which only
``evaluate`` reads, lives in ``planner.linkload``.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from planner.linkload import link_bound, link_bound_by_stage, server_groups
from planner.plan import Plan, PlanError
from planner.profile import ModelProfile
from planner.families import FAMILY, rank_of
from planner.schedulespec import looped_warmup_extra
from planner.sharding import (check_planned_zero, collective_bytes, fsdp_collectives, fsdp_pass_s,
                              weight_versions_refusal, zero3_refusal)
from planner.stagememory import fsdp_gathered_bytes as _fsdp_gathered, fsdp_units, peak_stage_bytes
from planner.stagememory import RECV_LOOKAHEAD, chunks_transfer_bytes, transfer_bytes
from planner.stagememory import static_bytes as _static_bytes
from planner.recompute import (kept_bytes, layer_input_bytes, layer_kept_bytes, microbatch_recompute_s,
                               pass_recompute_s, pass_tp_collectives, rebuilt_bytes, recompute_mode,
                               tp_collectives_run)
from planner.tpcollectives import collectives_time_s, ring_time_s
from planner.vpath import batch_time as v_batch_time

#: Optimizer state bytes per parameter byte.
OPTIMIZER_STATE = {"sgd": 1.0, "momentum": 1.0, "adam": 2.0, "none": 0.0}

#: What can limit a stage.
BINDINGS = ("compute", "communication", "all-reduce", "memory")

#: All-reduce algorithms the link-load bound knows (the simulator's: sim.params.ALLREDUCE_ALGORITHMS).
ALLREDUCE_ALGORITHMS = ("ring", "hierarchical", "auto")

#: A stage whose memory is at least this fraction of its device's limit is memory-bound.
MEMORY_BOUND_FRACTION = 0.9
#: The V families are timed by the longest path through their order (``planner.vpath``) up to this many
#: P × M; above it by the equal-time bubble, because building the order's graph grows with P·M (about 0.1–0.2 CPU s
#: at P·M = 1,024 on a 2-core box, 0.7 s in a 13B what-if sweep's larger points, which it made 6× slower).
V_PATH_MAX_PM = 1024


@dataclass(frozen=True)
class CostOptions:
    """How a plan is costed.

    Attributes:
        overlap_comm: point-to-point transfers overlap compute (else they add to it).
        recompute: activation recomputation, "none", "selective" or "full" (True means "full"); what it
            keeps and re-runs is ``planner.recompute``'s.
        optimizer: "sgd" (with momentum, 1× state), "adam" (2×) or "none".
        memory_limit_bytes: per-device memory limit; None uses each device's own memory.
        allreduce: the all-reduce the link-load bound routes: "ring", "hierarchical" or "auto"
            (the simulator's default: hierarchical when replicas span servers, some holding several).
        link_load: add the shared-link bound (see ``planner.linkload``); False costs stages alone.
        link_serial_flush, link_serial_async: how much of the opposite direction's traffic on the
            busiest link adds to the link time (0: full duplex overlaps perfectly, 1: the two
            directions take turns). Activations and their gradients form a closed loop through
            the pipeline, so the two directions of a link rarely run at full rate together;
            flush schedules (fill, then drain) overlap them less than PipeDream and 2BW. The
            defaults are fitted to the SimPy simulator on PipeDream's profiles and clusters.
        overlap_allreduce: a stage's all-reduce runs under its backward pass (PyTorch DDP's gradient buckets):
            its time is forward + max(backward, all-reduce) instead of their sum (``pipetwin plan --dp-overlap``).
        zero_stage: ZeRO sharding of the training state over each stage's replicas (``planner.sharding``): 0
            none, 1 the optimizer state, 2 also the gradients (their all-reduce a ring reduce-scatter + all-gather
            of the 16-bit tensors), 3 also the weights (FSDP: each unit gathered before every pass that needs it,
            its gradients reduce-scattered after every pass that makes them, ``planner.sharding.fsdp_pass_s``;
            its gathered units in memory). One weight version: flush schedules only. A plan's own
            ``zero_stage`` is used when this is 0.
        fsdp_overlap: ZeRO-3 prefetch (as ``SimParams.fsdp_overlap``); False: every collective exposed.
        transfers: charge what a stage holds for its boundaries, as the simulator and the executor hold it: the
            outputs kept as the roots of the backward, the receive pool, outgoing gradients
            (``planner.stagememory.transfer_bytes``). Off by default while the partition search
            (``planner.partition``), which reproduces the cost model's memory term by term, does not charge them:
            on, ``evaluate`` would refuse plans the search returns as fitting.
        recv_lookahead: with ``transfers``, the receives a worker posts ahead into pooled buffers (as
            ``SimParams.recv_lookahead``: the gloo executor's 8).
    """

    overlap_comm: bool = True
    recompute: str = "none"
    optimizer: str = "sgd"
    memory_limit_bytes: float | None = None
    allreduce: str = "auto"
    link_load: bool = True
    link_serial_flush: float = 0.8
    link_serial_async: float = 0.6
    overlap_allreduce: bool = False
    zero_stage: int = 0
    fsdp_overlap: bool = True
    transfers: bool = False
    recv_lookahead: int = RECV_LOOKAHEAD

    def __post_init__(self) -> None:
        check_planned_zero(self.zero_stage)
        try:
            object.__setattr__(self, "recompute", recompute_mode(self.recompute))
        except ValueError as e:
            raise PlanError(str(e)) from None
        if self.optimizer not in OPTIMIZER_STATE:
            raise PlanError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZER_STATE)}")
        if self.allreduce not in ALLREDUCE_ALGORITHMS:
            raise PlanError(f"unknown all-reduce algorithm {self.allreduce!r}; choose one of {', '.join(ALLREDUCE_ALGORITHMS)}")


@dataclass(frozen=True)
class StageCost:
    """The cost model's view of one (virtual) stage.

    Attributes:
        stage: index in the plan.
        layers: (first, last) layer, inclusive.
        replicas: data-parallel replicas.
        devices: its devices.
        compute_s: compute seconds per microbatch, amortised over the replicas.
        comm_s: point-to-point seconds per microbatch, amortised over the replicas.
        allreduce_s: all-reduce seconds per microbatch (amortised over the update interval).
        time_s: the stage's seconds per microbatch (see the module docstring).
        memory_bytes: peak bytes on each of its devices.
        memory_limit_bytes: the limit of its smallest device.
        slack: fraction of the bottleneck time this stage leaves idle (0 for the bottleneck).
        binding: what limits it: "compute", "communication", "all-reduce" or "memory".
    """

    stage: int
    layers: tuple[int, int]
    replicas: int
    devices: tuple[str, ...]
    compute_s: float
    comm_s: float
    allreduce_s: float
    time_s: float
    memory_bytes: float
    memory_limit_bytes: float
    slack: float
    binding: str

    def to_dict(self) -> dict:
        return {
            "stage": self.stage, "layers": list(self.layers), "replicas": self.replicas, "devices": list(self.devices),
            "compute_s": self.compute_s, "comm_s": self.comm_s, "allreduce_s": self.allreduce_s, "time_s": self.time_s,
            "memory_bytes": self.memory_bytes, "memory_limit_bytes": self.memory_limit_bytes,
            "slack": self.slack, "binding": self.binding,
        }


@dataclass(frozen=True)
class Candidate:
    """A costed plan.

    Attributes:
        plan: the plan (its ``predicted`` filled with the figures below).
        bottleneck_s: the slowest stage's seconds per microbatch.
        time_per_batch_s: seconds per batch of ``plan.microbatches`` microbatches, bubble included.
        time_per_sample_s: time_per_batch_s / samples per batch.
        throughput_samples_per_s: its inverse.
        bubble_fraction: idle share of the batch time on the bottleneck stage.
        peak_memory_bytes: device name → peak bytes.
        fits: every device stays within its memory limit.
        stages: per-stage breakdown.
        score: what a scoring hook (e.g. a simulation) said, when one ranked the candidates.
        compute_time_per_batch_s: the per-stage (compute, all-reduce, own cuts) bound with the bubble.
        link_time_per_batch_s: the link time charged per batch: on the busiest link, its busier direction's
            bytes / bandwidth plus a share of the other direction's (``CostOptions.link_serial_*``).
        link_bound_s: the plain link-load lower bound: max over directed links of bytes per batch / bandwidth.
        binding_link: the busiest link, "u->v" (None when no transfer crosses a finite link).
        binding: what limits the plan: the bottleneck stage's binding, or "communication (link u->v)"
            when the link-load bound is the larger one.
    """

    plan: Plan
    bottleneck_s: float
    time_per_batch_s: float
    time_per_sample_s: float
    throughput_samples_per_s: float
    bubble_fraction: float
    peak_memory_bytes: dict[str, float]
    fits: bool
    stages: tuple[StageCost, ...]
    score: float | None = field(default=None, compare=False)
    compute_time_per_batch_s: float = 0.0
    link_time_per_batch_s: float = 0.0
    link_bound_s: float = 0.0
    binding_link: str | None = None
    binding: str = "compute"

    def predicted(self) -> dict:
        """The figures a plan file keeps under ``predicted``."""
        return {
            "cost_model": "pipetwin",
            "samples_per_microbatch": self.plan.microbatch_size,
            "samples_per_batch": self.plan.microbatches * self.plan.microbatch_size,
            "time_per_sample_s": self.time_per_sample_s,
            "throughput_samples_per_s": self.throughput_samples_per_s,
            "time_per_batch_s": self.time_per_batch_s,
            "bottleneck_s": self.bottleneck_s,
            "bubble_fraction": self.bubble_fraction,
            "compute_time_per_batch_s": self.compute_time_per_batch_s,
            "link_time_per_batch_s": self.link_time_per_batch_s,
            "link_bound_s": self.link_bound_s,
            "binding_link": self.binding_link,
            "binding": self.binding,
            "peak_memory_bytes": dict(self.peak_memory_bytes),
            **({"score": self.score} if self.score is not None else {}),
        }

    def to_dict(self) -> dict:
        return {
            "schedule": self.plan.schedule,
            "microbatch_size": self.plan.microbatch_size,
            "microbatches": self.plan.microbatches,
            "chunks": self.plan.chunks,
            "stages": [s.to_dict() for s in self.stages],
            "predicted": self.predicted(),
            "fits": self.fits,
        }


# --- the formulas, shared with the partition search -----------------------------------
def update_interval(family: str, microbatches: int, replicas: int) -> int:
    """Microbatches between two all-reduces of a stage, seen per microbatch of the pipeline."""
    return microbatches if FAMILY[family].batched else replicas


def inflight(family: str, microbatches, workers_at_or_after, replicas):
    """Microbatches whose activations a replica keeps at its peak (non-interleaved families); elementwise over
    numpy arrays as over ints (the partition search asks it of a whole table of stages at once)."""
    per_replica = -(-microbatches // replicas)
    fam = FAMILY[family]
    if fam.inflight == "batch":
        return per_replica
    limit = -(-workers_at_or_after // replicas)
    if fam.stream:
        return limit
    return np.minimum(limit, per_replica)


def holds_until_weight_grad(family: str) -> bool:
    """A stage's activations wait for its BW, up to the family's weight-gradient backlog cap (``open_cap``), so what
    a stage holds depends on the whole pipeline's 1F1B depth L₀, not only on the workers at or after it."""
    fam = FAMILY[family]
    return fam.open_cap is not None and fam.backward == "split"


def held_until_weight_grad(family: str, microbatches, inflight_count, limit0: int, replicas):
    """Microbatches whose activations a replica of a stage keeps at its peak when a split backward frees them only
    at BW: the family's weight-gradient backlog cap (``open_cap``: a·L₀ + b, L₀ the pipeline's 1F1B depth
    ``limit0``) on every stage, not 1F1B's P − s (ZB-H1 holds P on each stage, ZB-H2 2P − 1), within the batch;
    ``inflight_count`` for the others. Elementwise over arrays (``limit0`` too: the partition search's lower bound
    charges each stage at its own depth)."""
    if not holds_until_weight_grad(family):
        return inflight_count
    fam = FAMILY[family]
    if np.ndim(limit0) == 0:
        cap = fam.open_cap_at(limit0)
    else:  # the registry's count at every depth up to the deepest asked, looked up
        cap = np.array([fam.open_cap_at(x) for x in range(int(np.max(limit0)) + 1)])[limit0]
    return np.maximum(inflight_count, np.minimum(cap, -(-microbatches // replicas)))


def deepest_limit0(family: str, microbatches, inflight_count, replicas, max_held, deepest: int):
    """The inverse of ``held_until_weight_grad`` in L₀: the largest 1F1B depth L₀ ≤ ``deepest`` at which a stage
    holds at most ``max_held`` microbatches (the count is non-decreasing in L₀); 0 when none does, ``deepest`` when
    the family's count does not read L₀ and fits. Elementwise over arrays (``max_held`` may be fractional or inf)."""
    fits = inflight_count <= max_held
    if not holds_until_weight_grad(family):
        return np.where(fits, deepest, 0)
    caps = np.array([FAMILY[family].open_cap_at(x) for x in range(1, deepest + 1)])
    within = np.searchsorted(caps, np.floor(max_held), side="right")  # how many L₀ in 1..deepest keep cap ≤ max_held
    return np.where(fits, np.where(-(-microbatches // replicas) <= max_held, deepest, within), 0)


def weight_versions(family: str, inflight_count):
    """Weight versions a stage keeps: PipeDream stashes one per in-flight minibatch, 2BW two, flush one."""
    copies = FAMILY[family].weight_copies
    return np.maximum(1, inflight_count) if copies == 0 else copies


def stage_counts(family: str, microbatches, workers_at_or_after, replicas, limit0):
    """(activations held, weight versions) of a replica of a linear stage at its peak: ``held_until_weight_grad`` of
    ``inflight`` and ``weight_versions``. The one source the cost model and the partition search size a stage by;
    ``limit0`` is the pipeline's 1F1B depth (max over stages of ⌈workers at or after / replicas⌉)."""
    n_in = inflight(family, microbatches, workers_at_or_after, replicas)
    return held_until_weight_grad(family, microbatches, n_in, limit0, replicas), weight_versions(family, n_in)


def static_bytes_per_param_byte(versions, optimizer: str):
    """Weights (× versions) + gradients + optimizer state, per parameter byte (``planner.stagememory.static_bytes``)."""
    return _static_bytes(1.0, versions, 1, 0, OPTIMIZER_STATE[optimizer])


#: A stage's peak bytes per device in closed form (``planner.stagememory.peak_stage_bytes``; the partition search's too).
stage_bytes = peak_stage_bytes


def bubble_factor(family: str, chunks: int = 1, forward_s: float = 1.0, backward_s: float = 2.0,
                  stages: int | None = None) -> float:
    """f in T_batch = t·(M + (P − 1)·f): the fill-and-drain cost in bottleneck-stage times (``stages``: P, for the
    families whose fill depends on it)."""
    kind = FAMILY[family].bubble  # the registry says what each family's fill and drain cost
    total = forward_s + backward_s
    if kind == "none":
        return 0.0
    if kind == "chunk":
        return 1.0 / chunks
    if kind == "split":  # stage 0's P forwards, then microbatch 0's round trip: (P − 1)·max(F, BI), BI = BW = B/2
        return max(forward_s, backward_s / 2) / total if total > 0 else 1.0 / 3.0
    if kind == "split2":
        return max(0.0, forward_s - backward_s / 2) / total if total > 0 else 0.0  # (F + BI − 2 BW)/(F + B)
    if kind == "split-chunk":  # a V-th of ZB-H1's: a chunk's forward against its BI's round trip
        return max(forward_s, backward_s / 2) / chunks / total if total > 0 else 1.0 / 6.0
    if kind == "v":
        return forward_s / chunks / total if total > 0 else 1.0 / 6.0  # rank P − 1 waits one chunk forward per rank
    if kind in ("v-half", "v-min"):  # their blocks' bubbles at tF = tBI = tBW, over 1F1B's 3(P − 1); other ratios alike
        return _v_bubble_units(kind, stages) / (3 * (stages - 1)) if stages and stages > 1 else 0.5 if kind == "v-half" else 2 / 3
    return 1.0


def _v_bubble_units(kind: str, P: int) -> float:
    """The idle time of V-Half and V-Min at unit costs (M ≥ P, tests/test_family_v_half.py and _v_min.py): (3P − 4)/2
    (3/2 at P = 2), and 2P − 5/2, one more when 3 divides P > 3."""
    if kind == "v-half":
        return (3 * P - 4) / 2 if P >= 3 else 1.5
    return 2 * P - 2.5 + (1.0 if P % 3 == 0 and P > 3 else 0.0)


def _round_trip_factor(m: int, P: int, forward_s: float, backward_s: float) -> float:
    """ZB-H1's and ZB-H2's bubble factor when a replica's m microbatches are too few to fill the pipeline (ZB-H2:
    its 2P − 1 warm-up; ZB-H1: P): stage 0 steps only after its last input gradient, which waits for microbatch
    m − 1's round trip, and each microbatch after the first waits max(F, BI) for its input gradient before its BW,
    so a batch takes at least (m − 1)·(max(F, BI) + BW) + P·(F + BI) + BI (BI = BW = B/2): ZB-H1's to the
    simulator's (``tests/test_recompute_split_time.py``: every m below P, with and without recomputation); ZB-H2's
    exact at tF = tBI = tBW, below the simulator's otherwise (tests/test_family_zb_h2.py). The families' own factor
    is the larger once m fills the pipeline."""
    total = forward_s + backward_s
    if total <= 0:
        return 0.0
    half = backward_s / 2
    # each microbatch after the first waits max(F, BI) for its input gradient's return, then its BW
    cycle = (m - 1) * (max(forward_s, half) + half) + P * (forward_s + half) + half
    return max(0.0, (cycle / total - m) / (P - 1))


def stage_input_bytes(profile: ModelProfile, first: int) -> float:
    """Bytes per sample entering a stage (what recomputation keeps): the previous cut, or the first layer's saved input."""
    return layer_input_bytes(profile, first)


# --- evaluation of a placed plan -------------------------------------------------------
def zero_family_refusal(family: str, zero_stage: int) -> str:
    """Why ``family`` cannot run under ZeRO ``zero_stage`` ('' when it can): ZeRO shards one weight version, and
    stage 3 is timed for one stage per device (``planner.sharding.zero3_refusal``)."""
    fam = FAMILY[family]
    if zero_stage and fam.weight_copies != 1:
        return weight_versions_refusal(zero_stage, family, fam.weight_copies or None)
    if zero_stage == 3 and fam.multi_stage:
        return zero3_refusal(True, 1, ())
    return ""


def zero_refusal(plan: Plan, zero_stage: int) -> str:
    """Why ``plan`` cannot run under ZeRO ``zero_stage`` ('' when it can); the search skips such plans."""
    why = zero_family_refusal(plan.schedule, zero_stage)
    if why or zero_stage != 3:
        return why
    fam = FAMILY[plan.schedule]
    return zero3_refusal(fam.multi_stage, plan.microbatches, plan.replicas, fam.batched)


def evaluate(plan: Plan, profile: ModelProfile, topology, options: CostOptions = CostOptions()) -> Candidate:
    """Cost a plan whose stages name topology devices. Raises PlanError on a plan the profile cannot cost."""
    if plan.num_layers != len(profile):
        raise PlanError(f"the plan covers {plan.num_layers} layers but the profile {profile.name!r} has {len(profile)}; re-plan for this model")
    for s in plan.stages:
        if not s.devices:
            raise PlanError("the plan names no devices; place it on a topology first (pipetwin plan does)")
    prof = _scaled(profile, plan.microbatch_size)
    if plan.recompute != "none" and options.recompute == "none":  # a plan that asks for recomputation is costed with it
        options = replace(options, recompute=plan.recompute)
    if plan.zero_stage and not options.zero_stage:  # and a sharded plan sharded
        options = replace(options, zero_stage=plan.zero_stage)
    why = zero_refusal(plan, options.zero_stage)
    if why:
        raise PlanError(why)
    if FAMILY[plan.schedule].multi_stage:
        return _evaluate_interleaved(plan, prof, topology, options)
    fam, M, mb = plan.schedule, plan.microbatches, plan.microbatch_size
    S = len(plan.stages)
    workers_after = [sum(s.replicas for s in plan.stages[i:]) for i in range(S)]
    limit0 = max(math.ceil(workers_after[i] / plan.stages[i].replicas) for i in range(S))  # 1F1B's peak depth
    cuts = [_cut_s(topology, prof, plan.stages[i].last_layer, plan.stages[i].devices[-1], plan.stages[i + 1].devices[0], mb)
            for i in range(S - 1)]
    raw = []
    T = plan.tensor_parallel
    split = FAMILY[fam].backward == "split"
    links, zero3_link = ((link_bound_by_stage(plan, prof, topology, options)) if options.zero_stage == 3
                         else (link_bound(plan, prof, topology, options), None))
    for i, st in enumerate(plan.stages):
        r = st.replicas
        speed = _slowest(topology, st.devices)[0]
        f, b = prof.forward_s(*st.layers), prof.backward_s(*st.layers)
        redo = microbatch_recompute_s(prof, *st.layers, options.recompute, split)
        compute = ((f + b + redo) / speed
                   + tp_collective_s(prof, *st.layers, options.recompute, topology, st.tensor_group(0, T), mb,
                                     float(split))) / r
        b += redo  # the backward the bubble reads (BI + BW when split)
        dp_group = list(st.devices[::T])
        ar = dp_allreduce_s(prof, st, topology, options, T) / update_interval(fam, M, r)
        if options.zero_stage == 3 and r > 1:  # FSDP: the collectives run inside the passes (planner.sharding)
            compute = fsdp_passes_s(prof, *st.layers, options, topology, dp_group, speed, FAMILY[fam].backward,
                                    st.tensor_group(0, T), mb) / r
            ar = 0.0
        comm = ((cuts[i - 1] if i > 0 else 0.0) + (cuts[i] if i < S - 1 else 0.0)) / r
        if options.overlap_allreduce:  # the all-reduce runs under the backward pass (DDP's gradient buckets)
            fwd = f / speed / r
            core = fwd + max(compute - fwd, ar)
        else:
            core = compute + ar
        t = max(core, comm) if options.overlap_comm else core + comm
        if zero3_link is not None and r > 1:  # its rings wait on whatever shares their links (linkload)
            t = max(t, zero3_link[i] / M)
        n_held, versions = (int(x) for x in stage_counts(fam, M, workers_after[i], r, limit0))
        mem = _stage_memory(prof, st.first_layer, st.last_layer, mb, n_held, versions, options, r)
        if options.transfers:
            mem += _transfer_memory(prof, st.first_layer, st.last_layer, i == 0, i == S - 1, mb, n_held,
                                    int(inflight(fam, M, workers_after[i], r)), -(-M // r) * plan.batches, options,
                                    FAMILY[fam].backward == "split")
        if options.zero_stage == 3 and r > 1:
            mem += fsdp_gathered_bytes(prof, *st.layers, options, FAMILY[fam].backward)
        raw.append((st, compute, comm, ar, t, mem, _limit(topology, st.devices, options), f, b))
    return _candidate(plan, raw, options, fam, chunks=1, links=links)


def _evaluate_interleaved(plan: Plan, prof: ModelProfile, topology, options: CostOptions) -> Candidate:
    """Several stages per device (interleaved, looped BFS, ZB-V): device d holds the virtual stages its family's
    placement gives it (looped: d, d + P, ...; V: d and 2P − 1 − d); its time is the sum over its chunks."""
    P, V, M, mb = plan.pipeline_depth, plan.chunks, plan.microbatches, plan.microbatch_size
    S = len(plan.stages)
    cuts = [_cut_s(topology, prof, plan.stages[i].last_layer, plan.stages[i].devices[-1], plan.stages[i + 1].devices[0], mb)
            for i in range(S - 1)]
    fam = FAMILY[plan.schedule]
    per_dev: dict[int, list[int]] = {d: [v for v in range(S) if rank_of(fam, P, v) == d] for d in range(P)}
    raw_dev = {}
    for d, vs in per_dev.items():
        dev = plan.stages[vs[0]].devices[0]
        speed = _slowest(topology, (dev,))[0]
        f = sum(prof.forward_s(*plan.stages[v].layers) for v in vs)
        b = sum(prof.backward_s(*plan.stages[v].layers) for v in vs)
        T, r = plan.tensor_parallel, plan.stages[vs[0]].replicas  # interleaved replicas each run the whole schedule
        shares = {v: fam.split_share(P, v, M) for v in vs}
        redo = sum(_recompute_at(prof, plan.stages[v].layers, options.recompute, shares[v]) for v in vs)
        compute = ((f + b + redo) / speed
                   + sum(tp_collective_s(prof, *plan.stages[v].layers, options.recompute, topology,
                                         plan.stages[v].tensor_group(0, T), mb, shares[v]) for v in vs)) / r
        b += redo  # the backward the bubble reads
        comm = sum((cuts[v - 1] if v > 0 else 0.0) + (cuts[v] if v < S - 1 else 0.0) for v in vs)
        # the DP all-reduce of each chunk after its last backward (the simulator's ALLREDUCE), one ring per chunk
        # over its replicas; the device's collectives are serial, so it waits for the sum once per update
        ar_total = sum(dp_allreduce_s(prof, plan.stages[v], topology, options, T) for v in vs)
        ar = ar_total / update_interval(plan.schedule, M, r)
        if options.overlap_allreduce:  # under the backward passes, as on one stage per device
            fwd = f / speed / r
            core, tail = fwd + max(compute - fwd, ar), 0.0
        else:  # after the drain: exposed once per batch, not stretched by the bubble
            core, tail = compute + ar, ar_total
        t = max(core, comm) if options.overlap_comm else core + comm
        warm = M * V if M == P else min((P - d - 1) * 2 + (V - 1) * P, M * V)
        depth = min(warm + 1, M * V)
        if fam.inflight == "batch":  # looped BFS: a whole batch on every chunk
            depth = M * V
        elif fam.held_whole:  # V-Half, V-Min: the block's lifespans, ⌊(P + b)/a⌋ whole microbatches (V chunks each)
            depth = min(V * ((P + fam.held_whole[1]) // fam.held_whole[0]), M * V)
        elif fam.open_cap:  # the other V families: the chunk-microbatches a rank may hold awaiting BW (a whole number)
            depth = fam.open_cap_at(P * V)
            if fam.placement == "looped":  # interleaved zero bubble warms up (V − 1)·g, g its first group (check.open_cap)
                depth += looped_warmup_extra(P, V, M, r)
            depth = min(depth, M * V)
        params = sum(prof.param_bytes(*plan.stages[v].layers) for v in vs)
        kept = [kept_bytes(prof, *plan.stages[v].layers, options.recompute) for v in vs]
        # looped BFS holds M of every chunk (the mean is exact); the others hold `depth` chunk-microbatches split
        # over the rank's chunks in a way depth does not say, so each is charged at the heaviest chunk: a bound
        # on every rank, exact where the chunks keep equal bytes
        per_chunk = sum(kept) / V if fam.inflight == "batch" else max(kept)
        act = (depth * per_chunk + max(rebuilt_bytes(prof, *plan.stages[v].layers, options.recompute) for v in vs)) * mb
        mem = static_bytes(params, 1, r, options) + act
        if options.transfers:
            mem += chunks_transfer_bytes(
                depth, [_boundaries(prof, plan.stages[v].layers, v == 0, v == S - 1, mb, options) for v in vs],
                -(-M // r) * plan.batches, options.recv_lookahead,
                max(rebuilt_bytes(prof, *plan.stages[v].layers, options.recompute) for v in vs) * mb,
                fam.backward == "split", fam.inflight == "batch")
        raw_dev[d] = (compute, comm, ar, t, mem, _limit(topology, (dev,), options), f, b, tail)
    factor = None
    if fam.placement == "v" and 1 < P and P * M <= V_PATH_MAX_PM:  # the longest path through the fixed order
        factor = _v_factor(plan, prof, topology, options.recompute, raw_dev)
    raw, tails = [], []
    for i, st in enumerate(plan.stages):
        compute, comm, ar, t, mem, lim, f, b, tail = raw_dev[rank_of(fam, P, i)]
        raw.append((st, compute, comm, ar, t, mem, lim, f, b))
        tails.append(tail)
    return _candidate(plan, raw, options, plan.schedule, chunks=V, links=link_bound(plan, prof, topology, options),
                      tails=tails, factor=factor)


def _v_factor(plan: Plan, prof: ModelProfile, topology, mode: str, raw_dev: dict) -> float:
    """A V family's f: its batch's longest path (``planner.vpath``) at each stage's F, B, BI and BW (recomputation
    per pass, BI = BW = B/2 before it, as the simulator splits them), less M of the bottleneck rank's F + B, over
    (P − 1) of it; so T_batch = t·(M + (P − 1)·f) is the simulator's wherever t is the rank's compute."""
    P, M = plan.pipeline_depth, plan.microbatches
    mode = recompute_mode(mode)
    passes = []
    for st in plan.stages:
        speed = _slowest(topology, st.devices)[0]
        layers = prof.layers[st.first_layer:st.last_layer + 1]
        f, b = sum(l.forward_s for l in layers), sum(l.backward_s for l in layers)
        extra = {k: sum(pass_recompute_s(l, mode, k) for l in layers) if mode != "none" else 0.0
                 for k in ("B", "BI", "BW")}
        passes.append((f / speed, (b + extra["B"]) / speed, (b / 2 + extra["BI"]) / speed,
                       (b / 2 + extra["BW"]) / speed))
    span = v_batch_time(plan.schedule, P, M, tuple(passes))
    worst = max(raw_dev, key=lambda d: raw_dev[d][3])
    speed = _slowest(topology, plan.stages[worst].devices)[0]  # rank d holds stage d
    work = (raw_dev[worst][6] + raw_dev[worst][7]) / speed
    return (span / work - M) / (P - 1) if work > 0 else 0.0


def _candidate(plan: Plan, raw: list, options: CostOptions, fam: str, chunks: int,
               links: tuple[float, float, str | None, frozenset[int]] = (0.0, 0.0, None, frozenset()),
               tails: list[float] | None = None, factor: float | None = None) -> Candidate:
    """``tails``: per stage, the seconds per batch of its time_s × M that run after the drain (the multi-stage
    all-reduces): the fill and drain stretch only the rest. ``factor``: the family's f where the caller has it."""
    M, P = plan.microbatches, plan.pipeline_depth
    bott = max(r[4] for r in raw)
    worst = max(range(len(raw)), key=lambda i: raw[i][4])
    if factor is None:
        factor = bubble_factor(fam, chunks, raw[worst][7], raw[worst][8], P)
    if FAMILY[fam].bubble in ("split", "split2") and P > 1:
        factor = max(factor, _round_trip_factor(-(-M // raw[worst][0].replicas), P, raw[worst][7], raw[worst][8]))
    # each replica of the bottleneck stage runs its own M/r microbatches through the fill and drain, which
    # take (P − 1)·factor of its per-microbatch time, r·bott (bott is amortised over the r replicas)
    span = M + (P - 1) * factor * raw[worst][0].replicas
    compute_batch = (bott * span if tails is None else
                     max((r[4] - x / M) * span + x for r, x in zip(raw, tails)))
    link_lower, link_batch, link_name, link_stages = links
    batch = max(compute_batch, link_batch)
    link_binds = link_name is not None and link_batch > compute_batch
    samples = M * plan.microbatch_size
    per_sample = batch / samples
    peak: dict[str, float] = {}
    stages = []
    fits = True
    for i, (st, compute, comm, ar, t, mem, lim, _f, _b) in enumerate(raw):
        for d in st.devices:
            peak[d] = mem  # interleaved: every chunk of a device carries the device's figure
        fits = fits and mem <= lim * (1 + 1e-9)
        slack = (bott - t) / bott if bott > 0 else 0.0
        if mem >= MEMORY_BOUND_FRACTION * lim:
            binding = "memory"
        elif link_binds and i in link_stages:
            binding = f"communication (link {link_name})"
        else:
            terms = {"compute": compute, "communication": comm, "all-reduce": ar}
            binding = max(terms, key=terms.__getitem__)
        stages.append(StageCost(i, st.layers, st.replicas, st.devices, compute, comm, ar, t, mem, lim, slack, binding))
    bubble = (batch - bott * M) / batch if batch > 0 else 0.0
    plan_binding = f"communication (link {link_name})" if link_binds else stages[worst].binding
    cand = Candidate(plan, bott, batch, per_sample, 1.0 / per_sample if per_sample > 0 else math.inf, bubble,
                     peak, fits, tuple(stages), compute_time_per_batch_s=compute_batch,
                     link_time_per_batch_s=link_batch, link_bound_s=link_lower, binding_link=link_name,
                     binding=plan_binding)
    return replace(cand, plan=replace(plan, predicted=cand.predicted(), recompute=options.recompute,
                                      zero_stage=options.zero_stage, optimizer=options.optimizer))


def tp_price(topology, group) -> Callable[[str, float], float]:
    """``price(kind, bytes)``: seconds of one ring collective of that kind and size over ``group`` (one replica's
    tensor group; 0 for a group of one), remembered per (kind, bytes) since a stage's blocks repeat them."""
    devices = list(group)
    seen: dict[tuple[str, float], float] = {}

    def price(kind: str, nbytes: float) -> float:
        key = (kind, nbytes)
        t = seen.get(key)
        if t is None:
            t = seen[key] = ring_time_s(topology, devices, kind, nbytes) if len(devices) > 1 else 0.0
        return t
    return price


def tp_collective_s(prof: ModelProfile, first: int, last: int, recompute: str, topology, group: tuple[str, ...],
                    mb: int, split_share: float = 0.0) -> float:
    """Seconds per microbatch of the TP collectives of layers first..last (``Layer.tp_collectives``, each as
    issued; with full recomputation its re-run forward's too, in a split backward's BI and BW each:
    ``planner.recompute.tp_collectives_run``), each a ring of its kind over ``group``, one replica's tensor group;
    ``split_share`` of the microbatches split their backward (``Family.split_share``), the rest run it whole."""
    if len(group) < 2:
        return 0.0
    price = tp_price(topology, group)
    layers = prof.layers[first:last + 1]
    whole = (sum(collectives_time_s(tp_collectives_run(l, recompute), mb, price) for l in layers)
             if split_share < 1.0 else 0.0)
    if split_share <= 0.0:
        return whole
    split = sum(collectives_time_s(tp_collectives_run(l, recompute, True), mb, price) for l in layers)
    return split if split_share >= 1.0 else (1.0 - split_share) * whole + split_share * split


def _recompute_at(prof: ModelProfile, layers: tuple[int, int], mode: str, share: float) -> float:
    """What recomputation adds to a microbatch's backward of ``layers``, ``share`` of them split."""
    whole = microbatch_recompute_s(prof, *layers, mode) if share < 1.0 else 0.0
    if share <= 0.0:
        return whole
    split = microbatch_recompute_s(prof, *layers, mode, True)
    return split if share >= 1.0 else (1.0 - share) * whole + share * split


def dp_allreduce_s(prof: ModelProfile, st, topology, options: CostOptions, T: int) -> float:
    """Seconds of one data-parallel all-reduce of stage ``st``'s gradients (``allreduce_bytes``) as a ring over
    TP rank 0's replicas (0 without replicas). Every TP rank's group all-reduces at the same time, so where the
    groups cross servers the T rings share each server's links: T times the bytes on them."""
    if st.replicas < 2:
        return 0.0
    dp_group = list(st.devices[::T])
    shared = T if T > 1 and len(server_groups(topology, dp_group)) > 1 else 1
    return topology.ring_allreduce_time_s(dp_group, allreduce_bytes(prof.param_bytes(*st.layers), options.zero_stage) * shared)


def allreduce_bytes(params, zero_stage: int):
    """What a stage's all-reduce point moves for ``params`` profile bytes (numbers or arrays): the bytes
    themselves (stage 0), their 16-bit tensor as a reduce-scatter + all-gather (1, 2: the same ring bytes
    as an all-reduce of it), nothing at stage 3 (its collectives run inside the passes: ``fsdp_passes_s``)."""
    if zero_stage == 0:
        return params
    return collective_bytes(params) if zero_stage < 3 else params * 0.0


def _pass_kinds(backward: str) -> tuple[str, ...]:
    """The compute passes of one microbatch on a stage: F and B, or F, BI and BW when the backward is split."""
    return ("F", "BI", "BW") if backward == "split" else ("F", "B")


def fsdp_passes_s(prof: ModelProfile, first: int, last: int, options: CostOptions, topology, group: list[str],
                  speed: float, backward: str = "full", tp_group: tuple[str, ...] = (), mb: int = 1) -> float:
    """Seconds of one microbatch's ZeRO-3 passes on a stage replica over ``group`` (its replicas, of one TP rank),
    each pass ``planner.sharding.fsdp_pass_s`` over the layers (units) with every collective a ring all-gather or
    reduce-scatter of the unit's 16-bit tensor on free links (half a ring all-reduce's time); a unit's compute
    holds its TP collectives as rings over ``tp_group`` (forward: the forward's; backward: the backward's and what
    recomputation re-runs; BI and BW: ``planner.recompute.pass_tp_collectives``); a split backward's BI and BW take
    half the backward each, plus what recomputation adds to each (``planner.recompute.pass_recompute_s``)."""
    layers = prof.layers[first:last + 1]
    ring = [topology.ring_allreduce_time_s(group, collective_bytes(l.param_bytes)) / 2 if l.param_bytes > 0 else 0.0
            for l in layers]
    mode = options.recompute
    price = tp_price(topology, tp_group)
    total = 0.0
    for kind in _pass_kinds(backward):
        gathers, scatters = fsdp_collectives(kind)
        tp = [collectives_time_s(pass_tp_collectives(l, mode, kind), mb, price) for l in layers]
        if kind == "F":
            c = [l.forward_s / speed + x for l, x in zip(layers, tp)]
            g, r = ring, [0.0] * len(layers)
        else:
            share = 1.0 if kind == "B" else 0.5
            c = [(l.backward_s * share + pass_recompute_s(l, mode, kind)) / speed + x
                 for l, x in zip(layers, tp)][::-1]
            g, r = ring[::-1], ring[::-1]
        total += fsdp_pass_s(c, g if gathers else [0.0] * len(c), r if scatters else [0.0] * len(c),
                             options.fsdp_overlap)
    return total


def fsdp_gathered_bytes(prof: ModelProfile, first: int, last: int, options: CostOptions, backward: str = "full") -> float:
    """The most a ZeRO-3 pass of the stage holds beyond the sharded state over the family's passes
    (``planner.stagememory.fsdp_gathered_bytes``, as the simulator counts it at a pass's start)."""
    return _fsdp_gathered(fsdp_units(prof, [(first, last)])[0], _pass_kinds(backward), options.fsdp_overlap)


def static_bytes(param_bytes, versions, replicas, options: CostOptions):
    """Weights (× versions), gradients and optimizer state of a device holding ``param_bytes``, sharded over its
    ``replicas`` by ``options.zero_stage`` (``planner.stagememory.static_bytes``, which the simulator reads too);
    elementwise over numpy arrays as over numbers (the partition search's tables)."""
    factor = OPTIMIZER_STATE[options.optimizer]
    if options.zero_stage == 0:
        return _static_bytes(param_bytes, versions, 1, 0, factor)
    if np.any(np.asarray(versions) != 1):
        raise PlanError(weight_versions_refusal(options.zero_stage, "this schedule", int(np.max(versions))))

    def one(p, r) -> float:
        return _static_bytes(float(p), 1, int(r), options.zero_stage, factor)

    if np.ndim(param_bytes) or np.ndim(replicas):
        return np.vectorize(one, otypes=[float])(param_bytes, replicas)
    return one(param_bytes, replicas)


def _stage_memory(prof: ModelProfile, first: int, last: int, mb: int, n_held: int, versions: int,
                  options: CostOptions, replicas: int = 1) -> float:
    mode = options.recompute
    return stage_bytes(static_bytes(prof.param_bytes(first, last), versions, replicas, options),
                       kept_bytes(prof, first, last, mode), rebuilt_bytes(prof, first, last, mode), n_held, mb)


def _boundaries(prof: ModelProfile, layers: tuple[int, int], is_first: bool, is_last: bool, mb: int,
                options: CostOptions) -> tuple[float, float, float, float]:
    """(input, the input its kept bytes count, output, kept) bytes per microbatch of a stage."""
    first, last = layers
    inp = 0.0 if is_first else prof.boundary_bytes(first - 1) * mb
    kept_in = 0.0 if is_first else min(layer_kept_bytes(prof, first, options.recompute), prof.boundary_bytes(first - 1)) * mb
    out = 0.0 if is_last else prof.boundary_bytes(last) * mb
    return inp, kept_in, out, kept_bytes(prof, first, last, options.recompute) * mb


def _transfer_memory(prof: ModelProfile, first: int, last: int, is_first: bool, is_last: bool, mb: int, n_held: int,
                     n_in: int, receives: int, options: CostOptions, split: bool) -> float:
    """A stage's boundary bytes at its peak (``planner.stagememory.transfer_bytes``): outputs kept as the roots of
    the backward, the receive pool, less the received input its kept bytes count."""
    inp, kept_in, out, kept = _boundaries(prof, (first, last), is_first, is_last, mb, options)
    return transfer_bytes(n_held, n_in, inp, kept_in, out, receives, options.recv_lookahead, kept,
                          rebuilt_bytes(prof, first, last, options.recompute) * mb, split)


# --- the link-load bound ------------------------------------------------------------------
def _cut_s(topology, prof: ModelProfile, last_layer: int, src: str, dst: str, mb: int) -> float:
    return topology.p2p_time_s(src, dst, prof.boundary_bytes(last_layer) * mb)


def _limit(topology, devices, options: CostOptions) -> float:
    if options.memory_limit_bytes is not None:
        return float(options.memory_limit_bytes)
    return _slowest(topology, devices)[1]


# --- what evaluate reads again and again, computed once per object ----------------------------------
_OBJECT_CACHES: dict[tuple[int, str], tuple[object, dict]] = {}
_OBJECT_CACHES_MAX = 64


def per_object_cache(obj, kind: str) -> dict:
    """A dict of ``kind`` results about ``obj``, the same dict for as long as ``obj`` lives (it is held, so its id is
    not reused; the oldest objects' caches are dropped past ``_OBJECT_CACHES_MAX``). For figures of objects that do
    not change once built (a profile, a topology: which caches its own routes): the search costs tens of thousands
    of plans on one profile and topology, and asking a topology for a device walks networkx's views."""
    key = (id(obj), kind)
    hit = _OBJECT_CACHES.get(key)
    if hit is None or hit[0] is not obj:
        while len(_OBJECT_CACHES) >= _OBJECT_CACHES_MAX:
            del _OBJECT_CACHES[next(iter(_OBJECT_CACHES))]
        hit = _OBJECT_CACHES[key] = (obj, {})
    return hit[1]


def _scaled(profile: ModelProfile, mb: int) -> ModelProfile:
    """``profile`` at microbatch size ``mb`` (``ModelProfile.scaled``), built once per profile and size."""
    if mb == profile.microbatch_size:
        return profile
    cache = per_object_cache(profile, "scaled")
    out = cache.get(mb)
    if out is None:
        out = cache[mb] = profile.scaled(mb)
    return out


def _slowest(topology, devices: tuple[str, ...]) -> tuple[float, float]:
    """(least speed, least memory bytes) over ``devices``, once per topology and device tuple."""
    cache = per_object_cache(topology, "slowest")
    out = cache.get(devices)
    if out is None:
        got = [topology.device(d) for d in devices]
        out = cache[devices] = (min(d.speed for d in got), min(d.memory_bytes for d in got))
    return out
