"""PipeDream-compatible planning: its states, its cost model, its hierarchical optimizer — fast.

PipeDream's optimizer (``optimizer_graph_hierarchical.py``) turns a model's DAG into a
sequence of *states* (the antichains reachable in topological order), then solves,
level by level of the cluster hierarchy (innermost first), a dynamic program
``A[i][j][m]``: the best bottleneck time of the states ``i..j`` on ``m + 1``
workers of that level. This module reproduces those rules exactly (the same
states, the same arithmetic, the same answers) with vectorised numpy in place
of PipeDream's Python loops:

* one level with ``M`` workers and bandwidth ``B`` (bytes/s); a range of states
  replicated ``m`` ways costs ``(T + 4(m-1)P/(B m) / n_in) / m`` (``n_in``: workers
  per machine of the level below, 1 at the first level);
* a split ``A(i,j,m) = min_{k<j, m'<m} max(A(i,k,m-m'), last, in, out)`` with
  ``last = (T(k+1..j) + 4(m'-1)P(k+1..j)/(B m'))/m'`` and, only with an activation
  compression ratio ``acr``, ``in = 2 a_k/(B m')/acr`` and ``out = 2 a_j/(B m')/acr``
  (no ``out`` for the last state);
* with a memory size, a choice is skipped when ``ceil((M-(m+1))/m') (Act + P)`` of
  its range exceeds it (the base case with ``m' = m+1``);
* the best time of each range on one whole machine of a level is that range's
  compute time at the next level up; replication factors multiply across levels.

How it stays exact and fast (every shortcut drops only candidates that provably
cannot be the minimum, so every cell is the same float PipeDream computes):

* within one m, the columns of ``A[:, :, m]`` depend only on smaller m, so each
  (m, m') is one batch of (min, max) products over all splits (j, k);
* states with the same cumulative figures (they differ by nodes that cost nothing,
  as GNMT's getitem nodes) dominate one another along the DAG: a split after the
  later one is never worse, so the earlier one is dropped (GNMT-16: 283k splits to 57k);
* rows are banded in order of their start's compute; a split is evaluated on a band
  only when its lower bound there is below the band's largest best so far (the m'
  before it tighten the bounds for the m' after it);
* the top level evaluates only predecessor pairs.

Where the antichain count explodes (inception_v3 has 221,564), the states are
reduced to a bounded chain of topological-order cut points and the result says
so (``reduction``).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, replace

import numpy as np

from planner.profile import ModelProfile
from topologies.errors import InputError

__all__ = [
    "PipeDreamError",
    "States",
    "PipeDreamStage",
    "PipeDreamResult",
    "pipedream_states",
    "optimize_pipedream",
    "pipedream_chain_profile",
    "brute_force_pipedream",
]

#: The most states a reduced (cut-point) state chain keeps.
REDUCED_STATES_CAP = 160
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


class PipeDreamError(InputError):
    """A PipeDream planning request that cannot be answered; the message says what to change."""


# ====================================================================== states
@dataclass(frozen=True)
class States:
    """PipeDream's states of a model, in the order its optimizer numbers them.

    Attributes:
        node_ids: the model's node ids (in the profile's topological order) the states are made of.
        antichains: per state, its (augmented) antichain as indices into ``node_ids``.
        members: per state, the sorted indices of the nodes the state covers (its antichain and all predecessors).
        compute_s: per state, cumulative forward+backward seconds of ``members``.
        activation_bytes: per state, cumulative activation bytes of ``members``.
        param_bytes: per state, cumulative parameter bytes of ``members``.
        output_activation_bytes: per state, summed activation bytes of its antichain (what a cut there sends).
        preds: per state, the indices of the states it can follow (transitive predecessors in the antichain DAG).
        reduction: None for PipeDream's own states; else the reduction used (``"cut-points"``).
        message: a human sentence about how the states were made.
        full_count: the antichain count when known (None when enumeration stopped at the cap).
    """

    node_ids: tuple[str, ...]
    antichains: tuple[tuple[int, ...], ...]
    members: tuple[tuple[int, ...], ...]
    compute_s: np.ndarray
    activation_bytes: np.ndarray
    param_bytes: np.ndarray
    output_activation_bytes: np.ndarray
    preds: tuple[tuple[int, ...], ...]
    reduction: str | None = None
    message: str = ""
    full_count: int | None = None

    def __len__(self) -> int:
        return len(self.antichains)

    def pred_matrix(self) -> np.ndarray:
        """``M[j, k]`` true when state k is a (transitive) predecessor of state j."""
        n = len(self)
        m = np.zeros((n, n), dtype=bool)
        for j, ps in enumerate(self.preds):
            if ps:
                m[j, list(ps)] = True
        return m


@dataclass(frozen=True)
class _Dag:
    """A model DAG after PipeDream's clean-up, as bitmasks over node indices (profile topological order)."""

    ids: tuple[str, ...]
    alive: tuple[int, ...]             # node indices kept (inputs and getitem sinks removed)
    out: tuple[tuple[int, ...], ...]   # out-neighbours in the file's edge order
    pred: tuple[int, ...]              # transitive predecessors (bitmask)
    succ: tuple[int, ...]              # transitive successors (bitmask)
    start: int                         # the first source in the file's node order
    compute_s: np.ndarray
    act: np.ndarray
    params: np.ndarray


