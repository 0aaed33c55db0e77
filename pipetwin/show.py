"""What the face draws: a rich console, per-stage tables, the sweep plot, progress bars on stderr."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

from topologies.files import output_path

__all__ = ["console", "stage_table", "plot_sweep", "Progress"]


def console():
    """A rich console; wide when the output is not a terminal, so piped tables stay readable."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def stage_table(stages: Iterable[dict], title: str = ""):
    """A rich table of a plan's stages: layers, replicas, compute, communication, all-reduce, memory, slack, binding."""
    from rich.table import Table

    t = Table(title=title or None, title_justify="left")
    for col in ("stage", "layers", "replicas", "compute ms", "comm ms", "all-reduce ms", "memory GB", "slack", "binding"):
        t.add_column(col, justify="right" if col not in ("binding", "layers") else "left")
    for s in stages:
        t.add_row(str(s["stage"]), f"{s['layers'][0]}–{s['layers'][1]}", str(s["replicas"]),
                  f"{s['compute_s'] * 1e3:.2f}", f"{s['comm_s'] * 1e3:.2f}", f"{s['allreduce_s'] * 1e3:.2f}",
                  f"{s['memory_bytes'] / 1e9:.1f}/{s['memory_limit_bytes'] / 1e9:.0f}", f"{s['slack']:.0%}",
                  s["binding"])
    return t


def plot_sweep(result, path: str | Path) -> None:
    """Throughput against devices for every feasible point of a ``whatif.SweepResult``, one series per
    kind × interconnect, front ringed; and peak memory per device against devices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    series: dict[str, list] = {}
    for r in result.records:
        if r.ok:
            series.setdefault(f"{r.device_kind} / {r.interconnect}", []).append(r)
    for label, rs in sorted(series.items()):
        best: dict[int, object] = {}
        for r in rs:
            if r.devices not in best or r.throughput_samples_per_s > best[r.devices].throughput_samples_per_s:
                best[r.devices] = r
        xs = sorted(best)
        ax1.plot(xs, [best[x].throughput_samples_per_s for x in xs], marker="o", ms=3, label=label)
        ax2.plot(xs, [best[x].peak_memory_bytes / 1e9 for x in xs], marker="o", ms=3, label=label)
    front = [result.records[i] for i in result.pareto]
    ax1.scatter([r.devices for r in front], [r.throughput_samples_per_s for r in front], s=70,
                facecolors="none", edgecolors="black", label="Pareto front")
    sims = [r for r in front if r.simulated]
    if sims:
        ax1.scatter([r.devices for r in sims], [r.simulated["throughput_samples_per_s"] for r in sims],
                    marker="x", color="black", label="simulated")
    for ax, ylab in ((ax1, "samples/s (cost model)"), (ax2, "peak memory per device (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("devices")
        ax.set_ylabel(ylab)
        ax.grid(alpha=0.3)
    ax1.set_title(f"{result.config.model}: throughput")
    ax2.set_title("memory per device")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_path(path), dpi=120)
    plt.close(fig)


class Progress:
    """Progress on stderr as the rooms report it, ``progress(phase, done, total)``. ``on``: True or "bar" — one
    rich bar per phase; "auto" — the bar when stderr is a terminal, else a plain line per report ("planning:
    3/200 points"), so a long run logged to a file still shows it is alive; False or "off" — nothing. Use as a
    context manager so the last bar is cleared."""

    def __init__(self, on: bool | str):
        mode = ("bar" if on else "off") if isinstance(on, bool) else on
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        if mode not in ("bar", "lines", "off"):
            raise ValueError(f"progress mode {on!r}: expected bar, lines, auto or off")
        self._mode, self._p, self._what = mode, None, None

    def __call__(self, what: str, done: int, total: int) -> None:
        if self._mode == "off" or not total:
            return
        if self._mode == "lines":
            print(f"{what}: {done}/{total} points", file=sys.stderr, flush=True)
            return
        if what != self._what:
            self.close()
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

            self._p = Bar(TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          console=Console(stderr=True), transient=True)
            self._p.start()
            self._t, self._what = self._p.add_task(what, total=total), what
        self._p.update(self._t, completed=done)

    def close(self) -> None:
        if self._p:
            self._p.stop()
        self._p, self._what = None, None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
