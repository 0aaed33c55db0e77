"""Preset clusters and the spec strings that name them.

Spec grammar (``load_topology``); every argument is optional::

    spec      := PRESET [":" args] | PATH(.yaml|.yml|.json)
    args      := arg ("," arg)*
    arg       := KEY "=" VALUE | VALUE            # a bare VALUE sets the preset's first key

    ideal:N                  N devices d0..d{N-1} on one switch, infinite bandwidth, zero latency (N=4)
    local:N                  N CPU worker processes over loopback; d0.., kind cpu (N=2)
    dgx:servers=S,gpus=8,kind=a100-80gb,ib=200
                             NVSwitch servers (GPU–NVSwitch links at the kind's NVLink bandwidth),
                             one InfiniBand NIC per server (ib Gbit/s) to one IB switch (S=2)
    pcie:servers=S,gpus=4,kind=v100,eth=10
                             GPUs on a PCIe switch per server (12 GB/s), servers on Ethernet (eth Gbit/s) (S=2)
    pipedream-a[:servers=4,gpus=4,kind=v100]
                             PipeDream Cluster-A: 4 servers of 4 V100 on PCIe, 10 Gbit/s Ethernet
    pipedream-b[:servers=4,gpus=8,kind=v100]
                             PipeDream Cluster-B: 4 servers of 8 V100 on NVLink, 25 Gbit/s Ethernet
                             (the paper's 2 x 8 is servers=2; its 16 GB cards kind=v100-16gb)
    fattree:gpus=N,per_server=8,kind=h100,ib=400,leaf=4,spines=LEAF
                             NVSwitch servers, `leaf` servers per leaf switch, every leaf linked to
                             every spine switch (non-blocking with spines=leaf) (N=64)
    hier:C@KIND:BW[:LAT],C@KIND:BW[:LAT],...[,kind=DEVICEKIND]
                             generic hierarchy, innermost first: C children per group joined by a
                             switch over KIND links (nvlink, nvswitch, pcie, ib|infiniband,
                             eth|ethernet, loopback, ideal) of BW bytes/s and LAT s (default per kind)
    hier:8x32x4              counts only: level 0 nvswitch 300e9, level 1 infiniband 25e9,
                             higher levels ethernet 12.5e9

Device names: ``d{i}`` for ideal, local and hier; ``s{server}g{gpu}`` for dgx, pcie,
pipedream-a/b and fattree. Switches: ``switch`` (ideal), ``localhost`` (local),
``s{i}-nvswitch``/``s{i}-nvlink``/``s{i}-pcie`` (per server), ``ib-switch``/``eth-switch``,
``leaf{j}``/``spine{k}`` (fattree), ``sw{level}.{j}`` (hier). Every preset records its
hierarchy, so ``levels()`` reports servers, leaves/racks and the whole cluster.
"""
from __future__ import annotations

import math
import os
from typing import Callable

import networkx as nx

from topologies.devices import device_kind, make_device
from topologies.ncclcost import COLLECTIVE_MODES
from topologies.errors import TopologyError
from topologies.records import LINK_KINDS, Device, Link
from topologies.topology import Topology

__all__ = ["load_topology", "PRESETS", "PRESET_HELP", "presets_help", "ideal", "local", "dgx", "pcie", "pipedream_a", "pipedream_b",
           "fattree", "hierarchical", "parse_hier", "DEFAULT_LATENCY_S", "gbit"]

#: Per-link latency used when a spec gives none, by link kind.
DEFAULT_LATENCY_S: dict[str, float] = {
    "nvlink": 2e-6, "nvswitch": 2e-6, "pcie": 5e-6, "infiniband": 5e-6,
    "ethernet": 25e-6, "loopback": 10e-6, "ideal": 0.0,
}
PCIE_BYTES_PER_S = 12e9
LOOPBACK_BYTES_PER_S = 5e9
_LINK_ALIASES = {"ib": "infiniband", "eth": "ethernet", "nvs": "nvswitch", "lo": "loopback"}


def gbit(x: float) -> float:
    """Gbit/s -> bytes/s."""
    return float(x) * 1e9 / 8


# ---------------------------------------------------------------------- builders
def _star(name: str, devices: list[Device], hub: str, link: Link) -> Topology:
    g = nx.Graph()
    for d in devices:
        g.add_node(d.name, device=d)
    g.add_node(hub, switch=True)
    for d in devices:
        g.add_edge(d.name, hub, link=link)
    topo = Topology(g, name, [[[d.name for d in devices]]])
    topo.validate()
    return topo


