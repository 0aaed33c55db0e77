"""Executor throughput: pipetwin's runtime against torch.distributed.pipelining, and emulated accelerators.

Not a test. Run ``python benchmarks/bench_executor.py [--repeats 3] [--batches 12]``.

1. Same model (mlp:layers=8,width=512: 8 x Linear(512) with ReLU), 2 stages,
   gloo, microbatch 32, 8 microbatches per batch, one thread per process:
   torch's ``Schedule1F1B`` (one ``PipelineStage`` per rank, SGD after each
   batch) against pipetwin's 1F1B with flush and its asynchronous PipeDream.
   Samples per second over several batches after a warm-up; median of
   ``--repeats`` launches.
2. Emulated accelerators: an 8-stage pipeline of equal ``uniform`` layers
   (compute is a timed wait), PipeDream's 1F1B-RR, against the bound
   1 / (slowest stage's forward + backward).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "mlp:layers=8,width=512"
MB_SIZE, MBS = 32, 8


# --- torch.distributed.pipelining --------------------------------------------------------
def _torch_rank(rank: int, port: int, batches: int, warmup: int, out) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    from executor.models import build_stage, loss_fn, make_batch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    first, last = (0, 3) if rank == 0 else (4, 7)
    module = nn.Sequential(*build_stage(MODEL, first, last))
    stage = PipelineStage(module, rank, 2, torch.device("cpu"))
    sched = Schedule1F1B(stage, MBS, loss_fn=loss_fn(MODEL))
    opt = torch.optim.SGD(module.parameters(), lr=0.01)
    data = [make_batch(MODEL, MB_SIZE * MBS, b) for b in range(batches + warmup)]
    times = []
    for b, (x, y) in enumerate(data):
        if b == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        if rank == 0:
            sched.step(x)
        else:
            sched.step(target=y, losses=[])
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.barrier()
    times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put(batches * MBS * MB_SIZE / times[0])
    dist.destroy_process_group()


def torch_1f1b(batches: int, warmup: int = 2) -> float:
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_torch_rank, args=(r, port, batches, warmup, q)) for r in range(2)]
    for p in procs:
        p.start()
    rate = q.get(timeout=300)
    for p in procs:
        p.join(60)
    return rate


# --- pipetwin ------------------------------------------------------------------------------
def ours(schedule: str, batches: int, warmup: int = 2) -> float:
    from executor.launch import run_plan
    from planner.plan import even_plan
    from planner.trace import throughput_samples_per_s

    if schedule == "pipedream":
        plan = even_plan(MODEL, 8, 2, schedule="pipedream", microbatches=MBS * (batches + warmup), microbatch_size=MB_SIZE)
    else:
        plan = even_plan(MODEL, 8, 2, schedule=schedule, microbatches=MBS, batches=batches + warmup,
                         microbatch_size=MB_SIZE)
    res = run_plan(plan, timeout_s=120)
    return throughput_samples_per_s(res.trace)


def emulated(stages: int, fwd_s: float, bwd_s: float, minibatches: int, schedule: str = "pipedream") -> tuple[float, float]:
    """(measured minibatches per second, bound 1 / (fwd + bwd) of the slowest stage)."""
    from executor.launch import run_plan
    from planner.plan import even_plan
    from planner.trace import throughput_samples_per_s

    model = f"uniform:layers={stages},fwd={fwd_s},bwd={bwd_s},act=4096,params=4096"
    if schedule == "pipedream":
        plan = even_plan(model, stages, stages, schedule="pipedream", microbatches=minibatches)
    else:
        plan = even_plan(model, stages, stages, schedule=schedule, microbatches=minibatches // 4, batches=4)
    res = run_plan(plan, timeout_s=120)
    return throughput_samples_per_s(res.trace), 1.0 / (fwd_s + bwd_s)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="launches per configuration (median kept)")
    ap.add_argument("--batches", type=int, default=12, help="timed batches of 8 microbatches per launch")
    ap.add_argument("--emulated-minibatches", type=int, default=240)
    args = ap.parse_args(argv)
    console = Console()

    runs: dict[str, list[float]] = {"torch Schedule1F1B": [], "pipetwin 1f1b (flush)": [], "pipetwin pipedream (async)": []}
    for _ in range(args.repeats):
        runs["torch Schedule1F1B"].append(torch_1f1b(args.batches))
        runs["pipetwin 1f1b (flush)"].append(ours("1f1b", args.batches))
        runs["pipetwin pipedream (async)"].append(ours("pipedream", args.batches))
    base = statistics.median(runs["torch Schedule1F1B"])
    t1 = Table(title=f"{MODEL}, 2 stages, gloo, microbatch {MB_SIZE} x {MBS}, 1 thread/process "
                     f"(median of {args.repeats})")
    for col in ("runtime", "samples/s (median)", "runs", "vs torch 1F1B"):
        t1.add_column(col, justify="left" if col == "runtime" else "right")
    for name, vals in runs.items():
        med = statistics.median(vals)
        t1.add_row(name, f"{med:.0f}", " ".join(f"{v:.0f}" for v in vals), f"{med / base:.2f}x")
    console.print(t1)

    t2 = Table(title="emulated accelerators: 8 equal stages (fwd 2 ms, bwd 4 ms), 1 layer each")
    for col in ("schedule", "minibatches/s", "bound 1/(fwd+bwd)", "of bound"):
        t2.add_column(col, justify="left" if col == "schedule" else "right")
    for sched in ("pipedream",):
        vals = [emulated(8, 2e-3, 4e-3, args.emulated_minibatches, sched) for _ in range(args.repeats)]
        rate = statistics.median(v[0] for v in vals)
        bound = vals[0][1]
        t2.add_row(f"{sched} (1F1B-RR)", f"{rate:.1f}", f"{bound:.1f}", f"{rate / bound * 100:.1f}%")
    console.print(t2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
