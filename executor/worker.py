"""Worker process entry points: one for the local launcher, one for torchrun.

Under torchrun (one process per worker; RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT from the environment)::

    torchrun --nnodes 1 --nproc-per-node 4 -m executor.worker plan.json --out DIR
    torchrun --nnodes 1 --nproc-per-node 2 -m executor.worker --program P.json --model M --out DIR

Rank 0 writes ``DIR/result.pt`` (every worker's timed actions, memory samples,
losses and final weights), ``DIR/trace.json`` (Chrome trace) and
``DIR/summary.json`` (the ``--json`` metric keys). A worker that fails writes
``DIR/error-rank{r}.json`` and exits non-zero; bad input exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from executor.backend import init_process_group, resolve_backend_device
from executor.errors import ExecutorError
from executor.faults import FAULT_ENV
from executor.tensor_parallel import TP_FAULT_ENV
from executor.prepare import Prepared, RunConfig, prepare
from executor.results import gather_results, result_from_parts
from executor.runtime import ActionFailed, StageWorker
from topologies.files import output_path


def _error_doc(rank: int, prep: Prepared | None, exc: BaseException, index: int | None, comm: bool) -> dict:
    cause = exc
    action = stage = None
    if prep is not None and prep.program is not None and rank in prep.program.actions:
        acts = prep.program[rank]
        if index is not None and 0 <= index < len(acts):
            action, stage = str(acts[index]), acts[index].stage
        else:
            stages = prep.program.stages_of(rank)
            stage = stages[0] if stages else None
    text = str(cause).strip().splitlines()
    return {
        "rank": rank, "stage": stage, "action": action, "index": index,
        "type": type(cause).__name__, "message": text[0][:400] if text else "",
        "comm": bool(comm), "time": time.time(),
        "traceback": "".join(traceback.format_exception(type(cause), cause, cause.__traceback__))[-4000:],
    }


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _check_world(prep: Prepared, world: int, what: str = "program") -> None:
    """The run has one process per worker of the program (nothing to check when a resume left nothing to run)."""
    if prep.program is not None and len(prep.program.workers) != world:
        n = len(prep.program.workers)
        raise ExecutorError(f"the {what} needs {n} workers but the run has {world} processes; launch with "
                            f"--nproc-per-node x --nnodes = {n}")


def run_rank(cfg: RunConfig, rank: int, world: int, out_dir: str | None, store=None, progress=None) -> tuple[int, dict | None]:
    """Run one rank to the end: (0, None) on success, else (1, error record), also written to out_dir when given."""
    prep = None
    try:
        prep = prepare(cfg)
        if prep.program is None:
            raise ExecutorError("nothing left to run: the checkpoint already covers every batch")
        _check_world(prep, world)
        device = init_process_group(cfg.backend, cfg.device, cfg.timeout_s, rank, world, store)
        worker = StageWorker(cfg, prep, rank, device, progress)
        worker.setup()
        worker.run()
        try:
            parts = gather_results(worker.results(), rank)
        except Exception as e:  # noqa: BLE001
            raise ActionFailed(None, True) from e
        if rank == 0 and out_dir:
            torch.save({"parts": parts, "start_step": prep.start_step}, Path(out_dir) / "result.pt")
        dist.barrier()
        dist.destroy_process_group()
        return 0, None
    except ActionFailed as e:
        doc = _error_doc(rank, prep, e.__cause__ or e, e.index, e.comm)
    except BaseException as e:  # noqa: BLE001 - every failure becomes one error record
        comm = isinstance(e, getattr(dist, "DistError", ())) if hasattr(dist, "DistError") else False
        doc = _error_doc(rank, prep, e, None, comm)
        doc["setup"] = True
    if out_dir:
        _write_json(Path(out_dir) / f"error-rank{rank}.json", doc)
    return 1, doc


def local_entry(cfg: RunConfig, rank: int, world: int, host: str, port: int, out_dir: str, progress, env: dict) -> None:
    """Target of the local launcher's processes: quiet stderr into a file, join the launcher's store, run."""
    for name in (FAULT_ENV, TP_FAULT_ENV):  # the forkserver's environment dates from its start; the launcher's env decides
        os.environ.pop(name, None)
    os.environ.update(env)
    log = open(Path(out_dir) / f"stderr-rank{rank}.log", "w")
    os.dup2(log.fileno(), 2)
    sys.stderr = log
    try:
        store = dist.TCPStore(host, port, world, is_master=False, timeout=timedelta(seconds=float(cfg.timeout_s)))
    except Exception as e:  # noqa: BLE001
        _write_json(Path(out_dir) / f"error-rank{rank}.json", _error_doc(rank, None, e, None, True))
        os._exit(1)
    code, _ = run_rank(cfg, rank, world, out_dir, store, progress)
    log.flush()
    if code:
        os._exit(code)  # skip interpreter teardown: peers may be gone and gloo threads may block it


def main(argv: list[str] | None = None) -> int:
    """`python -m executor.worker plan.json [--out DIR]` (or `--program P.json --model M`) under torchrun."""
    ap = argparse.ArgumentParser(prog="python -m executor.worker", description="One pipetwin stage worker (run it under torchrun).")
    ap.add_argument("plan", nargs="?", help="plan JSON file (or give --program and --model)")
    ap.add_argument("--program", metavar="JSON", help="program file (from `pipetwin schedule -o`), run exactly as it is")
    ap.add_argument("--model", help="with --program: the model spec its stages' layers come from")
    ap.add_argument("--microbatch-size", type=int, default=1, help="with --program: samples per microbatch (default 1)")
    ap.add_argument("--lr", type=float, default=0.01, help="with --program: SGD learning rate (default 0.01)")
    ap.add_argument("--optimizer", default="sgd", choices=["sgd", "none"],
                    help="with --program: sgd (with momentum) or none (plain SGD) (default sgd)")
    ap.add_argument("--momentum", type=float, default=0.9, help="with --program: SGD's momentum (default 0.9)")
    ap.add_argument("--recompute", default="none", help="with --program: none, selective or full (default none)")
    ap.add_argument("--sequence-parallel", action="store_true", help="with --program: Megatron sequence parallelism")
    ap.add_argument("--out", help="folder for rank 0's results (result.pt, trace.json, summary.json) and error files")
    ap.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: the GPUs under NCCL, else the CPU; cuda with gloo shares this node's GPUs")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds any blocking call may wait (default 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--save-weights", metavar="FILE")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    from planner.plan import Plan, PlanError
    from planner.program import Program, ProgramFileError

    try:
        if (args.plan is None) == (args.program is None):
            raise ExecutorError("give a plan file or --program P.json --model M (one of them)")
        backend, device = resolve_backend_device(args.backend, args.device, local_world)
        common = dict(backend=backend, device=device, timeout_s=args.timeout, seed=args.seed, dtype=args.dtype,
                      checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every, resume=args.resume)
        if args.program:
            cfg = RunConfig(program=Program.load(args.program).to_json(), model=args.model,
                            microbatch_size=args.microbatch_size, lr=args.lr, optimizer=args.optimizer,
                            momentum=args.momentum, recompute=args.recompute,
                            sequence_parallel=args.sequence_parallel, **common)
        else:
            cfg = RunConfig(plan=Plan.load(args.plan).to_dict(), **common)
        prep = prepare(cfg)
        _check_world(prep, world, "program" if args.program else "plan")
    except (ExecutorError, PlanError, ProgramFileError) as e:
        print(f"pipetwin worker {rank}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    out = args.out
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
    if prep.program is None:
        print(f"pipetwin worker {rank}: nothing left to run (checkpoint step {prep.start_step})", file=sys.stderr)
        return 0
    code, d = run_rank(cfg, rank, world, out)
    if code:
        print(f"pipetwin worker {rank}: error at action {d['action']} (stage {d['stage']}): {d['type']}: {d['message']}",
              file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)
    if rank == 0 and out:
        res = result_from_parts(torch.load(Path(out) / "result.pt", weights_only=False)["parts"], prep, cfg.backend)
        res.trace.save(Path(out) / "trace.json")
        _write_json(Path(out) / "summary.json", res.summary())
        if args.save_weights:
            torch.save(res.weights, output_path(args.save_weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
