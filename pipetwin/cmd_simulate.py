"""`pipetwin simulate`: predict how a plan runs on a topology with the SimPy cluster model."""
from __future__ import annotations

import json
from pathlib import Path

from pipetwin.args import (add_device_calibration_flag, add_zero_flag, add_grid_flags, add_recompute_flag, check_calibration_topology,
                           grid_degrees, grid_given, grid_plan, int_list, read_program)
from pipetwin.show import Progress

from planner.families import FAMILIES, FAMILY


def register(sub) -> None:
    p = sub.add_parser("simulate", help="predict a plan's trace and metrics with the SimPy cluster model",
                       description="Simulate a plan (--plan) or an even split of a model (--model, --topology).")
    p.add_argument("--plan", metavar="JSON", help="plan file (from `pipetwin plan -o`)")
    p.add_argument("--program", metavar="JSON", help="program file (from `pipetwin schedule -o`, e.g. an imported torch "
                   "schedule): run as it is, its stage_layers (else the layers split evenly over its stages), worker w "
                   "on the topology's w-th device")
    p.add_argument("--model", metavar="SPEC", help="profile: .json, graph.txt or uniform:layers=L,fwd=S,bwd=S,act=B,params=B "
                   "(default with --plan: the plan's model)")
    p.add_argument("--topology", metavar="SPEC", help="preset (ideal:8, dgx:servers=2, hier:8x4, ...) or file "
                   "(default with --plan: the plan's topology)")
    p.add_argument("--schedule", default="auto", choices=("auto", *FAMILIES),
                   help="schedule family; auto (default) lets the planner score every family")
    p.add_argument("--stages", type=int, help="pipeline stages P (default: min(4, layers, devices))")
    p.add_argument("--replicas", type=int_list, default=None, help="replicas per stage, e.g. 2,1,1,1")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches per batch (PipeDream: minibatches); overrides the planner")
    p.add_argument("--microbatch-size", type=int, default=1, help="samples per microbatch (default 1)")
    p.add_argument("--chunks", type=int, default=1, help="model chunks per device (interleaved; default 2 there)")
    p.add_argument("--vertical-sync", action="store_true", help="PipeDream: every stage uses stage 0's version")
    add_recompute_flag(p)
    add_grid_flags(p)
    add_device_calibration_flag(p)
    p.add_argument("--steps", type=int, default=None, metavar="N", help="batches (optimizer steps) to simulate")
    p.add_argument("--params", metavar="JSON",
                   help="simulator parameters (sim_params.json from `pipetwin calibrate`); the flags below override it")
    p.add_argument("--overhead", type=float, default=None, metavar="S", help="seconds of fixed cost per action (default 0)")
    p.add_argument("--no-overlap", action="store_true", help="devices wait for their sends to be delivered")
    p.add_argument("--allreduce", default=None, choices=["auto", "ring", "hierarchical"],
                   help="all-reduce algorithm (default auto)")
    p.add_argument("--optimizer-state", type=float, default=None, metavar="X",
                   help="optimizer state in parameter-bytes multiples (SGD momentum 1, Adam 2; default: a --plan file's optimizer, else 1)")
    add_zero_flag(p)
    p.add_argument("--no-prefetch", action="store_true",
                   help="ZeRO-3: no prefetch, every gather and reduce-scatter exposed (SimParams.fsdp_overlap false)")
    p.add_argument("--jitter", type=float, default=None, help="relative noise on compute times (default 0)")
    p.add_argument("--seed", type=int, default=None, help="seed of the jitter (default 0)")
    p.add_argument("--no-symmetry", action="store_true", help="simulate every replica even when symmetric")
    p.add_argument("--trace", metavar="JSON", help="write the predicted trace (Chrome trace JSON, opens in Perfetto)")
    p.add_argument("--chart", metavar="PNG", help="write a Gantt chart of the predicted run")
    p.add_argument("--json", action="store_true", help="print the predicted metrics as JSON")
    p.add_argument("--progress", action="store_true", help="show the simulation's progress on stderr")
    p.set_defaults(func=run)


