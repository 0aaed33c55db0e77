"""The hierarchical partition search: level by level over the topology's hierarchy, on layer blocks.

For clusters past ``partition.FLAT_MAX_DEVICES`` devices the flat programme's (first layer, first device)
grid is too large, so ``solve_hierarchical`` plans as PipeDream's hierarchical optimizer does: at level 0
the units are devices, at level ℓ they are level-(ℓ−1) domains each running the sub-plan found one level
down, and layers are grouped into at most ``HIER_MAX_BLOCKS`` blocks of near-equal work (``coarsen``,
which the flat programme uses too beyond ``partition.FLAT_MAX_BLOCKS`` layers). ``split_even`` is the
equal-work split interleaved chunks are cut by. The plan it returns is costed by the cost model like any other.

Why its own module: it shares with the flat programme only the problem and answer types (``planner.partition``)
and the digest and :class:`planner.partcache.PartitionCache` it keys and stores its level tables and splits with;
none of the flat programme's stage-cost arrays (``_Tables``) or passes. Apart, each module is one idea.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.costmodel import static_bytes_per_param_byte, update_interval, weight_versions
from planner.partcache import PartitionCache, digest
from planner.partition import Partition, Problem
from planner.plan import PlanError
from planner.profile import ModelProfile
from planner.program import FAMILY
from planner.recompute import layer_microbatch_recompute_s

#: Layers are grouped into at most this many blocks for the hierarchical programme.
HIER_MAX_BLOCKS = 40

def hierarchical_reads(family: str, microbatches: int) -> tuple:
    """What ``solve_hierarchical`` reads of a family and M: its update interval rule and its weight versions at the
    fewest in flight (one microbatch), so two families with the same tuple get the same hierarchical answer."""
    batched = FAMILY[family].batched
    return batched, weight_versions(family, 1), microbatches if batched else None


# --- equal-work split (interleaved chunks) ---------------------------------------------------
def split_even(profile: ModelProfile, parts: int, cache: PartitionCache | None = None) -> list[tuple[int, int]]:
    """Contiguous ranges of ``parts`` stages minimising the largest forward+backward time.

    Bisection on the cap with a greedy fill (the classic linear-partition test), to
    within 1e-9 of the optimum; greedy parts are then split until there are ``parts``.
    ``cache`` keeps answers by the layer times and ``parts`` (all the split reads).
    """
    L = len(profile)
    if parts > L:
        raise PlanError(f"{parts} stages but only {L} layers: use fewer stages or a deeper model")
    w = np.concatenate([[0.0], np.cumsum([l.forward_s + l.backward_s for l in profile.layers])])
    if cache is None:
        return _split_even(w, parts)
    key = digest("split", w, parts)
    if key not in cache.splits:
        cache.splits[key] = tuple(_split_even(w, parts))
    return list(cache.splits[key])


def _split_even(w: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """``split_even`` over the prefix sums ``w`` of the layers' forward+backward times."""
    L = len(w) - 1

    def greedy(cap: float) -> list[int] | None:
        bounds, i = [0], 0
        while i < L:
            j = int(np.searchsorted(w, w[i] + cap * (1 + 1e-12), side="right")) - 1
            j = max(j, i + 1)
            if w[j] - w[i] > cap * (1 + 1e-12) or len(bounds) > parts:
                return None
            bounds.append(j)
            i = j
        return bounds if len(bounds) - 1 <= parts else None

    lo = max(float(np.max(np.diff(w))), w[-1] / parts)
    hi = float(w[-1])
    for _ in range(100):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        if greedy(mid) is None:
            lo = mid
        else:
            hi = mid
    bounds = greedy(hi) or [round(x * L / parts) for x in range(parts + 1)]
    while len(bounds) - 1 < parts:
        x = max((b for b in range(len(bounds) - 1) if bounds[b + 1] - bounds[b] > 1),
                key=lambda b: w[bounds[b + 1]] - w[bounds[b]])
        mid = (bounds[x] + bounds[x + 1]) // 2
        bounds.insert(x + 1, mid)
    return [(bounds[x], bounds[x + 1] - 1) for x in range(parts)]


# --- the hierarchical programme ----------------------------------------------------------------
def _blocks(profile: ModelProfile, max_blocks: int) -> list[int]:
    """Layer boundaries of at most ``max_blocks`` blocks of near-equal work (the state-space reduction)."""
    L = len(profile)
    if L <= max_blocks:
        return list(range(L + 1))
    w = np.cumsum([l.forward_s + l.backward_s for l in profile.layers])
    total = w[-1]
    bounds = [0]
    for b in range(1, max_blocks):
        j = int(np.searchsorted(w, total * b / max_blocks, side="left")) + 1
        if bounds[-1] < j < L:
            bounds.append(j)
    bounds.append(L)
    return bounds


