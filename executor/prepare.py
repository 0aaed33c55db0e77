"""How a run is configured (RunConfig) and what it checks before any process starts (prepare).

A run executes a *program*: a plan is lowered into one (``planner.lowering``), and a
program file runs as it is. ``prepare`` turns a ``RunConfig`` into a ``Prepared``
through one entry point, ``prepare_program``: the program checked against its
model (which layers each stage holds, the workers it names, its laws), the
settings it runs with (model, microbatch size, learning rate, recomputation),
the checkpoint to resume from. Every rank calls it on the same config and so
runs the same program; bad input raises ``ExecutorError`` with one line that
says what to do.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from executor import checkpoint as ckpt
from executor.errors import ExecutorError
from executor.zero import EXECUTOR_OPTIMIZERS
from planner.plan import Plan, PlanError
from planner.program import FAMILY, FLUSH_FAMILIES, Program

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RunConfig:
    """What to run and how; the same on every worker.

    Attributes:
        plan: the plan as a dict (``Plan.to_dict``); its program is generated from it. Give this or ``program``.
        program: a program as a dict (``Program.to_json``), run exactly as it is.
        model: with ``program``: the model spec its stages' layers come from.
        microbatch_size: with ``program``: samples per microbatch.
        lr: with ``program``: the SGD learning rate.
        optimizer: with ``program``: "sgd" (with ``momentum``) or "none" (plain SGD), as a plan's.
        momentum: with ``program``: SGD's momentum μ.
        recompute: with ``program``: activation recomputation, "none", "selective" or "full".
        sequence_parallel: with ``program``: Megatron sequence parallelism (a tensor-parallel program).
        backend: "gloo" or "nccl" (the launcher resolves "auto").
        device: where stages compute: "cpu" or "cuda" (the launcher resolves "auto"). NCCL implies
            "cuda" with one GPU per worker; gloo with "cuda" lets workers share the GPUs there are
            (rank modulo the GPU count) and stages every message and all-reduce through host memory.
        timeout_s: limit of every blocking call (process-group timeout).
        seed: model weights and data seed.
        dtype: parameter and activation dtype name (see DTYPES).
        checkpoint_dir: where to write and read checkpoints (None: none).
        checkpoint_every: write a checkpoint every N optimizer steps (0: only with a dir, at the end).
        resume: continue from the newest complete checkpoint in checkpoint_dir (plans only).
        collect_weights: send the final weights to rank 0.
        track_memory: record memory samples.
    """

    plan: dict | None = None
    program: dict | None = None
    model: str | None = None
    microbatch_size: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    recompute: str = "none"
    sequence_parallel: bool = False
    backend: str = "gloo"
    device: str = "cpu"
    timeout_s: float = 60.0
    seed: int = 0
    dtype: str = "float32"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    collect_weights: bool = True
    track_memory: bool = True


@dataclass(frozen=True)
class Prepared:
    """A program checked against its model, with the settings it runs with.

    Attributes:
        program: the program of the batches left to run, its ``stage_layers`` filled in (None when a resumed run
            has nothing left).
        model: the model spec.
        layers: (first, last) layer of every stage.
        microbatch_size: samples per microbatch.
        lr: SGD learning rate.
        recompute: activation recomputation mode.
        sequence_parallel: Megatron sequence parallelism.
        start_step: optimizer steps already done (from a checkpoint), 0 for a fresh run.
        plan: the plan the program was lowered from (None for a program file).
        optimizer: the plan's optimizer name (``planner.plan.OPTIMIZERS``; ``executor.zero.EXECUTOR_OPTIMIZERS``
            says what steps for it).
        momentum: SGD's momentum μ (with "sgd" and "momentum").
    """

    program: Program | None
    model: str
    layers: tuple[tuple[int, int], ...]
    microbatch_size: int = 1
    lr: float = 0.01
    recompute: str = "none"
    sequence_parallel: bool = False
    start_step: int = 0
    plan: Plan | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9

    @property
    def family(self) -> str:
        return self.program.spec.family if self.program is not None else self.plan.schedule


def prepare(cfg: RunConfig) -> Prepared:
    """Check the plan or program against its model; raise ExecutorError on bad input.

    A plan is lowered into its program (the batches a checkpoint leaves to run); both then go through
    ``prepare_program``.
    """
    from planner.program import ProgramFileError

    if (cfg.plan is None) == (cfg.program is None):
        raise ExecutorError("a run needs either a plan or a program (exactly one)")
    if cfg.dtype not in DTYPES:
        raise ExecutorError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    if not cfg.timeout_s > 0:
        raise ExecutorError("--timeout must be > 0 seconds")
    if cfg.checkpoint_every < 0:
        raise ExecutorError("--checkpoint-every must be >= 0")
    if (cfg.checkpoint_every or cfg.resume) and not cfg.checkpoint_dir:
        raise ExecutorError("--checkpoint-every and --resume need --checkpoint-dir")
    if cfg.plan is not None:
        return _prepare_plan(cfg)
    if cfg.resume:
        raise ExecutorError("--resume needs --plan: a program file runs the batches it lists, from its first action")
    if not cfg.model:
        raise ExecutorError("a program needs the model it runs (--model, e.g. mlp:layers=8,width=256)")
    try:
        program = Program.from_json(cfg.program)
    except ProgramFileError as e:
        raise ExecutorError(f"bad program: {e.args[0]}") from None
    if cfg.optimizer not in ("sgd", "none"):
        raise ExecutorError(f"a program file runs SGD: optimizer 'sgd' (with momentum) or 'none' (plain), not "
                            f"{cfg.optimizer!r}; Adam needs --plan or --model and --pp")
    try:
        Plan.check_momentum(cfg.momentum)
    except PlanError as e:
        raise ExecutorError(str(e)) from None
    return prepare_program(program, cfg, model=cfg.model, microbatch_size=cfg.microbatch_size, lr=cfg.lr,
                           recompute=cfg.recompute, sequence_parallel=cfg.sequence_parallel,
                           optimizer=cfg.optimizer, momentum=cfg.momentum)


def _prepare_plan(cfg: RunConfig) -> Prepared:
    """The plan's program (of the batches a checkpoint leaves to run) through ``prepare_program``."""
    from planner.check import ProgramError
    from planner.lowering import plan_to_program
    from planner.schedules import ScheduleError

    try:
        plan = Plan.from_dict(cfg.plan)
    except PlanError as e:
        raise ExecutorError(f"bad plan: {e}") from None
    n = _num_layers(plan.model, "the plan's model")
    if plan.num_layers != n:
        raise ExecutorError(f"the plan covers {plan.num_layers} layers but model {plan.model!r} has {n}; "
                            f"re-plan for this model (or fix the stages' layer ranges)")
    _check_optimizer(plan, cfg)
    start = 0
    if cfg.resume:
        start = ckpt.latest_complete_step(cfg.checkpoint_dir, len(plan.stages)) or 0
        start = min(start, plan.batches)
        if start:
            ckpt.check_optimizer(cfg.checkpoint_dir, start, [s.layers for s in plan.stages], model=plan.model,
                                 optimizer=EXECUTOR_OPTIMIZERS[plan.optimizer])
    settings = dict(model=plan.model, microbatch_size=plan.microbatch_size, lr=float(plan.lr), recompute=plan.recompute,
                    sequence_parallel=plan.sequence_parallel, start_step=start, plan=plan, optimizer=plan.optimizer,
                    momentum=float(plan.momentum))
    if start >= plan.batches and start > 0:
        _check_checkpoints(cfg, plan.schedule in FLUSH_FAMILIES, plan.schedule)
        return Prepared(None, layers=tuple(s.layers for s in plan.stages), **settings)
    try:
        program = plan_to_program(replace(plan, batches=plan.batches - start) if start else plan)
    except (PlanError, ScheduleError, ProgramError) as e:
        raise ExecutorError(f"the plan's schedule: {e.args[0] if e.args else e}") from None
    return prepare_program(program, cfg, checked=True, **settings)


