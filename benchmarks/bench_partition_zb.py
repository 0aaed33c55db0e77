"""The flat partition search per family where memory binds: 1F1B's one pass against ZB-H1/ZB-H2's lower bound,
depth masks (time) and passes per 1F1B depth (the memory objective), on 16 and 64 devices.

Run: .venv/bin/python benchmarks/bench_partition_zb.py
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from planner import partition as part
from planner.costmodel import CostOptions
from planner.profile import uniform_profile
from topologies.presets import load_topology


def _cpu(fn):
    c0 = time.process_time()
    out = fn()
    return out, time.process_time() - c0


def main() -> None:
    prof = uniform_profile(48, 1e-3, 2e-3, act=1e7, params=1e7)
    table = Table(title="flat partition search, 48 layers (process CPU seconds)")
    for c in ("devices", "family", "M", "memory objective s", "time, ample memory s", "time at 1.3x least memory s",
              "counts that fit"):
        table.add_column(c, justify="right")
    for spec in ("dgx:servers=2,gpus=8", "dgx:servers=8,gpus=8"):
        topo = load_topology(spec)
        for fam in ("1f1b", "zb-h1", "zb-h2"):
            for M in (16, 64):
                pb = part.Problem(prof, tuple(topo.devices), fam, M, CostOptions())
                low, t_mem = _cpu(lambda: part.solve_flat(pb, topo, objective="memory"))
                _sols, t_loose = _cpu(lambda: part.solve_flat_per_count(pb, topo))
                tight = part.Problem(prof, tuple(topo.devices), fam, M, CostOptions(memory_limit_bytes=low.value * 1.3))
                sols, t_tight = _cpu(lambda: part.solve_flat_per_count(tight, topo))
                table.add_row(str(len(topo.devices)), fam, str(M), f"{t_mem:.2f}", f"{t_loose:.2f}", f"{t_tight:.2f}",
                              str(len(sols)))
    Console().print(table)


if __name__ == "__main__":
    main()
