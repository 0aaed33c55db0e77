"""Pictures of traces: a Gantt chart per worker, one panel per trace (predicted beside measured), with matplotlib.

It sits in validation, below the face, so that both the validation report and the commands draw with it.
"""
from __future__ import annotations

from pathlib import Path

from planner.program import Action
from planner.trace import Trace, worker_events
from topologies.files import output_path

__all__ = ["gantt"]

_COLORS = {"F": "#4C72B0", "B": "#55A868", "BI": "#8FD19E", "BW": "#2E7D32",
           "ALLREDUCE": "#C44E52", "STEP": "#8172B2", "SEND": "#CCB974", "RECV": "#64B5CD"}


def gantt(traces: dict[str, Trace] | Trace, path: str | Path, title: str = "", time_unit: str = "s") -> None:
    """Write a Gantt chart (PNG/SVG/PDF by extension): one row per worker, one panel per trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    single = isinstance(traces, Trace)
    if single:
        traces = {title or "trace": traces}
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6, "units": 1.0}[time_unit]
    n = len(traces)
    rows = max(len(worker_events(t)) for t in traces.values())
    fig, axes = plt.subplots(n, 1, figsize=(11, 0.45 * rows * n + 1.2 * n), squeeze=False, sharex=True)
    for ax, (name, tr) in zip(axes[:, 0], traces.items()):
        per = worker_events(tr)
        for w, evs in per.items():
            for e in evs:
                if e.kind not in ("F", "B", "BI", "BW", "ALLREDUCE", "STEP") or e.duration_s <= 0:
                    continue
                ax.barh(w, e.duration_s * scale, left=e.start_s * scale, color=_COLORS.get(e.kind, "#999"),
                        edgecolor="white", linewidth=0.5, height=0.8)
                if e.kind in ("F", "B", "BI", "BW"):
                    ax.text((e.start_s + e.duration_s / 2) * scale, w, str(Action.parse(e.action).mb),
                            ha="center", va="center", fontsize=6, color="white")
        ax.set_yticks(sorted(per))
        ax.set_yticklabels([f"w{w}" for w in sorted(per)])
        ax.invert_yaxis()
        if not single:
            ax.set_title(name, fontsize=9)
    axes[-1, 0].set_xlabel(f"time ({time_unit})")
    handles = [Patch(color=c, label=k) for k, c in _COLORS.items() if k not in ("SEND", "RECV")]
    axes[-1, 0].legend(handles=handles, ncol=6, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35 if n == 1 else -0.2), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(output_path(path), dpi=120)
    plt.close(fig)