def prepare_program(program: Program, cfg: RunConfig, *, model: str, microbatch_size: int = 1, lr: float = 0.01,
                    recompute: str = "none", sequence_parallel: bool = False, start_step: int = 0,
                    plan: Plan | None = None, checked: bool = False, optimizer: str = "sgd",
                    momentum: float = 0.9) -> Prepared:
    """The one entry point every run goes through: ``program`` checked against ``model`` and made ready to run.

    Args:
        program: what runs, exactly (a plan's lowered program, or a program file's).
        cfg: the run's settings (checkpoints are checked against the program's family).
        model: the model spec; the program's ``stage_layers`` must cover its layers (an even split when it
            names none).
        microbatch_size, lr, recompute, sequence_parallel, optimizer, momentum: what the run computes with.
        start_step: optimizer steps a checkpoint already did.
        plan: the plan the program came from, if any (kept for the result).
        checked: the program has passed ``planner.check.check`` already (a plan's program is checked when lowered).

    Raises:
        ExecutorError: one line naming what is wrong with the program or the settings and what to do.
    """
    from planner.check import ProgramError, check
    from planner.program import ProgramFileError, ScheduleError
    from planner.recompute import MODES

    n = _num_layers(model, "the model")
    try:
        program.check_shape()
        layers = program.layers(n)
    except ProgramFileError as e:
        raise ExecutorError(e.args[0]) from None
    try:
        fam = program.spec.traits
    except ScheduleError as e:
        raise ExecutorError(f"bad program: {e.args[0]}") from None
    _check_workers(program)
    if microbatch_size < 1:
        raise ExecutorError(f"--microbatch-size must be >= 1 (got {microbatch_size})")
    if recompute not in MODES:
        raise ExecutorError(f"unknown recompute mode {recompute!r}; choose one of {', '.join(MODES)}")
    if sequence_parallel and program.tensor_parallel < 2:
        raise ExecutorError("sequence parallelism needs a tensor-parallel program (tensor_parallel >= 2)")
    if program.tensor_parallel > 1:
        from executor.tensor_parallel import check_model

        check_model(model, program.tensor_parallel, sequence_parallel)
    _check_checkpoints(cfg, fam.flush, program.spec.family)
    if not checked:
        try:
            check(program)
        except ProgramError as e:
            raise ExecutorError(f"the program breaks a law of schedules: {e.args[0]}") from None
    return Prepared(replace(program, stage_layers=layers), model, layers, microbatch_size, float(lr), recompute,
                    sequence_parallel, start_step, plan, optimizer, float(momentum))


