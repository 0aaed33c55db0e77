"""`pipetwin netbench`: measure loopback latency and bandwidth between local gloo workers into a topology."""
from __future__ import annotations

import json
import sys

from topologies.files import output_path


def register(sub) -> None:
    p = sub.add_parser("netbench", help="measure link latency and bandwidth between local workers",
                       description="Start local gloo worker processes, ping-pong messages of a sweep of sizes "
                                   "between every pair, fit t = latency + bytes / bandwidth and write the result "
                                   "as a topology (one loopback link per pair).")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated message sizes in bytes, K/M/G binary suffixes allowed "
                        "(default 1,4,16,...,16M)")
    p.add_argument("--repeats", type=int, default=10, help="timed round trips per size; median kept (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed round trips per size first (default 2)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds before the workers are stopped (default 120)")
    p.add_argument("-o", "--output", metavar="JSON", help="write the topology JSON here")
    p.add_argument("--json", action="store_true",
                   help="print the full report (fits, raw [bytes, seconds] points, topology) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from executor.netbench import DEFAULT_SIZES, parse_sizes, run_netbench

    sizes = parse_sizes(args.sizes) if args.sizes else DEFAULT_SIZES
    report = run_netbench(workers=args.workers, sizes=sizes, repeats=args.repeats, warmup=args.warmup,
                          timeout_s=args.timeout)
    if args.output:
        with output_path(args.output).open("w") as f:
            json.dump(report["topology"], f, indent=1)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"loopback links between {report['workers']} local gloo workers "
                        f"(one-way time = latency + bytes / bandwidth)")
    for col in ("link", "latency µs", "bandwidth GB/s", "fit rms err", "sizes"):
        table.add_column(col, justify="left" if col == "link" else "right")
    for l in report["links"]:
        table.add_row(f"{l['a']}–{l['b']}", f"{l['latency_s'] * 1e6:.1f}", f"{l['bandwidth_bytes_per_s'] / 1e9:.3f}",
                      f"{l['rms_relative_error'] * 100:.1f}%", str(len(l["points"])))
    console.print(table)
    if args.output:
        console.print(f"wrote {args.output}")
    return 0
