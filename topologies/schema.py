"""The topology file: its schema (YAML or JSON), read and checked field by field, and written.

File schema (YAML or JSON; ``Topology.to_dict``/``Topology.from_dict``)::

    name: dgx:servers=2                     # optional, default "custom"
    devices:                                # required, non-empty, order is kept
      - {name: s0g0, kind: a100-80gb, memory_bytes: 8.0e10, peak_flops: 3.12e14, speed: 1.0}
    switches: [s0-nvswitch, ib-switch]      # optional
    links:                                  # required
      - {a: s0g0, b: s0-nvswitch, kind: nvswitch, bandwidth_bytes_per_s: 3.0e11, latency_s: 2.0e-6}
    levels:                                 # optional, innermost first
      - {count: 8, bandwidth_bytes_per_s: 3.0e11, domains: [[s0g0, ...], [s1g0, ...]]}
    collectives: nccl                       # optional, default "ideal" (topologies.ncclcost)

Only ``domains`` of a level is read on load; ``count`` and ``bandwidth_bytes_per_s`` are
written for the reader and recomputed from the graph. Numbers may be given as strings
("25e9", "inf"); JSON files write an infinite bandwidth as the string "inf".

:func:`parse` turns a mapping into what ``Topology(...)`` takes (``Topology.from_dict`` then validates the
whole); :func:`read` and :func:`write` are the files (``Topology.load``/``Topology.save``).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import networkx as nx

from topologies.errors import TopologyError
from topologies.files import output_path
from topologies.records import LINK_KINDS, Device, Link, is_num

__all__ = ["parse", "read", "write"]


_DEVICE_FIELDS = ("name", "kind", "memory_bytes", "peak_flops", "speed")
_LINK_FIELDS = ("a", "b", "kind", "bandwidth_bytes_per_s", "latency_s")


def _check_entry(item: Any, where: str, needs: str, allowed: tuple[str, ...]) -> None:
    """One entry of a list field is a mapping of known fields (``needs`` says what it must hold)."""
    if not isinstance(item, dict):
        raise TopologyError(f"{where} must be a mapping {needs}")
    extra = set(item) - set(allowed)
    if extra:
        raise TopologyError(f"{where} has unknown field(s) {', '.join(sorted(map(str, extra)))}; "
                            f"allowed: {', '.join(allowed)}")


def parse(d: Any) -> tuple[nx.Graph, str, list[list[list[str]]] | None, str]:
    """(graph, name, levels, collectives) of a topology mapping, each field checked as it is read (errors name
    the field); the arguments of ``Topology(...)``, whose ``validate`` checks the whole."""
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
        _check_entry(item, where, "with at least a name", _DEVICE_FIELDS)
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
        _check_entry(item, where, f"with {', '.join(_LINK_FIELDS)}", _LINK_FIELDS)
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
    return g, name, levels, d.get("collectives", "ideal")


def read(path: str | Path) -> Any:
    """The mapping in a .yaml/.yml/.json file; a missing, unreadable or malformed file raises TopologyError."""
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
            return json.loads(text)
        import yaml
        return yaml.safe_load(text)
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"topology file {str(p)!r} is not valid {fmt.upper()}: {first}") from None


def write(path: str | Path, d: dict) -> None:
    """Write the mapping ``d`` to ``path``: YAML for .yaml/.yml, JSON for .json (an infinity as "inf")."""
    p = Path(path)
    fmt = _format_of(p)
    if fmt == "json":
        text = json.dumps(_inf_to_str(d), indent=1) + "\n"
    else:
        import yaml
        text = yaml.safe_dump(d, sort_keys=False, default_flow_style=None, width=120)
    output_path(p).write_text(text)


def _str_field(item: dict, field: str, where: str) -> str:
    v = item.get(field)
    if not isinstance(v, str) or not v:
        raise TopologyError(f"{where}.{field} must be a non-empty string (got {v!r})")
    return v


def _num_field(item: dict, field: str, where: str, *, allow_inf: bool, allow_zero: bool = False) -> float:
    v = item.get(field)
    x: float | None = None
    if is_num(v):
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
