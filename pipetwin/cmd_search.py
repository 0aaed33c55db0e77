"""`pipetwin search`: the cost model's top-k plans on one cluster, re-ranked by simulation, with why they moved."""
from __future__ import annotations

import json

from pipetwin.args import (add_device_calibration_flag, check_calibration_kinds, check_calibration_topology, counts,
                           words)
from pipetwin.scoring import search
from pipetwin.show import Progress, console, stage_table


def register(sub) -> None:
    p = sub.add_parser("search", help="topology-aware plan search: top-k plans re-ranked by simulation",
                       description="Ask the planner for its top-k candidates (partition, replication, placement, "
                                   "schedule, microbatch size) on one cluster, simulate each, and show how the "
                                   "simulated ranking differs from the cost model's and why.")
    p.add_argument("--model", required=True, metavar="SPEC", help="gpt3-13b, gpt:layers=..., vgg16, a profile path, ...")
    p.add_argument("--topology", required=True, metavar="PRESET|FILE", help="cluster preset (dgx:servers=8,kind=h100) or a YAML/JSON file")
    p.add_argument("--device-kind", default=None, metavar="KIND", help="time an analytic model on this kind (default: the cluster's)")
    p.add_argument("--top-k", type=int, default=50, metavar="K", help="candidates to simulate (default 50)")
    p.add_argument("--schedules", type=words, default=("auto",), metavar="LIST", help="auto or families, e.g. 1f1b,2bw")
    p.add_argument("--microbatch-sizes", type=counts, default=(1, 2, 4), metavar="LIST", help="microbatch sizes to plan (default 1,2,4)")
    p.add_argument("--global-batch", type=int, default=None, metavar="N", help="samples per optimizer step (default: the planner tries several)")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam", "none"], help="optimizer state in the memory accounting")
    p.add_argument("--recompute", action="store_true", help="activation recomputation")
    add_device_calibration_flag(p)
    p.add_argument("--sim-batches", type=int, default=1, metavar="N", help="batches per simulation of a flush schedule (default 1)")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--show", type=int, default=20, metavar="N", help="rows to print (default 20; --json has all)")
    p.add_argument("--json", action="store_true", help="print every candidate with both ranks as JSON")
    p.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.device_kind:
        check_calibration_kinds(args.device_calibration, [args.device_kind], "--device-kind")
    elif args.device_calibration is not None:
        from topologies.presets import load_topology

        check_calibration_topology(args.device_calibration, load_topology(args.topology))
    with Progress(args.progress) as progress:
        result = search(args.model, args.topology, top_k=args.top_k, schedules=args.schedules,
                        microbatch_sizes=args.microbatch_sizes, global_batch=args.global_batch,
                        optimizer=args.optimizer, recompute=args.recompute, device_kind_name=args.device_kind,
                        sim_batches=args.sim_batches, jobs=args.jobs, progress=progress,
                        calibration=args.device_calibration)
    if args.json:
        print(json.dumps(result.to_json(), allow_nan=False))
        return 0
    _print(result, args.show)
    return 0


def _print(result, show: int) -> None:
    from rich.table import Table

    con = console()
    rows = result.rows
    moved = sum(r["analytic_rank"] != r["simulated_rank"] for r in rows)
    con.print(f"[bold]{result.model}[/] on {result.topology}: {len(rows)} candidates simulated, {moved} change rank")
    t = Table(title="cost model vs simulation (samples/s)", title_justify="left")
    for c in ("model rank", "sim rank", "schedule", "mb×M", "stages×replicas", "devices", "model", "simulated",
              "diff", "peak GB", "why"):
        t.add_column(c, justify="left" if c in ("schedule", "why", "stages×replicas") else "right")
    for r in rows[:show]:
        a, s = r["analytic_throughput_samples_per_s"], r["simulated_throughput_samples_per_s"]
        reps = r["replicas"]
        shape = f"{len(reps)}×{reps[0]}" if len(set(reps)) == 1 else f"{len(reps)}×({','.join(map(str, reps))})"
        peak = r["simulated_peak_memory_bytes"] or r["analytic_peak_memory_bytes"]
        t.add_row(str(r["analytic_rank"]), str(r["simulated_rank"]),
                  r["schedule"] + (f" v={r['chunks']}" if r["chunks"] > 1 else ""),
                  f"{r['microbatch_size']}×{r['microbatches']}", shape, str(r["devices_used"]), f"{a:.4g}", f"{s:.4g}",
                  f"{(s / a - 1) if a else 0:+.0%}", f"{peak / 1e9:.1f}", r["cause"])
    con.print(t)
    if len(rows) > show:
        con.print(f"({len(rows) - show} more with --show {len(rows)} or --json)")
    best_a = rows[0]
    best_s = min(rows, key=lambda r: r["simulated_rank"])
    if best_s is best_a:
        con.print("\nThe simulation keeps the cost model's best plan.")
    else:
        con.print(f"\nThe simulation prefers candidate {best_s['analytic_rank']} ({best_s['schedule']}, "
                  f"{best_s['simulated_throughput_samples_per_s']:.4g} samples/s simulated) over the cost model's best "
                  f"({best_a['schedule']}, {best_a['simulated_throughput_samples_per_s']:.4g} simulated): "
                  f"{best_a['cause']}.")
    con.print(f"cost model: {result.explanation}")
    con.print(stage_table(best_s["stages"], title="simulation's best, per stage (cost model's breakdown)"))
