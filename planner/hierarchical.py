"""The hierarchical partition search: level by level over the topology's hierarchy, on layer blocks.

For clusters past ``partition.FLAT_MAX_DEVICES`` devices the flat programme's (first layer, first device)
grid is too large, so ``solve_hierarchical`` plans as PipeDream's hierarchical optimizer does: at level 0
the units are devices, at level ℓ they are level-(ℓ−1) domains each running the sub-plan found one level
down, and layers are grouped into at most ``HIER_MAX_BLOCKS`` blocks of near-equal work (``coarsen``,
which the flat programme uses too beyond ``partition.FLAT_MAX_BLOCKS`` layers). ``split_even`` is the
equal-work split interleaved chunks are cut by. The plan it returns is costed by the cost model like any other;
each stage's memory is the cost model's for that stage in its place in the plan (``_StageMemory``), so the plan
fits when costed, and no plan that fits is passed over (but past ``CONTEXT_MAX_ENTRIES``, see ``_Programme.solve``).

Why its own module: it shares with the flat programme only the problem and answer types (``planner.partition``)
and the digest and :class:`planner.partcache.PartitionCache` it keys and stores its level tables and splits with;
none of the flat programme's stage-cost arrays (``_Tables``) or passes. Apart, each module is one idea.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.costmodel import (fsdp_gathered_bytes, holds_until_weight_grad, stage_bytes, stage_counts, static_bytes,
                               update_interval)
from planner.partcache import PartitionCache, digest
from planner.partition import Partition, Problem, _schedulable, reads_microbatches
from planner.plan import PlanError
from planner.profile import ModelProfile
from planner.program import FAMILY
from planner.recompute import layer_extra_forward_s, layer_kept_bytes, layer_rebuilt_bytes

#: Layers are grouped into at most this many blocks for the hierarchical programme.
HIER_MAX_BLOCKS = 40

def hierarchical_reads(family: str, microbatches: int) -> tuple:
    """What ``solve_hierarchical`` reads of a family and M: the family's memory and update rules (its stages are charged
    the cost model's bytes, which every family counts its own way) and M where a stage's figures read it
    (``partition.reads_microbatches``); searches with the same tuple get the same hierarchical answer."""
    return family, microbatches if reads_microbatches(family) else None


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


# --- the memory each stage is charged: the cost model's, in the stage's context -----------------
class _StageMemory:
    """Which level-0 stages fit, as the cost model charges them (``costmodel.stage_counts``, ``static_bytes``,
    ``stage_bytes``; ZeRO-3's gathered units; the schedules' replica rules, ``partition._schedulable``).

    A level-0 stage (block range [k, j) on r0 devices of one domain) sits in a flat plan replicated R times (the
    product of the unit counts of the stages holding it at the levels above) with e devices per replica after it
    (e = ⌈devices after it / R⌉): then it is a flat stage of r = r0·R replicas with ⌈(e + r0)/r0⌉ = 1 + ⌈e/r0⌉
    workers at or after it per replica, all its memory reads. Its bytes do not fall as e grows, so it fits for
    e ≤ a threshold; ``thresholds`` gives it for every (k, j, r0) under each R (−1: never; ``_ALWAYS``: every e
    that can occur). ``limit0``: the pipeline's 1F1B depth a pass charges a split-backward family at (None: each
    stage at its own depth, the least any plan holding it charges it).
    """

    def __init__(self, pb: Problem, bounds: list[int], memlim: float, devices: int):
        prof, opt = pb.profile, pb.options
        self.fam, self.M, self.opt, self.D = pb.family, pb.microbatches, opt, devices
        self.memlim = memlim * (1 + 1e-9)
        L, mb = len(prof), prof.microbatch_size
        B = len(bounds) - 1
        b = np.array(bounds)
        ii, jj = np.meshgrid(np.arange(B + 1), np.arange(B + 1), indexing="ij")
        self.valid = (jj > ii)[:, :, None]
        params = np.concatenate([[0.0], np.cumsum([l.param_bytes for l in prof.layers])])[b]
        kept = np.concatenate([[0.0], np.cumsum([layer_kept_bytes(prof, x, opt.recompute) for x in range(L)])])[b] * mb
        self.params = np.where(self.valid[:, :, 0], params[jj] - params[ii], 0.0)[:, :, None]
        self.kept = np.where(self.valid[:, :, 0], kept[jj] - kept[ii], 0.0)[:, :, None]
        per = np.array([layer_rebuilt_bytes(prof, x, opt.recompute) for x in range(L)]) * mb
        rebuilt = np.zeros((B + 1, B + 1))
        if per.any():
            for i in range(B):
                run = np.maximum.accumulate(per[b[i]:])
                rebuilt[i, i + 1:] = run[b[i + 1:] - 1 - b[i]]
        self.rebuilt = rebuilt[:, :, None]
        self.gathered = np.zeros((B + 1, B + 1, 1))
        if opt.zero_stage == 3:
            for i in range(B):
                for j in range(i + 1, B + 1):
                    self.gathered[i, j, 0] = fsdp_gathered_bytes(prof, b[i], b[j] - 1, opt, FAMILY[pb.family].backward)

    def _fits(self, L, r0, R, limit0):
        """Whether each stage fits with L workers at or after it per replica (arrays broadcast over (k, j, r0))."""
        mem = self._bytes(L, r0, R, L if limit0 is None else limit0)
        if self.opt.zero_stage == 3:
            mem = mem + np.where(r0 * R > 1, self.gathered, 0.0)
        return self._rules(L, r0, R, limit0) & self.valid & (mem <= self.memlim)

    def thresholds(self, C0: int, Rs: list[int], limit0) -> dict[int, np.ndarray]:
        """R → the largest e at which each stage (k, j, r0 = 1..C0; index 0 unused) fits: −1 never, ``_ALWAYS`` at
        every e that can occur (workers at or after a replica ≤ ⌈D / (r0·R)⌉).

        The R whose stages are charged alike at every e they can reach (``_reach_key``) share one answer, worked out
        at the one of them that reaches furthest (the least R), where it holds for the others too."""
        r0 = np.maximum(np.arange(C0 + 1), 1)[None, None, :]
        one = np.ones_like(r0)
        # where memory settles a stage for every R and e at once: the most bytes any context charges (R = 1: nothing
        # sharded, the most in flight, the gathered units on top) and the least (one in flight, the most replicas)
        worst = self._bytes(-(-self.D // r0), r0, 1, self.D if limit0 is None else limit0) + self.gathered
        best = self._bytes(one, r0, max(Rs), 1 if limit0 is None else limit0)
        always, never = (worst <= self.memlim) & self.valid, (best > self.memlim) | ~self.valid
        groups: dict[tuple, list[int]] = {}
        for R in Rs:
            groups.setdefault(self._reach_key(r0[0, 0], R, limit0), []).append(R)
        out = {}
        for members in groups.values():
            R = min(members)
            lmax = np.maximum(-(-self.D // (r0 * R)), 1)
            s_all, s_any = self._rules(lmax, r0, R, limit0), self._rules(one, r0, R, limit0)
            T = np.where(always & s_all, _ALWAYS, -1)
            todo = ~(always & s_all) & ~never & s_any
            if todo.any():
                hi_ok = self._fits(lmax, r0, R, limit0)
                T = np.where(todo & hi_ok, _ALWAYS, T)
                todo = todo & ~hi_ok & self._fits(one, r0, R, limit0)
            if todo.any():  # bisect on the workers at or after: the largest L that fits, then e ≤ r0·(L − 1)
                lo, hi = np.ones(T.shape, dtype=np.int64), np.broadcast_to(lmax, T.shape).astype(np.int64)
                while (todo & (hi - lo > 1)).any():
                    mid = (lo + hi) // 2
                    f = self._fits(mid, r0, R, limit0)
                    lo, hi = np.where(f, mid, lo), np.where(f, hi, mid)
                T = np.where(todo, r0 * (lo - 1), T)
            T[:, :, 0] = -1
            for x in members:
                out[x] = T
        return out

    def _reach_key(self, r0: np.ndarray, R: int, limit0) -> tuple:
        """What a stage's bytes and rules read of R at the L it can reach (L ≤ ⌈D / r⌉, r = r0·R), per r0: the
        batch's share ⌈M / r⌉ where it caps the count, r itself under ZeRO, the replica rules. Two R with one key
        charge every stage alike up to the lesser reach."""
        fam, M, D = FAMILY[self.fam], self.M, self.D
        r = r0 * R
        lm = -(-D // r)
        c = -(-M // r)
        parts = []
        if fam.inflight == "batch":
            parts.append(c)
        elif not fam.stream:
            parts.append(np.where(c < lm, c, -1))
        if holds_until_weight_grad(self.fam):
            cap = np.array([fam.open_cap_at(int(x if limit0 is None else limit0)) for x in lm])
            parts.append(np.where(c < cap, c, -1))
        if self.opt.zero_stage:
            parts += [r, M % r == 0]
        if fam.batched:
            parts.append(r <= M)
        if fam.versions == "stale":
            parts.append(np.where(M // r < lm - 1, M // r, -1))
        return tuple(tuple(int(v) for v in np.broadcast_to(p, r.shape)) for p in parts)

    def _rules(self, L, r0, R, limit0):
        """The schedules' rules alone (``partition._schedulable``, ZeRO-3's even split, a pass's depth), per r0."""
        fam, M = self.fam, self.M
        r = r0 * R
        ok = _schedulable(fam, M, r, L)
        if self.opt.zero_stage == 3:
            ok = ok & ((r == 1) | (M % r == 0) | (not FAMILY[fam].batched))
        if limit0 is not None and holds_until_weight_grad(fam):
            ok = ok & (L <= limit0)
        return ok & np.ones(np.shape(r0), dtype=bool)

    def plan_fits(self, stages: list[tuple[int, int, list[int]]], limit0: int | None = None) -> bool:
        """Whether every stage of a flat plan (block_i, block_j, device indices) fits as the cost model charges it,
        at the plan's own 1F1B depth (``costmodel.evaluate``'s counts), or at a pass's ``limit0`` (then no stage may
        be deeper)."""
        reps = [len(d) for _a, _b, d in stages]
        after = [sum(reps[s:]) for s in range(len(reps))]
        own = max(-(-w // r) for w, r in zip(after, reps))
        for (a, b, _d), r, w in zip(stages, reps, after):
            held, versions = stage_counts(self.fam, self.M, w, r, own if limit0 is None else limit0)
            mem = float(stage_bytes(static_bytes(self.params[a, b, 0], versions, r, self.opt), self.kept[a, b, 0],
                                    self.rebuilt[a, b, 0], held))
            if self.opt.zero_stage == 3 and r > 1:
                mem += self.gathered[a, b, 0]
            if not (bool(self._rules(-(-w // r), r, 1, limit0)) and mem <= self.memlim):
                return False
        return True

    def _bytes(self, L, r0, R, limit0):
        r = r0 * R
        held, versions = stage_counts(self.fam, self.M, r * L, r, limit0)
        return stage_bytes(static_bytes(self.params, versions, r, self.opt), self.kept, self.rebuilt, held)


#: A threshold meaning "fits in every context that can occur".
_ALWAYS = np.iinfo(np.int64).max // 4


def _context_level(single: np.ndarray, cut: np.ndarray, U: int, first_row: bool) -> tuple[np.ndarray, np.ndarray]:
    """``_level_tables``' programme with a context axis: A[i, j, m, e] is the best bottleneck of block range [i, j)
    on m units when e devices (per replica of the range's sub-plan) follow it, and arg[i, j, m, e] its split (k, m2).

    A last stage [k, j) on m2 units sees the same e; the prefix before it sees m2·U more devices after it (U: devices
    per unit). e is clipped at the last index, past which nothing changes (the caller sizes it so). Row i reads only
    row i, so ``first_row`` computes row 0 alone (shape (1, B + 1, C + 1, E + 1)).
    """
    B, C, E = single.shape[0] - 1, single.shape[2] - 1, single.shape[3] - 1
    A = single[:1].copy() if first_row else single.copy()
    arg = np.full(A.shape + (2,), -1, dtype=int)
    es = np.arange(E + 1)
    upper = np.arange(B + 1)[None, :] > np.arange(B + 1)[:, None]  # k > i
    for j in range(2, B + 1):
        rows = 1 if first_row else j
        ok = upper[:rows, :j, None, None]
        for m in range(2, C + 1):
            m2 = np.arange(1, m)
            eidx = np.minimum(es[None, :] + m2[:, None] * U, E)  # (m2, e): the prefix's context
            left = A[:rows, :j][:, :, (m - m2)[:, None], eidx]  # (i, k, m2, e)
            last = single[:j, j, 1:m, :]  # (k, m2, e)
            cand = np.maximum(np.maximum(left, cut[None, :j, None, None]), last[None])
            cand = np.where(ok, cand, math.inf).reshape(rows, -1, E + 1)
            a = np.argmin(cand, axis=1)  # (i, e)
            v = np.take_along_axis(cand, a[:, None, :], axis=1)[:, 0, :]
            better = v < A[:rows, j, m, :]
            A[:rows, j, m, :] = np.where(better, v, A[:rows, j, m, :])
            arg[:rows, j, m, :, 0] = np.where(better, a // (m - 1), arg[:rows, j, m, :, 0])
            arg[:rows, j, m, :, 1] = np.where(better, a % (m - 1) + 1, arg[:rows, j, m, :, 1])
    return A, arg


#: The context programme's tables past this many entries (all levels) are not built: the search then charges every
#: stage at the most any context can (it still never returns a plan that does not fit).
CONTEXT_MAX_ENTRIES = 2e7


def solve_hierarchical(pb: Problem, topology, max_blocks: int = HIER_MAX_BLOCKS,
                       cache: PartitionCache | None = None) -> Partition | None:
    """Plan level by level (innermost first), over layer blocks; None when nothing fits.

    At level 0 the units are devices; at level ℓ they are level-(ℓ−1) domains, each
    running a layer range with the sub-plan found for it one level down. A stage at
    level ℓ is a range replicated over m units; its time is the unit's time / m plus
    the all-reduce of the range's parameters over m units on that level's links;
    cuts cost one microbatch's boundary transfer on that level's links. Assumes every
    domain of a level holds the same number of units.

    Memory: every flat stage of the plan is charged what the cost model charges it (``_StageMemory``): weights ×
    the versions its in-flight count keeps, gradients, optimizer state, ZeRO's shards and gathered units, and its
    in-flight activations (or what recomputation keeps) under the family's rule, which read the workers at or
    after the stage and its replicas, so they depend on where the sub-plan sits; stages no schedule runs (replicas
    past M, 2BW's depth rule, ZeRO-3's even split) are left out. Where no stage's fit depends on that (memory
    loose, or a stage too big anywhere), the programme is context-free as before: the top level is solved from
    block 0 only (its first row), and ``cache`` reuses (and extends) the levels' tables across searches, bit for
    bit. Otherwise ``_Programme.solve``: a relaxation first, then tables that also take the devices after
    (``_context_level``) and the replication above. A split-backward family (ZB-H1, ZB-H2) is charged at the
    pipeline's 1F1B depth L₀: first each stage at its own (a lower bound); if that answer does not fit at its own
    L₀, one pass per L₀ (``_pass_depths``). ``tests/test_hierarchical_memory.py`` holds the answer to brute force.
    """
    prof, opt, M = pb.profile, pb.options, pb.microbatches
    devs = pb.devices
    bounds = _blocks(prof, max_blocks)
    B = len(bounds) - 1
    fb = np.array([l.forward_s + l.backward_s + layer_extra_forward_s(l, opt.recompute) for l in prof.layers])
    work = np.concatenate([[0.0], np.cumsum(fb)])[bounds]
    params = np.concatenate([[0.0], np.cumsum([l.param_bytes for l in prof.layers])])[bounds]
    bb = np.array([prof.boundary_bytes(bounds[x] - 1) * prof.microbatch_size if 0 < x < B else 0.0 for x in range(B + 1)])
    speed = min(topology.device(d).speed for d in devs)
    memlim = opt.memory_limit_bytes if opt.memory_limit_bytes is not None else min(topology.device(d).memory_bytes for d in devs)
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
    if not levels:
        return None
    D = levels[-1].unit * levels[-1].count  # the devices the hierarchy spans
    ii, jj = np.meshgrid(np.arange(B + 1), np.arange(B + 1), indexing="ij")
    valid = jj > ii
    rng_work = np.where(valid, work[jj] - work[ii], math.inf)
    rng_params = np.where(valid, params[jj] - params[ii], 0.0)
    singles = []  # per level: the stage time of a range on m units, from a unit's time (level 0: the devices')
    for lv in levels:
        ar = np.zeros((B + 1, B + 1, lv.count + 1))
        for m in range(2, lv.count + 1):
            ar[:, :, m] = (lv.ar_lat[m] + 2 * (m - 1) / m * rng_params / lv.ar_bw[m]) / update_interval(pb.family, M, m)
        cut = lv.cut_lat + bb / lv.cut_bw
        cut[0] = cut[B] = 0.0
        singles.append((ar, cut))
    # the replication above each level: the products of the unit counts of the stages holding it
    Rsets: list[list[int]] = [[1] for _ in levels]
    for l in range(len(levels) - 1, 0, -1):
        Rsets[l - 1] = sorted({R * m for R in Rsets[l] for m in range(1, levels[l].count + 1)})
    memory = _StageMemory(pb, bounds, memlim, D)
    prog = _Programme(levels, singles, rng_work / speed, valid, Rsets, cache, B)

    def run(limit0):
        return prog.solve(memory.thresholds(levels[0].count, Rsets[0], limit0),
                          lambda stages: memory.plan_fits(stages, limit0))

    flat = run(None)
    if flat is not None and holds_until_weight_grad(pb.family) and not memory.plan_fits(flat[1]):
        flat = None
        for limit0 in _pass_depths(pb.family, M, D):
            sol = run(limit0)
            if sol is not None and (flat is None or sol[0] < flat[0] * (1 - 1e-12)):
                flat = sol
    if flat is None:
        return None
    value, stages_ = flat
    stages = tuple((bounds[a], bounds[b] - 1, tuple(d)) for a, b, d in stages_)
    return Partition(float(value), stages, sum(len(d) for _a, _b, d in stages_))


def _pass_depths(family: str, M: int, D: int) -> list[int]:
    """The 1F1B depths L₀ a split-backward family gets a pass at (``partition._depths`` over D devices): every L₀ up to
    the first whose backlog cap reaches M, the last standing for every deeper one."""
    fam = FAMILY[family]
    out = []
    for limit0 in range(1, D + 1):
        out.append(limit0)
        if fam.open_cap_at(limit0) >= M:
            break
    out[-1] = D
    return out


class _Programme:
    """The levels' programmes over one set of stage thresholds (``_StageMemory.thresholds``)."""

    def __init__(self, levels, singles, base_time, valid, Rsets, cache, B):
        self.levels, self.singles, self.base, self.valid, self.Rsets, self.cache, self.B = (
            levels, singles, base_time, valid, Rsets, cache, B)

    def solve(self, thresholds: dict[int, np.ndarray], fits):
        """(value, flat stages as (block_i, block_j, device indices)) of the best plan, or None. ``fits(stages)``:
        whether a plan fits as the pass charges it (``_StageMemory.plan_fits``).

        Where no stage's fit reads its context, the context-free programme is exact. Otherwise it is first run
        admitting every stage that fits in some context (a relaxation: no plan is faster than its answer); when that
        answer fits in its own context, it is the answer. Else the context programme (``_with_context``) answers,
        unless its tables would pass ``CONTEXT_MAX_ENTRIES``: then the context-free programme admitting only the
        stages that fit in every context does, whose plan fits but may be slower than the best (the only case where a
        plan that fits can be passed over)."""
        distinct: dict[bytes, int] = {}
        Ts, cls0 = [], {}
        for R in self.Rsets[0]:
            T = thresholds[R]
            key = T.tobytes()
            if key not in distinct:
                distinct[key] = len(Ts)
                Ts.append(T)
            cls0[R] = distinct[key]
        finite = [int(T[(T >= 0) & (T < _ALWAYS)].max()) for T in Ts if ((T >= 0) & (T < _ALWAYS)).any()]
        if len(Ts) == 1 and not finite:
            return self._context_free(Ts[0] == _ALWAYS)
        relaxed = self._context_free(np.logical_or.reduce([T >= 0 for T in Ts]))
        if relaxed is None or fits(relaxed[1]):
            return relaxed
        D = self.levels[-1].unit * self.levels[-1].count
        E = [min(max(finite, default=-1) + 1, D)]
        for lv in self.levels[1:]:
            E.append(min(E[-1] * lv.count, D))
        B = self.B
        # the tables' entries: one per class of each level (at most its replication counts; the top has one)
        size = sum((B + 1) ** 2 * (lv.count + 1) * (e + 1) * (len(Ts) if l == 0 else len(self.Rsets[l]))
                   for l, (lv, e) in enumerate(zip(self.levels, E)))
        if size > CONTEXT_MAX_ENTRIES:
            return self._context_free(np.logical_and.reduce([T == _ALWAYS for T in Ts]))
        return self._with_context(Ts, cls0, E)

    def _context_free(self, fits: np.ndarray):
        levels, B = self.levels, self.B
        prev_full, tables = None, []
        for l, lv in enumerate(levels):
            ar, cut = self.singles[l]
            C = lv.count
            single = np.full((B + 1, B + 1, C + 1), math.inf)
            for m in range(1, C + 1):
                base = self.base if prev_full is None else prev_full
                t = np.where(self.valid, base / m + ar[:, :, m], math.inf)
                single[:, :, m] = np.where(fits[:, :, m], t, math.inf) if l == 0 else t
            top = l == len(levels) - 1
            A, arg = _level_tables(single, cut, self.cache, first_row=top)
            tables.append((A, arg))
            prev_full = None if top else A[:, :, C]
        A_top = tables[-1][0]
        m_best = int(np.argmin(A_top[0, B, 1:]) + 1)
        if not A_top[0, B, m_best] < math.inf:
            return None

        def expand(level, i, j, m, offset):
            k, m2 = tables[level][1][i, j, m]
            if k >= 0:
                return (expand(level, i, int(k), m - int(m2), offset)
                        + single_(level, int(k), j, int(m2), offset + (m - int(m2)) * levels[level].unit))
            return single_(level, i, j, m, offset)

        def single_(level, i, j, m, offset):
            if level == 0:
                return [(i, j, list(range(offset, offset + m)))]
            return _merge([expand(level - 1, i, j, levels[level - 1].count, offset + x * levels[level].unit)
                           for x in range(m)])

        return float(A_top[0, B, m_best]), expand(len(levels) - 1, 0, B, m_best, 0)

    def _with_context(self, Ts, cls0, E):
        levels, B = self.levels, self.B
        top = len(levels) - 1
        classes = [cls0]
        tables = [[]]
        es = np.arange(E[0] + 1)
        ar, cut = self.singles[0]
        C0 = levels[0].count
        for T in Ts:
            single = np.full((B + 1, B + 1, C0 + 1, E[0] + 1), math.inf)
            for m in range(1, C0 + 1):
                t = np.where(self.valid, self.base / m + ar[:, :, m], math.inf)
                single[:, :, m, :] = np.where(es[None, None, :] <= T[:, :, m, None], t[:, :, None], math.inf)
            tables[0].append(self._table(single, cut, 1, top == 0))
        for l in range(1, len(levels)):
            lv, below = levels[l], levels[l - 1]
            ar, cut = self.singles[l]
            es = np.arange(E[l] + 1)
            keys: dict[tuple, int] = {}
            cls = {}
            for R in self.Rsets[l]:
                key = tuple(classes[l - 1][R * m] for m in range(1, lv.count + 1))
                cls[R] = keys.setdefault(key, len(keys))
            classes.append(cls)
            tables.append([])
            for key in keys:  # in insertion order: index = its class
                single = np.full((B + 1, B + 1, lv.count + 1, E[l] + 1), math.inf)
                for m in range(1, lv.count + 1):
                    sub = tables[l - 1][key[m - 1]][0][:, :, below.count, :]
                    e_sub = np.minimum(-(-es // m), E[l - 1])
                    t = sub[:, :, e_sub] / m + ar[:, :, m, None]
                    single[:, :, m, :] = np.where(self.valid[:, :, None], t, math.inf)
                tables[l].append(self._table(single, cut, lv.unit, l == top))
        A_top = tables[top][0][0]
        m_best = int(np.argmin(A_top[0, B, 1:, 0]) + 1)  # (the first minimum, as the context-free top level's)
        if not A_top[0, B, m_best, 0] < math.inf:
            return None

        def expand(level, i, j, m, offset, e, R):
            arg = tables[level][classes[level][R]][1]
            k, m2 = arg[i, j, m, min(e, E[level])]
            if k >= 0:
                k, m2 = int(k), int(m2)
                u = levels[level].unit
                return (expand(level, i, k, m - m2, offset, e + m2 * u, R)
                        + single_(level, k, j, m2, offset + (m - m2) * u, e, R))
            return single_(level, i, j, m, offset, e, R)

        def single_(level, i, j, m, offset, e, R):
            if level == 0:
                return [(i, j, list(range(offset, offset + m)))]
            return _merge([expand(level - 1, i, j, levels[level - 1].count, offset + x * levels[level].unit,
                                  -(-e // m), R * m) for x in range(m)])

        return float(A_top[0, B, m_best, 0]), expand(top, 0, B, m_best, 0, 0, 1)


    def _table(self, single: np.ndarray, cut: np.ndarray, U: int, first_row: bool):
        """One class's level table: ``_context_level``, or ``_level_tables`` (with its cache and prefix extension) where
        the context axis has one entry (the classes differ only by the replicas the schedules allow); kept in the
        cache by its inputs, so a cluster whose level reads the same stage times and cuts reuses it."""
        if single.shape[3] == 1:
            A, arg = _level_tables(single[..., 0], cut, self.cache, first_row)
            return A[..., None], arg[:, :, :, None, :]
        if self.cache is None:
            return _context_level(single, cut, U, first_row)
        key = digest("context-level", first_row, U, cut, single)
        hit = self.cache.levels.get(key)
        if hit is not None:
            self.cache.hits += 1
            return hit[0][1], hit[0][2]
        self.cache.misses += 1
        A, arg = _context_level(single, cut, U, first_row)
        self.cache.levels[key] = [(single, A, arg)]
        return A, arg


def _merge(subs: list[list[tuple[int, int, list[int]]]]) -> list[tuple[int, int, list[int]]]:
    """The flat stages of m copies of one sub-plan: each stage's devices, copy after copy."""
    merged = [(a, b, list(d)) for a, b, d in subs[0]]
    for sub in subs[1:]:
        for s, (_a, _b, d) in zip(merged, sub):
            s[2].extend(d)
    return merged
