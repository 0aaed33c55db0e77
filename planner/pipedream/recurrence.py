"""PipeDream's recurrence on one level: A[i][j][m], the best bottleneck of states i..j on m + 1 workers, and its kernels.

Three kernels give the same floats: plain (min, max) products (``"dense"``, small problems), the banded
fast path with dominated splits dropped (large problems), and the column-by-column reference the fast path
is tested against. ``optimize_pipedream(kernel=...)`` picks: ``"auto"`` (plain products up to
``DENSE_MAX_STATES`` states, the fast path above), ``"fast"`` (the fast path always) or ``"reference"``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from planner.pipedream.states import States

#: Kernels ``optimize_pipedream`` accepts.
KERNELS = ("auto", "fast", "reference")
#: Up to this many states a level is solved with the plain (min, max) products.
DENSE_MAX_STATES = 16

_INF = float("inf")


@dataclass
class _SolvedLevel:
    """One solved level: A[row, j, m] (rows: all n+1 for inner levels, row 0 only for the top)."""

    M: int
    B: float
    n_in: int
    final: bool
    Tc: np.ndarray     # (n+1, n) compute seconds of the range row..j at this level (inf: PipeDream's None)
    A: np.ndarray      # (R, n, M)


class _Problem:
    """The arrays every level shares: cumulative figures as range tables, outputs, predecessor mask."""

    def __init__(self, st: States, straight: bool, acr: float | None, mem: float | None):
        n = len(st)
        self.n = n
        self.straight = straight
        self.acr = acr
        self.mem = mem
        comp, act, par = st.compute_s, st.activation_bytes, st.param_bytes
        # PipeDream's tables: row 0 is "from the start" (the state's own cumulative figure); row r >= 1 is
        # "after state r-1": the difference of cumulative figures, defined (not None) for j >= r only.
        upper_strict = np.triu(np.ones((n, n), dtype=bool), 1)  # [r-1, j]: j >= r  <=> j > r-1
        self.valid = np.vstack([np.ones((1, n), dtype=bool), upper_strict])
        self.Tc = np.where(self.valid, np.vstack([comp[None, :], comp[None, :] - comp[:, None]]), _INF)
        self.ParR = np.vstack([par[None, :], par[None, :] - par[:, None]])
        # activation + parameter bytes of each range (read only under a memory constraint)
        self.need = (np.vstack([act[None, :], act[None, :] - act[:, None]]) + self.ParR) if mem is not None else None
        self.oact = st.output_activation_bytes
        # predM[k, j]: state k is a predecessor of state j (a split after k may end a stage at j)
        pm = np.zeros((n, n), dtype=bool)
        for j, ps in enumerate(st.preds):
            if ps:
                pm[list(ps), j] = True
        self.predM = pm
        self.pred_lists = [np.array(ps, dtype=np.intp) for ps in st.preds]
        self._figures = (comp, act, par, st.output_activation_bytes)
        self._reduced: np.ndarray | None = None
        self._row_order: np.ndarray | None = None

    def reduced_preds(self) -> np.ndarray:
        """predM without the dominated splits: exact for a level whose compute table is ``self.Tc`` (the first).

        State a is dominated by state b when both have the same cumulative figures (compute, activation,
        parameters, output activation: they differ only by nodes that cost nothing, as GNMT's getitem and Add
        nodes) and a precedes b. Then every range ending at b can be split wherever one ending at a can,
        at the same cost, and b's ranges start no earlier (a < b), so A[r, b, c] <= A[r, a, c] for every row r
        where a's is defined; a last stage after a or after b to the same j costs the same (the same figures).
        So a split after a never beats one after b, and a column j holding both among its predecessors needs
        only b: the minimum (a float among the candidates) is unchanged, bit for bit.
        """
        if self._reduced is None:
            pm = self.predM
            key = np.stack(self._figures, axis=1)
            _, inv = np.unique(key, axis=0, return_inverse=True)
            inv = inv.ravel()
            order = np.argsort(inv, kind="stable")
            packed = np.packbits(pm, axis=1)      # successors of each state, as bits
            drop = np.zeros_like(packed)
            for g in np.split(order, np.flatnonzero(np.diff(inv[order])) + 1):
                if len(g) < 2:
                    continue
                a, b = np.nonzero(pm[np.ix_(g, g)])  # g[a] precedes g[b], both with the same figures
                if len(a) == 0:
                    continue
                # drop[a, j]: a precedes j and so does some b it precedes with the same figures
                starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
                hit = np.bitwise_or.reduceat(packed[g[b]], starts, axis=0)
                drop[g[a[starts]]] = packed[g[a[starts]]] & hit
            self._reduced = pm & ~np.unpackbits(drop, axis=1, count=self.n).astype(bool)
        return self._reduced

    def row_order(self) -> np.ndarray:
        """Rows (0: from the start, r: after state r-1) in order of their start's cumulative compute, so
        that a band of neighbouring rows holds ranges of similar size (and similar bests); row 0 first."""
        if self._row_order is None:
            start = np.r_[-_INF, self._figures[0]]
            self._row_order = np.argsort(start, kind="stable")
        return self._row_order


def _base_into(pb: _Problem, T: np.ndarray, P: np.ndarray, need: np.ndarray | None, M: int, B: float, n_in: int,
               dest) -> None:
    """Write the value of replicating each range on m+1 workers into ``dest(m)`` for every m, element-wise over
    ranges given in any layout: T, P and need are the ranges' compute seconds, parameter bytes and
    activation+parameter bytes. The arithmetic is PipeDream's, in its order: (T + 4mP/(B(m+1))/n_in)/(m+1)."""
    for m in range(1 if pb.straight else M):
        out = dest(m)
        np.multiply(4 * m, P, out=out)
        np.divide(out, B * (m + 1), out=out)
        np.divide(out, n_in, out=out)
        np.add(T, out, out=out)
        np.divide(out, m + 1, out=out)
        if pb.mem is not None:
            out[math.ceil((M - (m + 1)) / (m + 1)) * need > pb.mem] = _INF


