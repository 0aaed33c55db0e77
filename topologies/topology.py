"""The cluster as a graph: devices, switches and links, with routes, path costs and hierarchy levels.

A :class:`Topology` wraps an undirected ``networkx.Graph``:

* a device node carries ``device=Device(...)`` (the node name equals ``Device.name``);
* a switch node carries ``switch=True``;
* every edge carries ``link=Link(...)``. Links are full duplex: ``bandwidth_bytes_per_s`` is
  per direction, so a route a->b and a route b->a do not share capacity.

The graph is treated as immutable once wrapped: derive new topologies with
:meth:`Topology.with_links`, :meth:`Topology.with_link_params` or
:meth:`Topology.with_device_speed` instead of mutating ``graph``.

The class keeps the caches and the questions asked of a cluster; the answers' parts are rooms of their own:
the records and their checks (``topologies.records``), routes (``topologies.routing``: deterministic, through
the tree where the graph is one), the hierarchy levels (``topologies.hierarchy``: given or inferred from
bandwidth tiers), ring collective times (``topologies.ringtime``) and the file schema (``topologies.schema``).
"""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import networkx as nx

from topologies import ncclcost, ringtime, schema
from topologies.errors import TopologyError
from topologies.hierarchy import check_partitions, effective_hierarchy, infer_partitions, level_table
from topologies.ncclcost import COLLECTIVE_MODES
from topologies.records import Device, Link, device_problem, is_num, link_problem
from topologies.routing import TreeIndex, least_latency_path, tree_index, tree_path

__all__ = ["Topology"]

_ROUTE_CACHE_MAX = 1 << 18


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
        self._tree: TreeIndex | None | bool = False  # False = not computed
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

    def check_node(self, n: str) -> None:
        """Raise TopologyError unless ``n`` is a node (device or switch) of this topology."""
        if not isinstance(n, str) or n not in self.graph:
            raise TopologyError(f"unknown device {n!r} in topology {self.name!r}; it has {self._some_devices()}")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise TopologyError on the first problem: no devices, a bad device value, a bad link,
        a device with no link, or a device unreachable from the first device."""
        if not self.devices:
            raise TopologyError(f"topology {self.name!r} has no devices; add at least one device")
        for d in self.devices:
            p = device_problem(self.graph.nodes[d]["device"])
            if p:
                raise TopologyError(f"device {d!r}: {p}")
        for a, b, data in self.graph.edges(data=True):
            if a == b:
                raise TopologyError(f"node {a!r} has a link to itself; remove it")
            p = link_problem(data.get("link"))
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
            check_partitions(self._explicit, self.devices, "levels")

    # ------------------------------------------------------------------ routing
    def route(self, a: str, b: str) -> list[tuple[str, str]]:
        """Directed hops of the route a->b; [] if a == b."""
        key = (a, b)
        hops = self._route_cache.get(key)
        if hops is None:
            self.check_node(a)
            self.check_node(b)
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

    def route_costs(self, a: str, b: str) -> tuple[float, float]:
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
        return self.route_costs(a, b)[0]

    def path_latency(self, a: str, b: str) -> float:
        """Sum of link latencies (s) on the route a->b; 0 if a == b."""
        return self.route_costs(a, b)[1]

    def p2p_time_s(self, a: str, b: str, nbytes: float) -> float:
        """latency + nbytes / bottleneck bandwidth; 0 if a == b."""
        if nbytes < 0:
            raise TopologyError(f"cannot send {nbytes} bytes; the size must be >= 0")
        if a == b:
            self.check_node(a)
            return 0.0
        bw, lat = self.route_costs(a, b)
        return lat + nbytes / bw

    def ring_allreduce_time_s(self, devices: list[str], nbytes: float) -> float:
        """Ring all-reduce of ``nbytes`` over ``devices`` in the given ring order:
        2(n-1)·max neighbour latency + 2(n-1)/n · nbytes / min neighbour bottleneck bandwidth."""
        return self.ring_time_s(devices, nbytes, "allreduce")

    def ring_time_s(self, devices: list[str], nbytes: float, collective: str = "allreduce") -> float:
        """A ring ``collective`` (``allreduce``, ``all_gather`` or ``reduce_scatter``) of an ``nbytes`` tensor over
        ``devices`` in the given ring order, on these links (``topologies.ringtime.ring_time_s``)."""
        return ringtime.ring_time_s(self, devices, nbytes, collective)

    def nccl_choice(self, devices: list[str], nbytes: float, bandwidth_s: float,
                    collective: str = "allreduce") -> ncclcost.Choice:
        """What NCCL's model picks for a ring ``collective`` among ``devices`` whose time on the links at full
        bandwidth is ``bandwidth_s`` (``topologies.ringtime.nccl_choice``)."""
        return ringtime.nccl_choice(self, devices, nbytes, bandwidth_s, collective)

    def _tree_index(self) -> TreeIndex | None:
        if self._tree is False:
            self._tree = tree_index(self.graph)
        return self._tree  # type: ignore[return-value]

    def _path(self, a: str, b: str) -> list[str]:
        tree = self._tree_index()
        if tree is not None:
            return tree_path(tree, a, b)
        path = least_latency_path(self.graph, a, b)
        if path is None:
            raise TopologyError(f"no route from {a!r} to {b!r} in topology {self.name!r}; link the two parts of the graph")
        return path

    # ------------------------------------------------------------------ hierarchy
    def _hierarchy(self) -> list[list[list[str]]]:
        """Effective partitions, innermost first, strictly coarsening, ending with one group."""
        if self._hier is None:
            parts = self._explicit if self._explicit is not None else infer_partitions(self.graph, self.devices)
            self._hier = effective_hierarchy(parts, self.devices)
        return self._hier

    def levels(self) -> list[tuple[int, float]]:
        """Hierarchy innermost first: (sub-groups per group at this level, bandwidth at this level).
        E.g. 4 DGX servers of 8 GPUs -> [(8, nvswitch_bw), (4, ib_bw)]; flat -> [(n, bw)].
        The bandwidth of a level is the route bottleneck between the first devices of two of
        its sub-groups (the lowest over all groups of the level; ``topologies.hierarchy.level_table``)."""
        if self._levels is None:
            self._levels = level_table(self._hierarchy(), self.devices, self.path_bandwidth)
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
            p = link_problem(new)
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
            if not is_num(s) or not math.isfinite(s) or s <= 0:
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
        """The stable schema ``topologies.schema`` describes."""
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
        """Build and validate a topology from the schema (``topologies.schema``); errors name the field."""
        topo = cls(*schema.parse(d))
        topo.validate()
        return topo

    def save(self, path: str | Path) -> None:
        """Write to ``path``: YAML for .yaml/.yml, JSON for .json."""
        schema.write(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "Topology":
        """Read a .yaml/.yml/.json file; malformed content raises TopologyError naming the field."""
        data = schema.read(path)
        try:
            return cls.from_dict(data)
        except TopologyError as e:
            raise TopologyError(f"topology file {str(Path(path))!r}: {e.args[0]}") from None
