"""A topology's hierarchy: partitions of its devices, innermost first, and the (count, bandwidth) of each level.

The hierarchy (``Topology.levels()``/``Topology.domains()``) is either given explicitly (presets and files
with a ``levels`` section carry it; :func:`check_partitions` checks it) or inferred from link bandwidths
(:func:`infer_partitions`): devices joined by links of a bandwidth tier form a domain at that tier
(bandwidths within a factor 1.5 of each other count as one tier). Either way :func:`effective_hierarchy`
keeps the strictly coarsening levels and ends them with one group of every device, and :func:`level_table`
reads each level's fan-out and bandwidth off it.
"""
from __future__ import annotations

import math
from typing import Callable

import networkx as nx

from topologies.errors import TopologyError

__all__ = ["check_partitions", "infer_partitions", "effective_hierarchy", "level_table"]


def check_partitions(parts: list[list[list[str]]], devices: list[str], where: str) -> None:
    """Raise TopologyError unless each of ``parts`` partitions ``devices`` and each groups whole domains of the
    one before (``where`` names the field in the message)."""
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


def infer_partitions(graph: nx.Graph, devices: list[str]) -> list[list[list[str]]]:
    """One partition of ``devices`` per bandwidth tier of ``graph``'s links, fastest first: the devices the links of
    that tier or faster connect (groups in device order)."""
    bws = sorted({d["link"].bandwidth_bytes_per_s for _, _, d in graph.edges(data=True)}, reverse=True)
    tiers: list[float] = []  # threshold (lowest bandwidth) of each tier
    for bw in bws:
        if tiers and (bw == tiers[-1] or (math.isfinite(tiers[-1]) and bw * 1.5 >= tiers[-1])):
            tiers[-1] = bw
        else:
            tiers.append(bw)
    parts = []
    order = {d: i for i, d in enumerate(devices)}
    for t in tiers:
        sub = nx.Graph()
        sub.add_nodes_from(graph.nodes)
        sub.add_edges_from((u, v) for u, v, d in graph.edges(data=True) if d["link"].bandwidth_bytes_per_s >= t)
        groups = []
        for comp in nx.connected_components(sub):
            devs = sorted((n for n in comp if n in order), key=order.__getitem__)
            if devs:
                groups.append(devs)
        groups.sort(key=lambda g: order[g[0]])
        parts.append(groups)
    return parts


def effective_hierarchy(parts: list[list[list[str]]], devices: list[str]) -> list[list[list[str]]]:
    """Effective partitions, innermost first, strictly coarsening, ending with one group."""
    prev_key = frozenset(frozenset([d]) for d in devices)
    out: list[list[list[str]]] = []
    for part in parts:
        key = frozenset(frozenset(g) for g in part)
        if key != prev_key:
            out.append([list(g) for g in part])
            prev_key = key
    everything = [list(devices)]
    if len(devices) > 1 and (not out or len(out[-1]) != 1):
        out.append(everything)
    if not out:
        out.append(everything)
    return out


def level_table(hier: list[list[list[str]]], devices: list[str],
                path_bandwidth: Callable[[str, str], float]) -> list[tuple[int, float]]:
    """(sub-groups per group, bandwidth) of each level of ``hier``: the bandwidth of a level is the route bottleneck
    (``path_bandwidth``) between the first devices of two of its sub-groups, the lowest over all groups of the level;
    one device -> [(1, inf)]."""
    if len(devices) <= 1:
        return [(1, math.inf)]
    out = []
    prev_index = {d: i for i, d in enumerate(devices)}
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
                bw = min(bw, path_bandwidth(first[subs[0]], first[subs[1]]))
        out.append((count, bw))
        prev_index = {d: gi for gi, g in enumerate(part) for d in g}
    return out