def coarsen(profile: ModelProfile, max_blocks: int) -> tuple[ModelProfile, list[int]]:
    """The profile with consecutive layers merged into at most ``max_blocks`` blocks of near-equal work, and the
    block bounds (block b is layers ``bounds[b] .. bounds[b+1] − 1``). Times, parameter and saved bytes add up; a
    block's activation bytes are its last layer's (what a cut after it sends)."""
    from dataclasses import replace as _replace

    from planner.profile import Layer

    bounds = _blocks(profile, max_blocks)
    if len(bounds) - 1 == len(profile):
        return profile, bounds
    layers = []
    for b in range(len(bounds) - 1):
        a, z = bounds[b], bounds[b + 1] - 1
        part = profile.layers[a:z + 1]
        layers.append(Layer(f"block{b}", profile.forward_s(a, z), profile.backward_s(a, z), profile.boundary_bytes(z),
                            profile.saved_bytes(a, z), profile.param_bytes(a, z),
                            attention_saved_bytes=sum(l.attention_saved_bytes for l in part),
                            attention_forward_s=sum(l.attention_forward_s for l in part),
                            recomputable=all(l.recomputable for l in part)))
    return _replace(profile, layers=tuple(layers), graph=None), bounds


def _level_tables(single: np.ndarray, cut: np.ndarray, cache: PartitionCache | None,
                  first_row: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One level's programme: A[i, j, m], the best bottleneck of block range [i, j) on m units (a prefix on
    m − m2 units, then a last stage on m2), and arg[i, j, m] = (k, m2) of the split (−1: one stage).

    Reads only ``single`` (a range's time as one stage on m units, for every m ≤ C) and ``cut``. Row i of A
    reads only row i (and ``single``), so ``first_row`` computes the rows [0, j) alone — all the top level of
    the hierarchy reads — and returns A and arg of shape (1, B + 1, C + 1, ...): O(B²C²) work instead of
    O(B³C²), every entry the one the full programme computes. The entries for m ≤ c read only
    ``single[..., :c + 1]``, so with ``cache`` the table is copied from the stored one (of the same kind,
    full or first row) sharing the longest such prefix and extended from there, each (j, m) computed
    exactly as the full programme computes it.
    """
    B, C = single.shape[0] - 1, single.shape[2] - 1
    start, entry, entries = 1, None, None
    if cache is not None:
        entries = cache.levels.setdefault(digest("level", first_row, cut, single[:, :, :2]), [])
        bits = single.view(np.int64)
        for e in entries:
            n = min(C, e[0].shape[2] - 1)
            same = (e[0][:, :, :n + 1].view(np.int64) == bits[:, :, :n + 1]).all(axis=(0, 1))
            c = n if same.all() else int(np.argmin(same)) - 1
            if c > start or entry is None and c >= start:
                start, entry = c, e
        if entry is not None and start == C:
            cache.hits += 1
            return entry[1][:, :, :C + 1], entry[2][:, :, :C + 1]
        cache.misses += 1
        cache.extended += start > 1
    A = single[:1].copy() if first_row else single.copy()
    arg = np.full((A.shape[0], B + 1, C + 1, 2), -1, dtype=int)
    if entry is not None:
        A[:, :, :start + 1] = entry[1][:, :, :start + 1]
        arg[:, :, :start + 1] = entry[2][:, :, :start + 1]
    (_extend_first_row if first_row else _extend_all_rows)(A, arg, single, cut, max(2, start + 1))
    if entries is not None:
        if entry is not None and start == entry[0].shape[2] - 1:  # the new table holds all of the old one
            entries[:] = [e for e in entries if e is not entry]
        entries.append((single, A, arg))
    return A, arg


def _extend_all_rows(A: np.ndarray, arg: np.ndarray, single: np.ndarray, cut: np.ndarray, m_from: int) -> None:
    """``_level_tables``' programme over every row i, for the unit counts m ≥ ``m_from`` (in place)."""
    B, C = single.shape[0] - 1, single.shape[2] - 1
    upper = np.arange(B + 1)[None, :] > np.arange(B + 1)[:, None]  # k > i
    for j in range(1, B + 1):
        ok = upper[:j, :j, None]
        for m in range(m_from, C + 1):
            # prefix [i, k) on m − m2 units, last stage [k, j) on m2 units, for every k and m2 at once
            m2 = np.arange(1, m)
            left = A[:j, :j, m - m2]  # (i, k, m2)
            last = single[:j, j, 1:m]  # (k, m2)
            cand = np.maximum(np.maximum(left, cut[None, :j, None]), last[None, :, :])
            cand = np.where(ok, cand, math.inf).reshape(j, -1)
            a = np.argmin(cand, axis=1)
            v = cand[np.arange(j), a]
            better = v < A[:j, j, m]
            A[:j, j, m] = np.where(better, v, A[:j, j, m])
            arg[:j, j, m, 0] = np.where(better, a // (m - 1), arg[:j, j, m, 0])
            arg[:j, j, m, 1] = np.where(better, a % (m - 1) + 1, arg[:j, j, m, 1])


def _extend_first_row(A: np.ndarray, arg: np.ndarray, single: np.ndarray, cut: np.ndarray, m_from: int) -> None:
    """Row 0 of ``_extend_all_rows`` (A and arg of one row), every unit count m ≥ ``m_from`` of a column j at once.

    Column j reads only columns k < j, all of them final, so its m are independent: candidate (k, m, m2) is
    max(A[0, k, m − m2], cut[k], single[k, j, m2]) for 1 ≤ m2 < m, with m2 ≥ m padded by inf. The first
    minimum over (k, m2) in that order is the full programme's argmin (k = 0 and the padding are inf, so
    they never come first with a finite value), and the value is a max/min of the same floats: bit-identical.
    """
    B, C = single.shape[0] - 1, single.shape[2] - 1
    if m_from > C:
        return
    ms = np.arange(m_from, C + 1)
    m2 = np.arange(1, C)
    pad = m2[None, :] >= ms[:, None]  # (m, m2): no such split
    idx = np.where(pad, 0, ms[:, None] - m2[None, :])
    row, rarg = A[0], arg[0]
    for j in range(2, B + 1):
        ks = np.arange(1, j)
        left = np.maximum(row[1:j][:, idx], cut[1:j, None, None])  # (k, m, m2)
        cand = np.maximum(left, single[1:j, j, None, 1:C])
        cand = np.where(pad[None], math.inf, cand).transpose(1, 0, 2).reshape(len(ms), -1)
        a = np.argmin(cand, axis=1)
        v = cand[np.arange(len(ms)), a]
        better = v < row[j, ms]
        row[j, ms] = np.where(better, v, row[j, ms])
        rarg[j, ms, 0] = np.where(better, ks[a // (C - 1)], rarg[j, ms, 0])
        rarg[j, ms, 1] = np.where(better, a % (C - 1) + 1, rarg[j, ms, 1])


@dataclass(frozen=True)
class _LevelLinks:
    """One level of the hierarchy as the hierarchical programme costs it: its unit counts and links."""

    count: int  # units per group at this level
    unit: int  # devices per unit
    ar_lat: np.ndarray  # [m] latency term of a ring over m units
    ar_bw: np.ndarray  # [m] bottleneck bandwidth of that ring
    cut_lat: float
    cut_bw: float


def solve_hierarchical(pb: Problem, topology, max_blocks: int = HIER_MAX_BLOCKS,
                       cache: PartitionCache | None = None) -> Partition | None:
    """Plan level by level (innermost first), over layer blocks; None when nothing fits.

    At level 0 the units are devices; at level ℓ they are level-(ℓ−1) domains, each
    running a layer range with the sub-plan found for it one level down. A stage at
    level ℓ is a range replicated over m units; its time is the unit's time / m plus
    the all-reduce of the range's parameters over m units on that level's links;
    cuts cost one microbatch's boundary transfer on that level's links. Memory is
    checked for the weights, gradients and optimizer state of each device's layers;
    activations are checked afterwards by the cost model. Assumes every domain of a
    level holds the same number of units. The top level is solved from block 0 only (its
    first row: B times less work than its full table, which no one reads). ``cache`` reuses
    (and extends) the levels' tables across searches; the answer is the same, bit for bit.
    """
    prof, opt, M = pb.profile, pb.options, pb.microbatches
    devs = pb.devices
    bounds = _blocks(prof, max_blocks)
    B = len(bounds) - 1
    split = FAMILY[pb.family].backward == "split"  # BI and BW each rebuild (planner.recompute)
    fb = np.array([l.forward_s + l.backward_s + layer_microbatch_recompute_s(l, opt.recompute, split) for l in prof.layers])
    work = np.concatenate([[0.0], np.cumsum(fb)])[bounds]
    params = np.concatenate([[0.0], np.cumsum([l.param_bytes for l in prof.layers])])[bounds]
    bb = np.array([prof.boundary_bytes(bounds[x] - 1) * prof.microbatch_size if 0 < x < B else 0.0 for x in range(B + 1)])
    speed = min(topology.device(d).speed for d in devs)
    memlim = opt.memory_limit_bytes if opt.memory_limit_bytes is not None else min(topology.device(d).memory_bytes for d in devs)
    # the static bytes at the fewest weight versions the family keeps (PipeDream: one per in-flight minibatch, at
    # least one): a lower bound, as activations are, which the cost model checks on the plan afterwards
    static_per_param = static_bytes_per_param_byte(weight_versions(pb.family, 1), opt.optimizer)
    levels = []
    unit = 1
    for count, _bw in topology.levels():
        count = min(count, len(devs) // unit)
        if count < 1:
            break
        lat = np.zeros(count + 1)
        bw = np.full(count + 1, math.inf)
        firsts = [devs[u * unit] for u in range(count)]
        for m in range(2, count + 1):
            ring = firsts[:m]
            lat[m] = 2 * (m - 1) * max(topology.path_latency(ring[x], ring[(x + 1) % m]) for x in range(m))
            bw[m] = min(topology.path_bandwidth(ring[x], ring[(x + 1) % m]) for x in range(m))
        cl = topology.path_latency(firsts[0], firsts[1]) if count > 1 else 0.0
        cb = topology.path_bandwidth(firsts[0], firsts[1]) if count > 1 else math.inf
        levels.append(_LevelLinks(count, unit, lat, bw, cl, cb))
        unit *= count
    inf = math.inf
    ii, jj = np.meshgrid(np.arange(B + 1), np.arange(B + 1), indexing="ij")
    valid = jj > ii
    rng_work = np.where(valid, work[jj] - work[ii], inf)
    rng_params = np.where(valid, params[jj] - params[ii], 0.0)
    fits_static = rng_params * static_per_param <= memlim
    prev_full = None  # time of each range on one whole unit of the level below
    tables = []
    for lv in levels:
        C = lv.count
        single = np.full((B + 1, B + 1, C + 1), inf)
        for m in range(1, C + 1):
            base = rng_work / speed if prev_full is None else prev_full
            ar = (lv.ar_lat[m] + 2 * (m - 1) / m * rng_params / lv.ar_bw[m]) / update_interval(pb.family, M, m) if m > 1 else 0.0
            single[:, :, m] = np.where(valid, base / m + ar, inf)
            if prev_full is None:
                single[:, :, m] = np.where(fits_static, single[:, :, m], inf)
        cut = lv.cut_lat + bb / lv.cut_bw
        cut[0] = cut[B] = 0.0
        top = lv is levels[-1]  # the top level is read from its first row only (``expand`` from block 0)
        A, arg = _level_tables(single, cut, cache, first_row=top)
        tables.append((A, arg))
        prev_full = None if top else A[:, :, C]
    if not levels:
        return None
    top = len(levels) - 1
    A_top = tables[top][0]
    m_best = int(np.argmin(A_top[0, B, 1:]) + 1)
    if not A_top[0, B, m_best] < inf:
        return None

    def expand(level: int, i: int, j: int, m: int, offset: int) -> list[tuple[int, int, list[int]]]:
        """Flat stages (block_i, block_j, device indices) of range [i, j) on m units of ``level`` from ``offset``."""
        A, arg = tables[level]
        k, m2 = arg[i, j, m]
        if k >= 0:
            left = expand(level, i, int(k), m - int(m2), offset)
            right = _single(level, int(k), j, int(m2), offset + (m - int(m2)) * levels[level].unit)
            return left + right
        return _single(level, i, j, m, offset)

    def _single(level: int, i: int, j: int, m: int, offset: int) -> list[tuple[int, int, list[int]]]:
        u = levels[level].unit
        if level == 0:
            return [(i, j, list(range(offset, offset + m)))]
        merged: list[tuple[int, int, list[int]]] | None = None
        for x in range(m):
            sub = expand(level - 1, i, j, levels[level - 1].count, offset + x * u)
            if merged is None:
                merged = [(a, b, list(d)) for a, b, d in sub]
            else:
                for s, (_a, _b, d) in zip(merged, sub):
                    s[2].extend(d)
        return merged or []

    flat = expand(top, 0, B, m_best, 0)
    stages = tuple((bounds[a], bounds[b] - 1, tuple(d)) for a, b, d in flat)
    return Partition(float(A_top[0, B, m_best]), stages, sum(len(d) for _a, _b, d in flat))
