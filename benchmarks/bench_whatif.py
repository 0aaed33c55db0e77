"""How fast the what-if sweep and the simulation-ranked search run.

    .venv/bin/python benchmarks/bench_whatif.py [--jobs 2] [--quick]

Rows:
* a sweep of 200 cluster configurations for GPT-3 13B (10 device counts 8..512 ×
  2 device kinds × 5 interconnects × 2 microbatch sizes, schedule auto, global
  batch 1024), Pareto front simulated (goal <= 60 s on 2 cores);
* the same sweep again from its cache (resume; should take well under a second
  of planning);
* `search` over 50 candidates of GPT-3 1.3B on a 64-GPU DGX cluster, every candidate
  simulated (goal <= 30 s on 2 cores).

Wall seconds are what the goals are about; "cpu s" is the processor time of this
process and its pool workers together, which a shared machine does not inflate
(on 2 free cores, wall is at best cpu / 2).
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipetwin.scoring import run_sweep, search
from whatif import SweepConfig

SWEEP = SweepConfig(model="gpt3-13b", devices=(8, 16, 32, 48, 64, 96, 128, 256, 384, 512),
                    device_kinds=("a100-80gb", "h100"),
                    interconnects=("dgx-ib100", "dgx-ib200", "dgx-ib400", "pcie-eth100", "fattree-ib400"),
                    microbatch_sizes=(1, 2), global_batch=1024)
SEARCH = dict(model="gpt3-1.3b", topology="dgx:servers=8,gpus=8,kind=h100,ib=200", top_k=50)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2, the goal's machine)")
    ap.add_argument("--quick", action="store_true", help="a 40-point sweep and a 20-candidate search")
    args = ap.parse_args()
    cfg = SWEEP if not args.quick else SweepConfig(**{**SWEEP.__dict__, "devices": SWEEP.devices[:4]})
    table = Table(title=f"what-if benchmarks ({args.jobs} jobs, {os.cpu_count()} cores)")
    for c in ("case", "size", "wall s", "cpu s", "goal s", "ok", "notes"):
        table.add_column(c, justify="right" if c in ("wall s", "cpu s", "goal s") else "left")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "sweep.jsonl"
        n = len(cfg.points())
        t0, c0 = time.perf_counter(), _cpu()
        planned = run_sweep(replace(cfg, simulate="none"), jobs=args.jobs, cache=cache)
        t_plan, c_plan = time.perf_counter() - t0, _cpu() - c0
        t0, c0 = time.perf_counter(), _cpu()
        res = run_sweep(cfg, jobs=args.jobs, cache=cache)  # the points come from the cache: only the front is simulated
        t_sim, c_sim = time.perf_counter() - t0, _cpu() - c0
        wall = t_plan + t_sim
        ok = sum(r.ok for r in res.records)
        sims = sum(1 for i in res.pareto if res.records[i].simulated)
        slowest = max(planned.records, key=lambda r: r.devices)
        table.add_row("  planning every point", f"{n} configurations", f"{t_plan:.1f}", f"{c_plan:.1f}", "", "",
                      f"{ok} feasible ({n - ok} no-fit or invalid)")
        table.add_row("  simulating the Pareto front", f"{sims} plans", f"{t_sim:.1f}", f"{c_sim:.1f}", "", "",
                      f"largest cluster {slowest.devices} devices")
        table.add_row("whatif sweep gpt3-13b", f"{n} configurations", f"{wall:.1f}", f"{c_plan + c_sim:.1f}", "60",
                      _ok(wall <= 60 or args.quick), f"front {len(res.pareto)}")
        t0, c0 = time.perf_counter(), _cpu()
        again = run_sweep(cfg, jobs=args.jobs, cache=cache)
        wall2, cpu2 = time.perf_counter() - t0, _cpu() - c0
        same = again.to_json() | {"cached": 0} == res.to_json() | {"cached": 0}
        table.add_row("same sweep from cache", f"{again.cached} cached", f"{wall2:.2f}", f"{cpu2:.2f}", "–", _ok(same),
                      "identical output" if same else "OUTPUT DIFFERS")
    k = 20 if args.quick else SEARCH["top_k"]
    t0, c0 = time.perf_counter(), _cpu()
    sr = search(SEARCH["model"], SEARCH["topology"], top_k=k, jobs=args.jobs)
    wall3, cpu3 = time.perf_counter() - t0, _cpu() - c0
    moved = sum(r["analytic_rank"] != r["simulated_rank"] for r in sr.rows)
    table.add_row("search gpt3-1.3b, 64 H100", f"{len(sr.rows)} candidates", f"{wall3:.1f}", f"{cpu3:.1f}", "30",
                  _ok(wall3 <= 30 or args.quick), f"{moved} change rank under simulation")
    Console(width=max(120, Console().width)).print(table)
    return 0


def _cpu() -> float:
    """Processor seconds of this process and its finished children (the pool workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _ok(flag: bool) -> str:
    return "yes" if flag else "NO"


if __name__ == "__main__":
    raise SystemExit(main())
