"""A topology's records: the Device on a node, the Link on an edge, the link kinds, and what makes a value of
each invalid (the checks ``Topology.validate``, its derived copies and the file schema share).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["LINK_KINDS", "Device", "Link", "is_num", "link_problem", "device_problem"]

#: Link kinds a topology may use.
LINK_KINDS = ("nvlink", "nvswitch", "pcie", "infiniband", "ethernet", "loopback", "ideal")


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


def is_num(x: Any) -> bool:
    """A real number: an int or float, not a bool."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def link_problem(link: Any) -> str | None:
    """Why a link value is invalid, or None."""
    if not isinstance(link, Link):
        return "has no Link (edge attribute 'link' must be a topologies.Link)"
    if link.kind not in LINK_KINDS:
        return f"has unknown kind {link.kind!r}; use one of {', '.join(LINK_KINDS)}"
    bw = link.bandwidth_bytes_per_s
    if not is_num(bw) or math.isnan(bw) or bw <= 0:
        return f"bandwidth_bytes_per_s must be a positive number (got {bw!r})"
    lat = link.latency_s
    if not is_num(lat) or not math.isfinite(lat) or lat < 0:
        return f"latency_s must be a finite number >= 0 (got {lat!r})"
    return None


def device_problem(dev: Device) -> str | None:
    """Why a device's numbers are invalid, or None."""
    for field in ("memory_bytes", "peak_flops", "speed"):
        v = getattr(dev, field)
        if not is_num(v) or not math.isfinite(v) or v <= 0:
            return f"{field} must be a positive finite number (got {v!r})"
    return None
