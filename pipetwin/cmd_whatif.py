"""`pipetwin whatif`: sweep clusters (device counts × kinds × interconnects × schedules × microbatch sizes) for one model."""
from __future__ import annotations

import argparse
import json

from pipetwin.args import (add_device_calibration_flag, add_zero_flag, add_grid_flags, add_recompute_flag, check_calibration_kinds,
                           counts as _counts, grid_given, words as _words)
from pipetwin.errors import UserError
from pipetwin.scoring import run_sweep
from pipetwin.show import Progress, console, plot_sweep, stage_table
from topologies.clusters import INTERCONNECT_HELP
from whatif import SweepConfig, WhatIfError, cost_per_sample, fewest_devices_for, why_nothing_fits


def register(sub) -> None:
    p = sub.add_parser("whatif", help="capacity planning: sweep cluster sizes, device kinds and interconnects",
                       description="Plan a model on every combination of device count, device kind, interconnect, "
                                   "schedule and microbatch size; print the Pareto front (throughput, devices, memory "
                                   "per device, cost per sample) and the fewest devices that reach a target.")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="gpt3-13b, gpt:layers=40,hidden=5120,heads=40,seq=2048,vocab=50257, vgg16, a profile path, ...")
    p.add_argument("--devices", required=True, type=_counts, metavar="LIST",
                   help="device counts: 8,16,64 or 8,16,...,512 (geometric, ratio of the first two) or 8:64:8 (range)")
    p.add_argument("--device-kinds", type=_words, default=None, metavar="LIST",
                   help="catalogue kinds, e.g. a100-80gb,h100 (default: the model's @kind, else a100-80gb)")
    p.add_argument("--interconnects", type=_words, default=("dgx-ib200",), metavar="LIST", help=INTERCONNECT_HELP)
    p.add_argument("--schedules", type=_words, default=("auto",), metavar="LIST",
                   help="auto (the planner chooses) or families, e.g. 1f1b,gpipe,interleaved,2bw,pipedream,zb-h1")
    p.add_argument("--microbatch-sizes", type=_counts, default=(1,), metavar="LIST", help="samples per microbatch (default 1)")
    p.add_argument("--global-batch", type=int, default=None, metavar="N",
                   help="samples per optimizer step, the same at every size (default: the planner chooses)")
    p.add_argument("--optimizer", default="adam", choices=["adam", "sgd", "none"],
                   help="optimizer state in the memory accounting (default adam: 16 bytes/parameter)")
    add_recompute_flag(p)
    add_zero_flag(p)
    add_grid_flags(p, sequence_parallel=False)
    add_device_calibration_flag(p)
    p.add_argument("--target-throughput", type=float, default=None, metavar="X", help="samples/s to reach with the fewest devices")
    p.add_argument("--price", type=_prices, default=None, metavar="KIND=$,..",
                   help="dollars per device-hour, e.g. a100-80gb=1.5,h100=2.5 (adds cost per sample)")
    p.add_argument("--simulate", default="pareto", choices=["pareto", "all", "none"],
                   help="simulate the Pareto points (default), every feasible point, or none")
    p.add_argument("--sim-batches", type=int, default=1, metavar="N",
                   help="batches per simulation of a flush schedule (default 1: each batch pays fill and drain; "
                        "3 adds the overlap between batches)")
    p.add_argument("--jobs", type=int, default=None, metavar="N", help="worker processes (default: all cores)")
    p.add_argument("--cache", default=None, metavar="FILE", help="JSON-lines cache of finished points; resumes a sweep")
    p.add_argument("--plot", default=None, metavar="PNG", help="write throughput and memory against devices")
    p.add_argument("--json", action="store_true", help="print points, pareto (and target) as JSON")
    p.add_argument("--progress", action="store_true", help="a progress bar on stderr even when it is not a terminal "
                   "(default: the bar on a terminal, else a line per finished point)")
    p.add_argument("--no-progress", action="store_true", help="nothing on stderr while the sweep runs")
    p.set_defaults(func=run)


# --- argument types ------------------------------------------------------------------------------
def _prices(text: str) -> dict[str, float]:
    from topologies.devices import device_kind

    out: dict[str, float] = {}
    for part in _words(text):
        k, eq, v = part.partition("=")
        try:
            out[device_kind(k).name] = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects KIND=DOLLARS_PER_HOUR pairs like h100=2.5, got {part!r}") from None
    return out


# --- the command ---------------------------------------------------------------------------------
def _recompute(mode: str | None) -> bool | str:
    """The sweep's recomputation: False / True for none / full, as sweeps always recorded them (cache files of
    earlier sweeps keep their keys), "selective" by name; ``planner.recompute.recompute_mode`` reads all three."""
    return {None: False, "none": False, "full": True}.get(mode, mode)