def ideal(n: int = 4, name: str | None = None) -> Topology:
    """n devices d0.. on one switch over links of infinite bandwidth and zero latency."""
    _positive_int(n, "ideal", "N")
    return _star(name or f"ideal:{n}", [Device(f"d{i}") for i in range(n)], "switch",
                 Link("ideal", math.inf, 0.0))


def local(n: int = 2, name: str | None = None) -> Topology:
    """n CPU worker processes on this machine over loopback (5 GB/s, 20 us device to device)."""
    _positive_int(n, "local", "N")
    return _star(name or f"local:{n}", [make_device(f"d{i}", "cpu") for i in range(n)], "localhost",
                 Link("loopback", LOOPBACK_BYTES_PER_S, DEFAULT_LATENCY_S["loopback"]))


def _server_cluster(name: str, servers: int, gpus: int, kind: str, hub_suffix: str, intra: Link,
                    inter_switch: str, inter: Link) -> Topology:
    g = nx.Graph()
    groups = []
    for s in range(servers):
        group = []
        for j in range(gpus):
            dev = make_device(f"s{s}g{j}", kind)
            g.add_node(dev.name, device=dev)
            group.append(dev.name)
        groups.append(group)
    for s in range(servers):
        g.add_node(f"s{s}-{hub_suffix}", switch=True)
    if servers > 1:
        g.add_node(inter_switch, switch=True)
    for s, group in enumerate(groups):
        hub = f"s{s}-{hub_suffix}"
        for d in group:
            g.add_edge(d, hub, link=intra)
        if servers > 1:
            g.add_edge(hub, inter_switch, link=inter)
    topo = Topology(g, name, [groups, [[d for grp in groups for d in grp]]])
    topo.validate()
    return topo


def dgx(servers: int = 2, gpus: int = 8, kind: str = "a100-80gb", ib: float = 200, name: str | None = None) -> Topology:
    """NVSwitch servers ``s{i}g{j}``; one InfiniBand NIC of ``ib`` Gbit/s per server to one IB switch."""
    _positive_int(servers, "dgx", "servers")
    _positive_int(gpus, "dgx", "gpus")
    k = device_kind(kind)
    _positive_num(ib, "dgx", "ib")
    nv = k.nvlink_bytes_per_s or PCIE_BYTES_PER_S
    return _server_cluster(name or f"dgx:servers={servers},gpus={gpus},kind={k.name},ib={_fmt(ib)}",
                           servers, gpus, k.name, "nvswitch", Link("nvswitch", nv, DEFAULT_LATENCY_S["nvswitch"]),
                           "ib-switch", Link("infiniband", gbit(ib), DEFAULT_LATENCY_S["infiniband"]))


def pcie(servers: int = 2, gpus: int = 4, kind: str = "v100", eth: float = 10, name: str | None = None) -> Topology:
    """GPUs ``s{i}g{j}`` on a PCIe switch per server (12 GB/s); servers on ``eth`` Gbit/s Ethernet."""
    _positive_int(servers, "pcie", "servers")
    _positive_int(gpus, "pcie", "gpus")
    k = device_kind(kind)
    _positive_num(eth, "pcie", "eth")
    return _server_cluster(name or f"pcie:servers={servers},gpus={gpus},kind={k.name},eth={_fmt(eth)}",
                           servers, gpus, k.name, "pcie", Link("pcie", PCIE_BYTES_PER_S, DEFAULT_LATENCY_S["pcie"]),
                           "eth-switch", Link("ethernet", gbit(eth), DEFAULT_LATENCY_S["ethernet"]))


def pipedream_a(servers: int = 4, gpus: int = 4, name: str | None = None, kind: str = "v100") -> Topology:
    """PipeDream paper Cluster-A: 4-V100 PCIe servers on 10 Gbit/s Ethernet (the paper's cards: kind="v100-16gb")."""
    default = (servers, gpus, device_kind(kind).name) == (4, 4, "v100")
    return pcie(servers, gpus, kind, 10, name=name or ("pipedream-a" if default
                                                       else f"pipedream-a:servers={servers},gpus={gpus},kind={device_kind(kind).name}"))


