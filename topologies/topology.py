"""The cluster as a graph: devices, switches and links, with routes, path costs and hierarchy levels.

A :class:`Topology` wraps an undirected ``networkx.Graph``:

* a device node carries ``device=Device(...)`` (the node name equals ``Device.name``);
* a switch node carries ``switch=True``;
* every edge carries ``link=Link(...)``. Links are full duplex: ``bandwidth_bytes_per_s`` is
  per direction, so a route a->b and a route b->a do not share capacity.

Routes are shortest by total latency, then by hop count, then lexicographically by the
sequence of node names, so they are deterministic. Tree-shaped graphs (every preset except
the fat tree) are routed through the tree in O(depth); other graphs by a Dijkstra run per
source. Both are cached.

The hierarchy (``levels()``/``domains()``) is either given explicitly (presets and files
with a ``levels`` section carry it) or inferred from link bandwidths: devices joined by
links of a bandwidth tier form a domain at that tier (bandwidths within a factor 1.5 of
each other count as one tier).

The graph is treated as immutable once wrapped: derive new topologies with
:meth:`Topology.with_links`, :meth:`Topology.with_link_params` or
:meth:`Topology.with_device_speed` instead of mutating ``graph``.

File schema (YAML or JSON; ``to_dict``/``from_dict``)::

    name: dgx:servers=2                     # optional, default "custom"
    devices:                                # required, non-empty, order is kept
      - {name: s0g0, kind: a100-80gb, memory_bytes: 8.0e10, peak_flops: 3.12e14, speed: 1.0}
    switches: [s0-nvswitch, ib-switch]      # optional
    links:                                  # required
      - {a: s0g0, b: s0-nvswitch, kind: nvswitch, bandwidth_bytes_per_s: 3.0e11, latency_s: 2.0e-6}
    levels:                                 # optional, innermost first
      - {count: 8, bandwidth_bytes_per_s: 3.0e11, domains: [[s0g0, ...], [s1g0, ...]]}

Only ``domains`` of a level is read on load; ``count`` and ``bandwidth_bytes_per_s`` are
written for the reader and recomputed from the graph. Numbers may be given as strings
("25e9", "inf"); JSON files write an infinite bandwidth as the string "inf".

Why one module of ~700 lines: the graph, its routes, its hierarchy levels and the file format
share the node and edge records and their checks; the file format (``from_dict``, ``save``/``load``)
is the part that can move to a module of its own next.
"""
from __future__ import annotations

import heapq
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import networkx as nx

from topologies import ncclcost
from topologies.errors import InputError
from topologies.ncclcost import COLLECTIVE_MODES
from topologies.files import output_path

__all__ = ["TopologyError", "Device", "Link", "Topology", "LINK_KINDS"]

#: Link kinds a topology may use.
LINK_KINDS = ("nvlink", "nvswitch", "pcie", "infiniband", "ethernet", "loopback", "ideal")

_ROUTE_CACHE_MAX = 1 << 18


class TopologyError(InputError):
    """Bad topology input; the message is one line: what is wrong and what to do."""


@dataclass(frozen=True)
class Device:
    """A compute device. ``speed`` is a relative compute speed factor (1.0 reference, 0.5 twice as slow)."""

    name: str
    kind: str = "gpu-generic"
    memory_bytes: float = 16e9
    peak_flops: float = 1e14
    speed: float = 1.0


@dataclass(frozen=True)
class Link:
    """A full-duplex link; bandwidth is per direction, ``float('inf')`` allowed (ideal)."""

    kind: str
    bandwidth_bytes_per_s: float
    latency_s: float


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _link_problem(link: Any) -> str | None:
    """Why a link value is invalid, or None."""
    if not isinstance(link, Link):
        return "has no Link (edge attribute 'link' must be a topologies.Link)"
    if link.kind not in LINK_KINDS:
        return f"has unknown kind {link.kind!r}; use one of {', '.join(LINK_KINDS)}"
    bw = link.bandwidth_bytes_per_s
    if not _is_num(bw) or math.isnan(bw) or bw <= 0:
        return f"bandwidth_bytes_per_s must be a positive number (got {bw!r})"
    lat = link.latency_s
    if not _is_num(lat) or not math.isfinite(lat) or lat < 0:
        return f"latency_s must be a finite number >= 0 (got {lat!r})"
    return None