def _node_figures(profile: ModelProfile) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Per node: id, description, F+B seconds (PipeDream's (F+B)/1000 when the raw figures are intact), activation, params."""
    ids, descs = [], []
    for l in profile.layers:
        nid, _, desc = l.name.partition(":")
        ids.append(nid)
        descs.append(desc)
    comp = np.array([l.forward_s + l.backward_s for l in profile.layers], dtype=float)
    g = profile.graph
    if g is not None and len(g.raw_ms) == len(profile.layers):
        if all(l.forward_s == f / 1e3 and l.backward_s == b / 1e3 for l, (f, b) in zip(profile.layers, g.raw_ms)):
            comp = np.array([(f + b) / 1000.0 for f, b in g.raw_ms], dtype=float)
    if g is None:
        act = np.array([l.activation_bytes for l in profile.layers], dtype=float)
    else:  # a graph profile's per-node output is its saved_bytes (activation_bytes is the chain's crossing)
        act = np.array([l.saved_bytes for l in profile.layers], dtype=float)
    params = np.array([l.param_bytes for l in profile.layers], dtype=float)
    return ids, descs, comp, act, params


def _clean_dag(profile: ModelProfile) -> _Dag:
    ids, descs, comp, act, params = _node_figures(profile)
    n = len(ids)
    if profile.graph is None:
        edges = [(i, i + 1) for i in range(n - 1)]
        file_rank = list(range(n))
    else:
        pos = {nid: i for i, nid in enumerate(profile.graph.nodes)}
        if [ids[i] for i in range(n)] != list(profile.graph.nodes):
            ids = list(profile.graph.nodes)
        edges = [(pos[a], pos[b]) for a, b in profile.graph.edges]
        fo = profile.graph.file_order or profile.graph.nodes
        rank = {nid: r for r, nid in enumerate(fo)}
        file_rank = [rank.get(nid, n + i) for i, nid in enumerate(ids)]
    out: list[list[int]] = [[] for _ in range(n)]
    inn: list[list[int]] = [[] for _ in range(n)]
    for a, b in edges:
        out[a].append(b)
        inn[b].append(a)
    alive = [True] * n
    by_file = sorted(range(n), key=lambda i: file_rank[i])

    def remove(v: int) -> None:
        alive[v] = False
        for b in out[v]:
            inn[b] = [x for x in inn[b] if x != v]
        for a in inn[v]:
            out[a] = [x for x in out[a] if x != v]
        out[v], inn[v] = [], []

    # PipeDream: Input* sources are removed (their successors become the first stage's) ...
    for v in [v for v in by_file if not inn[v] and descs[v].startswith("Input")]:
        remove(v)
    # ... and so are sinks that only index a tuple.
    for v in [v for v in by_file if alive[v] and not out[v] and descs[v].startswith("__getitem__")]:
        remove(v)
    live = [v for v in range(n) if alive[v]]
    if not live:
        raise PipeDreamError(f"model {profile.name!r} has no nodes left after removing its inputs")
    pred = [0] * n
    for v in live:  # index order is topological
        m = 0
        for a in inn[v]:
            m |= pred[a] | (1 << a)
        pred[v] = m
    succ = [0] * n
    for v in reversed(live):
        m = 0
        for b in out[v]:
            m |= succ[b] | (1 << b)
        succ[v] = m
    start = next(v for v in by_file if alive[v] and not inn[v])
    return _Dag(tuple(ids), tuple(live), tuple(tuple(o) for o in out), tuple(pred), tuple(succ), start,
                comp, act, params)


def _bits(mask: int) -> list[int]:
    """The set bits of ``mask``, lowest first."""
    if mask.bit_count() > 24:  # many bits: unpack them in numpy
        raw = np.frombuffer(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), dtype=np.uint8)
        return np.flatnonzero(np.unpackbits(raw, bitorder="little")).tolist()
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