def pipedream_b(servers: int = 4, gpus: int = 8, name: str | None = None, kind: str = "v100") -> Topology:
    """PipeDream paper Cluster-B: 8-V100 NVLink servers (modelled as a per-server NVLink hub at the
    V100's 150 GB/s) on 25 Gbit/s Ethernet. Four servers by default; the paper's 2 x 8 is ``servers=2``,
    its 16 GB cards ``kind="v100-16gb"``."""
    _positive_int(servers, "pipedream-b", "servers")
    _positive_int(gpus, "pipedream-b", "gpus")
    k = device_kind(kind)
    default = (servers, gpus, k.name) == (4, 8, "v100")
    return _server_cluster(name or ("pipedream-b" if default else f"pipedream-b:servers={servers},gpus={gpus},kind={k.name}"),
                           servers, gpus, k.name, "nvlink", Link("nvlink", k.nvlink_bytes_per_s, DEFAULT_LATENCY_S["nvlink"]),
                           "eth-switch", Link("ethernet", gbit(25), DEFAULT_LATENCY_S["ethernet"]))


def fattree(gpus: int = 64, per_server: int = 8, kind: str = "h100", ib: float = 400, leaf: int = 4,
            spines: int | None = None, name: str | None = None) -> Topology:
    """Two-level InfiniBand fat tree of NVSwitch servers: ``leaf`` servers per leaf switch, every
    leaf linked to every spine (``spines`` defaults to ``leaf``: non-blocking). All IB links ``ib`` Gbit/s."""
    for v, key in ((gpus, "gpus"), (per_server, "per_server"), (leaf, "leaf")):
        _positive_int(v, "fattree", key)
    if spines is None:
        spines = leaf
    _positive_int(spines, "fattree", "spines")
    _positive_num(ib, "fattree", "ib")
    if gpus % per_server:
        raise TopologyError(f"fattree: gpus={gpus} is not a multiple of per_server={per_server}; pick whole servers")
    k = device_kind(kind)
    servers = gpus // per_server
    nleaves = -(-servers // leaf)
    nv = Link("nvswitch", k.nvlink_bytes_per_s or PCIE_BYTES_PER_S, DEFAULT_LATENCY_S["nvswitch"])
    ibl = Link("infiniband", gbit(ib), DEFAULT_LATENCY_S["infiniband"])
    g = nx.Graph()
    groups = []
    for s in range(servers):
        group = []
        for j in range(per_server):
            dev = make_device(f"s{s}g{j}", k.name)
            g.add_node(dev.name, device=dev)
            group.append(dev.name)
        groups.append(group)
    for s in range(servers):
        g.add_node(f"s{s}-nvswitch", switch=True)
    for j in range(nleaves):
        g.add_node(f"leaf{j}", switch=True)
    nspines = spines if nleaves > 1 else 0
    for p in range(nspines):
        g.add_node(f"spine{p}", switch=True)
    for s, group in enumerate(groups):
        for d in group:
            g.add_edge(d, f"s{s}-nvswitch", link=nv)
        g.add_edge(f"s{s}-nvswitch", f"leaf{s // leaf}", link=ibl)
    for j in range(nleaves):
        for p in range(nspines):
            g.add_edge(f"leaf{j}", f"spine{p}", link=ibl)
    leaves = [[d for grp in groups[j * leaf:(j + 1) * leaf] for d in grp] for j in range(nleaves)]
    nm = name or f"fattree:gpus={gpus},per_server={per_server},kind={k.name},ib={_fmt(ib)},leaf={leaf},spines={spines}"
    topo = Topology(g, nm, [groups, leaves, [[d for grp in groups for d in grp]]])
    topo.validate()
    return topo


def hierarchical(levels: list[tuple[int, str, float, float]], kind: str = "gpu-generic", name: str | None = None) -> Topology:
    """A generic tree: ``levels`` innermost first, each (count, link kind, bandwidth B/s, latency s).
    Level 0 joins ``count`` devices on a switch ``sw0.j``; level k joins ``count`` level-(k-1)
    switches on a switch ``sw{k}.j``. Devices are ``d0..`` in order, all of catalogue ``kind``."""
    if not levels:
        raise TopologyError("hier: give at least one level, e.g. hier:8@nvlink:300e9")
    norm = []
    for i, lv in enumerate(levels):
        try:
            count, lk, bw, lat = lv
        except (TypeError, ValueError):
            raise TopologyError(f"hier: level {i} must be (count, link kind, bandwidth B/s, latency s)") from None
        _positive_int(count, "hier", f"level {i} count")
        lk = _LINK_ALIASES.get(lk, lk)
        if lk not in LINK_KINDS:
            raise TopologyError(f"hier: level {i} link kind {lk!r} is unknown; use one of {', '.join(LINK_KINDS)} (or ib, eth)")
        if not isinstance(bw, (int, float)) or isinstance(bw, bool) or math.isnan(bw) or bw <= 0:
            raise TopologyError(f"hier: level {i} bandwidth must be a positive number of bytes/s (got {bw!r})")
        if not isinstance(lat, (int, float)) or isinstance(lat, bool) or not math.isfinite(lat) or lat < 0:
            raise TopologyError(f"hier: level {i} latency must be a finite number of seconds >= 0 (got {lat!r})")
        norm.append((count, lk, float(bw), float(lat)))
    k = device_kind(kind)
    n = math.prod(c for c, *_ in norm)
    if n > 1_000_000:
        raise TopologyError(f"hier: {n} devices is too many; keep it to 1,000,000 or fewer")
    g = nx.Graph()
    names = [f"d{i}" for i in range(n)]
    for d in names:
        g.add_node(d, device=make_device(d, k.name))
    children = names
    partitions = []
    block = 1
    for lvl, (count, lk, bw, lat) in enumerate(norm):
        link = Link(lk, bw, lat)
        parents = []
        for j in range(len(children) // count):
            sw = f"sw{lvl}.{j}"
            g.add_node(sw, switch=True)
            for c in children[j * count:(j + 1) * count]:
                g.add_edge(c, sw, link=link)
            parents.append(sw)
        block *= count
        partitions.append([names[j * block:(j + 1) * block] for j in range(n // block)])
        children = parents
    desc = ",".join(f"{c}@{lk}:{_fmt(bw)}:{_fmt(lat)}" for c, lk, bw, lat in norm)
    topo = Topology(g, name or f"hier:{desc}" + ("" if k.name == "gpu-generic" else f",kind={k.name}"), partitions)
    topo.validate()
    return topo


def parse_hier(args: str) -> tuple[list[tuple[int, str, float, float]], str]:
    """Parse the argument of a ``hier:`` spec into (levels, device kind)."""
    levels: list[tuple[int, str, float, float]] = []
    kind = "gpu-generic"
    defaults = [("nvswitch", 300e9), ("infiniband", 25e9)]
    items = [x.strip() for x in args.split(",") if x.strip()]
    if not items:
        raise TopologyError("hier: give levels, e.g. hier:8@nvlink:300e9,32@ib:25e9 or hier:8x32x4")
    for item in items:
        if "=" in item:
            key, _, val = item.partition("=")
            if key.strip() != "kind":
                raise TopologyError(f"hier: unknown option {key.strip()!r}; the only option is kind=DEVICEKIND")
            kind = val.strip()
        elif "@" in item:
            cnt, _, rest = item.partition("@")
            parts = rest.split(":")
            if len(parts) not in (2, 3):
                raise TopologyError(f"hier: level {item!r} must read COUNT@KIND:BANDWIDTH[:LATENCY], e.g. 8@nvlink:300e9")
            lk = _LINK_ALIASES.get(parts[0].strip(), parts[0].strip())
            bw = _num(parts[1], "hier", f"bandwidth of {item!r}")
            lat = _num(parts[2], "hier", f"latency of {item!r}") if len(parts) == 3 else DEFAULT_LATENCY_S.get(lk, 0.0)
            levels.append((_int(cnt, "hier", f"count of {item!r}"), lk, bw, lat))
        elif "x" in item or item.isdigit():
            for c in item.split("x"):
                i = len(levels)
                lk, bw = defaults[i] if i < len(defaults) else ("ethernet", 12.5e9)
                levels.append((_int(c, "hier", f"count {c!r} of {item!r}"), lk, bw, DEFAULT_LATENCY_S[lk]))
        else:
            raise TopologyError(f"hier: cannot read {item!r}; write COUNT@KIND:BANDWIDTH[:LATENCY] or COUNTxCOUNTx...")
    return levels, kind


# ---------------------------------------------------------------------- spec strings
def _spec_ideal(a: dict[str, str], spec: str) -> Topology:
    return ideal(_int(a.get("n", "4"), "ideal", "N"), name=spec)


def _spec_local(a: dict[str, str], spec: str) -> Topology:
    return local(_int(a.get("n", "2"), "local", "N"), name=spec)


def _spec_dgx(a: dict[str, str], spec: str) -> Topology:
    return dgx(_int(a.get("servers", "2"), "dgx", "servers"), _int(a.get("gpus", "8"), "dgx", "gpus"),
               a.get("kind", "a100-80gb"), _num(a.get("ib", "200"), "dgx", "ib"), name=spec)


def _spec_pcie(a: dict[str, str], spec: str) -> Topology:
    return pcie(_int(a.get("servers", "2"), "pcie", "servers"), _int(a.get("gpus", "4"), "pcie", "gpus"),
                a.get("kind", "v100"), _num(a.get("eth", "10"), "pcie", "eth"), name=spec)


def _spec_pda(a: dict[str, str], spec: str) -> Topology:
    return pipedream_a(_int(a.get("servers", "4"), "pipedream-a", "servers"), _int(a.get("gpus", "4"), "pipedream-a", "gpus"),
                       name=spec, kind=a.get("kind", "v100"))


def _spec_pdb(a: dict[str, str], spec: str) -> Topology:
    return pipedream_b(_int(a.get("servers", "4"), "pipedream-b", "servers"), _int(a.get("gpus", "8"), "pipedream-b", "gpus"),
                       name=spec, kind=a.get("kind", "v100"))


def _spec_fattree(a: dict[str, str], spec: str) -> Topology:
    spines = a.get("spines")
    return fattree(_int(a.get("gpus", "64"), "fattree", "gpus"), _int(a.get("per_server", "8"), "fattree", "per_server"),
                   a.get("kind", "h100"), _num(a.get("ib", "400"), "fattree", "ib"),
                   _int(a.get("leaf", "4"), "fattree", "leaf"),
                   None if spines is None else _int(spines, "fattree", "spines"), name=spec)


#: preset name -> (keys in positional order, builder from parsed args, usage)
PRESETS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, str], str], Topology], str]] = {
    "ideal": (("n",), _spec_ideal, "ideal:N"),
    "local": (("n",), _spec_local, "local:N"),
    "dgx": (("servers", "gpus", "kind", "ib"), _spec_dgx, "dgx:servers=S,gpus=8,kind=a100-80gb,ib=200"),
    "pcie": (("servers", "gpus", "kind", "eth"), _spec_pcie, "pcie:servers=S,gpus=4,kind=v100,eth=10"),
    "pipedream-a": (("servers", "gpus", "kind"), _spec_pda, "pipedream-a[:servers=4,gpus=4,kind=v100]"),
    "pipedream-b": (("servers", "gpus", "kind"), _spec_pdb, "pipedream-b[:servers=4,gpus=8,kind=v100]"),
    "fattree": (("gpus", "per_server", "kind", "ib", "leaf", "spines"), _spec_fattree,
                "fattree:gpus=N,per_server=8,kind=h100,ib=400,leaf=4"),
    # hier has its own grammar (parse_hier); load_topology never calls this builder
    "hier": ((), lambda a, s: hierarchical(*parse_hier(s.partition(":")[2]), name=s),
             "hier:8@nvlink:300e9,32@ib:25e9,4@eth:1.25e9 or hier:8x32x4"),
}


