"""Routes through a topology's graph: through the tree in O(depth) where the graph is a tree, else by
least latency.

Routes are shortest by total latency, then by hop count, then lexicographically by the sequence of node
names, so they are deterministic. Tree-shaped graphs (every preset except the fat tree) have one route per
pair, walked up from both ends to the common ancestor (:func:`tree_index`, :func:`tree_path`); other graphs
are routed by a Dijkstra run (:func:`least_latency_path`). ``Topology.route`` caches both.
"""
from __future__ import annotations

import heapq

import networkx as nx

__all__ = ["TreeIndex", "tree_index", "tree_path", "least_latency_path"]

#: (parent of each node, None at the root; depth of each node) of a tree-shaped graph.
TreeIndex = tuple[dict[str, "str | None"], dict[str, int]]


def tree_index(g: nx.Graph) -> TreeIndex | None:
    """Parents and depths of ``g`` rooted at its first node, by breadth-first search; None if ``g`` is empty
    or not a tree."""
    if g.number_of_nodes() > 0 and nx.is_tree(g):
        root = next(iter(g.nodes))
        parent: dict[str, str | None] = {root: None}
        depth = {root: 0}
        frontier = [root]
        while frontier:
            nxt = []
            for u in frontier:
                for v in g.adj[u]:
                    if v not in parent:
                        parent[v] = u
                        depth[v] = depth[u] + 1
                        nxt.append(v)
            frontier = nxt
        return (parent, depth)
    return None


def tree_path(tree: TreeIndex, a: str, b: str) -> list[str]:
    """The nodes of the one path a -> b in the tree ``tree`` indexes (``[a]`` when a == b)."""
    parent, depth = tree
    up: list[str] = [a]
    down: list[str] = [b]
    x, y = a, b
    while depth[x] > depth[y]:
        x = parent[x]  # type: ignore[assignment]
        up.append(x)
    while depth[y] > depth[x]:
        y = parent[y]  # type: ignore[assignment]
        down.append(y)
    while x != y:
        x = parent[x]  # type: ignore[assignment]
        y = parent[y]  # type: ignore[assignment]
        up.append(x)
        down.append(y)
    down.pop()  # the common ancestor is already last in `up`
    return up + down[::-1]


def least_latency_path(g: nx.Graph, src: str, dst: str) -> list[str] | None:
    """The route src->dst: least latency (in integer picoseconds, so sums are exact), then
    fewest hops, then the lexicographically smallest sequence of node names; None if there is none."""
    best: dict[str, tuple[int, int, tuple[str, ...]]] = {}
    done: set[str] = set()
    heap: list[tuple[int, int, tuple[str, ...]]] = [(0, 0, (src,))]
    while heap:
        lat, hops, path = heapq.heappop(heap)
        u = path[-1]
        if u == dst:
            return list(path)
        if u in done:
            continue
        done.add(u)
        for v, data in g.adj[u].items():
            if v in done:
                continue
            key = (lat + int(round(data["link"].latency_s * 1e12)), hops + 1, path + (v,))
            old = best.get(v)
            if old is None or key < old:
                best[v] = key
                heapq.heappush(heap, key)
    return None