def _plan_for(args, profile, topology):
    """The plan the shortcut (--model/--topology) simulates.

    The planner chooses (partition, replication, placement, schedule, microbatches)
    unless --stages or --replicas override it; then the layers are split evenly
    over the topology's first devices.
    """
    from dataclasses import replace

    from planner.plan import plan_from_flags

    if grid_given(args):
        return grid_plan(args, args.model, profile, topology.devices, schedule=args.schedule,
                         microbatches=args.microbatches, microbatch_size=args.microbatch_size, batches=args.steps or 1,
                         vertical_sync=args.vertical_sync, topology=args.topology)
    if args.stages is None and args.replicas is None:
        from planner.search import plan_model

        result = plan_model(profile, topology, schedule=args.schedule, microbatch_size=args.microbatch_size,
                            microbatches=args.microbatches, model_name=args.model, recompute=args.recompute,
                            zero_stage=args.zero or 0)
        plan = replace(result.best, batches=args.steps or result.best.batches, topology=args.topology)
        if args.vertical_sync and FAMILY[plan.schedule].versions == "stash":  # vertical sync orders stashed versions
            plan = replace(plan, vertical_sync=True)
        return plan
    schedule = "1f1b" if args.schedule == "auto" else args.schedule
    depth = args.stages or len(args.replicas)
    return plan_from_flags(args.model, len(profile), pp=depth, dp=args.replicas or 1, vp=args.chunks, schedule=schedule,
                           microbatches=args.microbatches or 4, microbatch_size=args.microbatch_size,
                           vertical_sync=args.vertical_sync, batches=args.steps or 1, topology=args.topology,
                           devices=topology.devices, recompute=args.recompute)