def _check_optimizer(plan: Plan, cfg: RunConfig) -> None:
    """The executor runs ZeRO 1, 2 and 3 and Adam on flush schedules (one weight version, stepped in place;
    ``executor.zero``), without checkpoints (they keep Adam's moments and ZeRO's shards not); ZeRO-3 as
    :func:`_check_zero3` says. SGD (with momentum or plain) runs every schedule, and checkpoints keep its buffer."""
    from planner.costmodel import zero_family_refusal

    why = zero_family_refusal(plan.schedule, plan.zero_stage)
    if why:
        raise ExecutorError(why)
    if plan.zero_stage == 3:
        _check_zero3(plan)
    stateful = plan.zero_stage or plan.optimizer == "adam"
    if plan.optimizer == "adam" and plan.schedule not in FLUSH_FAMILIES:
        raise ExecutorError(f"the executor runs Adam on flush schedules (gpipe, 1f1b, ...) only; {plan.schedule} "
                            f"keeps several weight versions: re-plan with --optimizer sgd or a flush schedule")
    if stateful and (cfg.checkpoint_dir or cfg.resume):
        raise ExecutorError("checkpoints keep SGD's momentum but not Adam's moments or ZeRO's shards yet: drop "
                            "--checkpoint-dir, or re-plan with --optimizer sgd and without --zero")


def _check_zero3(plan: Plan) -> None:
    """ZeRO-3 in the executor (``executor.zero.ShardedStage``): any optimizer, a flush schedule of whole backwards
    (F and B: gpipe, 1f1b) with one stage per device, every replica running as many microbatches, no tensor
    parallelism and no recomputation."""
    from planner.costmodel import zero_refusal

    why = zero_refusal(plan, 3)
    if why:
        raise ExecutorError(why)
    fam = FAMILY[plan.schedule]
    if fam.backward != "full":
        raise ExecutorError(f"the executor runs ZeRO-3 on schedules with whole backwards (gpipe, 1f1b); {plan.schedule} "
                            f"splits them (BI, BW): use --schedule 1f1b, or --zero 2")
    if plan.tensor_parallel > 1:
        raise ExecutorError("the executor runs ZeRO-3 without tensor parallelism: use --tp 1, or --zero 2")
    if plan.recompute != "none":
        raise ExecutorError("the executor runs ZeRO-3 without recomputation: drop --recompute, or use --zero 2")


def _num_layers(model: str, what: str) -> int:
    from executor.models import ModelSpecError, num_layers

    try:
        return num_layers(model)
    except ModelSpecError as e:
        raise ExecutorError(f"{what}: {e}") from None


def _check_checkpoints(cfg: RunConfig, flush: bool, family: str) -> None:
    if (cfg.checkpoint_every or cfg.resume) and not flush:
        raise ExecutorError(f"checkpoints need a flush schedule (gpipe, 1f1b, interleaved, zb-h1, ...): {family} keeps "
                            f"minibatches in flight across optimizer steps, so there is no clean point to stop and resume")


def _check_workers(program: Program) -> None:
    """Workers are the ranks 0..W−1, each with an action list and a stage."""
    workers = program.workers
    if workers != list(range(len(workers))):
        raise ExecutorError(f"the program's workers are {workers[:8]}{'...' if len(workers) > 8 else ''}; a run's "
                            f"ranks are 0..{len(workers) - 1}: number the workers from 0 without gaps")
    for s, ws in enumerate(program.stage_workers):  # (program.check_shape: every stage has workers, R x T of them)
        missing = [w for w in ws if w not in program.actions]
        if missing:
            raise ExecutorError(f"stage {s} is on worker {missing[0]}, which has no action list in the program; give "
                                f"worker {missing[0]} its actions or move the stage")
    held = {w for ws in program.stage_workers for w in ws}
    idle = [w for w in workers if w not in held]
    if idle:
        raise ExecutorError(f"worker {idle[0]} holds no stage (program.stage_workers never names it); drop it or "
                            f"give it a stage")
