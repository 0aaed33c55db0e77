"""The validation report: Markdown with tables and plots, and the stable JSON document."""
from __future__ import annotations

import json
import math
from pathlib import Path

from planner.trace import save_side_by_side
from validation.compare import format_spread
from validation.plots import gantt

#: Keys of ``summary`` in the JSON document that scripts may rely on.
SUMMARY_KEYS = ("mean_abs_throughput_error", "max_abs_throughput_error", "mean_abs_memory_error", "spearman",
                "n_configs")


def _yes_no(x) -> str:
    return "n/a" if x is None else ("yes" if x else "no")


def _times(x) -> str:
    """A ratio as "1.02x", or what stands for a ratio the runs could not give."""
    return "(not measurable: no compute overlapped a message)" if x is None else f"{x:.3f}x"


def _clean(x):
    """JSON-safe: NaN/inf become None, tuples lists, keys strings."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _p(x) -> str:
    """A p-value to three decimals; "-" where nothing was tested (the same configuration, or too few launches)."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _where(rows) -> str:
    """Where the measured runs computed and how they talked: "the CPU with gloo (34)", or several such."""
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        key = (r.get("device", "cpu"), r.get("backend", "gloo"))
        counts[key] = counts.get(key, 0) + 1
    names = {"cpu": "the CPU", "cuda": "the GPU"}
    return ", ".join(f"{names.get(d, d)} with {b} ({n})" for (d, b), n in sorted(counts.items())) or "nothing"


def to_json(result) -> dict:
    """``{"configs": [...], "summary": {...}, "calibration": {...}, "elapsed_s"}`` of a MatrixResult."""
    configs = [{k: r[k] for k in ("name", "model", "schedule", "stages", "replicas", "chunks", "microbatches",
                                  "workers", "predicted", "measured", "error")} for r in result.rows]
    for c, r in zip(configs, result.rows):
        c["device"], c["backend"] = r.get("device", "cpu"), r.get("backend", "gloo")  # "cpu"/"cuda", "gloo"/"nccl"
        c["measured_runs"] = r.get("measured_runs", [])
        c["run_spread"] = r.get("run_spread", float("nan"))
    cal = {k: {"used": c.used, "overhead_s": c.params.overhead_s, "action_s": c.action_s,
               "step_time_s": c.params.step_time_s, "bi_fraction": c.params.bi_fraction,
               "recv_wake_s": c.params.recv_wake_s, "recv_ready_s": c.params.recv_ready_s, "accumulate_s_per_byte": c.params.accumulate_s_per_byte,
               "links": [{"max_bytes": s.max_bytes, "latency_s": s.latency_s,
                          "bandwidth_bytes_per_s": s.bandwidth_bytes_per_s} for s in c.links],
               "in_sample": c.residuals.get("runs", {})}
           for k, c in result.calibrations.items()}
    return _clean({"configs": configs, "summary": result.summary, "calibration": cal, "elapsed_s": result.elapsed_s})


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x * 100:+.1f}%"


_INSIDE = " (inside half the measured best's spread)"