def _base(pb: _Problem, Tc_rows: np.ndarray, rows: np.ndarray, M: int, B: float, n_in: int) -> np.ndarray:
    """A[row, j, m] of replicating the whole range on m+1 workers (PipeDream's initialisation)."""
    R, n = Tc_rows.shape
    A = np.full((R, n, M), _INF)
    need = pb.need[rows] if pb.mem is not None else None
    _base_into(pb, Tc_rows, pb.ParR[rows], need, M, B, n_in, lambda m: A[:, :, m])
    return A


def _last_stage(pb: _Problem, Tc: np.ndarray, M: int, m: int, mp: int, B: float, j: int | None = None) -> np.ndarray:
    """G[k, j]: the cost of a last stage k+1..j on m' workers (with in/out transfers), inf where not allowed.

    With ``j`` given, only column j (the same element-wise arithmetic, so the same floats).
    """
    n = pb.n
    cols = slice(None) if j is None else j
    T = Tc[1:, cols]                   # [k, j] = range k+1..j
    P = pb.ParR[1:, cols]
    last = (T + (4 * (mp - 1) * P) / (B * mp)) / mp
    ok = pb.predM[:, cols] & np.isfinite(T)
    if pb.mem is not None:
        stashed = pb.need[1:, cols] * math.ceil((M - (m + 1)) / mp)
        ok &= ~(stashed > pb.mem)
    G = np.where(ok, last, _INF)
    if pb.acr is not None:
        tin = ((2.0 * pb.oact) / (B * mp)) / pb.acr
        tout = ((2.0 * pb.oact) / (B * mp)) / pb.acr
        tout[n - 1] = -_INF  # no output transfer after the last state
        if j is None:
            G = np.maximum(np.maximum(G, tin[:, None]), tout[None, :])
        else:
            G = np.maximum(np.maximum(G, tin), tout[j])
    return G