class _TooManyStates(Exception):
    pass


def _extras_function(dag: _Dag):
    """extras(a): the predecessors p of node a with an out-edge leaving pred(a) ∪ {a} (PipeDream's augmentation).

    It depends on a alone, so each node's is computed once.
    """
    pred, out = dag.pred, dag.out
    cache: dict[int, int] = {}

    def extras(a: int) -> int:
        e = cache.get(a)
        if e is None:
            inside = pred[a] | (1 << a)
            e = 0
            for p in _bits(pred[a]):
                for o in out[p]:
                    if not (inside >> o) & 1:
                        e |= 1 << p
                        break
            cache[a] = e
        return e

    return extras


def _enumerate_antichains(dag: _Dag, cap: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], list[list[int]]]:
    """PipeDream's antichain DAG: (deaugmented antichains, augmented antichains, out-edges), in discovery order.

    Raises _TooManyStates past ``cap`` antichains.
    """
    pred, succ, out = dag.pred, dag.succ, dag.out
    extras = _extras_function(dag)

    def augment(antichain: tuple[int, ...]) -> list[int]:
        e = 0
        for a in antichain:
            e |= extras(a)
        return _bits(e) + list(antichain)

    def deaugment(nodes: list[int]) -> tuple[int, ...]:
        under = 0
        for v in nodes:
            under |= pred[v]
        keep, seen = [], 0
        for v in nodes:
            if not (under >> v) & 1 and not (seen >> v) & 1:
                keep.append(v)
                seen |= 1 << v
        return tuple(keep)

    first = (dag.start,)
    index = {frozenset(first): 0}
    antichains = [first]
    augmented = [tuple(augment(first))]
    edges: list[list[int]] = [[]]
    done: set[int] = set()
    queue = [first]
    head = 0
    while head < len(queue):
        ac = queue[head]
        head += 1
        me = index[frozenset(ac)]
        if me in done:
            continue
        done.add(me)
        aug = list(augmented[me])
        aug_mask = 0
        for v in aug:
            aug_mask |= 1 << v
        ac_set = set(ac)
        for x in aug:
            for y in out[x]:
                if y in ac_set or succ[y] & aug_mask:
                    continue
                nxt = deaugment([y if v == x else v for v in aug])
                key = frozenset(nxt)
                k = index.get(key)
                if k is None:
                    k = len(antichains)
                    if k >= cap:
                        raise _TooManyStates()
                    index[key] = k
                    antichains.append(nxt)
                    augmented.append(tuple(augment(nxt)))
                    edges.append([])
                edges[me].append(k)
                queue.append(nxt)
    return antichains, augmented, edges


def _topological_order(edges: list[list[int]]) -> list[int]:
    """Reverse post-order of a depth-first search from node 0, children in edge order (PipeDream's sort)."""
    n = len(edges)
    marked = [False] * n
    post: list[int] = []
    for root in range(n):
        if marked[root]:
            continue
        marked[root] = True
        stack = [(root, 0)]
        while stack:
            v, i = stack[-1]
            if i < len(edges[v]):
                stack[-1] = (v, i + 1)
                w = edges[v][i]
                if not marked[w]:
                    marked[w] = True
                    stack.append((w, 0))
            else:
                stack.pop()
                post.append(v)
    post.reverse()
    return post


