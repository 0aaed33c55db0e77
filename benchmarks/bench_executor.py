"""Executor throughput: pipetwin's runtime against torch.distributed.pipelining, and emulated accelerators.

Not a test. Run ``python benchmarks/bench_executor.py [--repeats 5] [--batches 8]``.

1. Same model (mlp:layers=8,width=512: 8 x Linear(512) with ReLU), 2 stages,
   gloo, microbatch 32, 8 microbatches per batch, one thread per process,
   SGD with momentum 0.9. Every runtime processes the same samples: ``--warmup`` batches that
   are not timed, then ``--batches`` timed batches (64 microbatches by
   default). torch's ``Schedule1F1B`` (one ``PipelineStage`` per rank,
   ``opt.step()`` after each batch) and pipetwin's 1F1B with flush run them as
   batches, each with its fill, drain and optimizer step; pipetwin's
   asynchronous PipeDream (1F1B-RR, weight stashing, a step after every
   minibatch) runs the same microbatches as one stream of minibatches. The
   timed window starts when the warm-up's last optimizer step is done on
   stage 0 (torch: a barrier after the warm-up batches) and ends when every
   worker has finished (torch: a barrier after the last step), so it holds the
   flushes of every timed batch and, for the stream, its one final drain.
   Median of ``--repeats`` launches, the configurations interleaved so that a
   change of machine load hits them alike.
2. Emulated accelerators: an 8-stage pipeline of equal ``uniform`` layers
   (compute is a timed wait on real tensors), PipeDream's 1F1B-RR, against the
   bound 1 / (slowest stage's forward + backward), for a few stage times. The
   eight processes share this machine's cores, so every message costs CPU
   time that a real accelerator's host would spend on its own core; that
   cost is small only against a stage time of a realistic size.
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


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.2f} (1 min) / {five:.2f} (5 min)"


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
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)  # what pipetwin's "sgd" steps
    data = [make_batch(MODEL, MB_SIZE * MBS, b) for b in range(batches + warmup)]
    t0 = 0.0
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
    elapsed = time.perf_counter() - t0
    if rank == 0:
        out.put(batches * MBS * MB_SIZE / elapsed)
    dist.destroy_process_group()


def torch_1f1b(batches: int, warmup: int) -> float:
    """Samples per second of torch's Schedule1F1B over the timed batches."""
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
def window_rate(trace, warm_steps: int, timed_microbatches: int, microbatch_size: int) -> float:
    """Samples per second from the end of stage 0's ``warm_steps``-th optimizer step to the end of the run."""
    from planner.program import Action

    t0 = None
    for e in trace.events:
        if e.kind == "STEP":
            a = Action.parse(e.action)
            if a.stage == 0 and a.version == warm_steps:
                t0 = e.end_s if t0 is None else max(t0, e.end_s)
    t1 = max(e.end_s for e in trace.events)
    if t0 is None or t1 <= t0:
        raise RuntimeError("the trace has no warm-up step on stage 0")
    return timed_microbatches * microbatch_size / (t1 - t0)


def ours(schedule: str, batches: int, warmup: int) -> float:
    """Samples per second of pipetwin's ``schedule`` over the same timed microbatches as :func:`torch_1f1b`."""
    from executor.launch import run_plan
    from planner.plan import even_plan

    if schedule == "pipedream":  # one stream of minibatches; a step after each
        plan = even_plan(MODEL, 8, 2, schedule="pipedream", microbatches=MBS * (batches + warmup), microbatch_size=MB_SIZE)
        warm_steps = MBS * warmup
    else:
        plan = even_plan(MODEL, 8, 2, schedule=schedule, microbatches=MBS, batches=batches + warmup,
                         microbatch_size=MB_SIZE)
        warm_steps = warmup
    res = run_plan(plan, timeout_s=120)
    return window_rate(res.trace, warm_steps, MBS * batches, MB_SIZE)


