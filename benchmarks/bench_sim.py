"""How fast the simulator runs, next to bare SimPy on the same machine in the same run.

    .venv/bin/python benchmarks/bench_sim.py

Rows: bare SimPy timeout events/s; the simulator's actions/s (goal >= 1/3 of bare
SimPy); wall time of 8 stages x 32 microbatches (goal <= 0.2 s); wall time of
1,024 devices = 64 stages x 16 replicas x 64 microbatches with all-reduces
(goal <= 10 s), on free links (symmetry applies) and on a contended hierarchy
(replicas folded by sim.fold, their links being shared); a 3.6B GPT (30 layers, hidden 3072) on 64 A100s of
8-GPU NVSwitch servers as TP 8 x PP 2 x DP 4 with full recomputation, every TP
all-reduce a ring on the links (goal <= 10 s; TP ranks and replicas folded by sim.fold).
"""
from __future__ import annotations

import statistics
import time

import simpy
from rich.console import Console
from rich.table import Table

from planner.lowering import plan_to_program, worker_devices
from planner.plan import even_plan
from planner.profile import uniform_profile
from planner.schedules import generate, make_spec
from sim import SimParams, simulate, simulate_plan
from topologies.presets import load_topology


def _best(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _bare_simpy_run(processes: int = 64, per_process: int = 4000) -> None:
    env = simpy.Environment()

    def proc():
        for _ in range(per_process):
            yield env.timeout(1.0)

    for _ in range(processes):
        env.process(proc())
    env.run()


def bare_simpy_events_per_s(processes: int = 64, per_process: int = 4000) -> float:
    return processes * per_process / _best(lambda: _bare_simpy_run(processes, per_process))


def sim_actions_per_s(P: int = 64, M: int = 128) -> tuple[float, int]:
    prog = generate(make_spec("1f1b", P, M), check_program=False)
    prof = uniform_profile(P, 1.0, 2.0)
    topo = load_topology(f"ideal:{P}")
    devs = {w: f"d{w}" for w in prog.workers}
    n = sum(len(a) for a in prog.actions.values())
    return n / _best(lambda: simulate(prog, prof, topo, devs, check_program=False)), n


def sim_and_bare(P: int = 64, M: int = 128, repeat: int = 5) -> tuple[float, float, int]:
    """(bare SimPy timeouts/s, simulator actions/s, actions): the two timed alternately, best of each.

    Alternating keeps both under the same machine load (on a shared machine a
    load change between two separate measurements skews their ratio).
    """
    prog = generate(make_spec("1f1b", P, M), check_program=False)
    prof = uniform_profile(P, 1.0, 2.0)
    topo = load_topology(f"ideal:{P}")
    devs = {w: f"d{w}" for w in prog.workers}
    n = sum(len(a) for a in prog.actions.values())
    bare, sim = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _bare_simpy_run()
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        simulate(prog, prof, topo, devs, check_program=False)  # the trace is freed inside the timing, as a caller's would be
        sim.append(time.perf_counter() - t0)
    return 64 * 4000 / min(bare), n / min(sim), n


def placed(plan, topo):
    names = dict(zip(plan.devices, topo.devices))
    return plan.with_devices([tuple(names[d] for d in s.devices) for s in plan.stages])


def small_pipeline() -> tuple[float, float]:
    topo = load_topology("dgx:servers=1,gpus=8")
    prof = uniform_profile(8, 1e-3, 2e-3, act=8e6, params=100e6)
    plan = placed(even_plan("m", 8, 8, schedule="1f1b", microbatches=32), topo)
    end_to_end = _best(lambda: simulate_plan(plan, prof, topo))
    prog = plan_to_program(plan, prof)
    devs = worker_devices(plan, prog)
    layers = [s.layers for s in plan.stages]
    alone = _best(lambda: simulate(prog, prof, topo, devs, stage_layers=layers, check_program=False))
    return end_to_end, alone


def big_cluster(spec: str) -> tuple[float, dict, int]:
    topo = load_topology(spec)
    prof = uniform_profile(64, 1e-3, 2e-3, act=4e6, params=50e6)
    plan = placed(even_plan("m", 64, 64, replicas=(16,) * 64, schedule="1f1b", microbatches=64), topo)
    t0 = time.perf_counter()
    trace = simulate_plan(plan, prof, topo)
    return time.perf_counter() - t0, trace.meta, len(trace.events)


def tensor_parallel_cluster() -> tuple[float, int, int]:
    """(wall seconds, events, TP all-reduces) of a TP x PP x DP plan of a 3.6B GPT on 64 A100s."""
    from planner.analytic import load_model
    from planner.plan import plan_from_flags

    topo = load_topology("dgx:servers=8,gpus=8")
    prof = load_model("gpt:layers=30,hidden=3072,heads=32,seq=2048,vocab=50257", tensor_parallel=8)
    plan = plan_from_flags("gpt-3.6b", len(prof), pp=2, dp=4, tp=8, microbatches=32, microbatch_size=4,
                           recompute="full", devices=topo.devices)
    n_ar = sum(len(l.tp_forward) * 2 + len(l.tp_backward) for l in prof.layers) * 32 // 4
    t0 = time.perf_counter()
    trace = simulate_plan(plan, prof, topo, SimParams(link_events=False))
    return time.perf_counter() - t0, len(trace.events), n_ar


def main() -> None:
    bare, rate, n = sim_and_bare()
    e2e, alone = small_pipeline()
    table = Table(title="pipetwin simulator speed")
    for col in ("measure", "value", "goal", "met"):
        table.add_column(col)
    table.add_row("bare SimPy timeouts/s", f"{bare:,.0f}", "", "")
    table.add_row(f"simulator actions/s (1F1B 64x128 on ideal:64, {n:,} actions)", f"{rate:,.0f} ({rate / bare:.2f} of bare)",
                  ">= 1/3 of bare", "yes" if rate >= bare / 3 else "no")
    table.add_row("8 stages x 32 microbatches, dgx:servers=1 (simulate_plan: lower + check + simulate)",
                  f"{e2e:.3f} s", "<= 0.2 s", "yes" if e2e <= 0.2 else "no")
    table.add_row("  the same, simulate() alone", f"{alone:.3f} s", "", "")
    for spec in ("ideal:1024", "hier:8x32x4"):
        wall, meta, events = big_cluster(spec)
        sym = meta["symmetry"]
        how = f"symmetry x{sym['replicas']}" if sym["used"] else "every replica"
        table.add_row(f"1,024 devices (64 stages x 16 replicas x 64 mb, {'/'.join(meta['allreduce'])} all-reduce) "
                      f"on {spec}, {how}, {events:,} events", f"{wall:.2f} s", "<= 10 s", "yes" if wall <= 10 else "no")
    wall, events, n_ar = tensor_parallel_cluster()
    table.add_row(f"3.6B GPT, TP 8 x PP 2 x DP 4 on dgx:servers=8 (64 GPUs), 32 mb of 4, full recompute, "
                  f"~{n_ar:,} TP all-reduces per replica pipeline (fused rings), {events:,} events", f"{wall:.2f} s", "<= 10 s",
                  "yes" if wall <= 10 else "no")
    Console().print(table)


if __name__ == "__main__":
    main()