def _figures(dag: _Dag, member_masks: list[int], outputs: list[list[int]]):
    comp = np.empty(len(member_masks))
    act = np.empty(len(member_masks))
    par = np.empty(len(member_masks))
    oact = np.empty(len(member_masks))
    members = []
    for s, mask in enumerate(member_masks):
        idx = _bits(mask)
        members.append(tuple(idx))
        # PipeDream adds node by node; summing in topological order keeps the arithmetic a plain running sum
        c = a = p = 0.0
        for v in idx:
            c += dag.compute_s[v]
            a += dag.act[v]
            p += dag.params[v]
        comp[s], act[s], par[s] = c, a, p
        o = 0.0
        for v in outputs[s]:
            o += dag.act[v]
        oact[s] = o
    return members, comp, act, par, oact


def _full_states(dag: _Dag, cap: int) -> States:
    antichains, augmented, edges = _enumerate_antichains(dag, cap)
    order = _topological_order(edges)
    pos = {s: i for i, s in enumerate(order)}
    n = len(order)
    # transitive predecessors in the antichain DAG, by bitmask over new indices
    direct: list[list[int]] = [[] for _ in range(n)]
    for s, outs in enumerate(edges):
        for t in outs:
            direct[pos[t]].append(pos[s])
    pmask = [0] * n
    for j in range(n):
        m = 0
        for p in direct[j]:
            m |= pmask[p] | (1 << p)
        pmask[j] = m
    member_masks = []
    outputs = []
    for s in order:
        aug = augmented[s]
        m = 0
        for v in aug:
            m |= dag.pred[v] | (1 << v)
        member_masks.append(m)
        outputs.append(list(aug))
    members, comp, act, par, oact = _figures(dag, member_masks, outputs)
    return States(
        node_ids=dag.ids,
        antichains=tuple(tuple(augmented[s]) for s in order),
        members=tuple(members),
        compute_s=comp,
        activation_bytes=act,
        param_bytes=par,
        output_activation_bytes=oact,
        preds=tuple(tuple(_bits(pm)) for pm in pmask),
        reduction=None,
        message=f"{n} states (PipeDream's antichains)",
        full_count=n,
    )


def _prefix_states(dag: _Dag, cap: int, why: str) -> States:
    """A bounded chain of states: prefixes of the topological order, kept at least-crossing cut points.

    Every prefix of a topological order is a down-set, so each kept prefix is one of PipeDream's states
    (its antichain is the prefix's maximal nodes, augmented as PipeDream augments); the plan is the
    optimum over those cuts. It is not a bound on PipeDream's optimum in either direction: on GNMT-16
    8x8 the cut-point figure (0.016497 s) lies below PipeDream's exact 0.017779 s, so the costs of a
    cut here and of PipeDream's state for it differ somewhere (not yet pinned down).
    """
    live = list(dag.alive)
    n = len(live)
    pos = {v: i for i, v in enumerate(live)}
    first_use = [min((pos[o] for o in dag.out[v]), default=n) for v in live]
    last_use = [max((pos[o] for o in dag.out[v]), default=-1) for v in live]
    extras = _extras_function(dag)
    prefix_masks, aug_lists = [], []
    open_count = np.zeros(n + 1, dtype=int)  # nodes before position i still feeding a node after it
    mask = 0
    maximal: list[int] = []
    for i, v in enumerate(live):
        mask |= 1 << v
        prefix_masks.append(mask)
        maximal = [u for u in maximal if first_use[pos[u]] > i] + [v]
        e = 0
        for a in maximal:
            e |= extras(a)
        aug_lists.append(_bits(e) + maximal)
        if last_use[i] > i:
            open_count[i + 1] += 1
            open_count[last_use[i]] -= 1
    open_before = np.cumsum(open_count)[:n]  # open nodes strictly before position i, at the cut after i
    single = [i for i in range(n) if open_before[i] == 0]
    if n <= cap:
        keep = list(range(n))
        how = f"all {n} prefixes of a topological order"
    else:
        members_comp = np.cumsum([dag.compute_s[v] for v in live])
        oact = np.array([sum(dag.act[v] for v in aug) for aug in aug_lists])
        keep_set = {n - 1}
        if len(single) <= cap // 2:
            keep_set.update(single)
        buckets = cap - len(keep_set)
        total = members_comp[-1] if members_comp[-1] > 0 else 1.0
        edges = np.linspace(0.0, total, buckets + 1)
        b_of = np.minimum(np.searchsorted(edges, members_comp, side="right") - 1, buckets - 1)
        for b in range(buckets):
            idx = np.nonzero(b_of == b)[0]
            idx = [i for i in idx if i not in keep_set]
            if idx:
                keep_set.add(min(idx, key=lambda i: (oact[i], -i)))
        keep = sorted(keep_set)[-cap:] if len(keep_set) > cap else sorted(keep_set)
        n_single = len(set(keep) & set(single))
        how = (f"{len(keep)} cut points of a topological order, "
               + ("all single-node cuts, one per compute bucket with the least crossing activation"
                  if n_single == len(keep) else
                  f"{n_single} single-node cuts and the least-crossing cut of each compute bucket"))
    member_masks = [prefix_masks[i] for i in keep]
    outputs = [aug_lists[i] for i in keep]
    members, comp, act, par, oact = _figures(dag, member_masks, outputs)
    k = len(keep)
    return States(
        node_ids=dag.ids,
        antichains=tuple(tuple(outputs[s]) for s in range(k)),
        members=tuple(members),
        compute_s=comp,
        activation_bytes=act,
        param_bytes=par,
        output_activation_bytes=oact,
        preds=tuple(tuple(range(s)) for s in range(k)),
        reduction="cut-points",
        message=f"{why}; planned over {how}: optimal within those cuts, not PipeDream's exact state set (its figure may differ either way)",
        full_count=None,
    )


