"""How a run is configured (RunConfig) and what it checks before any process starts (prepare).

``prepare`` turns a ``RunConfig`` into a ``Prepared``: the plan checked against
its model, the checkpoint to resume from, and the program of the batches left
to run. Every rank calls it on the same config and so generates the same
program; bad input raises ``ExecutorError`` with one line that says what to do.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from executor import checkpoint as ckpt
from executor.errors import ExecutorError
from planner.plan import Plan, PlanError
from planner.program import FLUSH_FAMILIES, Program

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RunConfig:
    """How to run a plan; the same on every worker.

    Attributes:
        plan: the plan as a dict (``Plan.to_dict``).
        backend: "gloo" or "nccl" (the launcher resolves "auto").
        device: where stages compute: "cpu" or "cuda" (the launcher resolves "auto"). NCCL implies
            "cuda" with one GPU per worker; gloo with "cuda" lets workers share the GPUs there are
            (rank modulo the GPU count) and stages every message and all-reduce through host memory.
        timeout_s: limit of every blocking call (process-group timeout).
        seed: model weights and data seed.
        dtype: parameter and activation dtype name (see DTYPES).
        checkpoint_dir: where to write and read checkpoints (None: none).
        checkpoint_every: write a checkpoint every N optimizer steps (0: only with a dir, at the end).
        resume: continue from the newest complete checkpoint in checkpoint_dir.
        collect_weights: send the final weights to rank 0.
        track_memory: record memory samples.
    """

    plan: dict
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
    """A plan checked against its model, with the program this run executes.

    Attributes:
        plan: the full plan.
        program: the program of the batches left to run (None when a resumed run has nothing left).
        start_step: optimizer steps already done (from a checkpoint), 0 for a fresh run.
    """

    plan: Plan
    program: Program | None
    start_step: int


def prepare(cfg: RunConfig) -> Prepared:
    """Check the plan against its model and generate the program; raise ExecutorError on bad input."""
    from executor.models import ModelSpecError, num_layers
    from planner.check import ProgramError
    from planner.lowering import plan_to_program
    from planner.schedules import ScheduleError

    try:
        plan = Plan.from_dict(cfg.plan)
    except PlanError as e:
        raise ExecutorError(f"bad plan: {e}") from None
    try:
        n = num_layers(plan.model)
    except ModelSpecError as e:
        raise ExecutorError(f"the plan's model: {e}") from None
    if plan.num_layers != n:
        raise ExecutorError(f"the plan covers {plan.num_layers} layers but model {plan.model!r} has {n}; "
                            f"re-plan for this model (or fix the stages' layer ranges)")
    if plan.tensor_parallel > 1:
        from executor.tensor_parallel import check_model

        check_model(plan.model, plan.tensor_parallel, plan.sequence_parallel)
    if cfg.dtype not in DTYPES:
        raise ExecutorError(f"unknown dtype {cfg.dtype!r}; choose one of {', '.join(DTYPES)}")
    streaming = plan.schedule not in FLUSH_FAMILIES
    if (cfg.checkpoint_every or cfg.resume) and streaming:
        raise ExecutorError(f"checkpoints need a flush schedule (gpipe, 1f1b, interleaved, zb-h1): {plan.schedule} keeps "
                            f"minibatches in flight across optimizer steps, so there is no clean point to stop and resume")
    if (cfg.checkpoint_every or cfg.resume) and not cfg.checkpoint_dir:
        raise ExecutorError("--checkpoint-every and --resume need --checkpoint-dir")
    start = 0
    if cfg.resume:
        start = ckpt.latest_complete_step(cfg.checkpoint_dir, len(plan.stages)) or 0
        start = min(start, plan.batches)
    if start >= plan.batches and start > 0:
        return Prepared(plan, None, start)
    run_plan = replace(plan, batches=plan.batches - start) if start else plan
    try:
        program = plan_to_program(run_plan)
    except (PlanError, ScheduleError, ProgramError) as e:
        raise ExecutorError(f"the plan's schedule: {e.args[0] if e.args else e}") from None
    return Prepared(plan, program, start)