def emulated(stages: int, fwd_s: float, bwd_s: float, minibatches: int) -> tuple[float, float]:
    """(steady-state minibatches per second of PipeDream 1F1B-RR, bound 1 / (fwd + bwd) of the slowest stage)."""
    from executor.launch import run_plan
    from planner.plan import even_plan
    from planner.trace import throughput_samples_per_s

    model = f"uniform:layers={stages},fwd={fwd_s},bwd={bwd_s},act=4096,params=4096"
    plan = even_plan(model, stages, stages, schedule="pipedream", microbatches=minibatches)
    res = run_plan(plan, timeout_s=120)
    return throughput_samples_per_s(res.trace), 1.0 / (fwd_s + bwd_s)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="launches per configuration (median kept)")
    ap.add_argument("--batches", type=int, default=8, help="timed batches of 8 microbatches per launch")
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches before them")
    ap.add_argument("--emulated-fwd-ms", default="2,10,20",
                    help="comma-separated emulated forward times per stage in ms (backward twice as long)")
    ap.add_argument("--emulated-seconds", type=float, default=5.0, help="emulated run length (sets the minibatch count)")
    ap.add_argument("--skip-emulated", action="store_true")
    ap.add_argument("--skip-torch", action="store_true", help="only the emulated table")
    args = ap.parse_args(argv)
    console = Console()
    console.print(f"{os.cpu_count()} cores; load average at start {_load()}")

    if not args.skip_torch:
        names = {"torch Schedule1F1B": lambda: torch_1f1b(args.batches, args.warmup),
                 "pipetwin 1f1b (flush)": lambda: ours("1f1b", args.batches, args.warmup),
                 "pipetwin pipedream (async, no flush)": lambda: ours("pipedream", args.batches, args.warmup)}
        runs: dict[str, list[float]] = {n: [] for n in names}
        load0 = _load()
        for _ in range(args.repeats):
            for n, fn in names.items():
                runs[n].append(fn())
        load1 = _load()
        base = statistics.median(runs["torch Schedule1F1B"])
        n_mb = args.batches * MBS
        t1 = Table(title=f"{MODEL}, 2 stages, gloo, microbatch {MB_SIZE}, 1 thread/process, SGD: "
                         f"{args.warmup} untimed + {args.batches} timed batches of {MBS} microbatches "
                         f"({n_mb} timed microbatches, {n_mb * MB_SIZE} samples) per launch; flush schedules step "
                         f"after each batch, PipeDream streams the same {n_mb} minibatches and steps after each; "
                         f"median of {args.repeats} interleaved launches; load average {load0} before, {load1} after",
                   caption="samples/s over the timed window: from the warm-up's last step on stage 0 (torch: a "
                           "barrier) to the end of the run (torch: a barrier after the last step)")
        for col in ("runtime", "samples/s (median)", "runs", "vs torch 1F1B"):
            t1.add_column(col, justify="left" if col == "runtime" else "right")
        for name, vals in runs.items():
            med = statistics.median(vals)
            t1.add_row(name, f"{med:.0f}", " ".join(f"{v:.0f}" for v in vals), f"{med / base:.2f}x")
        console.print(t1)

    if not args.skip_emulated:
        fwds = [float(x) * 1e-3 for x in args.emulated_fwd_ms.split(",") if x.strip()]
        load0 = _load()
        rows = []
        for fwd in fwds:
            n = max(48, int(args.emulated_seconds / (3 * fwd)))
            vals = [emulated(8, fwd, 2 * fwd, n) for _ in range(args.repeats)]
            rows.append((fwd, n, [v[0] for v in vals], vals[0][1]))
        load1 = _load()
        t2 = Table(title=f"emulated accelerators: 8 equal stages of one layer (compute is a timed wait), 8 processes "
                         f"on {os.cpu_count()} cores, gloo, PipeDream 1F1B-RR; median of {args.repeats}; "
                         f"load average {load0} before, {load1} after",
                   caption="steady state: minibatches/s over the second half of completions; bound = 1 / (fwd + bwd)")
        for col in ("stage time fwd / bwd", "minibatches", "minibatches/s", "runs", "bound", "of bound"):
            t2.add_column(col, justify="left" if col.startswith("stage") else "right")
        for fwd, n, rates, bound in rows:
            rate = statistics.median(rates)
            t2.add_row(f"{fwd * 1e3:g} ms / {2 * fwd * 1e3:g} ms", str(n), f"{rate:.1f}",
                       " ".join(f"{r:.1f}" for r in rates), f"{bound:.1f}", f"{rate / bound * 100:.1f}%")
        console.print(t2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
