"""`pipetwin validate`: calibrate, then simulate and measure the validation matrix, and compare."""
from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("validate", help="run the validation matrix: predicted against measured",
                       description="Calibrate every model of the matrix on its calibration runs, then simulate "
                                   "(calibrated) and measure every held-out configuration and compare throughput, "
                                   "time per batch, bubble, busy time and peak memory.")
    p.add_argument("--quick", action="store_true", help="a small held-out set (about a minute on two cores)")
    p.add_argument("--report", metavar="DIR", help="write report.md, validation.json, plots, the timeline pair and "
                                                  "the calibration files here")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="rounds of launches: each round launches every calibration run and configuration of a "
                        "model once; the median launch is scored (default 1 with --quick, else 5)")
    p.add_argument("--no-netbench", action="store_true", help="fit links from the calibration runs only")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where profiles and runs compute (default cpu; cuda: the links are fitted from the runs, "
                        "since the loopback benchmark measures host memory)")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="with --device cuda: NCCL needs a GPU per worker; auto takes it where there is one, "
                        "else gloo with the workers sharing the GPUs (the CPU always uses gloo)")
    p.add_argument("--json", action="store_true", help="print {configs, summary, calibration} as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from validation.matrix import run_matrix, save_calibrations
    from validation.report import to_json, write_report

    log = (lambda msg: print(msg, file=sys.stderr)) if not args.json else None
    if args.repeats is not None and args.repeats < 1:
        from pipetwin.errors import UserError

        raise UserError("--repeats must be >= 1")
    result = run_matrix(quick=args.quick, links=not args.no_netbench, log=log, repeats=args.repeats,
                        device=args.device, backend=args.backend)
    if args.report:
        write_report(result, args.report)
        save_calibrations(result, args.report)
    if args.json:
        print(json.dumps(to_json(result)))
        return 0
    _print_table(result)
    if args.report:
        print(f"report written to {args.report}/report.md")
    return 0


def _print_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    from validation.compare import format_spread

    t = Table(title="predicted against measured (held-out configurations)")
    for col in ("configuration", "thr pred", "thr meas", "thr err", "run spread", "t/batch err", "bubble p/m", "mem err"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for r in result.rows:
        p, m, e = r["predicted"], r["measured"], r["error"]
        t.add_row(r["name"], f"{p['throughput_samples_per_s']:.4g}", f"{m['throughput_samples_per_s']:.4g}",
                  f"{e['throughput_samples_per_s'] * 100:+.1f}%",
                  format_spread(r.get("run_spread")), f"{e['time_per_batch_s'] * 100:+.1f}%",
                  f"{p['bubble_fraction']:.2f}/{m['bubble_fraction']:.2f}", f"{e['memory_abs_error'] * 100:.1f}%")
    c = Console()
    c.print(t)
    s = result.summary
    c.print(f"{s['n_configs']} configurations: mean |throughput error| {s['mean_abs_throughput_error'] * 100:.1f}%, "
            f"worst {s['max_abs_throughput_error'] * 100:.1f}%; mean |memory error| {s['mean_abs_memory_error'] * 100:.1f}%; "
            f"Spearman {s['spearman']:.3f}; measured-best predicted best in every model: "
            f"{s['best_predicted_best_all_models']} ({result.elapsed_s:.0f} s)")
    if s.get("n_within_half_spread") is not None:
        c.print(f"identical launches lay {s['median_run_spread'] * 100:.1f}% apart (median spread); "
                f"{s['n_within_half_spread']} of {s['n_with_spread']} errors lie within half their configuration's spread")