#: preset name -> what it builds by default: servers, devices, and every kind of link (``--topology`` help).
PRESET_HELP: dict[str, str] = {
    "ideal": "ideal:N — one server: N devices on one switch, infinite bandwidth, zero latency (N=4)",
    "local": "local:N — N CPU worker processes on this host over loopback (N=2)",
    "dgx": "dgx:servers=2,gpus=8,kind=a100-80gb,ib=200 — 2 servers of 8 GPUs on an NVSwitch (the kind's NVLink "
           "bandwidth per GPU), one InfiniBand NIC of ib Gbit/s per server to one IB switch",
    "pcie": "pcie:servers=2,gpus=4,kind=v100,eth=10 — 2 servers of 4 GPUs on a PCIe switch (12 GB/s per GPU), "
            "one Ethernet NIC of eth Gbit/s per server to one switch",
    "pipedream-a": "pipedream-a — PipeDream's Cluster-A: 4 servers of 4 V100 (32 GB; the paper's 16 GB cards: "
                   "kind=v100-16gb) on a PCIe switch (12 GB/s per GPU), one 10 Gbit/s Ethernet NIC per server",
    "pipedream-b": "pipedream-b — PipeDream's Cluster-B: 4 servers of 8 V100 (32 GB; kind=v100-16gb for the "
                   "paper's) on NVLink (150 GB/s per GPU), one 25 Gbit/s Ethernet NIC per server; the paper's "
                   "2 x 8 is pipedream-b:servers=2",
    "fattree": "fattree:gpus=64,per_server=8,kind=h100,ib=400,leaf=4 — 8 servers of 8 GPUs on an NVSwitch, 4 per leaf "
               "switch by an InfiniBand link of ib Gbit/s, every leaf linked to every spine (spines=leaf: non-blocking)",
    "hier": "hier:8@nvlink:300e9,32@ib:25e9,... or hier:8x32x4 — a generic hierarchy, innermost first: C children "
            "per group on a switch over links of BW bytes/s",
}


