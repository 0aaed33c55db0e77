"""Local launcher: one process per worker of a program on this machine, a watchdog, and the merged result.

``run_plan(plan)`` and ``run_program(program, model)`` take one route: a plan
is lowered into its program, and ``executor.prepare`` checks the program
against its model (bad input raises ``ExecutorError`` before any process
starts). The launcher hosts the rendezvous store on a free port, forks one
process per worker from a forkserver that has torch imported already, and
watches them: when one exits non-zero the others are stopped at once and ONE
``WorkerFailed`` names the rank, the stage and the action to blame (the
worker's own error record, or — for a worker that was killed — the action it
was executing, which every worker publishes in a shared array). Every blocking
call also has the run's timeout (process-group timeout). On success rank 0 has
gathered every worker's results; they are merged into one measured ``Trace``
(times since a common barrier), the final weights (``stage{s}.{param}``) and
the losses.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
import types
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from executor.backend import resolve_backend_device
from executor.errors import ExecutorError, WorkerFailed
from executor.faults import FAULT_ENV
from topologies.files import output_path
from executor.tensor_parallel import TP_FAULT_ENV
from executor.prepare import Prepared, RunConfig, prepare
from executor.results import RunResult, result_from_parts, weights_from_checkpoint
from executor.transport import p2p_orders_agree
from executor.worker import local_entry
from planner.plan import Plan, PlanError
from planner.program import Kind, Program
from planner.trace import Trace

_STOP_GRACE_S = 3.0


def _as_plan(plan: Plan | dict | str | os.PathLike) -> Plan:
    try:
        if isinstance(plan, Plan):
            return plan
        if isinstance(plan, dict):
            return Plan.from_dict(plan)
        return Plan.load(plan)
    except PlanError as e:
        raise ExecutorError(f"bad plan: {e}") from None


def run_plan(plan: Plan | dict | str | os.PathLike, *, backend: str = "auto", timeout_s: float = 60.0,
             save_weights: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
             checkpoint_every: int = 0, resume: bool = False, seed: int = 0, dtype: str = "float32",
             track_memory: bool = True, keep_dir: str | os.PathLike | None = None, device: str = "auto") -> RunResult:
    """Run ``plan`` for real: one process per worker on this machine (its program, through :func:`run_program`'s route).

    Args:
        plan: a Plan, its dict, or a plan JSON path. The world size is the plan's worker count.
        backend: "auto" (NCCL when there is a GPU per worker, else gloo), "gloo" or "nccl".
        device: "auto" (the GPUs under NCCL, else the CPU), "cpu" or "cuda" (with gloo: the workers share
            the GPUs there are, and messages go through host memory).
        timeout_s: how long any blocking call (receive, all-reduce, rendezvous) may wait.
        save_weights: write the final weights (``stage{s}.{param}``) here with ``torch.save``.
        checkpoint_dir: write checkpoints here (and read them with ``resume``).
        checkpoint_every: a checkpoint every N optimizer steps (flush schedules); the last step is always saved.
        resume: continue from the newest complete checkpoint in ``checkpoint_dir``.
        seed: weights and data seed.
        dtype: "float32" (default) or "float64" (exact parity checks).
        track_memory: record memory samples.
        keep_dir: keep the workers' files (results, error records, stderr logs) in this folder.

    Returns:
        RunResult with the merged measured trace, final weights and losses.

    Raises:
        ExecutorError: bad plan or model (before launch); WorkerFailed (a subclass) when a worker failed.
    """
    t_start = time.perf_counter()
    cfg = RunConfig(plan=_as_plan(plan).to_dict(), timeout_s=float(timeout_s), seed=int(seed), dtype=dtype,
                    checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                    checkpoint_every=int(checkpoint_every), resume=bool(resume), track_memory=track_memory)
    return _run(cfg, backend, device, save_weights, keep_dir, t_start)


def run_program(program: Program | dict | str | os.PathLike, model: str, *, microbatch_size: int = 1,
                lr: float = 0.01, optimizer: str = "sgd", momentum: float = 0.9, recompute: str = "none",
                sequence_parallel: bool = False, backend: str = "auto",
                timeout_s: float = 60.0, save_weights: str | os.PathLike | None = None,
                checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0, seed: int = 0,
                dtype: str = "float32", track_memory: bool = True, keep_dir: str | os.PathLike | None = None,
                device: str = "auto") -> RunResult:
    """Run ``program`` exactly as it is: worker w is rank w, stage s holds ``program.stage_layers[s]`` of ``model``
    (an even split of its layers when the program names none).

    Args:
        program: a Program, its dict (``Program.to_json``) or a program JSON path (``pipetwin schedule -o``).
        model: the model spec the stages' layers come from.
        microbatch_size: samples per microbatch.
        lr: SGD learning rate.
        optimizer: "sgd" (SGD with ``momentum``, as a plan's) or "none" (plain SGD).
        momentum: SGD's momentum μ, 0 < μ < 1.
        recompute: activation recomputation, "none", "selective" or "full".
        sequence_parallel: Megatron sequence parallelism (a tensor-parallel program of the zoo's gpt or llama model).
        Other arguments as :func:`run_plan` (no resume: a program runs from its first action).

    Returns:
        RunResult (``plan`` None) with the merged measured trace, final weights and losses.

    Raises:
        ExecutorError: a bad program or model (before launch); WorkerFailed when a worker failed.
    """
    from planner.program import ProgramFileError

    t_start = time.perf_counter()
    try:
        doc = program.to_json() if isinstance(program, Program) else program if isinstance(program, dict) else \
            Program.load(program).to_json()
    except ProgramFileError as e:
        raise ExecutorError(e.args[0]) from None
    cfg = RunConfig(program=doc, model=model, microbatch_size=int(microbatch_size), lr=float(lr),
                    optimizer=optimizer, momentum=momentum, recompute=recompute,
                    sequence_parallel=bool(sequence_parallel), timeout_s=float(timeout_s), seed=int(seed),
                    dtype=dtype, checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                    checkpoint_every=int(checkpoint_every), track_memory=track_memory)
    return _run(cfg, backend, device, save_weights, keep_dir, t_start)


def _run(cfg: RunConfig, backend: str, device: str, save_weights, keep_dir, t_start: float) -> RunResult:
    """The one route of every local run: prepare (checks before any process starts), launch, merge."""
    prep = prepare(cfg)
    if prep.program is None:
        weights = weights_from_checkpoint(prep, cfg)
        res = RunResult(Trace(meta={"source": "measured", "family": prep.family, "microbatch_size": prep.microbatch_size}),
                        weights, {}, prep.plan, None, prep.start_step, "none", time.perf_counter() - t_start)
        _save_weights(res, save_weights)
        return res
    world = len(prep.program.workers)
    backend, device = resolve_backend_device(backend, device, world)
    cfg = replace(cfg, backend=backend, device=device)
    if cfg.backend == "nccl":
        problem = p2p_orders_agree(prep.program)
        if problem:
            raise ExecutorError(f"NCCL matches messages in order, but in this program {problem}; use --backend gloo")
        if torch.cuda.device_count() < world:
            raise ExecutorError(f"NCCL needs one GPU per worker: the program has {world} workers, this machine "
                                f"{torch.cuda.device_count()} GPUs; use --backend gloo or launch with torchrun on more nodes")
    if keep_dir:
        out_dir = Path(keep_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for f in list(out_dir.glob("error-rank*.json")) + list(out_dir.glob("result.pt")):
            f.unlink()
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="pipetwin-run-"))
    try:
        parts = _launch(cfg, prep, world, out_dir)
    finally:
        if not keep_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    res = result_from_parts(parts, prep, cfg.backend, time.perf_counter() - t_start)
    _save_weights(res, save_weights)
    return res


def _save_weights(res: RunResult, path) -> None:
    if path:
        torch.save(res.weights, output_path(path))


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["executor.worker", "executor.models", "torch.fx.experimental.symbolic_shapes"])
    return ctx


def _launch(cfg: RunConfig, prep: Prepared, world: int, out_dir: Path) -> list[dict]:
    store = dist.TCPStore("127.0.0.1", 0, world + 1, True, timeout=timedelta(seconds=cfg.timeout_s),
                          wait_for_workers=False)
    ctx = _context()
    progress = ctx.Array("q", [-1] * world, lock=False)
    env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    for name in (FAULT_ENV, TP_FAULT_ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    procs = [ctx.Process(target=local_entry, name=f"pipetwin-w{r}",
                         args=(cfg, r, world, "127.0.0.1", store.port, str(out_dir), progress, env), daemon=True)
             for r in range(world)]
    try:
        with _main_module_hidden():
            for p in procs:
                p.start()
        first = _watch(procs)
        if first is not None:
            still_running = [r for r, p in enumerate(procs) if p.exitcode is None]
            _stop(procs)
            raise _blame(first, procs, still_running, progress, prep.program, out_dir)
    finally:
        _stop(procs)
        del store
    path = out_dir / "result.pt"
    if not path.exists():
        raise ExecutorError("the workers finished but rank 0 wrote no result; run again with keep_dir to inspect their logs")
    return torch.load(path, weights_only=False)["parts"]


@contextlib.contextmanager
def _main_module_hidden():
    """Start processes without making them re-import the caller's ``__main__``.

    The workers need nothing from it (their target and arguments live in
    ``executor``), and re-importing a script that calls ``run_plan`` at top
    level would start the run again inside every worker. multiprocessing
    records the main module when a process starts, so a blank stand-in is
    put in its place for that moment.
    """
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _watch(procs) -> int | None:
    """Wait for every process; the rank of the first one to exit non-zero (None when all succeed)."""
    pending = {p.sentinel: r for r, p in enumerate(procs)}
    while pending:
        ready = mp.connection.wait(list(pending), timeout=1.0)
        for s in ready:
            r = pending.pop(s)
            procs[r].join(0.1)
            if procs[r].exitcode not in (0, None):
                return r
    return None


def _stop(procs) -> None:
    live = [p for p in procs if p.is_alive()]
    for p in live:
        p.terminate()
    deadline = time.monotonic() + _STOP_GRACE_S
    for p in live:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in live:
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _read_errors(out_dir: Path) -> dict[int, dict]:
    errs = {}
    for f in out_dir.glob("error-rank*.json"):
        try:
            d = json.loads(f.read_text())
            errs[int(d["rank"])] = d
        except (ValueError, KeyError, OSError):
            pass
    return errs


def _exit_text(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _blame(first: int, procs, still_running: list[int], progress, program: Program, out_dir: Path) -> WorkerFailed:
    """One WorkerFailed naming the rank, stage and action most likely at the root of the failure."""
    errs = _read_errors(out_dir)
    primary = sorted((d for d in errs.values() if not d.get("comm")), key=lambda d: d["time"])

    def at(rank: int) -> tuple[int | None, str | None, int | None]:
        i = progress[rank]
        acts = program[rank]
        if 0 <= i < len(acts):
            return acts[i].stage, str(acts[i]), i
        stages = program.stages_of(rank)
        return (stages[0] if stages else None), None, None

    def grid(rank, index):
        return program.grid(mark=(rank, index)) if index is not None else ""

    def where(rank, stage, action, index):
        w = f"worker {rank} (stage {stage})"
        return w + (f" at action {action} (#{index})" if action is not None else " before its first action")

    if first not in errs:  # killed, or died without a word
        stage, action, index = at(first)
        msg = f"{where(first, stage, action, index)} {_exit_text(procs[first].exitcode)}; the other workers were stopped"
        log = out_dir / f"stderr-rank{first}.log"
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
        if tail and tail[0].strip():
            msg += f" (last stderr line: {tail[0][:200]})"
        return WorkerFailed(msg, first, stage, action, index, grid(first, index))
    d = primary[0] if primary else errs[first]
    r = int(d["rank"])
    if d.get("comm") and not primary:
        # every error is a communication error: a worker that is still computing (hung) is the likelier culprit
        for q in still_running:
            stage, action, index = at(q)
            if action is not None and program[q][index].kind in (Kind.F, Kind.B, Kind.BI, Kind.BW, Kind.STEP):
                msg = (f"{where(q, stage, action, index)} stopped making progress; worker {r} gave up waiting at "
                       f"{d['action']}: {d['type']}: {d['message']}")
                return WorkerFailed(msg, q, stage, action, index, grid(q, index))
    stage, action, index = d.get("stage"), d.get("action"), d.get("index")
    what = "failed" if not d.get("comm") else "lost its peers"
    msg = f"{where(r, stage, action, index)} {what}: {d['type']}: {d['message']}; the other workers were stopped"
    if d.get("setup") and action is None:
        msg = f"worker {r} (stage {stage}) failed while starting: {d['type']}: {d['message']}; the other workers were stopped"
    err = WorkerFailed(msg, r, stage, action, index, grid(r, index))
    err.traceback = d.get("traceback", "")
    return err
