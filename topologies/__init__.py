"""pipetwin: topologies package — devices, switches and links of a cluster, presets, YAML/JSON files.

    from topologies import load_topology
    topo = load_topology("dgx:servers=4")      # or "ideal:8", "local:2", "pipedream-a", a .yaml file
    topo.levels()                              # [(8, 3e11), (4, 2.5e10)]
    topo.p2p_time_s("s0g0", "s1g0", 1 << 20)
"""
from topologies.errors import TopologyError
from topologies.records import LINK_KINDS, Device, Link
from topologies.topology import Topology
from topologies.devices import DEVICE_KINDS, DeviceKind, device_kind, make_device
from topologies.presets import (PRESETS, dgx, fattree, hierarchical, ideal, load_topology, local, parse_hier,
                                pcie, pipedream_a, pipedream_b)

__all__ = ["TopologyError", "Device", "Link", "Topology", "LINK_KINDS", "DeviceKind", "DEVICE_KINDS", "device_kind",
           "make_device", "load_topology", "PRESETS", "ideal", "local", "dgx", "pcie", "pipedream_a", "pipedream_b",
           "fattree", "hierarchical", "parse_hier"]