def _scatter(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 6))
    for key in sorted({r["model"] for r in rows}):
        sub = [r for r in rows if r["model"] == key]
        ax.scatter([r["measured"]["throughput_samples_per_s"] for r in sub],
                   [r["predicted"]["throughput_samples_per_s"] for r in sub], label=key, s=22)
    vals = [v for r in rows for v in (r["measured"]["throughput_samples_per_s"], r["predicted"]["throughput_samples_per_s"])
            if v > 0]
    if vals:
        lo, hi = min(vals) / 1.3, max(vals) * 1.3
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("measured throughput (samples/s)")
    ax.set_ylabel("predicted throughput (samples/s)")
    ax.legend(fontsize=8)
    ax.set_title("predicted against measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _by_schedule(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = summary.get("throughput_error_by_schedule", {})
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(list(by), [v * 100 for v in by.values()], color="#4C72B0")
    ax.set_ylabel("mean |throughput error| (%)")
    ax.set_title("error by schedule family")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result, out: str | Path, timeline: str | None = None) -> dict[str, str]:
    """Write ``report.md``, ``validation.json``, the plots and one predicted/measured timeline pair into ``out``.

    Args:
        result: a ``validation.matrix.MatrixResult``.
        out: the report folder (created).
        timeline: the configuration whose timelines are drawn (default: the first scored one).

    Returns:
        What was written, by role.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, s = result.rows, result.summary
    files = {"report": str(out / "report.md"), "json": str(out / "validation.json"),
             "scatter": str(out / "scatter.png"), "by_schedule": str(out / "error_by_schedule.png")}
    Path(files["json"]).write_text(json.dumps(to_json(result), indent=1))
    if rows:
        _scatter(rows, Path(files["scatter"]))
        _by_schedule(s, Path(files["by_schedule"]))
    name = timeline or (rows[0]["name"] if rows else None)
    if name and name in result.traces:
        pair = result.traces[name]
        files["timeline_trace"] = str(out / "timeline.json")
        files["timeline_png"] = str(out / "timeline.png")
        save_side_by_side({f"predicted {name}": pair["predicted"], f"measured {name}": pair["measured"]},
                          files["timeline_trace"])
        gantt({f"predicted: {name}": pair["predicted"], f"measured: {name}": pair["measured"]}, files["timeline_png"],
              title=f"{name}: predicted (top) and measured (bottom)", time_unit="ms")
    lines = ["# pipetwin validation", "",
             f"{s['n_configs']} held-out configurations, simulated with calibrated parameters and measured on this "
             f"machine ({result.elapsed_s:.0f} s with calibration); they ran on {_where(result.rows)}.", "",
             "## Summary", "", "| figure | value |", "|---|---|",
             f"| mean \\|throughput error\\| | {_pct(s['mean_abs_throughput_error'])} |",
             f"| worst \\|throughput error\\| | {_pct(s['max_abs_throughput_error'])} |",
             f"| mean \\|time-per-batch error\\| | {_pct(s['mean_abs_time_per_batch_error'])} |",
             f"| mean \\|bubble fraction difference\\| | {_pct(s['mean_abs_bubble_fraction_error'])} |",
             f"| mean \\|peak memory error\\| (per device) | {_pct(s['mean_abs_memory_error'])} |",
             f"| worst \\|peak memory error\\| | {_pct(s['max_abs_memory_error'])} |",
             f"| Spearman (all configurations) | {s['spearman']:.3f} |",
             f"| measured-best predicted best, every model | {s['best_predicted_best_all_models']} |",
             f"| median run-to-run spread of identical launches | {format_spread(s.get('median_run_spread'))} |",
             f"| configurations whose error lies within half their spread | "
             f"{'n/a' if s.get('n_within_half_spread') is None else s['n_within_half_spread']} of "
             f"{s.get('n_with_spread', s['n_configs'])} |",
             "",
             "The spread of a configuration is (fastest − slowest) / median throughput of its identical launches; "
             "an error inside half of it is no larger than the machine's own variation. Where the predicted best is "
             "not the measured best, the MWU p is a one-sided Mann-Whitney U test on their launches that the measured "
             "best is faster (n against m launches: 1 / C(n + m, n) at the smallest). A large p: no evidence that "
             "the predicted best is slower; a small one overstates a real miss, since the measured best was picked "
             "from the same launches.", "",
             "| model | configs | Spearman | mean \\|thr error\\| | median run spread | measured best | predicted best | "
             "predicted best's measured gap | one-sided MWU p | predicted within 1% of the best (measured best among them?) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for k, v in s["by_model"].items():
        sp = "n/a" if not math.isfinite(v["spearman"]) else f"{v['spearman']:.3f}"
        lines.append(f"| {k} | {v['n_configs']} | {sp} | {_pct(v['mean_abs_throughput_error'])} | "
                     f"{format_spread(v.get('median_run_spread'))} | {v['measured_best']} | {v['predicted_best']} | "
                     f"{format_spread(v.get('best_gap'))}{_INSIDE if v.get('best_within_spread') else ''} | "
                     f"{_p(v.get('best_gap_p_value'))} | {len(v.get('predicted_ties', []))} "
                     f"({_yes_no(v.get('measured_best_among_predicted_ties'))}) |")
    lines += ["", "![predicted against measured](scatter.png)", "", "![error by schedule](error_by_schedule.png)", "",
              "## Configurations", "",
              "| configuration | workers | thr pred | thr meas | thr err | run spread | t/batch err | bubble pred/meas | "
              "busy err (max) | memory err (max) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m, e = r["predicted"], r["measured"], r["error"]
        busy = [abs(x) for x in e["busy_s"].values() if math.isfinite(x)]
        lines.append(f"| {r['name']} | {r['workers']} | {p['throughput_samples_per_s']:.4g} | "
                     f"{m['throughput_samples_per_s']:.4g} | {_pct(e['throughput_samples_per_s'])} | "
                     f"{format_spread(r.get('run_spread'))} | {_pct(e['time_per_batch_s'])} | {p['bubble_fraction']:.3f} / {m['bubble_fraction']:.3f} | "
                     f"{_pct(max(busy) if busy else float('nan'))} | {_pct(e['memory_abs_error'])} |")
    lines += ["", "## Calibration (hold-out)", "",
              "These runs were used to calibrate and are never scored:", ""]
    for k, c in result.calibrations.items():
        links = ", ".join(f"< {sg.max_bytes:.0f} B: {sg.latency_s * 1e6:.0f} us + {sg.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
                          if math.isfinite(sg.max_bytes) else f"{sg.latency_s * 1e6:.0f} us + {sg.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
                          for sg in c.links)
        comp = c.residuals.get("compute", {})
        lines += [f"- **{k}** ({c.model}): {', '.join(c.used)}",
                  f"  - compute: scale {comp.get('scale', float('nan')):.3g}, per layer "
                  f"{comp.get('per_layer_s', 0) * 1e6:.0f} us, per compute action {c.action_s * 1e6:.0f} us, "
                  f"per action (every kind) {c.params.overhead_s * 1e6:.0f} us, step {c.params.step_time_s * 1e6:.0f} us, "
                  f"BI share {c.params.bi_fraction:.2f}, split backward x{c.params.split_factor:.2f}",
                  f"  - links (one-way): {links}; a blocked receive wakes in {c.params.recv_wake_s * 1e6:.0f} us, an "
                  f"early one costs {c.params.recv_ready_s * 1e6:.0f} us; "
                  f"accumulating a gradient costs {c.params.accumulate_s_per_byte * 4e6 * 1e6:.0f} us per 4 MB",
                  f"  - compute while an own message is in flight takes "
                  f"{_times(c.residuals.get('overlap_slowdown'))} as long as without (the simulator has no such "
                  f"slowdown; one the runs show stays in the compute scale)"]
    lines += ["", "## Timeline", ""]
    if "timeline_png" in files:
        lines += [f"Predicted and measured timelines of {name} (Chrome trace with both: `timeline.json`, "
                  "open in Perfetto).", "", "![timeline](timeline.png)", ""]
    lines += ["## Worst configurations", ""]
    for w in s["worst"]:
        lines.append(f"- {w['name']}: throughput error {_pct(w['throughput_error'])}, "
                     f"run-to-run spread {format_spread(w.get('run_spread'))}")
    lines += ["", "## Memory: what each side counts", "",
              "Prediction: the simulator's peak per device (weights, gradients and optimizer state from the start; "
              "saved activations from a forward to its backward; stashed versions; receive buffers from a RECV to "
              "the compute that consumes it). Measurement: the executor's CPU accounting (saved tensors, live "
              "weight versions, gradient buffers while they exist, SGD's momentum buffer), sampled after compute "
              "actions. Calibration counts the runs' optimizer state (momentum: 1x) and adds the loss's saved "
              "tensors to the last layer; what remains by construction: gradients (the executor holds them only between a batch's "
              "first backward and its step) and receive buffers (the executor does not count them).", ""]
    Path(files["report"]).write_text("\n".join(lines))
    return files
