"""Which events of a measured trace the fits read: the workers' events after the warm-up."""
from __future__ import annotations

from planner.trace import Trace


def steady_events(trace: Trace, skip_fraction: float = 0.2):
    """Worker events after the first ``skip_fraction`` of the run (warm-up: first allocations, first messages)."""
    evs = [e for e in trace.events if isinstance(e.lane, int)]
    if not evs:
        return []
    t0 = min(e.start_s for e in evs)
    t1 = max(e.end_s for e in evs)
    cut = t0 + skip_fraction * (t1 - t0)
    return [e for e in evs if e.start_s >= cut]

