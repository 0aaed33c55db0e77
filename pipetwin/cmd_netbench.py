"""`pipetwin netbench`: measure latency and bandwidth between local workers (gloo ping-pong, or a ring all-reduce
on gloo or nccl) into a topology."""
from __future__ import annotations

import json
import sys

from topologies.files import output_path


def register(sub) -> None:
    p = sub.add_parser("netbench", help="measure link latency and bandwidth between local workers",
                       description="Start local worker processes. --mode pingpong (default): gloo ping-pong of a "
                                   "sweep of sizes between every pair, fit t = latency + bytes / bandwidth. "
                                   "--mode allreduce: a ring all-reduce over all workers (gloo on CPU, nccl on "
                                   "CUDA), reported as algorithm and bus bandwidth (busbw = algbw * 2(n-1)/n, "
                                   "the nccl-tests convention) and fitted to the ring form. Either writes the "
                                   "result as a topology (one link per pair).")
    p.add_argument("--mode", choices=("pingpong", "allreduce"), default="pingpong",
                   help="pingpong: every pair in turn (default); allreduce: all workers at once")
    p.add_argument("--backend", default="auto",
                   help="allreduce only: gloo, nccl (one GPU per worker) or auto (nccl where CUDA is; default)")
    p.add_argument("--workers", type=int, default=2,
                   help="local worker processes (default 2; allreduce takes 1 as a sanity run)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated message sizes in bytes, K/M/G binary suffixes allowed "
                        "(default 1,4,16,...,16M; allreduce 1M,4M,16M,64M,100M)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed trips per size; median kept (default 10; allreduce 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed trips per size first (default 2; allreduce 1)")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds before the workers are stopped (default 120; allreduce 300)")
    p.add_argument("-o", "--output", metavar="JSON", help="write the topology JSON here")
    p.add_argument("--json", action="store_true",
                   help="print the full report (fits, raw [bytes, seconds] points, topology) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from executor.netbench import NetbenchError

    if args.mode == "allreduce":
        return _run_allreduce(args)
    if args.backend not in ("auto", "gloo"):
        raise NetbenchError(f"--backend {args.backend} runs with --mode allreduce only; ping-pong runs on gloo")
    from executor.netbench import DEFAULT_SIZES, parse_sizes, run_netbench

    sizes = parse_sizes(args.sizes) if args.sizes else DEFAULT_SIZES
    report = run_netbench(workers=args.workers, sizes=sizes, repeats=_or(args.repeats, 10),
                          warmup=_or(args.warmup, 2), timeout_s=_or(args.timeout, 120.0))
    if _save_or_dump(args, report):
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


def _save_or_dump(args, report) -> bool:
    """Write the topology where -o says; print the JSON report with --json (True: nothing more to print)."""
    if args.output:
        with output_path(args.output).open("w") as f:
            json.dump(report["topology"], f, indent=1)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    return args.json


def _or(value, default):
    return default if value is None else value


def _run_allreduce(args) -> int:
    from executor.netbench import ALLREDUCE_SIZES, NetbenchError, parse_sizes, run_allreduce_bench

    if args.workers == 1 and args.output:
        raise NetbenchError("a 1-worker all-reduce moves nothing between ranks, so it has no link to save; "
                            "drop -o or give --workers 2 or more")
    sizes = parse_sizes(args.sizes) if args.sizes else ALLREDUCE_SIZES
    report = run_allreduce_bench(workers=args.workers, sizes=sizes, repeats=_or(args.repeats, 5),
                                 warmup=_or(args.warmup, 1), timeout_s=_or(args.timeout, 300.0),
                                 backend=args.backend)
    if _save_or_dump(args, report):
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    n = report["workers"]
    table = Table(title=f"ring all-reduce (float32 sum) over {n} local {report['backend']} worker(s) on "
                        f"{report['device']}; busbw = algbw × 2(n−1)/n")
    for col in ("size MiB", "time ms", "algbw GB/s", "busbw GB/s"):
        table.add_column(col, justify="right")
    for p in report["points"]:
        table.add_row(f"{p['bytes'] / 2**20:.2f}", f"{p['seconds'] * 1e3:.3f}", f"{p['algbw_bytes_per_s'] / 1e9:.3f}",
                      f"{p['busbw_bytes_per_s'] / 1e9:.3f}")
    console.print(table)
    if report["fit"]:
        f = report["fit"]
        console.print(f"fit t = 2(n−1)·{f['latency_s'] * 1e6:.1f} µs + 2(n−1)/n·bytes / "
                      f"{f['bandwidth_bytes_per_s'] / 1e9:.3f} GB/s (rms err {f['rms_relative_error'] * 100:.1f}%)")
    else:
        console.print("one rank: the all-reduce moves nothing between ranks (busbw 0); a sanity run, no link fitted")
    if args.output:
        console.print(f"wrote {args.output}")
    return 0