def run(args) -> int:
    from planner.analytic import split_device_suffix

    model, suffix = split_device_suffix(args.model)
    cal = args.device_calibration
    kinds = args.device_kinds or ((suffix,) if suffix else (cal.kind.name if cal else "a100-80gb",))
    check_calibration_kinds(cal, kinds, "the sweep (--device-kinds or the model's @kind)")
    if args.jobs is not None and args.jobs < 1:
        raise UserError("--jobs must be >= 1")
    if args.target_throughput is not None and not args.target_throughput > 0:
        raise UserError("--target-throughput must be a positive number of samples/s")
    from planner.analytic import load_model

    load_model(model, kinds[0], calibration=cal)  # an unknown model fails here, in one line, before any worker starts
    config = SweepConfig(model=model, devices=tuple(sorted(set(args.devices))), device_kinds=kinds,
                         interconnects=args.interconnects, schedules=args.schedules,
                         microbatch_sizes=tuple(sorted(set(args.microbatch_sizes))), global_batch=args.global_batch,
                         optimizer=args.optimizer, recompute=_recompute(args.recompute), simulate=args.simulate,
                         sim_batches=args.sim_batches, calibration=cal, zero_stage=args.zero or 0,
                         grid=(args.tp, args.pp, args.dp, args.vp) if grid_given(args) else None)
    with Progress("bar" if args.progress else "off" if args.no_progress else "auto") as progress:
        result = run_sweep(config, jobs=args.jobs, cache=args.cache, prices=args.price, progress=progress)
    if not any(r.ok for r in result.records):
        raise WhatIfError(why_nothing_fits(result.records, model))
    if args.plot:
        plot_sweep(result, args.plot)
    if args.json:
        print(json.dumps(result.to_json(args.target_throughput), allow_nan=False))
        return 0
    _print(result, args)
    return 0


def _print(result, args) -> None:
    from rich.table import Table

    con = console()
    recs = result.records
    ok = [r for r in recs if r.ok]
    bad = [r for r in recs if not r.ok]
    con.print(f"[bold]{result.config.model}[/]: {len(recs)} configurations, {len(ok)} feasible, "
              f"{len(result.pareto)} on the Pareto front" + (f" ({result.cached} from the cache)" if result.cached else ""))
    t = Table(title="Pareto front (throughput ↑, devices ↓, memory per device ↓" + (", cost per sample ↓)" if args.price else ")"),
              title_justify="left")
    cols = ["devices", "kind", "interconnect", "schedule", "mb×M", "stages×replicas", "samples/s", "simulated",
            "peak GB", "bound by"] + (["$ per 1M samples"] if args.price else [])
    for c in cols:
        t.add_column(c, justify="left" if c in ("kind", "interconnect", "schedule", "bound by", "stages×replicas") else "right")
    for i in result.pareto:
        t.add_row(*_row(recs[i], args.price))
    con.print(t)
    if bad:
        kinds: dict[str, int] = {}
        for r in bad:
            kinds[r.status] = kinds.get(r.status, 0) + 1
        first = next(r for r in bad)
        con.print(f"not plannable: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                  + f" (e.g. {first.devices}×{first.device_kind} {first.interconnect}: {first.reason})")
    if args.target_throughput is not None:
        hit, best = fewest_devices_for(recs, args.target_throughput, args.price)
        if hit is not None:
            con.print(f"\n[bold]target {args.target_throughput:g} samples/s[/]: fewest devices {hit.devices} "
                      f"({hit.device_kind}, {hit.interconnect}, {hit.plan['schedule']}) at "
                      f"{hit.throughput_samples_per_s:.4g} samples/s" + _sim_note(hit, args.target_throughput))
            shown = hit
        else:
            con.print(f"\n[bold]target {args.target_throughput:g} samples/s is not reachable[/] in this sweep: the best "
                      f"reachable is {best.throughput_samples_per_s:.4g} samples/s with {best.devices}×"
                      f"{best.device_kind} on {best.interconnect} ({best.plan['schedule']})")
            shown = best
    else:
        shown = max(ok, key=lambda r: r.throughput_samples_per_s)
        con.print(f"\nhighest throughput: {shown.devices}×{shown.device_kind} on {shown.interconnect}")
    if shown.explanation:
        con.print(shown.explanation)
    con.print(stage_table(shown.stages, title="per stage (compute, communication, memory, slack, binding constraint)"))
    if args.plot:
        con.print(f"plot written to {args.plot}")


def _sim_note(rec, target: float) -> str:
    sim = rec.simulated
    if not sim:
        return ""
    x = sim["throughput_samples_per_s"]
    return f"; simulated {x:.4g} samples/s" + ("" if x >= target else " — [yellow]below the target in simulation[/]")


def _row(r, prices) -> list[str]:
    plan = r.plan
    reps = [s["replicas"] for s in plan["stages"]]
    shape = f"{len(reps)}×{reps[0]}" if len(set(reps)) == 1 else f"{len(reps)}×({','.join(map(str, reps))})"
    sim = r.simulated
    row = [str(r.devices) + ("" if r.devices_used == r.devices else f" ({r.devices_used} used)"),
           r.device_kind, r.interconnect, plan["schedule"] + (f" v={plan['chunks']}" if plan["chunks"] > 1 else ""),
           f"{plan['microbatch_size']}×{plan['microbatches']}", shape, f"{r.throughput_samples_per_s:.4g}",
           f"{sim['throughput_samples_per_s']:.4g}" if sim else ("error" if r.simulation_error else "–"),
           f"{r.peak_memory_bytes / 1e9:.1f}", r.binding or ""]
    if prices:
        c = cost_per_sample(r, prices)
        row.append("–" if c is None else f"{c * 1e6:.2f}")
    return row