def presets_help() -> str:
    """One line per preset for a ``--topology`` help text, or a YAML/JSON file."""
    return "; ".join(PRESET_HELP[p] for p in PRESETS) + "; or a YAML/JSON topology file"


def _parse_args(preset: str, keys: tuple[str, ...], text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for i, item in enumerate(x.strip() for x in text.split(",")):
        if not item:
            continue
        if "=" in item:
            key, _, val = item.partition("=")
            key = key.strip().lower()
            if key not in keys:
                raise TopologyError(f"{preset}: unknown argument {key!r}; it takes {', '.join(keys)}")
        else:
            if i != 0 or not keys:
                raise TopologyError(f"{preset}: argument {item!r} needs a name; write KEY=VALUE with KEY one of {', '.join(keys)}")
            key, val = keys[0], item
        if key in out:
            raise TopologyError(f"{preset}: argument {key!r} is given twice")
        out[key] = val.strip()
    return out


def load_topology(spec: str) -> Topology:
    """A preset spec (see the module docstring) or a .yaml/.yml/.json file path."""
    if isinstance(spec, Topology):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TopologyError(f"a topology spec must be a string (got {type(spec).__name__})")
    text = os.fspath(spec).strip()
    body, mode = (text, None) if os.path.exists(text) else _split_collectives(text)
    if mode is not None:  # any preset spec may end with ",collectives=ideal|nccl" (topologies.ncclcost)
        topo = load_topology(body)
        return Topology(topo.graph, text, topo._explicit, mode)
    head, _, rest = text.partition(":")
    head_l = head.strip().lower()
    if head_l in PRESETS and not os.path.exists(text):
        if head_l == "hier":
            levels, kind = parse_hier(rest)
            return hierarchical(levels, kind, name=text)
        keys, build, _ = PRESETS[head_l]
        return build(_parse_args(head_l, keys, rest), text)
    if os.path.exists(text) or text.lower().endswith((".yaml", ".yml", ".json")):
        return Topology.load(text)
    raise TopologyError(f"unknown topology {text!r}: not a preset and not a .yaml/.json file; presets: "
                        + "; ".join(u for _, _, u in PRESETS.values()))


# ---------------------------------------------------------------------- small helpers
def _split_collectives(text: str) -> tuple[str, str | None]:
    """(the spec without its ``collectives=MODE`` argument, MODE or None): the one argument every preset takes."""
    head, sep, rest = text.partition(":")
    if not sep:
        return text, None
    items = [x for x in rest.split(",")]
    keep, mode = [], None
    for item in items:
        key, eq, val = item.partition("=")
        if eq and key.strip().lower() == "collectives":
            if mode is not None:
                raise TopologyError(f"{head}: argument 'collectives' is given twice")
            mode = val.strip().lower()
            if mode not in COLLECTIVE_MODES:
                raise TopologyError(f"{head}: collectives={val.strip()!r} is unknown; use one of {', '.join(COLLECTIVE_MODES)}")
        else:
            keep.append(item)
    return (f"{head}:{','.join(keep)}" if keep else head), mode


def _int(v: str | int, preset: str, key: str) -> int:
    try:
        x = int(str(v).strip())
    except ValueError:
        raise TopologyError(f"{preset}: {key} must be a positive integer (got {v!r})") from None
    _positive_int(x, preset, key)
    return x


def _num(v: str | float, preset: str, key: str) -> float:
    try:
        x = float(str(v).strip())
    except ValueError:
        raise TopologyError(f"{preset}: {key} must be a number (got {v!r})") from None
    if math.isnan(x) or x < 0:
        raise TopologyError(f"{preset}: {key} must be a number >= 0 (got {v!r})")
    return x


def _positive_int(v: object, preset: str, key: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise TopologyError(f"{preset}: {key} must be a positive integer (got {v!r})")


def _positive_num(v: object, preset: str, key: str) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise TopologyError(f"{preset}: {key} must be a positive number (got {v!r})")


def _fmt(x: float) -> str:
    return f"{x:g}"

