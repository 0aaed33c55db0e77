"""Named interconnects and the clusters they make: ``dgx-ib200`` × 16 devices × ``h100`` → a Topology.

The vocabulary a capacity sweep speaks (``parse_interconnect``)::

    dgx-ib<G>       8-GPU NVSwitch servers, one InfiniBand NIC of G Gbit/s each, one IB switch
    pcie-eth<G>     4-GPU PCIe servers (12 GB/s), one Ethernet link of G Gbit/s each, one switch
    pcie8-eth<G>    the same with 8 GPUs per server
    fattree-ib<G>   8-GPU NVSwitch servers, 4 per leaf, non-blocking two-level IB fat tree, G Gbit/s
    ideal           every device on one switch, infinite bandwidth (an upper bound)

A device count that is not whole servers (above one server) is refused with a TopologyError.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import networkx as nx

from topologies.devices import device_kind, make_device
from topologies.presets import dgx, fattree, ideal, pcie
from topologies.errors import TopologyError
from topologies.topology import Topology

__all__ = ["Interconnect", "parse_interconnect", "build_cluster", "INTERCONNECT_HELP"]

INTERCONNECT_HELP = ("dgx-ib<Gbit/s> (8-GPU NVSwitch servers on InfiniBand), pcie-eth<Gbit/s> (4-GPU PCIe servers "
                     "on Ethernet; pcie8-eth<G> for 8), fattree-ib<Gbit/s> (NVSwitch servers in a fat tree), ideal")


@dataclass(frozen=True)
class Interconnect:
    """A named way of joining devices into a cluster.

    Attributes:
        name: the spelling the user gave (normalised to lower case).
        family: "dgx", "pcie", "fattree" or "ideal".
        gbps: the inter-server link in Gbit/s (0 for ideal).
        per_server: devices per server.
    """

    name: str
    family: str
    gbps: float
    per_server: int


_IC_RE = re.compile(r"^(dgx|pcie|pcie8|fattree)-(ib|eth)(\d+(?:\.\d+)?)$")
_IC_FABRIC = {"dgx": "ib", "fattree": "ib", "pcie": "eth", "pcie8": "eth"}
_PER_SERVER = {"dgx": 8, "fattree": 8, "pcie": 4, "pcie8": 8}


def parse_interconnect(name: str) -> Interconnect:
    """``dgx-ib200`` -> Interconnect("dgx-ib200", "dgx", 200, 8); see the module docstring for the vocabulary."""
    text = str(name).strip().lower()
    if text == "ideal":
        return Interconnect(text, "ideal", 0.0, 1)
    m = _IC_RE.match(text)
    if not m or _IC_FABRIC[m.group(1)] != m.group(2) or float(m.group(3)) <= 0:
        raise TopologyError(f"unknown interconnect {name!r}; use {INTERCONNECT_HELP}")
    fam = m.group(1)
    return Interconnect(text, "pcie" if fam == "pcie8" else fam, float(m.group(3)), _PER_SERVER[fam])


def build_cluster(interconnect: str | Interconnect, devices: int, kind: str) -> Topology:
    """The topology of ``devices`` devices of ``kind`` joined by ``interconnect``.

    Raises:
        TopologyError: an unknown interconnect or kind, or a count that is not a whole number of servers
            (above one server).
    """
    ic = interconnect if isinstance(interconnect, Interconnect) else parse_interconnect(interconnect)
    if devices < 1:
        raise TopologyError(f"device count must be >= 1 (got {devices})")
    k = device_kind(kind).name
    if ic.family == "ideal":
        return _with_kind(ideal(devices, name=f"ideal:{devices}"), k)
    gpus = min(devices, ic.per_server)
    if devices % gpus:
        raise TopologyError(f"{devices} devices are not whole {ic.per_server}-device servers of {ic.name}")
    servers = devices // gpus
    if ic.family == "dgx":
        return dgx(servers, gpus, k, ic.gbps)
    if ic.family == "pcie":
        return pcie(servers, gpus, k, ic.gbps)
    return fattree(devices, gpus, k, ic.gbps, leaf=4)


def _with_kind(topo: Topology, kind: str) -> Topology:
    """An ideal topology whose devices are of catalogue ``kind``."""
    g = nx.Graph(topo.graph)
    for n in topo.devices:
        g.nodes[n]["device"] = make_device(n, kind)
    return Topology(g, f"{topo.name},kind={kind}", [[list(topo.devices)]])