def _minmax_dense(Ac: np.ndarray, G: np.ndarray, rows_first: np.ndarray) -> np.ndarray:
    """C[r, j] = min_k max(Ac[r, k], G[k, j]) (a (min, max) matrix product); Ac[r, k] is inf for k < row."""
    R, n = Ac.shape
    if R == 1:
        return np.min(np.maximum(Ac[0][:, None], G), axis=0)[None, :]
    C = np.full((R, n), _INF)
    budget = 1 << 22
    r = 0
    while r < R:
        lo = int(rows_first[r])  # smallest k that can be finite in this block
        width = max(1, n - lo)
        step = max(1, budget // (width * width))
        r1 = min(R, r + step)
        blk = np.maximum(Ac[r:r1, lo:, None], G[None, lo:, lo:])
        C[r:r1, lo:] = blk.min(axis=1)
        r = r1
    return C


def _minmax_columns_reference(Ac: np.ndarray, G: np.ndarray, best: np.ndarray, pred_lists: list[np.ndarray]) -> None:
    """The reference path's kernel: best = min(best, Ac ⊗ G) column by column over each state's predecessors.

    Column j only needs its predecessors k with G[k, j] below the column's largest best, and rows r <= k
    (A[r, k] is None for k < r); rows are taken in bands so each band gathers only the ks at or after it.
    """
    n = G.shape[0]
    for j in range(1, n):
        K = pred_lists[j]
        if len(K) == 0:
            continue
        g = G[K, j]
        U = best[: j + 1, j]
        sel = g < U.max()
        if not sel.any():
            continue
        K, g = K[sel], g[sel]
        rmax = int(K[-1]) + 1
        bands = max(1, min(32, len(K) // 24))
        cuts = np.linspace(0, rmax, bands + 1).astype(int)
        for b in range(bands):
            r0, r1 = int(cuts[b]), int(cuts[b + 1])
            if r1 <= r0:
                continue
            s = int(np.searchsorted(K, r0))
            if s == len(K):
                break
            c = np.maximum(Ac[r0:r1, K[s:]], g[s:]).min(axis=1)
            np.minimum(best[r0:r1, j], c, out=best[r0:r1, j])


class _PairCosts:
    """``_last_stage(pb, Tc, M, m, m', B)[k, j]`` for fixed pairs (k, j): the same element-wise arithmetic in
    the same order (so the same floats), with the gathers done once; inf where not allowed."""

    def __init__(self, pb: _Problem, Tc: np.ndarray, M: int, B: float, k: np.ndarray, j: np.ndarray):
        self.pb, self.M, self.B, self.k, self.j = pb, M, B, k, j
        self.T = Tc[k + 1, j]
        self.P = pb.ParR[k + 1, j]
        self.ok = pb.predM[k, j] & np.isfinite(self.T)
        self.need = pb.need[k + 1, j] if pb.mem is not None else None
        if pb.acr is not None:
            self.oact_k, self.oact_j, self.last_j = pb.oact[k], pb.oact[j], j == pb.n - 1
        self._cache: dict = {}

    def __call__(self, m: int, mp: int) -> np.ndarray:
        pb, M, B = self.pb, self.M, self.B
        key = mp if pb.mem is None else (m, mp)  # without a memory constraint the cost does not depend on m
        got = self._cache.get(key)
        if got is not None:
            return got
        last = (self.T + (4 * (mp - 1) * self.P) / (B * mp)) / mp
        ok = self.ok
        if pb.mem is not None:
            stashed = self.need * math.ceil((M - (m + 1)) / mp)
            ok = ok & ~(stashed > pb.mem)
        G = np.where(ok, last, _INF)
        if pb.acr is not None:
            tin = ((2.0 * self.oact_k) / (B * mp)) / pb.acr
            tout = ((2.0 * self.oact_j) / (B * mp)) / pb.acr
            tout[self.last_j] = -_INF  # no output transfer after the last state
            G = np.maximum(np.maximum(G, tin), tout)
        self._cache[key] = G
        return G


#: Rows per band of the banded kernel (a band's bound prunes a candidate for all its rows at once).
_BAND = 32
#: Elements (candidates x bands, or gathered values) the banded kernel handles per numpy step.
_BAND_CHUNK = 1 << 19


def _banded_update(flat: np.ndarray, bi: np.ndarray, ci: np.ndarray, src: np.ndarray, g: np.ndarray,
                   cj: np.ndarray, dst0: int, nb: int, W: int, thr: np.ndarray, mask: np.ndarray) -> None:
    """Evaluate the surviving (band, candidate) pairs, sorted by (band, column): each group's minimum of
    max(A's band piece, G) goes into its column's band (``flat`` row ``(dst0 + j) * nb + band``), and that
    band's bound ``thr[j * nb + band]`` becomes the largest of its new values where ``mask`` (by bands).

    Pieces are taken a bounded number at a time; a group cut between two steps is updated twice (the
    minimum is the same).
    """
    S = len(bi)
    per = max(1, _BAND_CHUNK // W)
    for s0 in range(0, S, per):
        b, c = bi[s0:s0 + per], ci[s0:s0 + per]
        j = cj[c]
        X = np.take(flat, src[c] * nb + b, axis=0)
        np.maximum(X, g[c][:, None], out=X)
        key = b * (len(flat) // nb) + j
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        V = np.minimum.reduceat(X, starts, axis=0)
        band = j[starts] * nb + b[starts]
        dst = dst0 * nb + band
        V = np.minimum(flat[dst], V)
        flat[dst] = V
        thr[band] = np.where(mask[band], V, -_INF).max(axis=1)


def _fold(x: np.ndarray, op) -> np.ndarray:
    """op-reduce the last axis of x (its length a power of two) by halving: faster than op.reduce on short rows."""
    w = x.shape[-1]
    while w > 1:
        w //= 2
        x = op(x[..., :w], x[..., w:2 * w])
    return x[..., 0]


def _solve_inner_banded(pb: _Problem, Tc: np.ndarray, M: int, B: float, n_in: int, cand: np.ndarray,
                        needed: np.ndarray | None) -> np.ndarray:
    """A[r, j, m] of an inner level (all rows), one (m, m') product at a time over all splits, pruned by row bands.

    Rows are taken in ``pb.row_order()`` and cut into bands of ``_BAND``. For each (m, m'), every candidate
    (j, k) (k a split of column j in ``cand``) and every band gets a lower bound, max(G[k, j], the band's
    least A[., k, m - m']); only pairs whose bound is below the band's largest best so far in column j can
    improve a cell of the band, and only those are evaluated: contiguous pieces of A (stored transposed, by
    bands) are gathered, and each (band, column) takes the least of its candidates (and its bound follows).
    The skipped pairs change nothing, so each cell is the exact minimum, float for float. ``needed``
    (n, n+1) given marks the cells of the last m that must be exact (the others keep an upper bound):
    there, bands are bounded by their needed cells only. Returns A as a (rows, n, M) view.
    """
    n = pb.n
    R = n + 1
    W = _BAND
    nb = -(-R // W)
    Rp = nb * W
    perm = pb.row_order()
    AT = np.full((M, n, Rp), _INF)               # AT[m, j, p] = A[perm[p], j, m]
    need = pb.need[perm].T if pb.mem is not None else None
    _base_into(pb, Tc[perm].T, pb.ParR[perm].T, need, M, B, n_in, lambda m: AT[m, :, :R])
    flat = AT.reshape(M * n * nb, W)              # row (c*n + k)*nb + b: band b of A[:, k, c]
    valid = np.zeros((n, Rp), dtype=bool)         # cells that can hold a range (row <= j); pads never
    valid[:, :R] = perm[None, :] <= np.arange(n)[:, None]
    last_mask = valid
    if needed is not None:
        last_mask = np.zeros((n, Rp), dtype=bool)
        last_mask[:, :R] = needed[:, perm] & valid[:, :R]
    Amin = np.empty((M * n, nb))                  # Amin[c*n + k, b]: least A over band b of column k, c
    Amin[:n] = _fold(AT[0].reshape(n, nb, W), np.minimum)
    jj, kk = np.nonzero(cand.T)                   # candidate splits, by column j, then k
    costs = _PairCosts(pb, Tc, M, B, kk, jj)
    for m in range(1, M):
        mask = (last_mask if m == M - 1 else valid).reshape(n * nb, W)
        # each band's bound: the largest best of its cells, kept current as the groups of m' improve them
        thr = _fold(np.where(mask, flat[m * n * nb:(m + 1) * n * nb], -_INF), np.maximum)   # (n * nb,)
        thr2 = thr.reshape(n, nb)
        for mp in range(1, 2 if pb.straight else m + 1):   # each m' prunes with what those before it found
            g = costs(m, mp)
            sel = np.flatnonzero(g < thr2.max(axis=1)[jj])   # below no band's bound: cannot improve the column
            cj, src, g = jj[sel], (m - mp) * n + kk[sel], g[sel]
            step = max(1, _BAND_CHUNK // nb)
            for c0 in range(0, len(g), step):
                c1 = min(len(g), c0 + step)
                lb = np.maximum(np.take(Amin, src[c0:c1], axis=0), g[c0:c1, None])
                ok = lb < np.take(thr2, cj[c0:c1], axis=0)
                bi, ci = np.nonzero(ok.T)         # by band, then column, then k
                if len(bi):
                    _banded_update(flat, bi, ci + c0, src, g, cj, m * n, nb, W, thr, mask)
        if m < M - 1:
            Amin[m * n:(m + 1) * n] = _fold(AT[m].reshape(n, nb, W), np.minimum)
    pos = np.empty(R, dtype=np.intp)
    pos[perm] = np.arange(R)
    for m in range(M):  # rows back in their own order, one m at a time
        AT[m, :, :R] = np.take(AT[m, :, :R], pos, axis=1)
    return AT[:, :, :R].transpose(2, 1, 0)


def _solve_top_pairs(pb: _Problem, Tc: np.ndarray, M: int, B: float, n_in: int) -> np.ndarray:
    """A[0, j, m] of the top level (row 0 only) over the predecessor pairs alone (a split after a
    non-predecessor costs inf): for each m and m', only the splits whose last stage costs less than the
    column's best so far are evaluated, and each column takes its least."""
    A = _base(pb, Tc[:1], np.arange(1), M, B, n_in)
    jj, kk = np.nonzero(pb.predM.T)               # by column j, then k
    costs = _PairCosts(pb, Tc, M, B, kk, jj)
    for m in range(1, M):
        for mp in range(1, 2 if pb.straight else m + 1):
            g = costs(m, mp)
            sel = np.flatnonzero(g < A[0, jj, m])
            if len(sel) == 0:
                continue
            cj = jj[sel]
            v = np.maximum(A[0, kk[sel], m - mp], g[sel])
            starts = np.flatnonzero(np.r_[True, cj[1:] != cj[:-1]])
            cols = cj[starts]
            A[0, cols, m] = np.minimum(A[0, cols, m], np.minimum.reduceat(v, starts))
    return A


def _solve_level(pb: _Problem, Tc: np.ndarray, M: int, B: float, n_in: int, final: bool,
                 need_all: bool = True, kernel: str = "auto") -> _SolvedLevel:
    """Solve one level: the top (``final``) for row 0 only, an inner level for every row.

    ``need_all`` False (the next level is the top, which reads only row 0 and the rows after a predecessor
    of each end state): A[:, :, M-1] is exact on those cells only (the others keep an upper bound, never
    read). ``kernel`` (see the module docstring): "reference" solves an inner level with the column kernel on
    every cell (slow; tests compare with it), the top level with the plain products; "auto" takes the plain
    products up to DENSE_MAX_STATES states; "fast" never does.
    """
    n = pb.n
    dense_max = DENSE_MAX_STATES if kernel == "auto" else 0
    if kernel != "reference" and n > dense_max:
        if final:
            return _SolvedLevel(M, B, n_in, final, Tc, _solve_top_pairs(pb, Tc, M, B, n_in))
        cand = pb.reduced_preds() if Tc is pb.Tc else pb.predM
        needed = None if need_all else np.hstack([np.ones((n, 1), dtype=bool), pb.predM.T])
        return _SolvedLevel(M, B, n_in, final, Tc, _solve_inner_banded(pb, Tc, M, B, n_in, cand, needed))
    dense = final or n <= dense_max
    rows = np.arange(1) if final else np.arange(n + 1)
    A = _base(pb, Tc[rows], rows, M, B, n_in)
    for m in range(1, M):
        best = np.ascontiguousarray(A[:, :, m])
        for mp in range(1, (2 if pb.straight else m + 1)):
            G = _last_stage(pb, Tc, M, m, mp, B)
            if dense:
                np.minimum(best, _minmax_dense(A[:, :, m - mp], G, rows), out=best)
            else:
                _minmax_columns_reference(A[:, :, m - mp], G, best, pb.pred_lists)
        A[:, :, m] = best
    return _SolvedLevel(M, B, n_in, final, Tc, A)


def _choice(pb: _Problem, lv: _SolvedLevel, row_index: int, row: int, j: int, m: int) -> tuple[int | None, int]:
    """PipeDream's choice for A[row][j][m]: (split k or None for the base case, workers of the last stage).

    Candidates in PipeDream's order (base case first, then k ascending, m' ascending), first strict minimum.
    """
    target = lv.A[row_index, j, m]
    base = _base(pb, lv.Tc[[row]], np.array([row]), lv.M, lv.B, lv.n_in)[0, j, m]
    best_val, best_choice = base, (None, m + 1)
    if m >= 1:
        mps = list(range(1, (2 if pb.straight else m + 1)))
        vals = np.empty((pb.n, len(mps)))
        for c, mp in enumerate(mps):
            G = _last_stage(pb, lv.Tc, lv.M, m, mp, lv.B, j)
            vals[:, c] = np.maximum(lv.A[row_index, :, m - mp], G)
        flat = int(np.argmin(vals))  # k-major: k ascending, then m' ascending
        k, c = divmod(flat, len(mps))
        if vals[k, c] < best_val:
            best_val, best_choice = float(vals[k, c]), (k, mps[c])
    if not (best_val == target or (math.isinf(best_val) and math.isinf(target))):
        raise AssertionError(f"reconstruction mismatch at A[{row}][{j}][{m}]: {best_val} != {target}")
    return best_choice


def _analyze(pb: _Problem, lv: _SolvedLevel, start: int, end: int) -> list[tuple[int, int, int]]:
    """Stages (first_state, last_state, workers) of states start..end-1 on one machine of this level."""
    row_index = 0 if lv.final else start
    if lv.final and start != 0:
        raise AssertionError("the top level only solves row 0")
    j, m = end - 1, lv.M - 1
    out = []
    while True:
        k, mp = _choice(pb, lv, row_index, start, j, m)
        if k is None:
            out.append((start, j, mp))
            break
        out.append((k + 1, j, mp))
        j, m = k, m - mp
    out.reverse()
    return out
