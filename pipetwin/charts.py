"""Pictures of traces for the commands: the text time × worker grid, and the Gantt chart (``validation.plots``)."""
from __future__ import annotations


from planner.program import Action
from planner.trace import Trace, worker_events
from validation.plots import gantt

__all__ = ["gantt", "text_grid"]

#: The widest text grid drawn, in slots; a longer schedule is drawn with longer slots.
GRID_MAX_SLOTS = 400


def text_grid(trace: Trace, unit: float | None = None) -> str:
    """The schedule as the PipeDream papers draw it: rows are workers, columns time slots.

    Each slot shows the kind and microbatch running then (``F3``, ``B3``,
    ``I3``/``W3`` for BI/BW); ``.`` is idle. ``unit`` is the slot length
    (default: the shortest compute action).
    """
    per = worker_events(trace)
    comp = [e for evs in per.values() for e in evs if e.is_compute and e.duration_s > 0]
    if not comp:
        return ""
    unit = unit or min(e.duration_s for e in comp)
    t0 = min(e.start_s for e in comp)
    span = max(e.end_s for e in comp) - t0
    unit = max(unit, span / GRID_MAX_SLOTS)  # costs far apart (--fwd 1e12 --bwd 2) would need billions of slots
    slots = int(round(span / unit))
    width = max(len(str(Action.parse(e.action).mb)) for e in comp) + 1
    short = {"F": "F", "B": "B", "BI": "I", "BW": "W"}
    lines = []
    for w in sorted(per):
        row = ["." * width] * slots
        for e in per[w]:
            if not e.is_compute or e.duration_s <= 0:
                continue
            a = Action.parse(e.action)
            first = int(round((e.start_s - t0) / unit))
            last = int(round((e.end_s - t0) / unit))
            for k in range(first, min(last, slots)):
                row[k] = f"{short[e.kind]}{a.mb}".ljust(width)
        lines.append(f"w{w:<3}|" + " ".join(row))
    return "\n".join(lines)
