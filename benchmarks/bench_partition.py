"""Planner timings: the exact flat search, the hierarchical one, and `schedule=auto` end to end.

Run: .venv/bin/python benchmarks/bench_partition.py
"""
from __future__ import annotations

import time
from pathlib import Path

from planner import partition as part
from planner.costmodel import CostOptions
from planner.profile import read_pipedream_graph, uniform_profile
from planner.search import plan_model
from topologies.presets import load_topology

PROFILES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pipedream_profiles"


def _time(fn):
    """(result, wall seconds, process CPU seconds): on a shared machine the CPU figure is the steadier one."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    rows = []
    prof = uniform_profile(12, 1e-3, 2e-3, act=1e6, params=1e7)
    topo = load_topology("dgx:servers=2,gpus=4")
    pb = part.Problem(prof, tuple(topo.devices), "1f1b", 8, CostOptions())
    dp, t_dp, _ = _time(lambda: part.solve_flat(pb, topo))
    bf, t_bf, _ = _time(lambda: part.brute_force(pb, topo))
    rows.append(("12 layers x 8 devices: DP vs brute force", f"{t_dp:.3f} s vs {t_bf:.2f} s", f"equal={abs(dp.value - bf.value) <= 1e-9 * bf.value}"))
    cases = [("uniform:layers=1000", "hier:8@nvlink:300e9,32@ib:25e9,16@eth:1.25e9", "1f1b"),
             ("uniform:layers=1000", "hier:8@nvlink:300e9,32@ib:25e9,16@eth:1.25e9", "auto")]
    for name, spec in (("vgg16", "pipedream-a"), ("resnet50", "pipedream-b"), ("gnmt", "dgx:servers=4")):
        path = PROFILES / f"{name}.graph.txt"
        if path.exists():
            cases.append((str(path), spec, "auto"))
    for model, spec, sched in cases:
        if model.startswith("uniform"):
            p = uniform_profile(1000, 1e-3, 2e-3, act=1e6, params=4e6)
        else:
            p = read_pipedream_graph(model)
        t = load_topology(spec)
        res, secs, cpu = _time(lambda: plan_model(p, t, schedule=sched))
        c = res.best_candidate
        rows.append((f"{p.name} ({len(p)} layers) on {spec} ({len(t.devices)} devices), schedule={sched}",
                     f"{secs:.2f} s wall, {cpu:.2f} s cpu",
                     f"{c.plan.schedule} M={c.plan.microbatches}, {len(c.stages)} stages on {len(c.plan.devices)} devices, "
                     f"{c.throughput_samples_per_s:.4g} samples/s"))
    w = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:>26}  {r[2]}")


if __name__ == "__main__":
    main()
