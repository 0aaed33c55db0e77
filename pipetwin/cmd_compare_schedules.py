"""`pipetwin compare-schedules`: every schedule family that fits, simulated on the same plan, side by side.

The plan is the same for every family (the model split evenly over ``--stages`` devices of
the topology, ``--microbatches`` per batch); a family that places two stages on a rank
splits the same layers into twice as many stages. A family that cannot run the shape
(too few layers for its stages, a replica count it refuses) is listed with the reason.
One table (throughput, bubble, peak memory per stage so the imbalance shows) and, with
``--chart``, one picture of the same figures.
"""
from __future__ import annotations

import json

from pipetwin.args import add_device_calibration_flag, check_calibration_topology
from topologies.files import output_path


def register(sub) -> None:
    p = sub.add_parser("compare-schedules", help="simulate every schedule family on one plan and compare them",
                       description="Every family that fits, on the same model, topology, stages and microbatches: "
                                   "throughput, bubble and peak memory per stage, from the simulator.")
    p.add_argument("--model", required=True, metavar="SPEC", help="model spec (as plan/simulate take it)")
    p.add_argument("--topology", required=True, metavar="SPEC", help="topology preset or file")
    p.add_argument("--stages", type=int, default=None, help="pipeline depth P (default: min(4, layers, devices))")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches per batch (default 2P)")
    p.add_argument("--microbatch-size", type=int, default=1, help="samples per microbatch (default 1)")
    p.add_argument("--batches", type=int, default=2, help="batches simulated (default 2: the second shows overlap)")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    p.add_argument("--chart", metavar="PNG", help="write a chart: throughput, and peak memory per stage")
    add_device_calibration_flag(p)
    p.set_defaults(func=run)


def compare(profile, topology, model: str, stages: int, microbatches: int, microbatch_size: int, batches: int) -> list[dict]:
    """One record per generated family: its figures, or why it does not fit."""
    from planner.plan import PlanError, plan_from_flags
    from planner.families import FAMILIES, FAMILY, ScheduleError
    from planner.schedulespec import chunks_for
    from planner.trace import summary
    from sim import simulate_plan

    out = []
    for name in FAMILIES:
        fam = FAMILY[name]
        try:
            plan = plan_from_flags(model, len(profile), pp=stages, vp=chunks_for(name, 1), schedule=name,
                                   microbatches=microbatches, microbatch_size=microbatch_size,
                                   batches=batches if fam.batched else 1, topology=topology.name,
                                   devices=list(topology.devices))
            if not fam.batched:  # a PipeDream stream of the same number of microbatches
                from dataclasses import replace

                plan = replace(plan, microbatches=microbatches * batches)
            s = summary(simulate_plan(plan, profile, topology))
        except (PlanError, ScheduleError, ValueError) as e:
            out.append({"family": name, "fits": False, "reason": e.args[0] if e.args else str(e)})
            continue
        peaks = [d["peak_memory_bytes"] for _, d in sorted(s["per_device"].items(), key=lambda kv: int(kv[0]))]
        out.append({"family": name, "fits": True, "stages_per_rank": plan.chunks,
                    "throughput_samples_per_s": s["throughput_samples_per_s"], "time_per_batch_s": s["time_per_batch_s"],
                    "bubble_fraction": s["bubble_fraction"], "peak_memory_bytes_per_stage": peaks,
                    "peak_memory_imbalance": (max(peaks) / min(peaks)) if peaks and min(peaks) > 0 else None})
    return out


def run(args) -> int:
    from pipetwin.cmd_plan import resolve_model
    from pipetwin.errors import UserError
    from topologies.presets import load_topology

    profile = resolve_model(args.model, calibration=args.device_calibration, microbatch_size=args.microbatch_size)
    topology = load_topology(args.topology)
    check_calibration_topology(args.device_calibration, topology)
    P = args.stages if args.stages is not None else min(4, len(profile), len(topology.devices))
    M = args.microbatches if args.microbatches is not None else 2 * P
    if P < 1 or M < 1 or args.batches < 1 or args.microbatch_size < 1:
        raise UserError("--stages, --microbatches, --microbatch-size and --batches must be >= 1")
    rows = compare(profile, topology, args.model, P, M, args.microbatch_size, args.batches)
    if not any(r["fits"] for r in rows):
        raise UserError(f"no schedule fits {P} stages of {profile.name!r} on {topology.name!r}; use fewer --stages")
    if args.chart:
        _chart(rows, args.chart, f"{profile.name}: {P} ranks x {M} microbatches on {topology.name}")
    if args.json:
        print(json.dumps({"stages": P, "microbatches": M, "families": rows}))
        return 0
    _table(rows, f"{profile.name}: {P} ranks x {M} microbatches of {args.microbatch_size} on {topology.name}, "
                 f"{args.batches} batches")
    if args.chart:
        print(f"chart written to {args.chart}")
    return 0


def _table(rows: list[dict], title: str) -> None:
    """The families that fit, fastest first, as a rich table (peak memory per rank in GB, and max/min across
    ranks: the first-stage and interleaving imbalance users ask about); then those that do not fit, and why."""
    from rich.table import Table

    from pipetwin.show import console

    t = Table(title=title, title_justify="left")
    for col in ("family", "samples/s", "batch ms", "bubble", "peak GB per rank", "max/min"):
        t.add_column(col, justify="left" if col in ("family", "peak GB per rank") else "right")
    for r in sorted((r for r in rows if r["fits"]), key=lambda r: -r["throughput_samples_per_s"]):
        imb = r["peak_memory_imbalance"]
        t.add_row(r["family"], f"{r['throughput_samples_per_s']:.4g}", f"{r['time_per_batch_s'] * 1e3:.4g}",
                  f"{r['bubble_fraction']:.3f}", " ".join(f"{b / 1e9:.3g}" for b in r["peak_memory_bytes_per_stage"]),
                  f"{imb:.2f}" if imb is not None else "-")
    out = console()
    out.print(t)
    for r in rows:
        if not r["fits"]:
            out.print(f"  {r['family']} does not fit: {r['reason']}", markup=False, highlight=False)


def _chart(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = [r for r in rows if r["fits"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["family"] for r in fit]
    a.barh(names, [r["throughput_samples_per_s"] for r in fit], color="tab:blue")
    a.set_xlabel("samples/s (simulated)")
    for r in fit:
        peaks = r["peak_memory_bytes_per_stage"]
        b.plot(range(len(peaks)), [x / 1e6 for x in peaks], marker="o", label=r["family"])
    b.set_xlabel("rank")
    b.set_ylabel("peak memory (MB)")
    b.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(output_path(path), dpi=110)
    plt.close(fig)