def pipedream_states(profile: ModelProfile, max_states: int = 20000) -> States:
    """PipeDream's states of ``profile`` (its antichain DAG in its topological order).

    Past ``max_states`` antichains the states are reduced to at most ``REDUCED_STATES_CAP``
    topological-order cut points and ``States.reduction`` says so.
    """
    dag = _clean_dag(profile)
    try:
        return _full_states(dag, max_states)
    except _TooManyStates:
        why = f"{profile.name}: more than {max_states:,} antichains (the cap)"
        return _prefix_states(dag, REDUCED_STATES_CAP, why)


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


_INF = float("inf")


@dataclass
class _Level:
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
                 need_all: bool = True, reference: bool = False) -> _Level:
    """Solve one level: the top (``final``) for row 0 only, an inner level for every row.

    ``need_all`` False (the next level is the top, which reads only row 0 and the rows after a predecessor
    of each end state): A[:, :, M-1] is exact on those cells only (the others keep an upper bound, never
    read). ``reference``: the plain (min, max) products, the column kernel on every cell of an inner level
    (slow; tests compare with it). Small problems take the plain products too.
    """
    n = pb.n
    if not reference and n > DENSE_MAX_STATES:
        if final:
            return _Level(M, B, n_in, final, Tc, _solve_top_pairs(pb, Tc, M, B, n_in))
        cand = pb.reduced_preds() if Tc is pb.Tc else pb.predM
        needed = None if need_all else np.hstack([np.ones((n, 1), dtype=bool), pb.predM.T])
        return _Level(M, B, n_in, final, Tc, _solve_inner_banded(pb, Tc, M, B, n_in, cand, needed))
    dense = final or n <= DENSE_MAX_STATES
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
    return _Level(M, B, n_in, final, Tc, A)


def _choice(pb: _Problem, lv: _Level, row_index: int, row: int, j: int, m: int) -> tuple[int | None, int]:
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


def _analyze(pb: _Problem, lv: _Level, start: int, end: int) -> list[tuple[int, int, int]]:
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


#: Up to this many states a level is solved with the plain (min, max) products.
DENSE_MAX_STATES = 16
#: True: solve with the pre-vectorised column kernel on every cell (the slow reference path tests compare with).
REFERENCE_PATH = False


