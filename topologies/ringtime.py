"""Ring collectives timed on a topology's links: the link model's closed form, or NCCL's model
(``topologies.ncclcost``) with its inputs — ranks, servers, the intra-server link class — read off the topology.

``Topology.ring_time_s``, ``Topology.ring_allreduce_time_s`` and ``Topology.nccl_choice`` are these functions,
asked of the topology (the cost model, the simulator and the validation time their rings through them).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from topologies import ncclcost
from topologies.errors import TopologyError

if TYPE_CHECKING:  # topologies.topology imports this module
    from topologies.topology import Topology

__all__ = ["ring_time_s", "nccl_choice"]


def ring_time_s(topo: "Topology", devices: list[str], nbytes: float, collective: str = "allreduce") -> float:
    """A ring ``collective`` (``allreduce``, ``all_gather`` or ``reduce_scatter``, ``topologies.ncclcost``'s
    names) of an ``nbytes`` tensor over ``devices`` of ``topo`` in the given ring order: k(n-1)·max neighbour
    latency + k(n-1)/n · nbytes / min neighbour bottleneck bandwidth, k = 2 for an all-reduce and 1 for the others
    (half its steps); under ``collectives=nccl`` NCCL's model of that collective."""
    n = len(devices)
    if nbytes < 0:
        raise TopologyError(f"cannot all-reduce {nbytes} bytes; the size must be >= 0")
    if collective not in ncclcost.COLLECTIVES:
        raise TopologyError(f"unknown collective {collective!r}; use one of {', '.join(ncclcost.COLLECTIVES)}")
    if n <= 1:
        for d in devices:
            topo.check_node(d)
        return 0.0
    max_lat = 0.0
    min_bw = math.inf
    for i in range(n):
        bw, lat = topo.route_costs(devices[i], devices[(i + 1) % n])
        max_lat = max(max_lat, lat)
        min_bw = min(min_bw, bw)
    k = 2 if collective == "allreduce" else 1
    bandwidth_s = k * (n - 1) / n * nbytes / min_bw
    if topo.collectives == "ideal" or nbytes <= 0:
        return k * (n - 1) * max_lat + bandwidth_s
    # NCCL's model (topologies.ncclcost), as the simulator runs it: the ring as one phase of its bytes over the
    # protocol's fraction, its latency NCCL's (never less than that phase's route latency)
    c = nccl_choice(topo, list(devices), nbytes, bandwidth_s, collective)
    return c.time_s + max(0.0, max_lat - c.latency_s)


def nccl_choice(topo: "Topology", devices: list[str], nbytes: float, bandwidth_s: float,
                collective: str = "allreduce") -> ncclcost.Choice:
    """What NCCL's model (``topologies.ncclcost.choose``) picks for a ring ``collective`` of ``nbytes`` among
    ``devices`` whose time on the links at full bandwidth, latencies left out, is ``bandwidth_s``: ranks, nodes
    (servers: ``topo.domains(0)``) and the intra-node hardware class (NVLink when the first server holding 2+ of the
    devices joins them by NVLink/NVSwitch links only, else PCI) read off ``topo``."""
    where = topo.server_index()
    groups: dict[int, list[str]] = {}
    for d in devices:
        groups.setdefault(where.get(d, -1 - len(groups)), []).append(d)
    intra = "nvlink"
    for g in groups.values():
        if len(g) > 1:
            kinds = {topo.graph.edges[h]["link"].kind for h in topo.route(g[0], g[1])}
            intra = "nvlink" if kinds <= set(ncclcost.NVLINK_KINDS) | {"ideal"} else "pci"
            break
    return ncclcost.choose(collective, len(devices), len(groups), nbytes, bandwidth_s, intra)