def _device_problem(dev: Device) -> str | None:
    for field in ("memory_bytes", "peak_flops", "speed"):
        v = getattr(dev, field)
        if not _is_num(v) or not math.isfinite(v) or v <= 0:
            return f"{field} must be a positive finite number (got {v!r})"
    return None


class Topology:
    """Devices, switches and links over a networkx graph; see the module docstring."""

    def __init__(self, graph: nx.Graph, name: str = "custom", levels: list[list[list[str]]] | None = None,
                 collectives: str = "ideal"):
        """Wrap ``graph``. ``levels``, when given, is the explicit hierarchy: one partition of the
        devices per level, innermost first, each coarser than the one before (see ``domains``).
        ``collectives`` is how both interpreters time an all-reduce on these links (``topologies.ncclcost``):
        "ideal" (the link model alone) or "nccl" (NCCL's protocol choice, bandwidth fractions and latency)."""
        if collectives not in COLLECTIVE_MODES:
            raise TopologyError(f"collectives={collectives!r} is unknown; use one of {', '.join(COLLECTIVE_MODES)}")
        self.collectives = collectives
        if not isinstance(graph, nx.Graph) or graph.is_directed() or graph.is_multigraph():
            raise TopologyError("a topology needs an undirected networkx.Graph (not directed, not multi)")
        self.name = str(name)
        self.graph = graph
        devices: list[str] = []
        switches: list[str] = []
        for node, data in graph.nodes(data=True):
            dev = data.get("device")
            if dev is not None:
                if not isinstance(dev, Device):
                    raise TopologyError(f"node {node!r}: attribute 'device' must be a topologies.Device")
                if dev.name != node:
                    raise TopologyError(f"node {node!r} holds Device named {dev.name!r}; node name and device name must match")
                devices.append(node)
            elif data.get("switch"):
                switches.append(node)
            else:
                raise TopologyError(f"node {node!r} is neither a device (attribute device=Device) nor a switch (switch=True)")
        self.devices: list[str] = devices
        self.switches: list[str] = switches
        self._explicit = [[list(g) for g in part] for part in levels] if levels else None
        self._route_cache: dict[tuple[str, str], list[tuple[str, str]]] = {}
        self._cost_cache: dict[tuple[str, str], tuple[float, float]] = {}
        self._hops_cache: dict[tuple[str, str], tuple[tuple[tuple[str, str], float], ...]] = {}
        self._tree: tuple[dict[str, str | None], dict[str, int]] | None | bool = False  # False = not computed
        self._hier: list[list[list[str]]] | None = None
        self._levels: list[tuple[int, float]] | None = None
        self._server_index: dict[str, int] | None = None

    # ------------------------------------------------------------------ basics
    def device(self, name: str) -> Device:
        data = self.graph.nodes.get(name) if isinstance(name, str) else None
        if not data or "device" not in data:
            raise TopologyError(f"unknown device {name!r} in topology {self.name!r}; it has {self._some_devices()}")
        return data["device"]

    def has_device(self, name: str) -> bool:
        data = self.graph.nodes.get(name) if isinstance(name, str) else None
        return bool(data) and "device" in data

    def link(self, a: str, b: str) -> Link:
        """The link on edge a–b (either orientation)."""
        data = self.graph.get_edge_data(a, b)
        if data is None:
            raise TopologyError(f"no link between {a!r} and {b!r} in topology {self.name!r}")
        return data["link"]

    def links(self) -> Iterator[tuple[str, str, Link]]:
        """All links as (a, b, Link), in the canonical order ``to_dict`` writes."""
        for a, b in self._canonical_edges():
            yield a, b, self.graph.edges[a, b]["link"]

    def __len__(self) -> int:
        return len(self.devices)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Topology({self.name!r}, {len(self.devices)} devices, {len(self.switches)} switches, {self.graph.number_of_edges()} links)"

    def _some_devices(self) -> str:
        shown = ", ".join(self.devices[:6])
        more = f", ... ({len(self.devices)} in all)" if len(self.devices) > 6 else ""
        return f"devices {shown}{more}" if self.devices else "no devices"

    def _check_node(self, n: str) -> None:
        if not isinstance(n, str) or n not in self.graph:
            raise TopologyError(f"unknown device {n!r} in topology {self.name!r}; it has {self._some_devices()}")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise TopologyError on the first problem: no devices, a bad device value, a bad link,
        a device with no link, or a device unreachable from the first device."""
        if not self.devices:
            raise TopologyError(f"topology {self.name!r} has no devices; add at least one device")
        for d in self.devices:
            p = _device_problem(self.graph.nodes[d]["device"])
            if p:
                raise TopologyError(f"device {d!r}: {p}")
        for a, b, data in self.graph.edges(data=True):
            if a == b:
                raise TopologyError(f"node {a!r} has a link to itself; remove it")
            p = _link_problem(data.get("link"))
            if p:
                raise TopologyError(f"link {a}–{b}: {p}")
        if len(self.devices) > 1 or self.graph.number_of_nodes() > 1:
            for d in self.devices:
                if self.graph.degree(d) == 0:
                    raise TopologyError(f"device {d!r} has no link; connect it to a switch or another device")
        reach = nx.node_connected_component(self.graph, self.devices[0])
        for d in self.devices:
            if d not in reach:
                raise TopologyError(f"device {d!r} cannot be reached from {self.devices[0]!r}; link its part of the graph to the rest")
        if self._explicit is not None:
            _check_partitions(self._explicit, self.devices, "levels")

    # ------------------------------------------------------------------ routing
    def route(self, a: str, b: str) -> list[tuple[str, str]]:
        """Directed hops of the route a->b; [] if a == b."""
        key = (a, b)
        hops = self._route_cache.get(key)
        if hops is None:
            self._check_node(a)
            self._check_node(b)
            if a == b:
                hops = []
            else:
                path = self._path(a, b)
                hops = list(zip(path[:-1], path[1:]))
            if len(self._route_cache) >= _ROUTE_CACHE_MAX:
                self._route_cache.clear()
                self._cost_cache.clear()
                self._hops_cache.clear()
            self._route_cache[key] = hops
        return list(hops)

    def bandwidth_hops(self, a: str, b: str) -> tuple[tuple[tuple[str, str], float], ...]:
        """The hops of the route a->b whose link has a finite bandwidth, as ((u, v), bytes/s); () if a == b.
        Cached: the cost model's link-load bound walks the same routes for every plan it costs, and a networkx
        edge lookup per hop dominated it."""
        key = (a, b)
        out = self._hops_cache.get(key)
        if out is None:
            edges = self.graph.edges
            out = tuple(((u, v), bw) for u, v in self.route(a, b)
                        if math.isfinite(bw := edges[u, v]["link"].bandwidth_bytes_per_s))
            self._hops_cache[key] = out
        return out

    def _costs(self, a: str, b: str) -> tuple[float, float]:
        """(bottleneck bandwidth, total latency) of the route a->b."""
        key = (a, b)
        c = self._cost_cache.get(key)
        if c is None:
            hops = self.route(a, b)
            if not hops:
                c = (math.inf, 0.0)
            else:
                edges = self.graph.edges
                links = [edges[u, v]["link"] for u, v in hops]
                c = (min(l.bandwidth_bytes_per_s for l in links), float(sum(l.latency_s for l in links)))
            self._cost_cache[key] = c
        return c

    def path_bandwidth(self, a: str, b: str) -> float:
        """Bottleneck bandwidth (bytes/s, per direction) on the route a->b; inf if a == b."""
        return self._costs(a, b)[0]

    def path_latency(self, a: str, b: str) -> float:
        """Sum of link latencies (s) on the route a->b; 0 if a == b."""
        return self._costs(a, b)[1]

    def p2p_time_s(self, a: str, b: str, nbytes: float) -> float:
        """latency + nbytes / bottleneck bandwidth; 0 if a == b."""
        if nbytes < 0:
            raise TopologyError(f"cannot send {nbytes} bytes; the size must be >= 0")
        if a == b:
            self._check_node(a)
            return 0.0
        bw, lat = self._costs(a, b)
        return lat + nbytes / bw

    def ring_allreduce_time_s(self, devices: list[str], nbytes: float) -> float:
        """Ring all-reduce of ``nbytes`` over ``devices`` in the given ring order:
        2(n-1)·max neighbour latency + 2(n-1)/n · nbytes / min neighbour bottleneck bandwidth."""
        return self.ring_time_s(devices, nbytes, "allreduce")

    def ring_time_s(self, devices: list[str], nbytes: float, collective: str = "allreduce") -> float:
        """A ring ``collective`` (``allreduce``, ``all_gather`` or ``reduce_scatter``, ``topologies.ncclcost``'s
        names) of an ``nbytes`` tensor over ``devices`` in the given ring order: k(n-1)·max neighbour latency +
        k(n-1)/n · nbytes / min neighbour bottleneck bandwidth, k = 2 for an all-reduce and 1 for the others (half
        its steps); under ``collectives=nccl`` NCCL's model of that collective."""
        n = len(devices)
        if nbytes < 0:
            raise TopologyError(f"cannot all-reduce {nbytes} bytes; the size must be >= 0")
        if collective not in ncclcost.COLLECTIVES:
            raise TopologyError(f"unknown collective {collective!r}; use one of {', '.join(ncclcost.COLLECTIVES)}")
        if n <= 1:
            for d in devices:
                self._check_node(d)
            return 0.0
        max_lat = 0.0
        min_bw = math.inf
        for i in range(n):
            bw, lat = self._costs(devices[i], devices[(i + 1) % n])
            max_lat = max(max_lat, lat)
            min_bw = min(min_bw, bw)
        k = 2 if collective == "allreduce" else 1
        bandwidth_s = k * (n - 1) / n * nbytes / min_bw
        if self.collectives == "ideal" or nbytes <= 0:
            return k * (n - 1) * max_lat + bandwidth_s
        # NCCL's model (topologies.ncclcost), as the simulator runs it: the ring as one phase of its bytes over the
        # protocol's fraction, its latency NCCL's (never less than that phase's route latency)
        c = self.nccl_choice(list(devices), nbytes, bandwidth_s, collective)
        return c.time_s + max(0.0, max_lat - c.latency_s)

    def nccl_choice(self, devices: list[str], nbytes: float, bandwidth_s: float,
                    collective: str = "allreduce") -> "ncclcost.Choice":
        """What NCCL's model (``topologies.ncclcost.choose``) picks for a ring ``collective`` of ``nbytes`` among
        ``devices`` whose time on the links at full bandwidth, latencies left out, is ``bandwidth_s``: ranks, nodes
        (servers: ``domains(0)``) and the intra-node hardware class (NVLink when the first server holding 2+ of the
        devices joins them by NVLink/NVSwitch links only, else PCI) read off this topology."""
        where = self.server_index()
        groups: dict[int, list[str]] = {}
        for d in devices:
            groups.setdefault(where.get(d, -1 - len(groups)), []).append(d)
        intra = "nvlink"
        for g in groups.values():
            if len(g) > 1:
                kinds = {self.graph.edges[h]["link"].kind for h in self.route(g[0], g[1])}
                intra = "nvlink" if kinds <= set(ncclcost.NVLINK_KINDS) | {"ideal"} else "pci"
                break
        return ncclcost.choose(collective, len(devices), len(groups), nbytes, bandwidth_s, intra)

    def _tree_index(self) -> tuple[dict[str, str | None], dict[str, int]] | None:
        if self._tree is False:
            g = self.graph
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
                self._tree = (parent, depth)
            else:
                self._tree = None
        return self._tree  # type: ignore[return-value]

    def _path(self, a: str, b: str) -> list[str]:
        tree = self._tree_index()
        if tree is not None:
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
        path = self._dijkstra(a, b)
        if path is None:
            raise TopologyError(f"no route from {a!r} to {b!r} in topology {self.name!r}; link the two parts of the graph")
        return path

    def _dijkstra(self, src: str, dst: str) -> list[str] | None:
        """The route src->dst: least latency (in integer picoseconds, so sums are exact), then
        fewest hops, then the lexicographically smallest sequence of node names."""
        g = self.graph
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

    # ------------------------------------------------------------------ hierarchy
    def _hierarchy(self) -> list[list[list[str]]]:
        """Effective partitions, innermost first, strictly coarsening, ending with one group."""
        if self._hier is None:
            parts = self._explicit if self._explicit is not None else self._infer_partitions()
            prev_key = frozenset(frozenset([d]) for d in self.devices)
            out: list[list[list[str]]] = []
            for part in parts:
                key = frozenset(frozenset(g) for g in part)
                if key != prev_key:
                    out.append([list(g) for g in part])
                    prev_key = key
            everything = [list(self.devices)]
            if len(self.devices) > 1 and (not out or len(out[-1]) != 1):
                out.append(everything)
            if not out:
                out.append(everything)
            self._hier = out
        return self._hier

    def _infer_partitions(self) -> list[list[list[str]]]:
        bws = sorted({d["link"].bandwidth_bytes_per_s for _, _, d in self.graph.edges(data=True)}, reverse=True)
        tiers: list[float] = []  # threshold (lowest bandwidth) of each tier
        for bw in bws:
            if tiers and (bw == tiers[-1] or (math.isfinite(tiers[-1]) and bw * 1.5 >= tiers[-1])):
                tiers[-1] = bw
            else:
                tiers.append(bw)
        parts = []
        order = {d: i for i, d in enumerate(self.devices)}
        for t in tiers:
            sub = nx.Graph()
            sub.add_nodes_from(self.graph.nodes)
            sub.add_edges_from((u, v) for u, v, d in self.graph.edges(data=True) if d["link"].bandwidth_bytes_per_s >= t)
            groups = []
            for comp in nx.connected_components(sub):
                devs = sorted((n for n in comp if n in order), key=order.__getitem__)
                if devs:
                    groups.append(devs)
            groups.sort(key=lambda g: order[g[0]])
            parts.append(groups)
        return parts

    def levels(self) -> list[tuple[int, float]]:
        """Hierarchy innermost first: (sub-groups per group at this level, bandwidth at this level).
        E.g. 4 DGX servers of 8 GPUs -> [(8, nvswitch_bw), (4, ib_bw)]; flat -> [(n, bw)].
        The bandwidth of a level is the route bottleneck between the first devices of two of
        its sub-groups (the lowest over all groups of the level)."""
        if self._levels is None:
            hier = self._hierarchy()
            if len(self.devices) <= 1:
                self._levels = [(1, math.inf)]
                return list(self._levels)
            out = []
            prev_index = {d: i for i, d in enumerate(self.devices)}
            for part in hier:
                count = 0
                bw = math.inf
                for group in part:
                    subs: list[int] = []
                    first: dict[int, str] = {}
                    for d in group:
                        s = prev_index[d]
                        if s not in first:
                            first[s] = d
                            subs.append(s)
                    count = max(count, len(subs))
                    if len(subs) >= 2:
                        bw = min(bw, self.path_bandwidth(first[subs[0]], first[subs[1]]))
                out.append((count, bw))
                prev_index = {d: gi for gi, g in enumerate(part) for d in g}
            self._levels = out
        return list(self._levels)

    def server_index(self) -> dict[str, int]:
        """Device -> index of its group in ``domains(0)`` (its server). Cached and shared: read it, do not change it."""
        if self._server_index is None:
            self._server_index = {d: i for i, dom in enumerate(self._hierarchy()[0]) for d in dom}
        return self._server_index

    def domains(self, level: int) -> list[list[str]]:
        """Device groups at ``level`` of ``levels()`` (0 = innermost, e.g. one group per server)."""
        hier = self._hierarchy()
        if not isinstance(level, int) or not 0 <= level < len(hier):
            raise TopologyError(f"topology {self.name!r} has levels 0..{len(hier) - 1}; level {level!r} does not exist")
        return [list(g) for g in hier[level]]

    # ------------------------------------------------------------------ derived topologies
    def _derived(self, graph: nx.Graph) -> "Topology":
        return Topology(graph, self.name, self._explicit, self.collectives)

    def with_collectives(self, mode: str) -> "Topology":
        """A copy whose all-reduces are timed by ``mode`` ("ideal" or "nccl"; see ``__init__``)."""
        return Topology(self.graph, self.name, self._explicit, mode)

    def with_links(self, fn: Callable[[str, str, Link], Link]) -> "Topology":
        """A copy whose link on each edge (a, b) is ``fn(a, b, old_link)`` (a, b in ``links()`` order)."""
        g = self.graph.copy()
        for a, b, link in self.links():
            new = fn(a, b, link)
            p = _link_problem(new)
            if p:
                raise TopologyError(f"link {a}–{b}: {p}")
            g.edges[a, b]["link"] = new
        return self._derived(g)

    def with_link_params(self, *, kind: str | None = None, edge: tuple[str, str] | None = None,
                         bandwidth_bytes_per_s: float | None = None, latency_s: float | None = None) -> "Topology":
        """A copy where links of ``kind`` (or the one ``edge`` (a, b), either orientation; or all
        links if neither is given) get the given bandwidth and/or latency."""
        if edge is not None:
            a, b = edge
            if not self.graph.has_edge(a, b):
                raise TopologyError(f"no link between {a!r} and {b!r} in topology {self.name!r}; pick an existing edge")
        elif kind is not None and not any(l.kind == kind for _, _, l in self.links()):
            kinds = sorted({l.kind for _, _, l in self.links()})
            raise TopologyError(f"topology {self.name!r} has no {kind!r} links; its link kinds are {', '.join(kinds)}")
        target = frozenset(edge) if edge is not None else None

        def fn(u: str, v: str, link: Link) -> Link:
            if target is not None and frozenset((u, v)) != target:
                return link
            if target is None and kind is not None and link.kind != kind:
                return link
            changes: dict[str, float] = {}
            if bandwidth_bytes_per_s is not None:
                changes["bandwidth_bytes_per_s"] = bandwidth_bytes_per_s
            if latency_s is not None:
                changes["latency_s"] = latency_s
            return replace(link, **changes)

        return self.with_links(fn)

    def with_device_speed(self, speeds: dict[str, float]) -> "Topology":
        """A copy where each named device gets the given relative speed factor."""
        g = self.graph.copy()
        for name, s in speeds.items():
            if not self.has_device(name):
                raise TopologyError(f"cannot set the speed of unknown device {name!r}; topology {self.name!r} has {self._some_devices()}")
            if not _is_num(s) or not math.isfinite(s) or s <= 0:
                raise TopologyError(f"speed of device {name!r} must be a positive number (got {s!r})")
            g.nodes[name]["device"] = replace(g.nodes[name]["device"], speed=float(s))
        return self._derived(g)

    # ------------------------------------------------------------------ serialisation
    def _canonical_edges(self) -> list[tuple[str, str]]:
        pos = {n: i for i, n in enumerate(self.devices + self.switches)}
        edges = []
        for u, v in self.graph.edges():
            if pos[u] > pos[v]:
                u, v = v, u
            edges.append((u, v))
        edges.sort(key=lambda e: (pos[e[0]], pos[e[1]]))
        return edges

    def to_dict(self) -> dict:
        """The stable schema described in the module docstring."""
        devs = []
        for d in self.devices:
            dev = self.graph.nodes[d]["device"]
            devs.append({"name": dev.name, "kind": dev.kind, "memory_bytes": float(dev.memory_bytes),
                         "peak_flops": float(dev.peak_flops), "speed": float(dev.speed)})
        links = [{"a": a, "b": b, "kind": l.kind, "bandwidth_bytes_per_s": float(l.bandwidth_bytes_per_s),
                  "latency_s": float(l.latency_s)} for a, b, l in self.links()]
        out: dict[str, Any] = {"name": self.name, "devices": devs, "switches": list(self.switches), "links": links}
        if self.collectives != "ideal":
            out["collectives"] = self.collectives
        if self._explicit is not None:
            lv = self.levels()
            out["levels"] = [{"count": c, "bandwidth_bytes_per_s": float(bw), "domains": self.domains(i)}
                             for i, (c, bw) in enumerate(lv)]
        return out

    @classmethod
    def from_dict(cls, d: Any) -> "Topology":
        """Build and validate a topology from the schema; errors name the field."""
        if not isinstance(d, dict):
            raise TopologyError("a topology must be a mapping with 'devices' and 'links'")
        unknown = set(d) - {"name", "devices", "switches", "links", "levels", "collectives"}
        if unknown:
            raise TopologyError(f"unknown topology field(s) {', '.join(sorted(map(str, unknown)))}; "
                                "allowed: name, devices, switches, links, levels, collectives")
        name = d.get("name", "custom")
        if not isinstance(name, str):
            raise TopologyError("name must be a string")
        g = nx.Graph()
        devices = d.get("devices")
        if not isinstance(devices, list) or not devices:
            raise TopologyError("devices must be a non-empty list of {name, kind, memory_bytes, peak_flops, speed}")
        for i, item in enumerate(devices):
            where = f"devices[{i}]"
            if not isinstance(item, dict):
                raise TopologyError(f"{where} must be a mapping with at least a name")
            extra = set(item) - {"name", "kind", "memory_bytes", "peak_flops", "speed"}
            if extra:
                raise TopologyError(f"{where} has unknown field(s) {', '.join(sorted(map(str, extra)))}; "
                                    "allowed: name, kind, memory_bytes, peak_flops, speed")
            dname = _str_field(item, "name", where)
            if dname in g:
                raise TopologyError(f"{where}.name {dname!r} is used twice; device names must be unique")
            kw: dict[str, Any] = {}
            if "kind" in item:
                kw["kind"] = _str_field(item, "kind", where)
            for f in ("memory_bytes", "peak_flops", "speed"):
                if f in item:
                    kw[f] = _num_field(item, f, where, allow_inf=False)
            g.add_node(dname, device=Device(dname, **kw))
        switches = d.get("switches", []) or []
        if not isinstance(switches, list):
            raise TopologyError("switches must be a list of switch names")
        for i, s in enumerate(switches):
            if not isinstance(s, str) or not s:
                raise TopologyError(f"switches[{i}] must be a non-empty string")
            if s in g:
                raise TopologyError(f"switches[{i}] {s!r} is already a device or switch name; names must be unique")
            g.add_node(s, switch=True)
        links = d.get("links")
        if not isinstance(links, list):
            raise TopologyError("links must be a list of {a, b, kind, bandwidth_bytes_per_s, latency_s}")
        for i, item in enumerate(links):
            where = f"links[{i}]"
            if not isinstance(item, dict):
                raise TopologyError(f"{where} must be a mapping with a, b, kind, bandwidth_bytes_per_s, latency_s")
            extra = set(item) - {"a", "b", "kind", "bandwidth_bytes_per_s", "latency_s"}
            if extra:
                raise TopologyError(f"{where} has unknown field(s) {', '.join(sorted(map(str, extra)))}; "
                                    "allowed: a, b, kind, bandwidth_bytes_per_s, latency_s")
            a = _str_field(item, "a", where)
            b = _str_field(item, "b", where)
            for end, n in (("a", a), ("b", b)):
                if n not in g:
                    raise TopologyError(f"{where}.{end} names unknown node {n!r}; declare it under devices or switches")
            if a == b:
                raise TopologyError(f"{where} links {a!r} to itself; a link needs two different ends")
            if g.has_edge(a, b):
                raise TopologyError(f"{where} repeats the link {a}–{b}; give each pair one link")
            kind = _str_field(item, "kind", where)
            if kind not in LINK_KINDS:
                raise TopologyError(f"{where}.kind {kind!r} is unknown; use one of {', '.join(LINK_KINDS)}")
            bw = _num_field(item, "bandwidth_bytes_per_s", where, allow_inf=True)
            lat = _num_field(item, "latency_s", where, allow_inf=False, allow_zero=True)
            g.add_edge(a, b, link=Link(kind, bw, lat))
        levels = None
        if d.get("levels") is not None:
            lv = d["levels"]
            if not isinstance(lv, list):
                raise TopologyError("levels must be a list of {domains: [[device, ...], ...]}, innermost first")
            levels = []
            for i, item in enumerate(lv):
                doms = item.get("domains") if isinstance(item, dict) else None
                if not isinstance(doms, list) or not all(isinstance(x, list) for x in doms):
                    raise TopologyError(f"levels[{i}].domains must be a list of lists of device names")
                levels.append(doms)
        topo = cls(g, name, levels, d.get("collectives", "ideal"))
        topo.validate()
        return topo

    def save(self, path: str | Path) -> None:
        """Write to ``path``: YAML for .yaml/.yml, JSON for .json."""
        p = Path(path)
        fmt = _format_of(p)
        d = self.to_dict()
        if fmt == "json":
            text = json.dumps(_inf_to_str(d), indent=1) + "\n"
        else:
            import yaml
            text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=120)
        output_path(p).write_text(text)

    @classmethod
    def load(cls, path: str | Path) -> "Topology":
        """Read a .yaml/.yml/.json file; malformed content raises TopologyError naming the field."""
        p = Path(path)
        fmt = _format_of(p)
        try:
            text = p.read_text()
        except FileNotFoundError:
            raise TopologyError(f"topology file {str(p)!r} not found; give a preset (e.g. dgx:servers=2) or an existing file") from None
        except OSError as e:
            raise TopologyError(f"cannot read topology file {str(p)!r}: {e.strerror}") from None
        try:
            if fmt == "json":
                data = json.loads(text)
            else:
                import yaml
                data = yaml.safe_load(text)
        except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TopologyError(f"topology file {str(p)!r} is not valid {fmt.upper()}: {first}") from None
        try:
            return cls.from_dict(data)
        except TopologyError as e:
            raise TopologyError(f"topology file {str(p)!r}: {e.args[0]}") from None