def _solve(st: States, levels: tuple[tuple[int, float], ...], straight: bool, acr, mem):
    pb = _Problem(st, straight, acr, mem)
    Tc = pb.Tc
    solved = []
    n_in = 1
    for li, (M, B) in enumerate(levels):
        lv = _solve_level(pb, Tc, M, B, n_in, final=(li == len(levels) - 1),
                          need_all=(li < len(levels) - 2), reference=REFERENCE_PATH)
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
    """
    t0 = time.perf_counter()
    lv = _check_levels(levels)
    if activation_compression_ratio is not None and not activation_compression_ratio > 0:
        raise PipeDreamError("activation_compression_ratio must be > 0")
    st = pipedream_states(profile, max_states=max_states)
    work = _dp_work(len(st), lv, straight)
    if work > max_dp_work:
        n_fit = len(st)
        while n_fit > 8 and _dp_work(n_fit, lv, straight) > max_dp_work:
            n_fit = int(n_fit * 0.9)
        why = (f"{profile.name}: {len(st):,} states on {'x'.join(str(w) for w, _ in lv)} workers would be "
               f"{work:.2g} (min, max) steps (the budget is {max_dp_work:.2g})")
        st = _prefix_states(_clean_dag(profile), n_fit, why)
    pb, solved = _solve(st, lv, straight, activation_compression_ratio, memory_size)
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


# ====================================================================== brute force (tests)
def brute_force_pipedream(
    profile: ModelProfile,
    levels: list[tuple[int, float]],
    *,
    memory_size: float | None = None,
    straight: bool = False,
    activation_compression_ratio: float | None = None,
) -> float:
    """PipeDream's answer by enumerating every split and every replication assignment (tiny chains only).

    Level by level, the value of a range on one whole machine is the minimum, over every way to cut the range
    into consecutive stages and every way to give the stages worker counts summing to exactly the level's
    workers, of the slowest stage under PipeDream's cost rules. Returns inf when nothing is feasible.
    """
    lv = _check_levels(levels)
    st = pipedream_states(profile)
    n = len(st)
    if n > 14 or any(len(p) != i for i, p in enumerate(st.preds)):
        raise PipeDreamError("brute force is for chains of at most 14 states")
    comp, act, par, oact = st.compute_s, st.activation_bytes, st.param_bytes, st.output_activation_bytes
    acr, mem = activation_compression_ratio, memory_size

    def diff(x, a, b):  # PipeDream's range table: row 0 is the cumulative figure itself
        return float(x[b]) if a == 0 else float(x[b] - x[a - 1])

    def compositions(total: int, parts: int):
        if parts == 1:
            yield (total,)
            return
        for first in range(1, total - parts + 2):
            for rest in compositions(total - first, parts - 1):
                yield (first,) + rest

    T = {(a, b): diff(comp, a, b) for a in range(n) for b in range(a, n)}
    n_in = 1
    value = _INF
    for li, (M, B) in enumerate(lv):
        V = {}
        for (a, b) in T:
            best = _INF
            inner = list(range(a, b))  # possible cut points k (a piece ends at k)
            for ncuts in range(0, min(len(inner), M - 1) + 1):
                for cuts in itertools.combinations(inner, ncuts):
                    pieces = list(zip((a,) + tuple(k + 1 for k in cuts), cuts + (b,)))
                    counts = [(1,) * len(pieces)] if straight else compositions(M, len(pieces))
                    if straight and len(pieces) != M:
                        continue
                    for cs in counts:
                        cost, used, ok = -_INF, 0, True
                        for idx, ((x, y), c) in enumerate(zip(pieces, cs)):
                            used += c
                            need = diff(act, x, y) + diff(par, x, y)
                            P = diff(par, x, y)
                            if idx == 0:
                                if mem is not None and math.ceil((M - c) / c) * need > mem:
                                    ok = False
                                    break
                                dp = ((4 * (c - 1) * P) / (B * c)) / n_in
                                piece = (T[(x, y)] + dp) / c
                            else:
                                if mem is not None and need * math.ceil((M - used) / c) > mem:
                                    ok = False
                                    break
                                piece = (T[(x, y)] + (4 * (c - 1) * P) / (B * c)) / c
                                if acr is not None:
                                    piece = max(piece, ((2.0 * float(oact[x - 1])) / (B * c)) / acr)
                                    if y < n - 1:
                                        piece = max(piece, ((2.0 * float(oact[y])) / (B * c)) / acr)
                            cost = max(cost, piece)
                        if ok and cost < best:
                            best = cost
            V[(a, b)] = best
        if li == len(lv) - 1:
            value = V[(0, n - 1)]
        T = V
        n_in = M
    return value
