"""`pipetwin calibrate`: fit the cluster model to this machine for one model and write the calibrated files."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("calibrate", help="fit compute, link and overhead parameters to measured runs",
                       description="Profile a model, benchmark the loopback link and run a few short pipelines, "
                                   "then fit per-layer compute (scale, per-layer and per-action costs), link latency "
                                   "and bandwidth (piecewise by message size), the wake-up of a blocked receive, "
                                   "the cost of accumulating a gradient, the optimizer step and the BI share. "
                                   "Writes DIR/profile.json, DIR/topology.json, DIR/sim_params.json and "
                                   "DIR/calibration.json.")
    p.add_argument("--model", required=True, help="a matrix model key (mlp, emu, gpt) or a model spec")
    p.add_argument("--microbatch-size", type=int, default=None, help="microbatch size of the profile and runs")
    p.add_argument("-o", "--output", default="out/calibration", metavar="DIR", help="where to write (default out/calibration)")
    p.add_argument("--no-netbench", action="store_true", help="fit links from the calibration runs only")
    p.add_argument("--repeats", type=int, default=3, metavar="N",
                   help="launches of each calibration run, all fitted (default 3: identical launches on a shared "
                        "CPU lie several percent apart)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the profile and the runs compute (default cpu; cuda: links from the runs alone)")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="with --device cuda: NCCL needs a GPU per worker (auto: NCCL where there is one, else gloo)")
    p.add_argument("--json", action="store_true", help="print the residuals and the files as JSON")
    p.set_defaults(func=run)


def _runs(model: str, mbs: int | None):
    """(spec, microbatch size, calibration plans, their names) for a matrix key or a spec."""
    from dataclasses import replace

    from executor.models import num_layers
    from pipetwin.errors import UserError
    from planner.plan import even_plan
    from validation.configs import CALIBRATION, MODELS

    if model in MODELS:
        m = MODELS[model]
        mbs = mbs or m.microbatch_size
        cs = CALIBRATION[model]
        return m.spec, mbs, [replace(c.plan(), microbatch_size=mbs) for c in cs], [c.name for c in cs]
    n = num_layers(model)
    if n < 2:
        raise UserError(f"model {model!r} has {n} layer; calibration runs need at least 2 (two stages)")
    mbs = mbs or 1
    plans = [even_plan(model, n, 2, schedule="1f1b", microbatches=8, microbatch_size=mbs, batches=4)]
    names = ["1f1b/P2/M8"]
    if n >= 4:
        plans.append(even_plan(model, n, 4 if n >= 4 else 2, schedule="gpipe", microbatches=4, microbatch_size=mbs,
                               batches=4))
        names.append("gpipe/P4/M4")
    return model, mbs, plans, names


def run(args) -> int:
    from pipetwin.errors import UserError
    from validation.calibrate import calibrate
    from validation.measure import measure_links, run_options

    if args.microbatch_size is not None and args.microbatch_size < 1:
        raise UserError("--microbatch-size must be >= 1")
    if args.repeats < 1:
        raise UserError("--repeats must be >= 1")
    spec, mbs, plans, names = _runs(args.model, args.microbatch_size)
    log = (lambda msg: print(msg, file=sys.stderr)) if not args.json else None
    # a bad device or backend is said before anything runs; one backend for every calibration run
    where = run_options(args.device, args.backend, max(len(p.devices) for p in plans))
    points = None if args.no_netbench or args.device == "cuda" else measure_links()
    cal = calibrate(spec, plans, names=names, microbatch_size=mbs, bench_points=points, log=log, repeats=args.repeats,
                    **where)
    files = cal.save(args.output)
    res = cal.residuals
    if args.json:
        doc = {"model": spec, "files": files, "used": cal.used, "residuals": res,
               "sim_params": json.loads(open(files["sim_params"]).read())}
        print(json.dumps(doc, default=lambda x: None))
        return 0
    comp = res["compute"]
    print(f"calibrated {spec} on {', '.join(cal.used)}")
    print(f"  compute: scale {comp['scale']:.3g}, per layer {comp['per_layer_s'] * 1e6:.1f} us, per compute action "
          f"{cal.action_s * 1e6:.1f} us, per action {cal.params.overhead_s * 1e6:.1f} us; "
          f"rms relative residual {comp['rms_relative_error'] * 100:.1f}%")
    for label, e in comp["rows"].items():
        print(f"    {label:40s} {e * 100:+6.1f}%")
    for s in cal.links:
        upto = "all sizes" if s.max_bytes == float("inf") else f"< {s.max_bytes:.0f} B"
        print(f"  link {upto}: latency {s.latency_s * 1e6:.1f} us, bandwidth {s.bandwidth_bytes_per_s / 1e9:.3g} GB/s")
    print(f"  step {cal.params.step_time_s * 1e6:.1f} us, BI share {cal.params.bi_fraction:.2f}, "
          f"split backward x{cal.params.split_factor:.2f}, "
          "overlap slowdown " + ("n/a" if res['overlap_slowdown'] is None else f"{res['overlap_slowdown']:.3f}x"))
    print(f"  a blocked receive wakes in {cal.params.recv_wake_s * 1e6:.1f} us, an early one costs "
          f"{cal.params.recv_ready_s * 1e6:.1f} us; accumulating a gradient costs "
          f"{cal.params.accumulate_s_per_byte * 1e12:.1f} us per MB")
    for name, e in res["runs"].items():
        print(f"  in-sample {name}: throughput {e['throughput_samples_per_s'] * 100:+.1f}%, "
              f"time per batch {e['time_per_batch_s'] * 100:+.1f}%")
    print(f"wrote {', '.join(files.values())}")
    return 0
