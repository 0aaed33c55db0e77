"""Partition search: contiguous layer ranges × contiguous device blocks (replicas) minimising the bottleneck stage.

Devices are taken in *placement order* (the topology's device order, which every
preset lays out domain by domain), and a plan on N devices uses the first N of
them: stage s holds a block ``[k0, k)`` of that order, so its ``k − k0`` replicas
sit in the smallest domain that can hold them whenever the block is aligned, and
the search prefers aligned blocks because the all-reduce of a misaligned one
crosses a slower link. The stage costs are exactly ``planner.costmodel``'s, so
the value the search returns is the bottleneck ``costmodel.evaluate`` reports for
the plan it builds. Every stage's memory is the cost model's, from the same counts
(``costmodel.stage_counts``) and bytes (``costmodel.stage_bytes``), read from the
family's traits; a family whose stages hold activations until BW up to a cap set by
the whole pipeline's 1F1B depth L₀ (ZB-H1, ZB-H2) is solved once per L₀ unless a
lower bound already settles it (``_solve_n``).

``solve_flat`` is an exact dynamic programme over (first layer, first device) for
every candidate N (all N when the topology has at most ``EXACT_DEVICES``
devices). Clusters too large for it are planned level by level by
``planner.hierarchical.solve_hierarchical``, which keeps its tables in the same
:class:`PartitionCache`. ``brute_force`` enumerates every plan: the reference the tests hold the
programme to.

A :class:`PartitionCache` passed to the solvers reuses their answers across
searches (a sweep plans one model on many clusters). Keys are digests of exactly
what a solver reads — the layer tables at the microbatch size, the options and
schedule figures it uses, and the device tables of the first N devices (speeds,
memory, the latency and bandwidth of every path it costs) — never names or
sizes, so two clusters share an answer only when the search could not tell them
apart, and a cached answer is bit-identical to a fresh one.

Why one module of ~670 lines: the flat dynamic programme and the brute-force oracle share the stage-cost arrays
(``_Tables``); apart, those internals would become an interface. The digest and :class:`PartitionCache` both
programmes key and store their tables with live in ``planner/partcache.py`` (re-exported here); the hierarchical
programme reads none of ``_Tables`` and lives in ``planner/hierarchical.py``.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from planner.costmodel import (CostOptions, OPTIMIZER_STATE, allreduce_bytes, deepest_limit0, fsdp_gathered_bytes,
                               holds_until_weight_grad, inflight, stage_bytes, stage_counts, stage_input_bytes,
                               static_bytes, update_interval, weight_versions)
from planner.partcache import PartitionCache, TimeStore, digest
from planner.profile import ModelProfile
from planner.program import FAMILY
from planner.recompute import layer_kept_bytes, layer_microbatch_recompute_s, layer_rebuilt_bytes

#: Up to this many devices, every device count N is searched (the exact regime).
EXACT_DEVICES = 16
#: Above this many devices the flat programme gives way to the hierarchical one.
FLAT_MAX_DEVICES = 64
#: Beyond this many layers the flat programme plans over blocks of near-equal work.
FLAT_MAX_BLOCKS = 48
#: A grid of at least this many stages has its stage times kept for the other passes (``_stage_time``).
STORE_MIN_STAGES = 64


@dataclass(frozen=True)
class Problem:
    """One partition problem: a profile at its microbatch size on devices in placement order.

    Attributes:
        profile: the model at the plan's microbatch size.
        devices: device names in placement order.
        family: schedule family (non-interleaved).
        microbatches: microbatches per batch M.
        options: the cost options.
    """

    profile: ModelProfile
    devices: tuple[str, ...]
    family: str
    microbatches: int
    options: CostOptions


@dataclass(frozen=True)
class Partition:
    """A solution: stages as (first_layer, last_layer, device indices into placement order).

    Attributes:
        value: the bottleneck (seconds per microbatch, or bytes for the memory objective).
        stages: (first_layer, last_layer, indices); the flat search gives each stage a block ``range(k0, k)``.
        devices_used: N.
    """

    value: float
    stages: tuple[tuple[int, int, tuple[int, ...]], ...]
    devices_used: int


class _Tables:
    """Prefix sums over layers and per-block device figures, shared by every N."""

    def __init__(self, pb: Problem, topology):
        prof, opt = pb.profile, pb.options
        L, D = len(prof), len(pb.devices)
        self.L, self.D = L, D
        self.times = TimeStore()  # stage times per grid, shared by the passes (a cache's store: by families too)
        self._time_key = None
        mb = prof.microbatch_size
        split = FAMILY[pb.family].backward == "split"  # BI and BW each rebuild (planner.recompute)
        fb = np.array([l.forward_s + l.backward_s + layer_microbatch_recompute_s(l, opt.recompute, split) for l in prof.layers])
        self.work = np.concatenate([[0.0], np.cumsum(fb)])
        # what recomputation keeps per layer (prefix sums) and the most one layer of [i, j) rebuilds (rebuilt[i, j])
        self.kept = np.concatenate([[0.0], np.cumsum([layer_kept_bytes(prof, i, opt.recompute) for i in range(L)])]) * mb
        per_layer = self.rebuilt_layer = np.array([layer_rebuilt_bytes(prof, i, opt.recompute) for i in range(L)]) * mb
        self.rebuilt = np.zeros((L + 1, L + 1))
        if per_layer.any():
            for i in range(L):
                self.rebuilt[i, i + 1:] = np.maximum.accumulate(per_layer[i:])
        self.params = np.concatenate([[0.0], np.cumsum([l.param_bytes for l in prof.layers])])
        self.saved = np.concatenate([[0.0], np.cumsum([l.saved_bytes for l in prof.layers])]) * mb
        self.inbytes = np.array([stage_input_bytes(prof, i) for i in range(L)] + [0.0]) * mb
        self.bbytes = np.array([prof.boundary_bytes(j - 1) * mb if 0 < j < L else 0.0 for j in range(L + 1)])
        devs = pb.devices
        speed = np.array([topology.device(d).speed for d in devs])
        if opt.memory_limit_bytes is not None:
            mem = np.full(D, float(opt.memory_limit_bytes))
        else:
            mem = np.array([topology.device(d).memory_bytes for d in devs])
        inf = math.inf
        self.smin = np.full((D + 1, D + 1), inf)
        self.mlim = np.full((D + 1, D + 1), -inf)
        self.ar_lat = np.zeros((D + 1, D + 1))
        self.ar_bw = np.full((D + 1, D + 1), inf)
        for k0 in range(D):
            s, m = inf, inf
            chain_lat, chain_bw = 0.0, inf
            for k in range(k0 + 1, D + 1):
                s, m = min(s, speed[k - 1]), min(m, mem[k - 1])
                self.smin[k0, k], self.mlim[k0, k] = s, m
                n = k - k0
                if n >= 2:
                    a, b = devs[k - 2], devs[k - 1]
                    chain_lat = max(chain_lat, topology.path_latency(a, b))
                    chain_bw = min(chain_bw, topology.path_bandwidth(a, b))
                    wrap_lat = topology.path_latency(devs[k - 1], devs[k0])
                    wrap_bw = topology.path_bandwidth(devs[k - 1], devs[k0])
                    self.ar_lat[k0, k] = 2 * (n - 1) * max(chain_lat, wrap_lat)
                    self.ar_bw[k0, k] = min(chain_bw, wrap_bw)
        # the cut before device k: from devices[k-1] to devices[k]
        self.cut_lat = np.zeros(D + 1)
        self.cut_bw = np.full(D + 1, inf)
        for k in range(1, D):
            self.cut_lat[k] = topology.path_latency(devs[k - 1], devs[k])
            self.cut_bw[k] = topology.path_bandwidth(devs[k - 1], devs[k])
        self.opt_state = OPTIMIZER_STATE[opt.optimizer]
        # ZeRO-3: what a pass of layers [i, j) gathers beyond the sharded state (the cost model's fsdp_gathered_bytes)
        self.gathered = np.zeros((L + 1, L + 1))
        if opt.zero_stage == 3:
            for i in range(L):
                for j in range(i + 1, L + 1):
                    self.gathered[i, j] = fsdp_gathered_bytes(prof, i, j - 1, opt, FAMILY[pb.family].backward)

    def prefix(self, n: int) -> "_Tables":
        """The tables of the first ``n`` devices alone — equal, array for array, to ``_Tables`` built on them.

        A search over n devices reads only these: every device figure and path it costs lies among the
        first n (the cut after device n − 1 ends the pipeline, so it costs nothing, as on an n-device cluster).
        """
        if n == self.D:
            return self
        t = object.__new__(_Tables)
        t.__dict__.update(self.__dict__)
        t.D = n
        for name in ("smin", "mlim", "ar_lat", "ar_bw"):
            setattr(t, name, getattr(self, name)[:n + 1, :n + 1])
        t.cut_lat, t.cut_bw = self.cut_lat[:n + 1].copy(), self.cut_bw[:n + 1].copy()
        t.cut_lat[n], t.cut_bw[n] = 0.0, math.inf
        t._time_key = None
        return t

    def time_key(self, pb: Problem) -> bytes:
        """A digest of everything ``_stage_time`` reads: the layer work, parameter and boundary bytes, the device
        speeds, ring and cut figures of these tables, overlap, the ZeRO stage and the update interval's rule (M for a
        batched family, the replicas for a stream) — so the families and passes that share it share the times."""
        if self._time_key is None:
            opt = pb.options
            rule = ("batch", pb.microbatches) if FAMILY[pb.family].batched else ("stream",)
            self._time_key = digest("time", rule, opt.overlap_comm, opt.zero_stage, self.L, self.D, self.work,
                                     self.params, self.bbytes, self.smin, self.ar_lat, self.ar_bw, self.cut_lat,
                                     self.cut_bw)
        return self._time_key

    def key(self, pb: Problem, objective: str) -> bytes:
        """A digest of everything ``_solve_n`` reads for a search over all of these tables' devices.

        Layer tables, the options the stage costs use (overlap, recomputation, optimizer state, ZeRO stage),
        the schedule family and microbatch count (PipeDream's stage costs do not use M), the objective, and
        the device tables. ``memory_limit_bytes`` is in ``mlim``; device names are not read.
        """
        opt = pb.options
        M = pb.microbatches if reads_microbatches(pb.family) else None
        return digest("flat", objective, pb.family, M, opt.overlap_comm, opt.recompute, self.opt_state, opt.zero_stage,
                       opt.fsdp_overlap, self.gathered, self.L, self.D, self.work, self.params, self.saved, self.inbytes, self.kept, self.rebuilt_layer, self.bbytes,
                       self.smin, self.mlim, self.ar_lat, self.ar_bw, self.cut_lat, self.cut_bw)

    def cut(self, j, k):
        """Seconds of one microbatch's boundary transfer for a cut before layer j at device k (0 at the ends)."""
        j, k = np.asarray(j), np.asarray(k)
        t = self.cut_lat[k] + self.bbytes[j] / self.cut_bw[k]
        return np.where((j > 0) & (j < self.L) & (k > 0) & (k < self.D), t, 0.0)


def reads_microbatches(family: str) -> bool:
    """Whether a stage's figures read the microbatch count M: a batched family's do (one update per batch, replicas
    ≤ M, in flight within the batch); a stream's (PipeDream: M is the stream's length) read only its replicas."""
    fam = FAMILY[family]
    return fam.batched or fam.inflight == "batch" or holds_until_weight_grad(family)


def needs_no_less_than(family: str, other: str, zero_stage: int = 0) -> bool:
    """Every partition needs at least as many bytes per device under ``family`` as under ``other``: the two keep the
    same weights, in-flight rule and schedulability, and ``family``'s stages also hold activations until BW, which
    ``other``'s do not (ZB-H1 and ZB-H2 against 1F1B: ``costmodel.held_until_weight_grad`` is at least the
    in-flight count). Under ZeRO-3 the passes' gathered weights differ with the backward (a split one gathers
    less at a time), so there the backward must be the same too."""
    a, b = FAMILY[family], FAMILY[other]
    same = (a.inflight, a.flush, a.versions, a.weight_copies) == (b.inflight, b.flush, b.versions, b.weight_copies)
    if zero_stage == 3:
        same = same and a.backward == b.backward
    return same and holds_until_weight_grad(family) and not holds_until_weight_grad(other)




def _stage_arrays(tb: _Tables, pb: Problem, N: int, i: int, k0: np.ndarray, j: np.ndarray, k: np.ndarray,
                  limit0: int | None):
    """Time and memory of the stage layers [i, j) on devices [k0, k) (broadcast arrays), as the cost model has them.

    ``limit0`` is the pipeline's 1F1B depth L₀ the pass assumes (``costmodel.stage_counts``); a family whose stages
    hold activations until BW (``costmodel.holds_until_weight_grad``) is charged at it, and a stage deeper than it
    (⌈(N − k0) / replicas⌉ > L₀) is left out of the pass. None: each stage at its own depth, the least any
    partition holding it can charge it (the lower bound ``_solve_n`` tries first)."""
    opt, fam, M = pb.options, pb.family, pb.microbatches
    r = k - k0
    rr = np.maximum(r, 1)
    params = tb.params[j] - tb.params[i]
    t = _stage_time(tb, pb, i, k0, j, k)
    # memory: the cost model's counts and bytes (planner.costmodel.stage_counts, stage_bytes)
    after = N - k0
    lim = -(-after // rr)
    held, versions = stage_counts(fam, M, after, rr, lim if limit0 is None else limit0)
    mem = stage_bytes(static_bytes(params, versions, rr, opt), tb.kept[j] - tb.kept[i], tb.rebuilt[i, j], held)
    ok = _schedulable(fam, M, r, lim)
    if opt.zero_stage == 3:  # FSDP: the gathered units on top, and (zero3_refusal) replicas that split M evenly
        mem = mem + np.where(r > 1, tb.gathered[i, j], 0.0)
        ok = ok & ((r == 1) | (M % rr == 0) | (not FAMILY[fam].batched))
    if limit0 is not None and holds_until_weight_grad(fam):
        ok = ok & (lim <= limit0)
    return np.where(ok, t, math.inf), np.where(ok, mem, math.inf), tb.mlim[k0, k]


def _stage_time(tb: _Tables, pb: Problem, i: int, k0: np.ndarray, j: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Seconds per microbatch of the stage layers [i, j) on devices [k0, k) (broadcast arrays): compute over the
    replicas plus the all-reduce per update, against the cuts in and out (the time half of ``_stage_arrays``).

    It reads no memory rule, so every pass over N devices (a ZB family runs up to three) and every family that
    updates alike read one table: a grid of ``STORE_MIN_STAGES`` or more stages is kept in ``tb.times`` by
    ``tb.time_key`` and the grid, and read back, the same floats, instead of recomputed.
    """
    k0, j, k = np.asarray(k0), np.asarray(j), np.asarray(k)
    size = np.broadcast_shapes(k0.shape, j.shape, k.shape)
    key = digest(tb.time_key(pb), i, k0, j, k) if math.prod(size) >= STORE_MIN_STAGES else None
    if key is not None and (t := tb.times.get(key)) is not None:
        return t
    opt, fam, M = pb.options, pb.family, pb.microbatches
    r = k - k0
    rr = np.maximum(r, 1)
    compute = (tb.work[j] - tb.work[i]) / tb.smin[k0, k] / rr
    params = tb.params[j] - tb.params[i]
    n = k - k0
    # ZeRO-3's gathers run inside its passes, which this programme does not time (evaluate does): none here
    ar_full = tb.ar_lat[k0, k] + 2 * (n - 1) / np.maximum(n, 1) * allreduce_bytes(params, opt.zero_stage) / tb.ar_bw[k0, k]
    ar = np.where((r > 1) & (opt.zero_stage != 3), ar_full / update_interval(fam, M, rr), 0.0)
    cin = tb.cut(i, k0) if i > 0 else 0.0
    cout = tb.cut(j, k)
    comm = (cin + cout) / rr
    t = np.maximum(compute + ar, comm) if opt.overlap_comm else compute + ar + comm
    if key is not None:
        tb.times.put(key, t)
    return t


def _schedulable(family: str, M: int, replicas, limit):
    """What planner.schedules accepts over many batches: replicas ≤ M (a batched family); a stale-version family (2BW)
    needs M ≥ the in-flight depth, and from the third batch on ⌊M / replicas⌋ ≥ that depth less one
    (``REQUIRES['2bw']``: batch b + 2 runs on batch b's step)."""
    fam = FAMILY[family]
    ok = (replicas <= M) | (not fam.batched)
    if fam.versions == "stale":
        ok = ok & (limit <= M) & (M // replicas >= limit - 1)
    return ok


def _depths(pb: Problem, N: int) -> list[int]:
    """The 1F1B depths L₀ the programme runs a pass at over N devices, shallowest first.

    A family whose stage memory does not read L₀ needs one pass (any L₀: N). ZB-H1 and ZB-H2 hold
    min(cap(L₀), ⌈M / r⌉) on every stage (cap = ``open_cap_at``), so each L₀ gets a pass admitting only the stages
    no deeper than it, charged at cap(L₀): a partition is charged exactly in the pass at its own L₀ and more in the
    later ones, so the first pass reaching the best value answers exactly. Once cap(L₀) ≥ M every deeper L₀
    charges the same, and the pass at N stands for them all.
    """
    if not holds_until_weight_grad(pb.family):
        return [N]
    fam = FAMILY[pb.family]
    out = []
    for limit0 in range(1, N + 1):
        out.append(limit0)
        if fam.open_cap_at(limit0) >= pb.microbatches:
            break
    out[-1] = N
    return out


def pipeline_depth(stages: tuple[tuple[int, int, tuple[int, ...]], ...], N: int) -> int:
    """L₀ of a partition over N devices: the largest ⌈workers at or after a stage / its replicas⌉ (1F1B's peak)."""
    return max(-(-(N - idx[0]) // len(idx)) for _a, _b, idx in stages)


def stage_memory(pb: Problem, topology, stages: tuple[tuple[int, int, tuple[int, ...]], ...]) -> list[float]:
    """The bytes the search charges each stage of a partition (``Partition.stages``, device blocks of placement order,
    on the first N devices it names): what it compares with the limit, at the partition's own L₀."""
    N = max(idx[-1] for _a, _b, idx in stages) + 1
    tb = _Tables(pb, topology).prefix(N)
    limit0 = pipeline_depth(stages, N)
    return [float(_stage_arrays(tb, pb, N, a, np.array(idx[0]), np.array(b + 1), np.array(idx[-1] + 1), limit0)[1])
            for a, b, idx in stages]


def _solve_n(tb: _Tables, pb: Problem, N: int, objective: str) -> Partition | None:
    """The best partition over N devices: one pass per 1F1B depth the family's memory reads (``_depths``).

    A family that reads it first runs the lower bound (every stage charged at its own depth): when its answer,
    charged at its own L₀, still fits (time) or still peaks at the bound (memory), no partition does better and
    that is the answer; otherwise the time objective bisects with bit masks of depths (``_solve_by_depth_masks``)
    and the memory objective runs the passes, narrowed first (``_memory_depths``) when there are many.
    """
    if not holds_until_weight_grad(pb.family):
        return _solve_pass(tb, pb, N, objective, N)
    low = _solve_pass(tb, pb, N, objective, None)
    if low is None:
        return None
    exact = [_stage_arrays(tb, pb, N, a, np.array(idx[0]), np.array(b + 1), np.array(idx[-1] + 1),
                           pipeline_depth(low.stages, N))[1:] for a, b, idx in low.stages]
    if (max(float(m) for m, _lim in exact) <= low.value if objective == "memory"
            else all(m <= lim * (1 + 1e-9) for m, lim in exact)):
        return low
    if objective == "time" and N <= _MASK_BITS:
        sol = _solve_by_depth_masks(tb, pb, N, low.value)
        if sol is not False:
            return sol
    depths = _depths(pb, N)
    if objective == "memory" and N <= _MASK_BITS and len(depths) > _MEMORY_PASSES:  # the depths that can answer
        depths = _memory_depths(tb, pb, N, low.value, max(float(m) for m, _lim in exact))
    best = None
    for limit0 in depths:
        sol = _solve_pass(tb, pb, N, objective, limit0)
        if sol is not None and (best is None or sol.value < best.value * (1 - 1e-12)):
            best = sol
    return best


#: 1F1B depths a bit mask of ``_solve_by_depth_masks`` holds (L₀ = 1..64, bit L₀ − 1 of an unsigned 64-bit word).
_MASK_BITS = 64


def _stage_window(tb: _Tables, pb: Problem, N: int, i: int, k0: np.ndarray, j: np.ndarray, k: np.ndarray,
                  cap_bytes: float | None = None):
    """(time, shallowest L₀, deepest L₀) of the stages ``_stage_arrays`` costs: a stage is in the pass at L₀ when
    ⌈(N − k0) / replicas⌉ ≤ L₀ (its own depth) and its memory charged at L₀ fits its devices (or ``cap_bytes``, the
    memory objective's threshold), which holds up to ``costmodel.deepest_limit0`` of the microbatches its bytes
    leave room for."""
    opt, fam, M = pb.options, pb.family, pb.microbatches
    t, _mem, mlim = _stage_arrays(tb, pb, N, i, k0, j, k, None)
    if cap_bytes is not None:
        mlim = cap_bytes / (1 + 1e-9)
    rr = np.maximum(k - k0, 1)
    n_in = inflight(fam, M, N - k0, rr)
    static = static_bytes(tb.params[j] - tb.params[i], weight_versions(fam, n_in), rr, opt)
    if opt.zero_stage == 3:
        static = static + np.where(k - k0 > 1, tb.gathered[i, j], 0.0)
    kept, room = tb.kept[j] - tb.kept[i], mlim * (1 + 1e-9) - static - tb.rebuilt[i, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        max_held = np.where(kept > 0, room / np.where(kept > 0, kept, 1.0), np.where(room >= 0, math.inf, -math.inf))
    return t, -(-(N - k0) // rr), deepest_limit0(fam, M, n_in, rr, max_held, N)


#: Up to this many passes the memory objective runs them all; beyond, ``_memory_depths`` first narrows them down.
_MEMORY_PASSES = 16


def _memory_depths(tb: _Tables, pb: Problem, N: int, lower: float, upper: float) -> list[int]:
    """The depths L₀ whose pass can give the memory objective's answer, which lies in [``lower``, ``upper``]: bisect
    on the threshold μ (to 1e-6, or until at most ``_MEMORY_PASSES`` / 2 depths remain) with a programme ORing, as bit masks, the depths at which a suffix of stages all
    fit in μ charged there; every depth the best partition can be charged at is among those at the upper end."""
    L, ALL = tb.L, np.uint64(2**64 - 1)

    def depths_within(mu: float) -> int:
        g = np.zeros((L + 1, N + 1), dtype=np.uint64)
        g[L, N] = ALL
        for i, k0s, K0, J, Kc, valid in _rows(L, N):
            t, lo, hi = _stage_window(tb, pb, N, i, K0, J, Kc, mu)
            mask = np.where(valid & (lo <= hi) & (t < math.inf), _low_bits(hi) & ~_low_bits(lo - 1), np.uint64(0))
            g[i, k0s] = np.bitwise_or.reduce((mask & g[J, Kc]).reshape(len(k0s), -1), axis=1)
        return int(g[0, 0])

    bits = depths_within(upper * (1 + 1e-9))
    while upper - lower > 1e-6 * upper and bin(bits).count("1") > _MEMORY_PASSES // 2:
        mid = (lower + upper) / 2
        found = depths_within(mid * (1 + 1e-9))
        if found:
            upper, bits = mid, found
        else:
            lower = mid
    return [L0 for L0 in range(1, N + 1) if bits >> (L0 - 1) & 1]


def _rows(L: int, N: int):
    """The programme's rows, last layer first: (i, first devices k0, then as broadcast views K0 (a,1,1), next layer
    J (1,b,1), next device Kc (a,1,c, clipped to k0 + 1 where not past k0) and the mask of the k past k0)."""
    for i in range(L - 1, -1, -1):
        k0s = np.array([0]) if i == 0 else np.arange(1, N)
        if k0s.size == 0:
            continue
        K0, J, K = k0s[:, None, None], np.arange(i + 1, L + 1)[None, :, None], np.arange(N + 1)[None, None, :]
        valid = K > K0
        yield i, k0s, K0, J, np.where(valid, K, np.minimum(K0 + 1, N)), valid


def _low_bits(h: np.ndarray) -> np.ndarray:
    """Unsigned 64-bit words with their ``h`` lowest bits set (0 ≤ h ≤ 64)."""
    one = np.left_shift(np.uint64(1), np.minimum(h, 63).astype(np.uint64)) - np.uint64(1)
    return np.where(h >= 64, np.uint64(2**64 - 1), one)


def _solve_by_depth_masks(tb: _Tables, pb: Problem, N: int, lower: float) -> Partition | None | bool:
    """The time objective's answer over N ≤ 64 devices without a pass per L₀: bisect on the bottleneck τ among the
    stage times ≥ ``lower``; for a τ, a programme over (first layer, first device) ORs, as bit masks, the depths L₀
    at which a suffix of stages of time ≤ τ all fit (each stage's ``_stage_window``). The least τ with a depth at
    the start is the answer, and the pass at its shallowest depth finds that partition. False: that pass disagreed
    (a rounding at a memory boundary), and the caller runs every pass."""
    L, ALL = tb.L, np.uint64(2**64 - 1)
    rows, values = [], []
    for i, k0s, K0, J, Kc, valid in _rows(L, N):
        t, lo, hi = _stage_window(tb, pb, N, i, K0, J, Kc)
        use = valid & (lo <= hi) & (t < math.inf)
        a, b, c = np.nonzero(np.broadcast_to(use, t.shape))
        if a.size == 0:
            continue
        lo_u, hi_u = np.broadcast_to(lo, t.shape)[a, b, c], np.broadcast_to(hi, t.shape)[a, b, c]
        mask = _low_bits(hi_u) & ~_low_bits(lo_u - 1)  # bits lo − 1 .. hi − 1: depths lo .. hi
        flat = (np.broadcast_to(J, t.shape)[a, b, c] * (N + 1) + np.broadcast_to(Kc, t.shape)[a, b, c])
        starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
        t_u = t[a, b, c]
        rows.append((i, k0s[a[starts]], starts, t_u, mask, flat))
        values.append(t_u[t_u >= lower * (1 - 1e-12)])  # no partition's bottleneck is below the lower bound
    if not values:
        return None

    def depths_at_start(tau: float) -> int:
        g = np.zeros((L + 1) * (N + 1), dtype=np.uint64)
        g[L * (N + 1) + N] = ALL
        for i, k0u, starts, t_u, mask, flat in rows:
            m = np.where(t_u <= tau, mask & g[flat], np.uint64(0))
            g[i * (N + 1) + k0u] = np.bitwise_or.reduceat(m, starts)
        return int(g[0])

    taus = np.unique(np.concatenate(values))
    if not taus.size or not depths_at_start(taus[-1]):
        return None
    lo_i, hi_i = 0, len(taus) - 1
    while lo_i < hi_i:
        mid = (lo_i + hi_i) // 2
        if depths_at_start(taus[mid]):
            hi_i = mid
        else:
            lo_i = mid + 1
    tau, bits = float(taus[hi_i]), depths_at_start(taus[hi_i])
    sol = _solve_pass(tb, pb, N, "time", (bits & -bits).bit_length())
    return sol if sol is not None and math.isclose(sol.value, tau, rel_tol=1e-12) else False


def _solve_pass(tb: _Tables, pb: Problem, N: int, objective: str, limit0: int) -> Partition | None:
    L = tb.L
    inf = math.inf
    f = np.full((L + 1, N + 1), inf)
    f[L, N] = 0.0
    depth = np.zeros((L + 1, N + 1))  # stages of the chosen suffix: ties go to the shallower pipeline
    choice = np.zeros((L + 1, N + 1, 2), dtype=int)  # (j, k) of the state's best first stage
    ks = np.arange(N + 1)
    for i in range(L - 1, -1, -1):
        k0s = np.array([0]) if i == 0 else np.arange(1, N)
        if k0s.size == 0:
            continue
        js = np.arange(i + 1, L + 1)
        # broadcast views instead of meshgrid copies: K0 (a,1,1), J (1,b,1), K (1,1,c)
        K0, J, K = k0s[:, None, None], js[None, :, None], ks[None, None, :]
        valid = K > K0
        Kc = np.where(valid, K, np.minimum(K0 + 1, N))
        t, mem, lim = _stage_arrays(tb, pb, N, i, K0, J, Kc, limit0)
        if objective == "memory":
            stage_val = mem
        else:
            stage_val = np.where(mem <= lim * (1 + 1e-9), t, inf)
        # a valid (j, k) has Kc = k, so the suffix tables are read as slices, not gathered (the invalid are inf)
        val = np.where(valid, np.maximum(stage_val, f[None, i + 1:, :]), inf)
        flat = val.reshape(len(k0s), -1)
        vmin = flat.min(axis=1, keepdims=True)
        ties = np.where(val <= vmin[:, :, None] * (1 + 1e-12), depth[None, i + 1:, :], inf).reshape(len(k0s), -1)
        best = np.argmin(ties, axis=1)
        v = flat[np.arange(len(k0s)), best]
        hit = v < inf  # the states with a finite best: their value, depth and choice (j, k), all at once
        jj, kk = np.divmod(best[hit], N + 1)
        f[i, k0s[hit]] = v[hit]
        depth[i, k0s[hit]] = depth[js[jj], kk] + 1
        choice[i, k0s[hit]] = np.stack([js[jj], kk], axis=1)
    if not f[0, 0] < inf:
        return None
    stages, i, k0 = [], 0, 0
    while i < L:
        j, k = (int(x) for x in choice[i, k0])
        stages.append((i, j - 1, tuple(range(k0, k))))
        i, k0 = j, k
    return Partition(float(f[0, 0]), tuple(stages), N)


def device_counts(topology, devices: tuple[str, ...]) -> list[int]:
    """The N a flat search tries: all up to EXACT_DEVICES, then powers of two, domain sizes and all devices."""
    D = len(devices)
    if D <= EXACT_DEVICES:
        return list(range(1, D + 1))
    out = set(range(1, EXACT_DEVICES + 1)) | {D}
    p = 1
    while p <= D:
        out.add(p)
        p *= 2
    size = 1
    for count, _bw in topology.levels():
        size *= count
        for m in range(1, 5):
            if m * size <= D:
                out.add(m * size)
    return sorted(n for n in out if n <= D)


def _solve_prefix(tb: _Tables, pb: Problem, N: int, objective: str, cache: PartitionCache | None) -> Partition | None:
    """``_solve_n`` over the first N devices, from ``cache`` when it has the answer for the same inputs."""
    sub = tb.prefix(N)
    if cache is None:
        return _solve_n(sub, pb, N, objective)
    key = sub.key(pb, objective)
    if key in cache.flat:
        cache.hits += 1
        return cache.flat[key]
    cache.misses += 1
    cache.flat[key] = out = _solve_n(sub, pb, N, objective)
    return out


def solve_flat(pb: Problem, topology, objective: str = "time", counts: list[int] | None = None,
               cache: PartitionCache | None = None) -> Partition | None:
    """The best partition over the first N devices for each candidate N (exact for each N); None if nothing fits.

    ``objective`` "time" minimises the bottleneck seconds subject to memory; "memory"
    minimises the largest per-device memory (the smallest limit anything fits in).
    ``cache`` reuses answers for device prefixes it has seen (the same answer, bit for bit).
    """
    tb = _Tables(pb, topology)
    if cache is not None:
        tb.times = cache.times
    counts = counts or device_counts(topology, pb.devices)
    found: dict[int, Partition | None] = {}
    if objective == "memory" and holds_until_weight_grad(pb.family):
        # one pass per 1F1B depth makes each N dear: solve the N in the order of their lower bound (every stage at
        # its own depth) and leave out those whose bound is above the best found; the answer is the same
        low = {N: _solve_pass(tb.prefix(N), pb, N, objective, None) for N in counts}
        for N in sorted((N for N in counts if low[N] is not None), key=lambda N: low[N].value):
            if any(f is not None and low[N].value > f.value * (1 + 1e-12) for f in found.values()):
                break
            found[N] = _solve_prefix(tb, pb, N, objective, cache)
        counts = [N for N in counts if N in found]
    best: Partition | None = None
    for N in counts:
        part = found[N] if N in found else _solve_prefix(tb, pb, N, objective, cache)
        if part is not None and (best is None or part.value < best.value * (1 - 1e-12)):
            best = part
    return best


def solve_flat_per_count(pb: Problem, topology, counts: list[int] | None = None,
                         cache: PartitionCache | None = None) -> list[Partition]:
    """The DP's best partition for each candidate device count N (those where something fits).

    The same programme as ``solve_flat``, kept per N: the search ranks them all by the full
    cost model (with the shared-link bound the programme does not see), so a plan on fewer
    devices whose traffic stays off a slow link can win. ``cache`` as in ``solve_flat``.
    """
    tb = _Tables(pb, topology)
    if cache is not None:
        tb.times = cache.times
    out = []
    for N in counts or device_counts(topology, pb.devices):
        part = _solve_prefix(tb, pb, N, "time", cache)
        if part is not None:
            out.append(part)
    return out


# --- the reference: every plan, one by one ---------------------------------------------------
def _compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        b = (0,) + cuts + (total,)
        yield [(b[x], b[x + 1]) for x in range(parts)]


def brute_force(pb: Problem, topology, objective: str = "time", counts: list[int] | None = None) -> Partition | None:
    """Enumerate every contiguous layer partition × device-block split over the first N devices; the DP's reference."""
    tb = _Tables(pb, topology)
    L = tb.L
    best: Partition | None = None
    for N in counts or device_counts(topology, pb.devices):
        memo: dict = {}
        sub = tb.prefix(N)

        def cost(i, j, k0, k, limit0):
            key = (i, j, k0, k, limit0)
            if key not in memo:
                t, mem, lim = _stage_scalar(sub, pb, N, i, j, k0, k, limit0)
                memo[key] = mem if objective == "memory" else (t if mem <= lim * (1 + 1e-9) else math.inf)
            return memo[key]

        for P in range(1, min(L, N) + 1):
            for lay in _compositions(L, P):
                for dev in _compositions(N, P):
                    limit0 = max(-(-(N - c) // (d - c)) for c, d in dev)  # this partition's own 1F1B depth
                    v = max(cost(a, b, c, d, limit0) for (a, b), (c, d) in zip(lay, dev))
                    if v < math.inf and (best is None or v < best.value * (1 - 1e-12)):
                        best = Partition(v, tuple((a, b - 1, tuple(range(c, d))) for (a, b), (c, d) in zip(lay, dev)), N)
    return best


def _stage_scalar(tb: _Tables, pb: Problem, N: int, i: int, j: int, k0: int, k: int, limit0: int):
    """The same stage figures as ``_stage_arrays``, written out in scalars for the reference (``limit0``: the whole
    partition's 1F1B depth, not a pass's bound)."""
    opt, fam, M = pb.options, pb.family, pb.microbatches
    r = k - k0
    compute = (tb.work[j] - tb.work[i]) / tb.smin[k0, k] / r
    params = tb.params[j] - tb.params[i]
    ar = ((tb.ar_lat[k0, k] + 2 * (r - 1) / r * allreduce_bytes(params, opt.zero_stage) / tb.ar_bw[k0, k])
          / update_interval(fam, M, r) if r > 1 and opt.zero_stage != 3 else 0.0)
    cin = float(tb.cut(i, k0)) if i > 0 else 0.0
    comm = (cin + float(tb.cut(j, k))) / r
    t = max(compute + ar, comm) if opt.overlap_comm else compute + ar + comm
    held, versions = stage_counts(fam, M, N - k0, r, limit0)
    mem = float(stage_bytes(static_bytes(params, versions, r, opt), tb.kept[j] - tb.kept[i], tb.rebuilt[i, j], held))
    if opt.zero_stage == 3 and r > 1:
        mem += tb.gathered[i, j]
        if FAMILY[fam].batched and M % r:
            return math.inf, math.inf, tb.mlim[k0, k]
    if not _schedulable(fam, M, r, math.ceil((N - k0) / r)):
        return math.inf, math.inf, tb.mlim[k0, k]
    return t, mem, tb.mlim[k0, k]
