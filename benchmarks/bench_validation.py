"""The full validation matrix: calibrate, simulate and measure every held-out configuration, write the report.

Not a test. Run ``python benchmarks/bench_validation.py [--out out/validation] [--quick]``
(the same as ``pipetwin validate --report out/validation``). Prints the summary figures against the
issue's targets: mean |throughput error| <= 5 %, worst <= 12 %, memory within 5 %, Spearman >= 0.9 and
the measured-best configuration predicted best.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/validation")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None,
                    help="launches per calibration run and per configuration (default 1 with --quick, else 5)")
    args = ap.parse_args()
    from validation.matrix import run_matrix, save_calibrations
    from validation.report import write_report

    res = run_matrix(quick=args.quick, log=lambda m: print(m, file=sys.stderr, flush=True), repeats=args.repeats)
    write_report(res, args.out)
    save_calibrations(res, args.out)
    s = res.summary
    targets = [("mean |throughput error| <= 5%", s["mean_abs_throughput_error"] <= 0.05),
               ("worst |throughput error| <= 12%", s["max_abs_throughput_error"] <= 0.12),
               ("mean |memory error| <= 5%", s["mean_abs_memory_error"] <= 0.05),
               ("Spearman >= 0.9", s["spearman"] >= 0.9),
               ("measured best predicted best (every model)", s["best_predicted_best_all_models"])]
    print(json.dumps({k: v for k, v in s.items() if k not in ("by_model",)}, indent=1, default=str))
    for k, v in s["by_model"].items():
        print(f"{k}: {json.dumps(v)}")
    for what, ok in targets:
        print(f"{'met ' if ok else 'MISS'} {what}")
    ties = {k: (len(v["predicted_ties"]), v["measured_best_among_predicted_ties"]) for k, v in s["by_model"].items()}
    print("(not a target) measured best among the configurations predicted within 1% of the best: "
          + ", ".join(f"{k} {'n/a' if ok is None else 'yes' if ok else 'no'} ({n} such)" for k, (n, ok) in ties.items()))
    def p_text(v) -> str:
        p = v.get("best_gap_p_value")
        return "same" if v["best_predicted_best"] else "n/a" if p is None else f"{p:.3f}"

    print("(not a target) where the predicted best is not the measured best, one-sided Mann-Whitney p that the "
          "measured best is faster: " + ", ".join(f"{k} {p_text(v)}" for k, v in s["by_model"].items()))
    print(f"{s['n_configs']} configurations in {res.elapsed_s:.0f} s; report: {args.out}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
