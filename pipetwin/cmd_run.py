"""`pipetwin run`: run a plan or a program file for real (one process per worker, torch.distributed) and report what it
measured."""
from __future__ import annotations

import argparse
import json

from pipetwin.args import add_grid_flags, add_recompute_flag, add_zero_flag, int_list, read_program
from planner.program import FAMILIES, FAMILY, family


def register(sub) -> None:
    p = sub.add_parser("run", help="run a plan for real with torch.distributed and measure it",
                       description="Run a plan on this machine, one process per worker (gloo on CPU, NCCL on GPUs), "
                                   "and print the measured throughput, bubble and memory. Give --plan, or --model "
                                   "and --pp (with --dp and --tp for data and tensor parallelism) to split the model "
                                   "evenly, or --program and --model to run a program file exactly as it is.")
    p.add_argument("--plan", metavar="JSON", help="plan file (from `pipetwin plan -o`)")
    p.add_argument("--program", metavar="JSON", help="program file (from `pipetwin schedule -o`, e.g. an imported torch "
                   "schedule): run exactly as it is, worker w as rank w, its stage_layers (else an even split) of --model")
    p.add_argument("--model", help="model spec, e.g. mlp:layers=8,width=512 (without --plan)")
    p.add_argument("--replicas", type=int_list, default=None, help="replicas per stage, e.g. 2,1 (instead of --dp)")
    add_grid_flags(p, aliases=True)  # --tp (zoo gpt/llama only), --pp/--stages, --dp, --vp/--chunks, --sequence-parallel
    # the shape flags default to None so that one given beside --plan is seen (and refused); SHAPE_DEFAULTS fills them
    p.add_argument("--schedule", default=None, choices=FAMILIES, help="default 1f1b")
    p.add_argument("--microbatches", type=int, default=None, help="microbatches per batch (PipeDream: minibatches; default 4)")
    p.add_argument("--microbatch-size", type=int, default=None, help="samples per microbatch (default 1)")
    p.add_argument("--batches", type=int, default=None, help="batches (optimizer steps) for flush schedules and 2BW (default 1)")
    p.add_argument("--vertical-sync", action="store_true", help="PipeDream: every stage uses stage 0's version")
    add_recompute_flag(p)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the plan's, 0.01)")
    p.add_argument("--optimizer", default=None, choices=["sgd", "adam", "none"],
                   help="sgd (with momentum, as the planner counts it), adam, or none (plain SGD) (default: sgd, or "
                        "what a --plan file says; Adam on flush schedules)")
    p.add_argument("--momentum", type=float, default=None, metavar="MU",
                   help="SGD's momentum, 0 < MU < 1 (default: the plan's, 0.9); plain SGD is --optimizer none")
    add_zero_flag(p, "; the executor runs 3 with --optimizer adam on gpipe or 1f1b, without --tp or --recompute, "
                     "and every replica given as many microbatches")  # executor/zero.py; over what a --plan file says
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"], help="default: NCCL with a GPU per worker, else gloo")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where stages compute (default: the GPUs under NCCL, else the CPU); cuda with gloo lets "
                        "workers share this machine's GPUs, messages staged through host memory")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds any blocking call may wait (default 60)")
    p.add_argument("--seed", type=int, default=0, help="weights and data seed (default 0)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    p.add_argument("--json", action="store_true", help="print the measured metrics as JSON")
    p.add_argument("--trace", metavar="JSON", help="write the measured trace (Chrome trace JSON, opens in Perfetto)")
    p.add_argument("--save-weights", metavar="FILE", help="write the final weights (stage{s}.{param}) with torch.save")
    p.add_argument("--checkpoint-dir", metavar="DIR", help="write each stage's weights and optimizer state here")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N", help="a checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --checkpoint-dir")
    p.set_defaults(func=run)


#: What the shape flags mean when not given (without --plan).
SHAPE_DEFAULTS = {"schedule": "1f1b", "microbatches": 4, "microbatch_size": 1, "batches": 1}
#: Flags that say a schedule and its shape: a --program file brings its own (with --plan, none may be given beside it).
_SCHEDULE_FLAGS = ("tp", "pp", "dp", "vp", "replicas", "schedule", "microbatches", "batches", "vertical_sync")
#: Flags that say the plan's shape: a --plan file brings its own, so none may be given beside it.
SHAPE_FLAGS = ("model", *_SCHEDULE_FLAGS, "microbatch_size")
#: Flags a --program file makes meaningless: another plan, or a schedule and shape of its own.
PROGRAM_SHAPE_FLAGS = ("plan", *_SCHEDULE_FLAGS)


def _given(args, names) -> list[str]:
    """The flags among ``names`` the command line gave, spelled as typed."""
    return [f"--{k.replace('_', '-')}" for k in names if getattr(args, k, None) not in (None, False)]


def _runnable_model(model: str) -> str:
    """The model a plan names, or where it names a profile JSON (`plan --model out/profile.json`), the model that
    `pipetwin profile` measured into it: the executor builds that one, the file holds only its costs."""
    from pathlib import Path

    from executor.models import ModelSpecError, num_layers
    from planner.profile import ProfileError, load_profile

    if not model.endswith(".json") or not Path(model).is_file():
        return model
    try:
        name = load_profile(model).name
        num_layers(name)
    except (ProfileError, ModelSpecError, ValueError, KeyError, TypeError):
        return model  # not a runnable model's profile: the executor says the plan's model is unknown, as before
    return name


def _plan_for(args):
    """The plan to run: the --plan file (with --lr, --recompute, --sequence-parallel applied), or the model
    split evenly by the shape flags."""
    from dataclasses import replace

    from executor.models import num_layers
    from pipetwin.errors import UserError
    from planner.plan import Plan, plan_from_flags

    if args.plan:
        given = _given(args, SHAPE_FLAGS)
        if given:
            raise UserError(f"--plan brings its own shape; drop {', '.join(given)} (or drop --plan and give "
                            f"--model and --pp)")
        plan = Plan.load(args.plan)
        plan = replace(plan, model=_runnable_model(plan.model))
        if args.zero is not None:
            plan = replace(plan, zero_stage=args.zero)
        if args.optimizer is not None:
            plan = replace(plan, optimizer=args.optimizer)
        if args.lr is not None:
            plan = replace(plan, lr=args.lr)
        if args.momentum is not None:
            plan = replace(plan, momentum=args.momentum)
        if args.recompute is not None:
            plan = replace(plan, recompute=args.recompute)
        if args.sequence_parallel:
            plan = replace(plan, sequence_parallel=True)
        return plan
    args = argparse.Namespace(**{**vars(args), **{k: v for k, v in SHAPE_DEFAULTS.items() if getattr(args, k) is None}})
    if not args.model or not args.pp:
        raise UserError("give --plan plan.json, or --model and --pp (e.g. --model mlp:layers=8,width=512 --pp 2)")
    if args.pp < 1 or args.microbatches < 1 or args.microbatch_size < 1 or args.batches < 1:
        raise UserError("--pp, --microbatches, --microbatch-size and --batches must be >= 1")
    if args.dp is not None and args.replicas is not None:
        raise UserError("give --dp (the same replicas for every stage) or --replicas (one count per stage), not both")
    if (args.vp or 1) != 1 and not family(args.schedule).multi_stage:
        raise UserError("--chunks is for the schedules that place several stages on a rank (e.g. interleaved) only")
    if args.replicas is not None and len(args.replicas) != args.pp:
        raise UserError(f"--replicas gives {len(args.replicas)} values for {args.pp} stages")
    dp = args.replicas if args.replicas is not None else (args.dp or 1)
    plan = plan_from_flags(args.model, num_layers(args.model), pp=args.pp, dp=dp, tp=args.tp or 1, vp=args.vp or 1,
                           schedule=args.schedule, microbatches=args.microbatches, microbatch_size=args.microbatch_size,
                           batches=args.batches, vertical_sync=args.vertical_sync, lr=args.lr,
                           recompute=args.recompute or "none", sequence_parallel=args.sequence_parallel)
    plan = replace(plan, zero_stage=args.zero or 0, optimizer=args.optimizer or "sgd")
    return plan if args.momentum is None else replace(plan, momentum=args.momentum)


def _run_program(args):
    """``--program``: the file as it is, on --model; (result, what ran, its schedule family, microbatch size)."""
    from executor.launch import run_program
    from pipetwin.errors import UserError

    given = _given(args, PROGRAM_SHAPE_FLAGS)
    if given:
        raise UserError(f"--program brings its own schedule and shape; drop {', '.join(given)}")
    if args.resume:
        raise UserError("--resume needs --plan: a program file runs the batches it lists, from its first action")
    if args.zero or args.optimizer == "adam":
        raise UserError("a program file runs SGD (with momentum, or plain with --optimizer none) without ZeRO; --zero "
                        "and --optimizer adam need --plan or --model and --pp")
    if not args.model:
        raise UserError("--program needs --model, the model its stages' layers come from (e.g. --model mlp:layers=8,width=256)")
    program = read_program(args.program, "run")
    mbs = args.microbatch_size if args.microbatch_size is not None else 1
    res = run_program(program, args.model, microbatch_size=mbs, lr=0.01 if args.lr is None else args.lr,
                      optimizer=args.optimizer or "sgd", momentum=0.9 if args.momentum is None else args.momentum,
                      recompute=args.recompute or "none", sequence_parallel=args.sequence_parallel,
                      backend=args.backend, timeout_s=args.timeout, save_weights=args.save_weights,
                      checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, seed=args.seed,
                      dtype=args.dtype, device=args.device)
    spec = program.spec
    return res, f"program {args.program} ({spec.family}) of {args.model}", _what(spec.family, spec.batches,
                                                                               spec.microbatches), mbs


def _what(family: str, batches: int, microbatches: int) -> str:
    """What a run of a plan or a program computed, in words (PipeDream streams minibatches, no batches)."""
    return (f"{batches} batch(es) x {microbatches} microbatches" if FAMILY[family].batched
            else f"{microbatches} minibatches")


def run(args) -> int:
    from executor.launch import run_plan
    from pipetwin.cmd_profile import human_bytes

    from topologies.files import output_path

    for path in (args.trace, args.save_weights):  # a path that cannot be written is refused before any process starts
        if path:
            output_path(path)
    if args.program:
        res, title, what, mbs = _run_program(args)
        T = res.program.tensor_parallel if res.program else 1
    else:
        plan = _plan_for(args)
        res = run_plan(plan, backend=args.backend, timeout_s=args.timeout, save_weights=args.save_weights,
                       checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume,
                       seed=args.seed, dtype=args.dtype, device=args.device)
        title, mbs, T = f"{plan.schedule} of {plan.model}", plan.microbatch_size, plan.tensor_parallel
        what = _what(plan.schedule, plan.batches, plan.microbatches)
    if args.trace:
        res.trace.save(args.trace)
    s = res.summary()
    if args.json:
        print(json.dumps(s))
        return 0
    workers = len(res.program.workers) if res.program else 0
    grid = f" (tensor-parallel groups of {T})" if T > 1 else ""
    sequence = res.plan.sequence_parallel if res.plan is not None else args.sequence_parallel
    recompute = res.plan.recompute if res.plan is not None else (args.recompute or "none")
    if sequence:
        grid = grid[:-1] + ", sequence-parallel)"
    if recompute != "none":
        grid += f" with {recompute} recomputation"
    print(f"ran {title} on {workers} workers{grid} ({res.backend}, {s['device']}): {what} of "
          f"{mbs} samples" + (f", resumed after step {res.start_step}" if res.start_step else ""))
    print(f"throughput {s['throughput_samples_per_s']:.1f} samples/s, time per batch {s['time_per_batch_s'] * 1e3:.2f} ms, "
          f"makespan {s['makespan_s'] * 1e3:.1f} ms, bubble {s['bubble_fraction'] * 100:.1f}%")
    stateful = any(d["optimizer_state_bytes"] for d in s["per_device"].values())
    if res.plan is not None and (res.plan.zero_stage or stateful):
        mu = f" (momentum {res.plan.momentum:g})" if res.plan.optimizer in ("sgd", "momentum") else ""
        print(f"optimizer {res.plan.optimizer}{mu}" + (f", ZeRO {res.plan.zero_stage} over each stage's replicas"
                                                   if res.plan.zero_stage else ""))
    for w, d in s["per_device"].items():
        state = f", optimizer state {human_bytes(d['optimizer_state_bytes'])}" if stateful else ""
        if "param_shard_bytes" in d:  # ZeRO-3: the weights a worker holds between passes
            state += f", parameter shard {human_bytes(d['param_shard_bytes'])}"
        print(f"  worker {w}: busy {d['busy_s'] * 1e3:.1f} ms, bubble {d['bubble_fraction'] * 100:.1f}%, "
              f"peak memory {human_bytes(d['peak_memory_bytes'])}{state}")
    if s["final_loss"] is not None:
        print(f"final loss {s['final_loss']:.6g}")
    if args.trace:
        print(f"trace written to {args.trace}")
    if args.save_weights:
        print(f"weights written to {args.save_weights}")
    return 0
