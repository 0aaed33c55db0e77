"""Comparison math: predicted against measured, per configuration and over the matrix."""
from __future__ import annotations

import math

import numpy as np

from planner.trace import Trace, summary

#: Scalar metrics compared by relative error.
RELATIVE = ("throughput_samples_per_s", "time_per_batch_s")


def rel_error(predicted: float, measured: float) -> float:
    """(predicted − measured) / measured; NaN when the measurement is 0 or either side is not finite."""
    if not (math.isfinite(predicted) and math.isfinite(measured)) or measured == 0:
        return float("nan")
    return (predicted - measured) / measured


def _metrics(trace: Trace) -> dict:
    s = summary(trace)
    return {
        "throughput_samples_per_s": s["throughput_samples_per_s"],
        "time_per_batch_s": s["time_per_batch_s"],
        "bubble_fraction": s["bubble_fraction"],
        "busy_s": {w: d["busy_s"] for w, d in s["per_device"].items()},
        "peak_memory_bytes": {w: d["peak_memory_bytes"] for w, d in s["per_device"].items()},
    }


def compare_traces(predicted: Trace, measured: Trace) -> dict:
    """``{"predicted", "measured", "error"}``: throughput and time per batch (relative error), bubble fraction
    (absolute difference, a fraction already), per-device busy time and peak memory (relative errors), and
    ``memory_abs_error`` (the largest per-device one)."""
    p, m = _metrics(predicted), _metrics(measured)
    err = {k: rel_error(p[k], m[k]) for k in RELATIVE}
    err["bubble_fraction"] = p["bubble_fraction"] - m["bubble_fraction"]
    devs = sorted(set(p["busy_s"]) & set(m["busy_s"]), key=int)
    err["busy_s"] = {w: rel_error(p["busy_s"][w], m["busy_s"][w]) for w in devs}
    err["peak_memory_bytes"] = {w: rel_error(p["peak_memory_bytes"][w], m["peak_memory_bytes"][w]) for w in devs}
    mem = [abs(e) for e in err["peak_memory_bytes"].values() if math.isfinite(e)]
    err["memory_abs_error"] = max(mem) if mem else float("nan")
    return {"predicted": p, "measured": m, "error": err}


def run_spread(rates: list[float]) -> float:
    """(fastest − slowest) / median of identical launches' throughputs; NaN with fewer than two."""
    xs = sorted(r for r in rates if math.isfinite(r))
    if len(xs) < 2:
        return float("nan")
    med = float(np.median(xs))
    return (xs[-1] - xs[0]) / med if med else float("nan")


