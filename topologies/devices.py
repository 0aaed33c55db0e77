"""Catalogue of device kinds: peak dense FLOP/s, typical achievable fraction, memory, NVLink and memory bandwidth.

Figures are vendor datasheet values (dense bf16/fp16 tensor throughput, SXM parts, HBM
bandwidth: A100 40 GB 1.555 TB/s, 80 GB 2.039 TB/s, H100 SXM 3.35 TB/s, H200 4.8 TB/s, the 96 GB HBM2e H100 of
Meta's Grand Teton hosts 2.4 TB/s); the
achievable fraction is a typical training model-FLOPs utilisation, a starting point that
calibration replaces with measurements.
"""
from __future__ import annotations

from dataclasses import dataclass

from topologies.errors import TopologyError
from topologies.records import Device

__all__ = ["DeviceKind", "DEVICE_KINDS", "KIND_ALIASES", "device_kind", "make_device"]


@dataclass(frozen=True)
class DeviceKind:
    """A catalogue entry for a kind of device."""

    name: str
    peak_flops: float           # dense bf16/fp16 FLOP/s
    achievable_fraction: float  # typical fraction of peak reached in training
    memory_bytes: float
    nvlink_bytes_per_s: float   # per-GPU NVLink bandwidth, one direction; 0 where there is none
    memory_bytes_per_s: float = 1e12  # device memory (HBM) bandwidth, what memory-bound kernels stream at

    @property
    def achievable_flops(self) -> float:
        return self.peak_flops * self.achievable_fraction


DEVICE_KINDS: dict[str, DeviceKind] = {k.name: k for k in (
    DeviceKind("v100", 125e12, 0.40, 32e9, 150e9, 900e9),
    # the PipeDream paper's clusters had the 16 GB card
    DeviceKind("v100-16gb", 125e12, 0.40, 16e9, 150e9, 900e9),
    DeviceKind("a100-40gb", 312e12, 0.50, 40e9, 300e9, 1.555e12),
    DeviceKind("a100-80gb", 312e12, 0.50, 80e9, 300e9, 2.039e12),
    DeviceKind("h100", 989e12, 0.45, 80e9, 450e9, 3.35e12),
    DeviceKind("h200", 989e12, 0.45, 141e9, 450e9, 4.8e12),
    # Meta's Grand Teton part (torchtitan's benchmarks): 96 GB HBM2e at 2.4 TB/s, 500 W; its bf16 peak lies
    # "between SXM and NVL" (989 and 835 TFLOP/s, the benchmark's footnote), taken as their midpoint
    DeviceKind("h100-96gb-hbm2e", 912e12, 0.45, 96e9, 450e9, 2.4e12),
    DeviceKind("cpu", 1e11, 0.50, 16e9, 0.0, 50e9),
    # an emulated accelerator: compute is a timed wait, so it reaches its nominal rate
    DeviceKind("emulated", 1e12, 1.0, 16e9, 0.0, 1e12),
    # the default of topologies.Device
    DeviceKind("gpu-generic", 1e14, 0.50, 16e9, 0.0, 1e12),
)}

#: Other spellings accepted by ``device_kind``.
KIND_ALIASES: dict[str, str] = {"a100": "a100-80gb", "h100-sxm": "h100", "v100-32gb": "v100"}


def device_kind(name: str) -> DeviceKind:
    """The catalogue entry for ``name`` (case-insensitive; aliases in KIND_ALIASES)."""
    key = str(name).strip().lower()
    key = KIND_ALIASES.get(key, key)
    try:
        return DEVICE_KINDS[key]
    except KeyError:
        raise TopologyError(f"unknown device kind {name!r}; known kinds: {', '.join(DEVICE_KINDS)}") from None


def make_device(name: str, kind: str, speed: float = 1.0) -> Device:
    """A Device of a catalogue kind: its memory and peak FLOP/s, the given relative speed."""
    k = device_kind(kind)
    return Device(name=name, kind=k.name, memory_bytes=k.memory_bytes, peak_flops=k.peak_flops, speed=speed)
