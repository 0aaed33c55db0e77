"""`pipetwin groundtruth`: predict vTrain's published A100 runs with pipetwin's own plans and score them."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipetwin.args import add_device_calibration_flag

_DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "vtrain"


def register(sub) -> None:
    p = sub.add_parser("groundtruth", help="score predictions against vTrain's measured A100 iteration times",
                       description="Express every row of ground_truth_single.csv and ground_truth_multi.csv as a "
                                   "pipetwin plan (TP × DP × PP, full recomputation, 1F1B), fit the compute-efficiency "
                                   "model on the calibration rows (sha256 of the config mod 5 == 0), predict every row "
                                   "(simulated where affordable, else the 1F1B closed form) and score the others.")
    p.add_argument("--data", default=str(_DEFAULT_DATA), metavar="DIR",
                   help="folder holding ground_truth_single.csv and ground_truth_multi.csv (default ../shared/data/vtrain)")
    p.add_argument("--report", metavar="DIR", help="write report.md, scatter.png, groundtruth.json and "
                                                  "device-calibration.json here")
    p.add_argument("--json", action="store_true", help="print {rows, summary} as JSON")
    add_device_calibration_flag(p)  # given, it is used instead of fitting one (the calibration rows stay unscored)
    p.add_argument("--save-calibration", metavar="FILE", help="write the fitted device calibration JSON here")
    p.add_argument("--save-calibration-h100", metavar="FILE",
                   help="write the H100 calibration (h100-96gb-hbm2e) fitted on torchtitan's plain-FSDP Llama 3.1 8B "
                        "rows, the rule of validation/groundtruth_titan.py, for --device-calibration FILE with "
                        "--device-kinds h100-96gb-hbm2e")
    p.add_argument("--explain", metavar="FILE:LINE", action="append", default=[],
                   help="print a row's closed form split into its terms (compute, TP all-reduces, pipeline fill and "
                        "drain, p2p, DP all-reduce tail, overhead) next to its measured time, e.g. multi:52 "
                        "(repeatable; FILE is single or multi, LINE the CSV line); with --json those rows as JSON")
    p.add_argument("--no-simulate", action="store_true", help="predict every row by the closed form")
    p.add_argument("--korthikanti", metavar="FILE", default=None,
                   help="also predict Korthikanti et al. 2022's Table 5 (default: "
                        "DATA/../published/korthikanti22_table5_via_calculon.csv when it exists; 'none' to skip)")
    p.add_argument("--torchtitan", metavar="FILE", default=None,
                   help="also fit an H100 calibration on torchtitan's Llama 3.1 H100 calibration rows and predict "
                        "the others, tokens/s per GPU and memory (default: "
                        "DATA/../published/torchtitan_llama3_h100_202412.csv when it exists; 'none' to skip)")
    p.set_defaults(func=run)


def _explain_keys(texts: list[str]) -> list[tuple[str, int]]:
    from pipetwin.errors import UserError

    keys = []
    for t in texts:
        src, _, line = t.partition(":")
        if src not in ("single", "multi") or not line.isdigit():
            raise UserError(f"--explain {t!r}: give FILE:LINE with FILE single or multi, e.g. multi:52")
        keys.append((src, int(line)))
    return keys


def run(args) -> int:
    from validation.groundtruth import run as run_groundtruth
    from validation.groundtruth_report import to_json, write_report

    from validation.groundtruth_published import KORTHIKANTI_FILE, score_korthikanti

    from validation.groundtruth_titan import fit_h100, score_torchtitan

    from pipetwin.errors import UserError

    explain = _explain_keys(args.explain)
    if explain and args.report:
        raise UserError("--explain prints the named rows' terms, --report writes the whole report: give one of them")
    titan_rows = _torchtitan_rows(args)
    if args.save_calibration_h100 and not titan_rows:
        raise UserError("--save-calibration-h100 fits on torchtitan's rows, but none were read: drop --torchtitan none "
                        "or give --torchtitan FILE")
    g = run_groundtruth(args.data, calibration=args.device_calibration, simulate=not args.no_simulate)
    h100 = fit_h100(titan_rows, g.calibration) if titan_rows else None
    if args.save_calibration_h100:
        h100.save(args.save_calibration_h100)
    if explain:
        chosen = _explained(g, explain)
        if args.save_calibration:
            g.calibration.save(args.save_calibration)
        if args.json:
            print(json.dumps({"rows": [x.to_dict() for x in chosen]}))
            return 0
        return _print_explain(chosen)
    table5 = args.korthikanti or str(Path(args.data) / ".." / "published" / KORTHIKANTI_FILE)
    extra = None
    if args.korthikanti != "none" and (args.korthikanti or Path(table5).is_file()):
        extra = score_korthikanti(table5, g.calibration)
    titan = score_torchtitan(titan_rows, h100) if titan_rows else None
    if args.save_calibration:
        g.calibration.save(args.save_calibration)
    if args.report:
        write_report(g, args.report, extra, titan, h100)
    if args.json:
        print(json.dumps(to_json(g, extra, titan, h100)))
        return 0
    _print(g)
    if extra:
        from validation.groundtruth_report import extra_markdown

        print("\n".join(extra_markdown(extra)))
    if titan:
        from validation.groundtruth_report import titan_markdown

        print("\n".join(titan_markdown(titan, h100)))
    if args.report:
        print(f"report written to {args.report}/report.md")
    return 0


def _torchtitan_rows(args) -> list | None:
    """torchtitan's rows, read before anything is fitted so a bad file fails at once (None when skipped): the
    given file, else the default one where it exists."""
    from validation.groundtruth_titan import TORCHTITAN_FILE, read_torchtitan

    if args.torchtitan == "none":
        return None
    path = args.torchtitan or str(Path(args.data) / ".." / "published" / TORCHTITAN_FILE)
    if not args.torchtitan and not Path(path).is_file():
        return None
    return read_torchtitan(path)


def _print(g) -> None:
    from rich.console import Console
    from rich.table import Table

    from validation.groundtruth import simulated_workers_sentence
    from validation.groundtruth_report import breakdown, worst_rows

    c = Console(width=None if sys.stdout.isatty() else 130)
    t = Table(title="pipetwin against vTrain's measured A100 runs (scored rows only)")
    for col in ("group", "rows", "MAPE", "worst"):
        t.add_column(col, justify="left" if col == "group" else "right")
    for k, n, m, w in breakdown(g, lambda r: f"{r.source} {r.parallelism}"):
        t.add_row(k, str(n), f"{m * 100:.1f}%", f"{w * 100:.1f}%")
    c.print(t)
    w = Table(title="worst scored rows")
    for col in ("file:line", "model", "shape", "micro", "measured ms", "predicted ms", "error", "method"):
        w.add_column(col, justify="left" if col in ("file:line", "model", "shape", "method") else "right")
    for x in worst_rows(g, 8):
        r = x.row
        w.add_row(f"{r.source}:{r.line}", r.model, r.shape, str(r.micro_batch), f"{r.measured_ms:.1f}",
                  f"{x.predicted_ms:.1f}", f"{x.error * 100:+.1f}%", x.method)
    c.print(w)
    s = g.summary()
    c.print(f"MAPE {s['mape_single'] * 100:.2f}% single-node, {s['mape_multi'] * 100:.2f}% multi-node; worst "
            f"{s['max_abs_error'] * 100:.1f}%; {s['n_scored']} scored, {s['n_calibration']} calibration, "
            f"{s['n_skipped']} skipped; measured-fastest in the predicted top three in {s['best_in_top3']} of "
            f"{s['best_groups']} groups; {s['n_simulated']} rows simulated ({simulated_workers_sentence(s['simulated_workers'])}), "
            f"{s['n_closed_form']} by the closed form "
            f"(they differ by at most {s['max_sim_vs_closed_form'] * 100:.2f}% where both ran); {s['seconds']:.1f} s")
    c.print(f"all-reduces timed with collectives={s['collectives']} (topologies.ncclcost: ideal = the link model, "
            f"nccl = NCCL's protocol, bandwidth fraction and latency; chosen by validation.groundtruth_cv's rule)")
    if g.calibration.block_timings:
        c.print(f"per-shape block times (the calibration's table, {len(g.calibration.block_timings)} shapes) for "
                f"{s['n_shape_table']} of {s['n_scored']} scored rows, the smooth model for the others "
                f"(each row's block_timing in --json says which)")
    closed = [x for x in g.scored if x.method == "closed-form"]
    if closed:
        c.print(f"closed form instead of simulation for {len(closed)} rows: {closed[0].why_closed_form}"
                + (f" (and {len(closed) - 1} more like it; --json gives each row's why_closed_form)" if len(closed) > 1 else ""))


def _explained(g, keys: list[tuple[str, int]]) -> list:
    """The scored rows ``--explain`` names, in its order; a key naming no expressed row is refused in one line."""
    from pipetwin.errors import UserError

    by_key = {(s.row.source, s.row.line): s for s in g.scored}
    skipped = {(r.source, r.line): why for r, why in g.skipped}
    chosen = []
    for key in keys:
        x = by_key.get(key)
        if x is None:
            why = skipped.get(key)
            raise UserError(f"--explain {key[0]}:{key[1]}: " + (f"the row was not expressed ({why})" if why else
                             "no such data row (LINE is the line in the CSV file, the header being line 1)"))
        chosen.append(x)
    return chosen


def _print_explain(chosen: list) -> int:
    from rich.console import Console
    from rich.table import Table

    from validation.groundtruth_closed_form import TERMS

    c = Console(width=None if sys.stdout.isatty() else 130)
    for x in chosen:
        r = x.row
        c.print(f"[bold]{r.source}:{r.line}[/] {r.model} {r.shape}, micro {r.micro_batch}, {r.microbatches} "
                f"microbatches per pipeline, {r.gpus} GPUs{' (a calibration row)' if r.calibration else ''}")
        t = Table()
        t.add_column("term")
        t.add_column("ms", justify="right")
        t.add_column("share", justify="right")
        total = sum(x.terms_ms.values())
        for k in TERMS:
            t.add_row(k, f"{x.terms_ms[k]:.1f}", f"{x.terms_ms[k] / total * 100:.1f}%")
        t.add_row("closed form", f"{x.closed_form_ms:.1f}", "")
        if x.method == "simulated":
            t.add_row("simulated (the prediction)", f"{x.predicted_ms:.1f}", "")
        t.add_row("measured", f"{r.measured_ms:.1f}", f"{x.error * 100:+.1f}% off")
        c.print(t)
    return 0