def median_launch(traces: list[Trace]) -> tuple[Trace, list[float]]:
    """The launch of median throughput (the lower middle of an even count) and every launch's throughput, slowest first."""
    from planner.trace import throughput_samples_per_s

    runs = sorted(traces, key=throughput_samples_per_s)
    return runs[(len(runs) - 1) // 2], [throughput_samples_per_s(t) for t in runs]


def format_spread(x) -> str:
    """A spread as a percentage; n/a where there is none (one launch)."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x * 100:.1f}%"


def spearman(predicted: list[float], measured: list[float]) -> float:
    """Spearman rank correlation (scipy.stats.spearmanr); NaN with fewer than 3 pairs or a constant side."""
    from scipy.stats import spearmanr

    if len(predicted) < 3 or len(set(predicted)) < 2 or len(set(measured)) < 2:
        return float("nan")
    return float(spearmanr(predicted, measured).statistic)


#: predicted throughputs within this share of the predicted best count as a tie with it (``summarize``)
TIE = 0.01


def _argbest(xs: list[float]) -> int:
    """Index of the largest finite value (NaN never wins; 0 when there is none)."""
    vals = [x if math.isfinite(x) else -math.inf for x in xs]
    return max(range(len(vals)), key=vals.__getitem__) if vals else 0


def best_agrees(predicted: list[float], measured: list[float]) -> bool:
    """Whether the configuration measured fastest is also predicted fastest."""
    return bool(predicted) and _argbest(predicted) == _argbest(measured)


#: launches each side needs before ``best_gap_p_value`` tests anything
MIN_LAUNCHES = 3


def best_gap_p_value(best_runs, picked_runs) -> float | None:
    """One-sided Mann-Whitney U p-value that the measured best's launches ran faster than the predicted best's.

    Large: no evidence that the predicted best is slower on this machine; which of the two measured best may
    be the machine's noise. Small: evidence of a real miss, but an optimistic one, since the measured best
    was picked as the fastest median of these same launches (on identical configurations, 5 launches each,
    p < 0.05 came out 10-20% of the time instead of 5%, more with more configurations to pick from). With n
    and m launches the smallest possible value is 1 / C(n + m, n) (5 against 5: 1/252). Ties get scipy's
    tie correction. None with fewer than ``MIN_LAUNCHES`` launches on either side.
    """
    from scipy.stats import mannwhitneyu

    a = [x for x in (best_runs or []) if math.isfinite(x)]
    b = [x for x in (picked_runs or []) if math.isfinite(x)]
    if len(a) < MIN_LAUNCHES or len(b) < MIN_LAUNCHES:
        return None
    return float(mannwhitneyu(a, b, alternative="greater", method="auto").pvalue)


def summarize(rows: list[dict]) -> dict:
    """Matrix figures from rows ``{"name", "model", "schedule", "predicted", "measured", "error"}``.

    Spearman and best-agreement are over all configurations and within each model (throughputs of different
    models differ by orders of magnitude, so the within-model figures are the demanding ones).
    """
    thr = [abs(r["error"]["throughput_samples_per_s"]) for r in rows]
    thr = [e for e in thr if math.isfinite(e)]
    mem = [abs(e) for r in rows for e in r["error"]["peak_memory_bytes"].values() if math.isfinite(e)]
    tpb = [abs(r["error"]["time_per_batch_s"]) for r in rows if math.isfinite(r["error"]["time_per_batch_s"])]
    bub = [abs(r["error"]["bubble_fraction"]) for r in rows if math.isfinite(r["error"]["bubble_fraction"])]
    p = [r["predicted"]["throughput_samples_per_s"] for r in rows]
    m = [r["measured"]["throughput_samples_per_s"] for r in rows]
    by_model: dict[str, dict] = {}
    for key in sorted({r["model"] for r in rows}):
        sub = [r for r in rows if r["model"] == key]
        sp = [r["predicted"]["throughput_samples_per_s"] for r in sub]
        sm = [r["measured"]["throughput_samples_per_s"] for r in sub]
        by_model[key] = {"n_configs": len(sub), "spearman": spearman(sp, sm), "best_predicted_best": best_agrees(sp, sm),
                         "measured_best": sub[_argbest(sm)]["name"] if sub else None,
                         "predicted_best": sub[_argbest(sp)]["name"] if sub else None,
                         "mean_abs_throughput_error": float(np.mean([abs(r["error"]["throughput_samples_per_s"]) for r in sub]))}
        if sub:  # how much slower, measured, the predicted best ran than the measured best, against the latter's spread
            mb, pb = sub[_argbest(sm)], sub[_argbest(sp)]
            gap = 1.0 - pb["measured"]["throughput_samples_per_s"] / mb["measured"]["throughput_samples_per_s"]
            spread = mb.get("run_spread", float("nan"))
            by_model[key]["best_gap"] = gap
            by_model[key]["best_within_spread"] = bool(math.isfinite(spread) and gap <= spread / 2)
            by_model[key]["best_gap_p_value"] = best_gap_p_value(mb.get("measured_runs"), pb.get("measured_runs")) \
                if mb is not pb else None
            # the configurations the model itself cannot tell from its best (predicted within TIE of it): when
            # several share one steady-state rate (PipeDream and 2BW on the same stages) the pick among them is a
            # coin toss, and what the prediction says is that the measured best is one of them
            finite = [x for x in sp if math.isfinite(x)]
            top = max(finite) if finite else float("nan")
            if top > 0 and all(math.isfinite(x) for x in sm):
                ties = [r["name"] for r, x in zip(sub, sp) if math.isfinite(x) and x >= top * (1.0 - TIE)]
                by_model[key]["predicted_ties"] = ties
                by_model[key]["measured_best_among_predicted_ties"] = mb["name"] in ties
            else:  # no usable prediction (or measurement) to call anything a tie with
                by_model[key]["predicted_ties"] = []
                by_model[key]["measured_best_among_predicted_ties"] = None
    by_schedule: dict[str, float] = {}
    for fam in sorted({r["schedule"] for r in rows}):
        es = [abs(r["error"]["throughput_samples_per_s"]) for r in rows if r["schedule"] == fam]
        by_schedule[fam] = float(np.mean(es))
    worst = sorted(rows, key=lambda r: -abs(r["error"]["throughput_samples_per_s"]))[:5]
    # how far apart identical launches lay (fastest minus slowest over median), against which a throughput
    # error is read: an error inside half the spread is no larger than what the machine itself varies
    spreads = {r["name"]: r["run_spread"] for r in rows if math.isfinite(r.get("run_spread", float("nan")))}
    within = [r for r in rows if r["name"] in spreads
              and abs(r["error"]["throughput_samples_per_s"]) <= spreads[r["name"]] / 2]
    for key, v in by_model.items():
        sub = [spreads[r["name"]] for r in rows if r["model"] == key and r["name"] in spreads]
        v["median_run_spread"] = float(np.median(sub)) if sub else float("nan")
    nan = float("nan")
    return {
        "n_configs": len(rows),
        "mean_abs_throughput_error": float(np.mean(thr)) if thr else nan,
        "max_abs_throughput_error": float(np.max(thr)) if thr else nan,
        "mean_abs_time_per_batch_error": float(np.mean(tpb)) if tpb else nan,
        "mean_abs_bubble_fraction_error": float(np.mean(bub)) if bub else nan,
        "mean_abs_memory_error": float(np.mean(mem)) if mem else nan,
        "max_abs_memory_error": float(np.max(mem)) if mem else nan,
        "spearman": spearman(p, m),
        "best_predicted_best": best_agrees(p, m),
        "best_predicted_best_all_models": all(v["best_predicted_best"] for v in by_model.values()) if by_model else False,
        "by_model": by_model,
        "throughput_error_by_schedule": by_schedule,
        "worst": [{"name": r["name"], "throughput_error": r["error"]["throughput_samples_per_s"],
                   "run_spread": r.get("run_spread", float("nan"))} for r in worst],
        "median_run_spread": float(np.median(list(spreads.values()))) if spreads else float("nan"),
        "n_within_half_spread": len(within) if spreads else None,
        "n_with_spread": len(spreads),
    }
