"""The answers a sweep gives: cost per sample, the Pareto front, the fewest devices for a target, why nothing fits.

The front's objectives, each smaller-is-better: −throughput, devices, peak memory per device and,
with prices, dollars per sample. Ties keep the earlier record, so the front depends only on the
record order (the point order).
"""
from __future__ import annotations

from whatif.points import SweepRecord

__all__ = ["cost_per_sample", "pareto_front", "fewest_devices_for", "why_nothing_fits"]


def cost_per_sample(rec: SweepRecord, prices: dict[str, float] | None) -> float | None:
    """Dollars per sample: devices × price per device-hour / 3600 / throughput (None without a price)."""
    if not prices or rec.device_kind not in prices or rec.throughput_samples_per_s <= 0:
        return None
    return rec.devices * prices[rec.device_kind] / 3600.0 / rec.throughput_samples_per_s


def _objectives(rec: SweepRecord, prices: dict[str, float] | None) -> tuple[float, ...]:
    """Smaller is better in every coordinate."""
    obj = (-rec.throughput_samples_per_s, float(rec.devices), float(rec.peak_memory_bytes or 0.0))
    c = cost_per_sample(rec, prices)
    return obj + ((c,) if c is not None else ())


def pareto_front(records: list[SweepRecord], prices: dict[str, float] | None = None) -> list[int]:
    """Indices of the feasible records no other feasible record dominates; equal ones keep the first."""
    ok = [i for i, r in enumerate(records) if r.ok]
    objs = {i: _objectives(records[i], prices) for i in ok}
    front = []
    for i in ok:
        oi = objs[i]
        dominated = False
        for j in ok:
            if j == i:
                continue
            oj = objs[j]
            if len(oj) != len(oi):
                continue
            if all(a <= b for a, b in zip(oj, oi)) and (oj != oi or j < i):
                dominated = True
                break
        if not dominated:
            front.append(i)
    return front


def fewest_devices_for(records: list[SweepRecord], target: float, prices: dict[str, float] | None = None
                       ) -> tuple[SweepRecord | None, SweepRecord | None]:
    """(the smallest cluster reaching ``target`` samples/s, or None; the highest-throughput record, or None).

    Ties on devices go to the higher throughput, then the cheaper, then the earlier point.
    """
    ok = [r for r in records if r.ok]
    best = max(ok, key=lambda r: r.throughput_samples_per_s, default=None)
    hits = [(r.devices, -r.throughput_samples_per_s, cost_per_sample(r, prices) or 0.0, k)
            for k, r in enumerate(ok) if r.throughput_samples_per_s >= target]
    if not hits:
        return None, best
    return ok[min(hits)[3]], best


def why_nothing_fits(records: list[SweepRecord], model: str) -> str:
    """One line for a sweep with no feasible point: the least memory per device a plan would need, and where."""
    nofit = [r for r in records if r.status == "no-fit" and r.memory_needed_bytes]
    if not nofit:
        reasons = sorted({r.reason for r in records if r.reason})
        return f"no configuration of the sweep can run {model}: {reasons[0] if reasons else 'no valid point'}"
    r = min(nofit, key=lambda r: (r.memory_needed_bytes / r.memory_limit_bytes, -r.devices))
    return (f"{model} fits on no configuration of this sweep: it would need {r.memory_needed_bytes / 1e9:.1f} GB "
            f"per device at best ({r.devices}×{r.device_kind}, {r.interconnect}) but a {r.device_kind} "
            f"has {r.memory_limit_bytes / 1e9:.0f} GB; add devices, use --recompute, a smaller --microbatch-sizes "
            f"or a larger-memory kind")