def _inputs(args):
    from dataclasses import replace

    from pipetwin.errors import UserError
    from planner.plan import Plan
    from planner.profile import load_profile
    from topologies.presets import load_topology

    if args.plan:
        plan = Plan.load(args.plan)
        model = args.model or plan.model
        topo_spec = args.topology or plan.topology
        if not topo_spec:
            raise UserError(f"plan {args.plan!r} names no topology; give --topology")
        from pipetwin.cmd_plan import resolve_model

        if grid_given(args) or args.stages or args.replicas:
            raise UserError("give either --plan or a plan's shape (--tp/--pp/--dp/--vp, --stages/--replicas), not both")
        profile = resolve_model(model, tensor_parallel=plan.tensor_parallel, sequence_parallel=plan.sequence_parallel,
                                calibration=args.device_calibration, microbatch_size=plan.microbatch_size)
        topology = load_topology(topo_spec)
        check_calibration_topology(args.device_calibration, topology)
        if args.steps:
            plan = replace(plan, batches=args.steps)
        if args.recompute is not None:
            plan = replace(plan, recompute=args.recompute)
        return plan, profile, topology
    if not args.model or not args.topology:
        raise UserError("give --plan plan.json, or --model and --topology (e.g. --model uniform:layers=8 --topology ideal:4)")
    for name in ("microbatches", "microbatch_size", "chunks"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.stages is not None and args.stages < 1:
        raise UserError("--stages must be >= 1")
    from pipetwin.cmd_plan import resolve_model

    topology = load_topology(args.topology)
    tp = 1
    if grid_given(args):
        if args.stages is not None or args.replicas is not None or args.chunks != 1:
            raise UserError("give the plan's shape one way: --tp/--pp/--dp/--vp, or --stages/--replicas/--chunks")
        tp = grid_degrees(args, len(topology.devices))[0]
    check_calibration_topology(args.device_calibration, topology)
    profile = resolve_model(args.model, tensor_parallel=tp, sequence_parallel=args.sequence_parallel,
                            calibration=args.device_calibration, microbatch_size=args.microbatch_size)
    return _plan_for(args, profile, topology), profile, topology


def _params_file(args) -> dict:
    """What --params sets (read after ``_params`` checked it)."""
    return json.loads(Path(args.params).read_text()) if args.params else {}


def _params(args):
    """SimParams from --params (if given) with the explicit flags on top."""
    from dataclasses import fields

    from pipetwin.errors import UserError
    from sim import SimParams

    base: dict = {}
    if args.params:
        try:
            base = json.loads(Path(args.params).read_text())
        except OSError as e:
            raise UserError(f"--params {args.params}: cannot read it ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise UserError(f"--params {args.params}: not valid JSON (line {e.lineno}: {e.msg})") from None
        known = {f.name for f in fields(SimParams)}
        if not isinstance(base, dict) or set(base) - known:
            extra = sorted(set(base) - known) if isinstance(base, dict) else "not an object"
            raise UserError(f"--params {args.params}: unknown simulator parameters {extra}; known: {', '.join(sorted(known))}")
    flags = {"overhead_s": args.overhead, "allreduce": args.allreduce, "optimizer_state_factor": args.optimizer_state,
             "zero_stage": args.zero,
             "jitter": args.jitter, "seed": args.seed}
    base.update({k: v for k, v in flags.items() if v is not None})
    if args.no_overlap:
        base["overlap_comm"] = False
    if args.no_symmetry:
        base["use_symmetry"] = False
    if args.no_prefetch:
        base["fsdp_overlap"] = False
    try:
        return SimParams(**base)
    except TypeError as e:
        raise UserError(f"--params {args.params}: {e}") from None


def _simulate_program(args, params):
    """``--program``: the program file as it is, on --model and --topology."""
    from pipetwin.cmd_plan import resolve_model
    from pipetwin.errors import UserError
    from sim import simulate
    from topologies.presets import load_topology

    if args.plan or grid_given(args) or args.stages or args.replicas:
        raise UserError("--program brings its own schedule and shape; drop --plan and the shape flags")
    if not args.model or not args.topology:
        raise UserError("--program needs --model and --topology (e.g. --model uniform:layers=8 --topology ideal:4)")
    program = read_program(args.program, "simulate")
    topology = load_topology(args.topology)
    if len(program.workers) > len(topology.devices):
        raise UserError(f"the program has {len(program.workers)} workers but topology {topology.name!r} has "
                        f"{len(topology.devices)} devices; use a larger topology")
    devices = {w: topology.devices[i] for i, w in enumerate(program.workers)}
    check_calibration_topology(args.device_calibration, topology)
    profile = resolve_model(args.model, tensor_parallel=program.tensor_parallel, calibration=args.device_calibration,
                            microbatch_size=args.microbatch_size)
    layers = program.layers(len(profile))  # the program's stage_layers must cover the model (else an even split)
    trace = simulate(program, profile, topology, devices, microbatch_size=args.microbatch_size,
                     params=params, stage_layers=list(layers))
    spec = program.spec
    return trace, f"{spec.family} program {len(program.workers)} workers x {spec.microbatches} microbatches on {topology.name}"


def _grid(plan) -> str:
    """The plan's device grid in words: pipeline stages, their replicas (data parallel) and tensor-parallel ranks."""
    words = f"{plan.pipeline_depth} stages"
    reps = plan.replicas
    if any(r > 1 for r in reps):
        words += f" x {reps[0]} replicas" if len(set(reps)) == 1 else f" x replicas {','.join(map(str, reps))}"
    if plan.tensor_parallel > 1:
        words += f" x {plan.tensor_parallel} tensor-parallel ranks" + (" (sequence parallel)" if plan.sequence_parallel else "")
    return f"{words} ({len(plan.devices)} devices)"


def run(args) -> int:
    from planner.trace import summary
    from sim import SimParams, bytes_per_link, simulate_plan

    params = _params(args)
    if args.program:
        trace, title = _simulate_program(args, params)
    else:
        plan, profile, topology = _inputs(args)
        if args.zero is not None:  # the flag over what a plan file says
            from dataclasses import replace

            plan = replace(plan, zero_stage=args.zero)
        if args.no_prefetch and plan.zero_stage != 3:  # only ZeRO-3 gathers weights to prefetch
            from pipetwin.errors import UserError

            raise UserError(f"--no-prefetch changes ZeRO-3's weight gathers, and this plan runs "
                            f"{'ZeRO-' + str(plan.zero_stage) if plan.zero_stage else 'no ZeRO'}; add --zero 3 or drop --no-prefetch")
        if args.optimizer_state is None and "optimizer_state_factor" not in _params_file(args):
            from dataclasses import replace

            from planner.costmodel import OPTIMIZER_STATE

            params = replace(params, optimizer_state_factor=OPTIMIZER_STATE[plan.optimizer])  # the plan's optimizer
        with Progress(args.progress) as bar:
            trace = simulate_plan(plan, profile, topology, params,
                                  progress=(lambda done, total: bar("simulating actions", done, total)) if args.progress else None)
        title = f"{plan.schedule}, {_grid(plan)}, {plan.microbatches} microbatches on {topology.name}"
        if plan.zero_stage:
            title += f", ZeRO-{plan.zero_stage}"
    if args.trace:
        trace.save(args.trace)
    if args.chart:
        from pipetwin.charts import gantt

        gantt(trace, args.chart, title=title, time_unit="ms")
    s = summary(trace)
    if args.json:
        s["symmetry"] = trace.meta.get("symmetry")
        s["allreduce"] = trace.meta.get("allreduce")
        s["bytes_per_link"] = bytes_per_link(trace)
        print(json.dumps(s))
        return 0
    print(f"simulated {title}")
    print(f"  throughput {s['throughput_samples_per_s']:.4g} samples/s, time per batch {s['time_per_batch_s'] * 1e3:.4g} ms, "
          f"makespan {s['makespan_s'] * 1e3:.4g} ms, bubble fraction {s['bubble_fraction']:.3f}")
    sym = trace.meta.get("symmetry") or {}
    if sym.get("folded"):
        what = "TP ranks and replicas" if sym.get("tp_folded") else "replicas"
        print(f"  symmetry: {what} folded, one worker of every {sym['replicas']} simulated on a quotient of the "
              f"links (sim.fold)")
    elif sym.get("used"):
        print(f"  symmetry: one of {sym['replicas']} identical replicas per stage simulated")
    for w, d in s["per_device"].items():
        print(f"  w{w:<4} busy {d['busy_s'] * 1e3:10.4g} ms  bubble {d['bubble_fraction']:.3f}  "
              f"peak memory {d['peak_memory_bytes'] / 1e9:.4g} GB")
    for what, path in (("trace", args.trace), ("chart", args.chart)):
        if path:
            print(f"{what} written to {path}")
    return 0

