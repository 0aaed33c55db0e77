"""`pipetwin schedule`: generate one family's program (or read torch's schedule CSV), check it, dry-run it, show it."""
from __future__ import annotations

import json

from pathlib import Path

from planner.check import UnitCosts, dry_run, measured_bounds
from planner.families import FAMILIES, family
from planner.schedulespec import chunks_for
from planner.schedules import generate, make_spec
from planner.trace import bubble_fraction, makespan_s
from pipetwin.args import int_list
from pipetwin.errors import UserError
from topologies.files import output_path


def register(sub) -> None:
    p = sub.add_parser("schedule", help="print a schedule family's program as a time x worker grid",
                       description="Generate a schedule, check its invariants, dry-run it at unit costs.")
    p.add_argument("--kind", choices=FAMILIES, help="schedule family (required unless --from-torch)")
    p.add_argument("--stages", type=int, help="pipeline stages P (devices along the pipeline)")
    p.add_argument("--microbatches", type=int, help="microbatches per batch M (PipeDream: minibatches)")
    p.add_argument("--from-torch", metavar="CSV", help="read torch.distributed.pipelining's schedule CSV (compute-only "
                   "or with communication) instead of generating one; it is checked by the laws only")
    p.add_argument("--plan", metavar="JSON", help="lower this plan file (`pipetwin plan -o`) instead of generating one: "
                   "its program, which layers each stage holds included, for -o and `run/simulate --program`")
    p.add_argument("--to-torch", metavar="CSV", help="also write the program as torch's schedule CSV")
    p.add_argument("--torch-format", default="compute_only", choices=["compute_only", "compute_comms"],
                   help="what --to-torch writes (default compute_only, torch's _load_csv default)")
    p.add_argument("--program-out", "-o", metavar="JSON", help="write the program (for simulate/run --program)")
    p.add_argument("--replicas", type=int_list, default=None, help="replicas per stage, e.g. 2,1,1,1")
    p.add_argument("--chunks", type=int, default=1, help="model chunks per device (interleaved)")
    p.add_argument("--batches", type=int, default=1, help="batches (optimizer steps) for flush schedules and 2BW")
    p.add_argument("--vertical-sync", action="store_true", help="PipeDream: every stage uses stage 0's version")
    p.add_argument("--fwd", type=float, default=1.0, help="forward cost units (default 1)")
    p.add_argument("--bwd", type=float, default=2.0, help="backward cost units (default 2; BI and BW half each)")
    p.add_argument("--comm", type=float, default=0.0, help="point-to-point cost units (default 0)")
    p.add_argument("--json", action="store_true", help="print the program and its dry-run figures as JSON")
    p.add_argument("--chart", metavar="PNG", help="write a Gantt chart of the dry run")
    p.add_argument("--actions", action="store_true", help="also print every worker's full action list")
    p.set_defaults(func=run)


def _program(args):
    if args.plan:
        from planner.lowering import plan_to_program
        from planner.plan import Plan

        if args.kind or args.stages or args.microbatches or args.from_torch:
            raise UserError("--plan brings its own schedule and shape; drop --kind/--stages/--microbatches/--from-torch")
        plan = Plan.load(args.plan)
        program = plan_to_program(plan)
        args.kind, args.stages, args.microbatches, args.chunks = plan.schedule, plan.pipeline_depth, plan.microbatches, plan.chunks
        return program
    if args.from_torch:
        from planner.torch_interop import program_from_torch, read_torch_csv

        if args.kind or args.stages or args.microbatches:
            raise UserError("--from-torch reads the family, stages and microbatches from the file; drop --kind/--stages/--microbatches")
        program = program_from_torch(read_torch_csv(Path(args.from_torch).read_text()))
        args.kind, args.stages, args.microbatches = "custom", program.spec.stages, program.spec.microbatches
        args.chunks = program.spec.chunks
        return program
    if not args.kind or args.stages is None or args.microbatches is None:
        raise UserError("give --kind, --stages and --microbatches (or --from-torch FILE.csv, or --plan plan.json)")
    if args.stages < 1 or args.microbatches < 1:
        raise UserError("--stages and --microbatches must be >= 1")
    args.chunks = chunks_for(args.kind, args.chunks)
    spec = make_spec(args.kind, args.stages, args.microbatches, args.replicas, args.chunks,
                     args.vertical_sync, args.batches)
    return generate(spec)


def run(args) -> int:
    program = _program(args)
    spec = program.spec
    if args.to_torch:
        from planner.torch_interop import write_torch_csv

        output_path(args.to_torch).write_text(write_torch_csv(program, args.torch_format))
    if args.program_out:
        output_path(args.program_out).write_text(json.dumps(program.to_json()))
    costs = UnitCosts(f=args.fwd, b=args.bwd, bi=args.bwd / 2, bw=args.bwd / 2, comm=args.comm)
    trace = dry_run(program, costs)
    span, bubble = makespan_s(trace), bubble_fraction(trace)
    if args.chart:
        from pipetwin.charts import gantt

        gantt(trace, args.chart, title=f"{args.kind} P={args.stages} M={args.microbatches} "
              f"bubble={bubble:.3f}", time_unit="units")
    if args.json:
        doc = {
            "workers": {str(w): [a.to_json() for a in program[w]] for w in program.workers},
            "stage_workers": [list(ws) for ws in program.stage_workers],
            "makespan_units": span,
            "bubble_fraction": bubble,
            "family": spec.family,
        }
        if not spec.traits.generated:
            doc["measured_bounds"] = measured_bounds(program)
        print(json.dumps(doc))
        return 0
    from pipetwin.charts import text_grid

    print(f"{args.kind}: {args.stages} stages, {args.microbatches} microbatches"
          + (f", replicas {','.join(map(str, spec.replicas))}" if args.replicas else "")
          + (f", {args.chunks} chunks" if family(args.kind).multi_stage else "")
          + (f" (read from {args.from_torch}: checked by the laws only)" if args.from_torch else ""))
    print(text_grid(trace, unit=min(args.fwd, args.bwd / 2) / spec.chunks))
    print(f"makespan {span:g} units, bubble fraction {bubble:.4f}")
    if not spec.traits.generated:
        b = measured_bounds(program)
        print(f"measured (no family promises these): in flight per stage {b['inflight']}, awaiting BW per worker "
              f"{b['awaiting_weight_grad']}, microbatch order {'kept' if b['in_microbatch_order'] else 'not kept'}, "
              f"backward {b['backward']}")
    if args.actions:
        print(program.grid())
    if args.to_torch:
        print(f"torch schedule CSV ({args.torch_format}) written to {args.to_torch}")
    if args.program_out:
        print(f"program written to {args.program_out}")
    if args.chart:
        print(f"chart written to {args.chart}")
    return 0