# ---------------------------------------------------------------------- helpers
def _check_partitions(parts: list[list[list[str]]], devices: list[str], where: str) -> None:
    devset = set(devices)
    prev: dict[str, int] | None = None
    for i, part in enumerate(parts):
        seen: dict[str, int] = {}
        for gi, group in enumerate(part):
            if not group:
                raise TopologyError(f"{where}[{i}].domains[{gi}] is empty; remove it")
            for d in group:
                if d not in devset:
                    raise TopologyError(f"{where}[{i}].domains names unknown device {d!r}")
                if d in seen:
                    raise TopologyError(f"{where}[{i}].domains lists device {d!r} twice; each device belongs to one domain")
                seen[d] = gi
        missing = [d for d in devices if d not in seen]
        if missing:
            raise TopologyError(f"{where}[{i}].domains must cover every device; {missing[0]!r} is in none")
        if prev is not None:
            # every previous domain must lie inside one domain of this level
            owner: dict[int, int] = {}
            for d, pg in prev.items():
                if owner.setdefault(pg, seen[d]) != seen[d]:
                    raise TopologyError(f"{where}[{i}].domains split a domain of level {i - 1} (at device {d!r}); "
                                        "each level must group whole domains of the level below")
        prev = seen


def _str_field(item: dict, field: str, where: str) -> str:
    v = item.get(field)
    if not isinstance(v, str) or not v:
        raise TopologyError(f"{where}.{field} must be a non-empty string (got {v!r})")
    return v


def _num_field(item: dict, field: str, where: str, *, allow_inf: bool, allow_zero: bool = False) -> float:
    v = item.get(field)
    x: float | None = None
    if _is_num(v):
        x = float(v)
    elif isinstance(v, str):
        try:
            x = float(v)
        except ValueError:
            x = None
    need = "a number >= 0" if allow_zero else "a positive number"
    if x is None or math.isnan(x) or (x < 0 if allow_zero else x <= 0) or (math.isinf(x) and not allow_inf):
        raise TopologyError(f"{where}.{field} must be {need}{' (inf allowed)' if allow_inf else ''} (got {v!r})")
    return x


def _format_of(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise TopologyError(f"topology file {str(p)!r} must end in .yaml, .yml or .json")


def _inf_to_str(x: Any) -> Any:
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, dict):
        return {k: _inf_to_str(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_inf_to_str(v) for v in x]
    return x
