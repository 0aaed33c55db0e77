"""PipeDream's 14 shipped profiles on the paper's clusters: the plan each cost model picks, and its speedup over data parallelism.

Run: PYTHONPATH=. .venv/bin/python benchmarks/bench_pipedream_profiles.py [--presets pipedream-a,pipedream-b] [--md FILE]

Conventions (PipeDream's own): one microbatch is the profiled minibatch (its batch size where the
profile records one, else one "sample" = one profiled minibatch) and the schedule is ``pipedream``.

* pipetwin: ``plan_model(..., schedule="pipedream", microbatch_size=batch)`` on the preset; data
  parallelism = the best one-stage plan (one stage replicated on the first n devices, n over the
  planner's device counts) under the same cost model (all-reduce not overlapped).
* pipedream: PipeDream's optimizer (``optimize_pipedream``) on the preset's levels; its own
  data-parallel figure (``data_parallel_time_s``).

Replication per stage is written ``r0-r1-...``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner import partition as part  # noqa: E402
from planner.analytic import load_model  # noqa: E402
from planner.cnn import PIPEDREAM_BATCH, pipedream_profiles_dir  # noqa: E402
from planner.costmodel import CostOptions, evaluate  # noqa: E402
from planner.plan import Plan, StagePlan  # noqa: E402
from planner.profile import read_pipedream_graph  # noqa: E402
from planner.search import plan_model  # noqa: E402
from topologies.presets import load_topology  # noqa: E402

MODELS = ("alexnet", "vgg16", "resnet18", "squeezenet1_0", "resnet50", "resnext50", "resnet101", "resnext101",
          "densenet121", "inception_v3", "nasnetamobile", "nasnetalarge", "gnmt", "gnmt_large")


def dp_best(profile, topology, batch: int, microbatches: int):
    """The best pure data-parallel plan under pipetwin's cost model: (candidate, devices)."""
    devs = tuple(topology.devices)
    best = None
    for n in part.device_counts(topology, devs):
        plan = Plan(model=profile.name, stages=(StagePlan(0, len(profile) - 1, n, devs[:n]),), schedule="pipedream",
                    microbatch_size=batch, microbatches=microbatches, topology=topology.name)
        c = evaluate(plan, profile, topology, CostOptions())
        if c.fits and (best is None or c.time_per_sample_s < best.time_per_sample_s):
            best = c
    return best


def rows_for(model: str, preset: str) -> dict:
    d = pipedream_profiles_dir()
    batch = PIPEDREAM_BATCH.get(model, 1)
    prof = load_model(model)
    topo = load_topology(preset)
    row = {"model": model, "preset": preset, "batch": batch}
    t0 = time.perf_counter()
    try:
        res = plan_model(prof, topo, schedule="pipedream", microbatch_size=batch, top_k=1)
        c = res.best_candidate
        M = c.plan.microbatches
        dp = dp_best(prof, topo, batch, M)
        row.update(pt_repl="-".join(str(s.replicas) for s in c.stages), pt_sps=c.throughput_samples_per_s,
                   pt_dp_sps=dp.throughput_samples_per_s if dp else math.nan,
                   pt_dp_devices=len(dp.plan.devices) if dp else 0,
                   pt_speedup=c.throughput_samples_per_s / dp.throughput_samples_per_s if dp else math.nan)
    except ValueError as e:
        row.update(pt_repl=f"error: {e}"[:60], pt_sps=math.nan, pt_dp_sps=math.nan, pt_dp_devices=0, pt_speedup=math.nan)
    row["pt_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    from planner.pipedream import optimize_pipedream

    raw = read_pipedream_graph(d / f"{model}.graph.txt", name=model)
    levels = [(int(n), float(bw)) for n, bw in topo.levels()]
    try:
        r = optimize_pipedream(raw, levels)
        row.update(pd_repl="-".join(str(s.replicas) for s in r.stages), pd_sps=batch / r.pipeline_time_s,
                   pd_speedup=r.data_parallel_time_s / r.pipeline_time_s,
                   pd_red="" if r.reduction is None else r.reduction)
    except ValueError as e:
        row.update(pd_repl=f"error: {e}"[:60], pd_sps=math.nan, pd_speedup=math.nan, pd_red="")
    row["pd_s"] = time.perf_counter() - t0
    return row


def table(rows: list[dict]) -> str:
    head = ("| model | preset | batch | pipetwin replication | pipetwin samples/s | DP samples/s (devices) | "
            "speedup vs DP | PipeDream replication | PipeDream samples/s | PipeDream speedup vs DP | plan s |")
    out = [head, "|" + "|".join("---" for _ in range(11)) + "|"]
    for r in rows:
        pd_repl = r["pd_repl"] + (f" ({r['pd_red']})" if r["pd_red"] else "")
        out.append(f"| {r['model']} | {r['preset']} | {r['batch']} | {r['pt_repl']} | {r['pt_sps']:.4g} | "
                   f"{r['pt_dp_sps']:.4g} ({r['pt_dp_devices']}) | {r['pt_speedup']:.2f}x | {pd_repl} | "
                   f"{r['pd_sps']:.4g} | {r['pd_speedup']:.2f}x | {r['pt_s']:.1f} + {r['pd_s']:.1f} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="pipedream-a,pipedream-b")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--md", default=None, help="also write the table to this Markdown file")
    args = ap.parse_args()
    rows = []
    for preset in args.presets.split(","):
        for model in args.models.split(","):
            rows.append(rows_for(model, preset))
            print(f"done {model} on {preset} ({rows[-1]['pt_s']:.1f} s + {rows[-1]['pd_s']:.1f} s)", file=sys.stderr)
    text = table(rows)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
