"""The whole loop on this machine, as `make demo` shows it: plan, simulate (calibrated), run, compare."""
from __future__ import annotations

import time
from pathlib import Path

MODEL = "mlp:layers=8,width=512"
# 256 as in the validation matrix: at 32 an action takes 0.7 ms and identical launches lie 11-28% apart
MICROBATCH_SIZE = 256
LAUNCHES = 3


def demo_loop(out: Path) -> int:
    """Plan an MLP on local:2, calibrate (link benchmark, three launches of each of two short runs), simulate a
    held-out plan and run it three times, print the prediction against the median launch in one table.

    Writes ``out/loop_timeline.json`` (predicted and measured in one Chrome trace) and ``out/loop_timeline.png``.
    """
    from dataclasses import replace

    from rich.console import Console
    from rich.table import Table

    from executor.launch import run_plan
    from executor.models import num_layers
    from pipetwin.charts import gantt
    from planner.plan import even_plan
    from planner.search import plan_model
    from planner.trace import save_side_by_side
    from validation.calibrate import calibrate
    from validation.measure import measure_links, run_options
    from validation.compare import compare_traces, median_launch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    t0 = time.perf_counter()
    console.print("\n== 2. The loop: plan, calibrate, simulate, run, compare ==\n")
    n = num_layers(MODEL)
    cal_plans = [even_plan(MODEL, n, 2, schedule="1f1b", microbatches=8, microbatch_size=MICROBATCH_SIZE, batches=4),
                 even_plan(MODEL, n, 2, schedule="zb-h1", microbatches=4, microbatch_size=MICROBATCH_SIZE, batches=4)]
    console.print("  link benchmark (loopback, 2 processes)")
    # three launches of each calibration run and of the held-out plan (its median scored): identical launches
    # on a shared CPU lie several percent apart, and one launch each put this table 5-15% off
    cal = calibrate(MODEL, cal_plans, names=["1f1b/P2/M8", "zb-h1/P2/M4"], microbatch_size=MICROBATCH_SIZE,
                    bench_points=measure_links(), devices=2, log=lambda m: console.print(f"  {m}"), repeats=LAUNCHES)
    result = plan_model(cal.profile, cal.topology(devices=2), schedule="gpipe", microbatch_size=MICROBATCH_SIZE,
                        microbatches=16, model_name=MODEL)
    plan = replace(result.best, model=MODEL, batches=4)
    if len(plan.stages) != 2 or plan.num_layers != n:  # the loop compares a 2-stage pipeline
        plan = even_plan(MODEL, n, 2, schedule="gpipe", microbatches=16, microbatch_size=MICROBATCH_SIZE, batches=4)
    console.print(f"  plan: {plan.schedule}, stages {[s.layers for s in plan.stages]}, "
                  f"{plan.microbatches} microbatches of {plan.microbatch_size} (held out from calibration)")
    predicted = cal.simulate(plan)
    # on the CPU with gloo like the calibration runs, even where there are GPUs
    measured, rates = median_launch([run_plan(plan, timeout_s=60, **run_options("cpu")).trace for _ in range(LAUNCHES)])
    console.print(f"  measured: the median of {LAUNCHES} launches ({', '.join(f'{r:.0f}' for r in rates)} samples/s)")
    cmp = compare_traces(predicted, measured)
    p, m, e = cmp["predicted"], cmp["measured"], cmp["error"]
    table = Table(title=f"{MODEL}, {plan.schedule}, 2 stages: predicted against measured")
    for col in ("metric", "predicted", "measured", "error"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    table.add_row("throughput (samples/s)", f"{p['throughput_samples_per_s']:.1f}", f"{m['throughput_samples_per_s']:.1f}",
                  f"{e['throughput_samples_per_s'] * 100:+.1f}%")
    table.add_row("time per batch (ms)", f"{p['time_per_batch_s'] * 1e3:.2f}", f"{m['time_per_batch_s'] * 1e3:.2f}",
                  f"{e['time_per_batch_s'] * 100:+.1f}%")
    table.add_row("bubble fraction", f"{p['bubble_fraction']:.3f}", f"{m['bubble_fraction']:.3f}",
                  f"{e['bubble_fraction'] * 100:+.1f} pts")
    for w in sorted(e["busy_s"], key=int):
        table.add_row(f"w{w} busy (ms)", f"{p['busy_s'][w] * 1e3:.1f}", f"{m['busy_s'][w] * 1e3:.1f}",
                      f"{e['busy_s'][w] * 100:+.1f}%")
        table.add_row(f"w{w} peak memory (MiB)", f"{p['peak_memory_bytes'][w] / 2**20:.2f}",
                      f"{m['peak_memory_bytes'][w] / 2**20:.2f}", f"{e['peak_memory_bytes'][w] * 100:+.1f}%")
    console.print(table)
    trace_path, png_path = out / "loop_timeline.json", out / "loop_timeline.png"
    save_side_by_side({"predicted": predicted, "measured": measured}, trace_path)
    gantt({"predicted": predicted, "measured": measured}, png_path,
          title=f"{plan.schedule} 2 stages: predicted (top) and measured (bottom)", time_unit="ms")
    console.print(f"timelines: {trace_path} (Perfetto), {png_path}; {time.perf_counter() - t0:.0f} s")
    return 0
