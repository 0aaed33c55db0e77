"""`pipetwin demo`: the embedded default run that `make demo` shows a new user."""
from __future__ import annotations

from pathlib import Path

from planner.check import UnitCosts, dry_run
from planner.schedules import generate, make_spec
from planner.trace import bubble_fraction, makespan_s, steady_bubble_fraction


def register(sub) -> None:
    p = sub.add_parser("demo", help="the default tour: schedules, plan, simulate, run, compare")
    p.add_argument("--out", default="out/demo", help="directory for charts and traces (default out/demo)")
    p.add_argument("--quick", action="store_true", help="schedules only")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from pipetwin.charts import gantt, text_grid

    print("== 1. Schedules as checked programs (unit costs: forward 1, backward 2) ==\n")
    for family, M, batches in (("1f1b", 8, 1), ("pipedream", 8, 1), ("1f1b", 8, 4), ("pipedream", 32, 1)):
        prog = generate(make_spec(family, 4, M, batches=batches))
        trace = dry_run(prog, UnitCosts())
        bf, sbf = bubble_fraction(trace), steady_bubble_fraction(trace)
        n = M * batches
        what = f"{batches} batch(es) of {M} microbatches" if prog.spec.traits.batched else f"{n} minibatches, no flush"
        print(f"{family}: 4 stages, {what}: makespan {makespan_s(trace):g} units, "
              f"bubble fraction {bf:.3f} (steady state {sbf:.3f})")
        if n == 8:
            print(text_grid(trace))
        chart = out / f"{family}_{n}.png"
        gantt(trace, chart, title=f"{family} P=4 {what} bubble={bf:.3f}", time_unit="units")
        print(f"chart: {chart}\n")
    if args.quick:
        return 0
    try:
        from pipetwin.loop import demo_loop
    except ImportError:
        return 0
    return demo_loop(out)
