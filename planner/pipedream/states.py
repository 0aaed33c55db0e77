"""PipeDream's states: a profile's DAG cleaned as PipeDream's optimizer cleans it, and its antichains in order.

Input sources are removed (their successors join the first stage), tuple-indexing sinks dropped, and the
DAG turned into the sequence of antichains reachable in topological order, each with its cumulative
compute, activation and parameter figures (see the package docstring for the exact rules).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planner.profile import ModelProfile
from topologies.errors import InputError


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
    pred = _reach_masks(live, inn, n)  # index order is topological
    succ = _reach_masks(reversed(live), out, n)
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
    pmask = _reach_masks(range(n), direct, n)
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


def _reach_masks(order, nbrs, n: int) -> list[int]:
    """Transitive reach as bitmasks: node v's mask has bit a for every a reachable through ``nbrs``.

    ``order`` must visit each node after all of its ``nbrs`` (a topological order for predecessors,
    its reverse for successors).
    """
    mask = [0] * n
    for v in order:
        m = 0
        for a in nbrs[v]:
            m |= mask[a] | (1 << a)
        mask[v] = m
    return mask
