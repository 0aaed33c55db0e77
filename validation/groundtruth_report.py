"""The ground truth's outputs: the JSON document, the breakdown tables, and the Markdown + PNG report."""
from __future__ import annotations

import json
from pathlib import Path

from validation.groundtruth import GroundTruth, Scored, simulated_workers_sentence
from validation.groundtruth_rows import CALIBRATION_RULE


def to_json(g: GroundTruth, extra: list[dict] | None = None, titan: list[dict] | None = None, h100=None) -> dict:
    """``{"rows": [...], "summary": {...}}``: every expressed row (calibration rows flagged, never scored);
    ``extra`` (Korthikanti et al.'s Table 5 rows) goes into the summary as ``korthikanti_table5``, ``titan`` (and
    the H100 calibration ``h100`` they were predicted with) as ``torchtitan_llama3_h100``."""
    summary = dict(g.summary())
    summary["calibration"] = g.calibration.to_dict()
    summary["skipped"] = [{"source": r.source, "line": r.line, "why": why} for r, why in g.skipped]
    if extra:
        summary["korthikanti_table5"] = {"mape": sum(abs(x["error"]) for x in extra) / len(extra), "rows": extra}
    if titan:
        from validation.groundtruth_titan import titan_summary

        summary["torchtitan_llama3_h100"] = titan_summary(titan)
        if h100 is not None:
            summary["torchtitan_llama3_h100"]["calibration"] = h100.to_dict()
    return {"rows": [s.to_dict() for s in g.scored], "summary": summary}


def extra_markdown(extra: list[dict]) -> list[str]:
    """The Table 5 section: predicted with the vTrain-fitted calibration, no fitting on these rows."""
    if not extra:
        return []
    mape = sum(abs(x["error"]) for x in extra) / len(extra)
    lines = ["## Extra: Korthikanti et al. 2022, Table 5 (Selene, TP 8; not fitted on)", "",
             f"Predicted by the closed form with the calibration fitted on vTrain's rows (another cluster and code "
             f"base): MAPE {_pct(mape)}.", "",
             "| model | GPUs | TP·PP·DP | v | micro | batch | recompute | measured s | predicted s | error |",
             "|---|---:|---|---:|---:|---:|---|---:|---:|---:|"]
    for x in extra:
        lines.append(f"| {x['model']} | {x['gpus']} | {x['tp']}·{x['pp']}·{x['dp']} | {x['chunks']} | {x['micro_batch']} | "
                     f"{x['global_batch']} | {x['recompute']} | {x['measured_s']:.2f} | {x['predicted_s']:.2f} | "
                     f"{x['error'] * 100:+.1f}% |")
    return lines + [""]


def titan_markdown(titan: list[dict], h100=None) -> list[str]:
    """The torchtitan section: Llama 3.1 on H100, predicted with the H100 calibration ``h100`` fitted on the
    calibration rows by the rule in ``validation.groundtruth_titan`` (they are marked and not scored)."""
    if not titan:
        return []
    from validation.groundtruth_titan import H100_CALIBRATION_RULE, TERMS as TITAN_TERMS, titan_summary

    s = titan_summary(titan)
    fitted = (f"gemm_efficiency {h100.params.gemm_efficiency:.4f} of the 912 TFLOP/s peak (rms relative error "
              f"{_pct(h100.rms_relative_error)} on its {h100.n_rows} rows), " if h100 is not None else "")
    clean = (f"; over the {s['n_all_modelled']} scored rows without torch.compile (the one technique not modelled) "
             f"{_pct(s['mape_tps_all_modelled'])} and {_pct(s['mape_memory_all_modelled'])}" if s["n_all_modelled"]
             else "; every scored row names torch.compile, the one technique not modelled")
    lines = ["## Extra: torchtitan, Llama 3.1 8B/70B/405B on H100 (Grand Teton; H100 calibration, look 2)", "",
             f"Predicted by the closed form of `validation/groundtruth_titan.py` with the H100 calibration: {fitted}"
             f"the other parameters the A100 fit's. Rule: {H100_CALIBRATION_RULE}. Scored rows: tokens/s per GPU MAPE "
             f"{_pct(s['mape_tps'])}, memory MAPE {_pct(s['mape_memory'])} over {s['n_rows']} rows ({s['n_calibration']} "
             f"calibration rows, marked C, not scored){clean}. Sequence 8192 where the file gives none (marked *).", "",
             "| table | model | FSDP·TP·PP·CP | seq | local batch | AC | techniques | schedule | tokens/s/GPU measured | "
             "predicted | error | GiB measured | predicted | error |",
             "|---:|---|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in titan:
        seq = f"{x['seq']}{'*' if x['seq_assumed'] else ''}"
        lines.append(f"| {x['table']}{' C' if x['calibration'] else ''} | {x['model']} | {x['fsdp']}·{x['tp']}·{x['pp']}·{x['cp']} | {seq} | "
                     f"{x['local_batch']} | {x['activation_ckpt']} | {x['techniques']} | {x['schedule']} | "
                     f"{x['measured_tps']:,.0f} | {x['predicted_tps']:,.0f} | {x['tps_error'] * 100:+.1f}% | "
                     f"{x['measured_gib']:.1f} | {x['predicted_gib']:.1f} | {x['memory_error'] * 100:+.1f}% |")
    lines += ["", "Not modelled, so predicted as eager kernels: torch.compile (every row that names it). "
                  "No row skipped.", "",
              "Where each predicted step goes (shares of `step_terms_s` in the JSON, which add up to the step):", "",
              "| table | FSDP·TP·PP·CP | techniques | schedule | step s | " + " | ".join(TITAN_TERMS) + " |",
              "|---:|---|---|---|---:|" + "---:|" * len(TITAN_TERMS)]
    for x in titan:
        t = x["step_terms_s"]
        lines.append(f"| {x['table']} | {x['fsdp']}·{x['tp']}·{x['pp']}·{x['cp']} | {x['techniques']} | {x['schedule']} | "
                     f"{x['step_s']:.2f} | " + " | ".join(f"{t[k] / x['step_s'] * 100:.0f}%" for k in TITAN_TERMS) + " |")
    return lines + [""]


def breakdown(g: GroundTruth, key) -> list[tuple[str, int, float, float]]:
    """(group, scored rows, mean |error|, worst |error|) of the scored rows grouped by ``key(row)``."""
    groups: dict[str, list[Scored]] = {}
    for s in g.rows(calibration=False):
        groups.setdefault(key(s.row), []).append(s)
    out = []
    for k in sorted(groups, key=lambda x: (len(x), x)):
        xs = groups[k]
        errs = [abs(s.error) for s in xs]
        out.append((k, len(xs), sum(errs) / len(errs), max(errs)))
    return out


def worst_rows(g: GroundTruth, n: int = 10) -> list[Scored]:
    return sorted(g.rows(calibration=False), key=lambda s: -abs(s.error))[:n]


def best_pick_misses(g: GroundTruth) -> list[tuple[tuple, Scored, list[Scored]]]:
    """Groups (see ``best_pick``) whose measured-fastest row is not among the three predicted fastest."""
    groups: dict[tuple, list[Scored]] = {}
    for s in g.rows(calibration=False):
        groups.setdefault((s.row.source, s.row.model, s.row.gpus, s.row.global_batch), []).append(s)
    out = []
    for key, members in groups.items():
        if len(members) < 2:
            continue
        best = min(members, key=lambda s: s.row.measured_ms)
        top = sorted(members, key=lambda s: s.predicted_ms)[:3]
        if best not in top:
            out.append((key, best, top))
    return out


def scatter(g: GroundTruth, path: str | Path) -> None:
    """Predicted against measured iteration time (log-log), single- and multi-node, calibration rows hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6.5))
    for source, color in (("single", "#4C72B0"), ("multi", "#C44E52")):
        test = g.rows(False, source)
        cal = g.rows(True, source)
        ax.scatter([s.row.measured_ms for s in test], [s.predicted_ms for s in test], s=9, color=color, alpha=0.7,
                   label=f"{source}-node, scored ({len(test)})")
        ax.scatter([s.row.measured_ms for s in cal], [s.predicted_ms for s in cal], s=14, facecolors="none",
                   edgecolors=color, alpha=0.6, linewidths=0.7, label=f"{source}-node, calibration ({len(cal)})")
    lo = min(min(s.row.measured_ms, s.predicted_ms) for s in g.scored) * 0.8
    hi = max(max(s.row.measured_ms, s.predicted_ms) for s in g.scored) * 1.25
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
    for k, style in ((1.1, ":"), (1 / 1.1, ":")):
        ax.plot([lo, hi], [lo * k, hi * k], color="gray", linewidth=0.6, linestyle=style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("measured iteration time (ms)")
    ax.set_ylabel("pipetwin predicted (ms)")
    s = g.summary()
    ax.set_title(f"vTrain A100 runs: MAPE {s['mape_single'] * 100:.1f}% single-node, "
                 f"{s['mape_multi'] * 100:.1f}% multi-node (scored rows)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, which="both", linewidth=0.3, alpha=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%"


def markdown(g: GroundTruth, plot: str | None = "scatter.png", extra: list[dict] | None = None,
             titan: list[dict] | None = None, h100=None) -> str:
    s = g.summary()
    p = g.calibration.params
    lines = [
        "# pipetwin against vTrain's measured A100 runs",
        "",
        f"Scored rows (never the calibration rows): **{s['n_scored']}**; calibration rows: {s['n_calibration']}; "
        f"skipped: {s['n_skipped']}.",
        "",
        "| | single-node | multi-node |",
        "|---|---|---|",
        f"| MAPE | {_pct(s['mape_single'])} | {_pct(s['mape_multi'])} |",
        f"| worst |error| | {_pct(max((abs(x.error) for x in g.rows(False, 'single')), default=0))} | "
        f"{_pct(max((abs(x.error) for x in g.rows(False, 'multi')), default=0))} |",
        "",
        f"Worst scored row: {_pct(s['max_abs_error'])}. Measured-fastest configuration among the three predicted "
        f"fastest: {s['best_in_top3']} of {s['best_groups']} groups (same model, GPU count and global batch).",
        "",
        f"Calibration rule: {CALIBRATION_RULE}. Fitted on {g.calibration.n_rows} rows "
        f"(rms relative error {_pct(g.calibration.rms_relative_error)}): GEMM efficiency {p.gemm_efficiency:.3f} of peak, "
        f"memory efficiency {p.memory_efficiency:.3f} of HBM bandwidth, {p.kernel_launch_s * 1e6:.1f} us per kernel launch, "
        f"{p.layer_overhead_s * 1e6:.1f} us per layer, {p.iteration_overhead_s * 1e3:.2f} ms per iteration, "
        f"overlap exponent {p.overlap_exponent:.2f}, {p.loss_overhead_s * 1e3:.2f} ms per microbatch at the loss; the DP all-reduce sends "
        f"{g.calibration.gradient_bytes_per_param} bytes per parameter (the fit's choice of fp32 4 / fp16 2). "
        f"Per-shape block times: {len(g.calibration.block_timings)} shapes in the calibration's table, used for "
        f"{s['n_shape_table']} of {s['n_scored']} scored rows (the smooth model for the others; `block_timing` per row).",
        "",
        f"Prediction method: {s['n_simulated']} rows simulated (SimPy; {simulated_workers_sentence(s['simulated_workers'])}), "
        f"{s['n_closed_form']} by the 1F1B closed form (each row's `why_closed_form` says why: its simulation "
        f"is estimated over the per-row time budget); on the simulated rows the two differ by at most "
        f"{_pct(s['max_sim_vs_closed_form'])}. {s['seconds']:.1f} s in all.",
        "",
    ]
    if plot:
        lines += [f"![predicted against measured]({plot})", ""]
    for title, key in (("By file and parallelism", lambda r: f"{r.source} {r.parallelism}"),
                       ("By shape (multi-node)", None), ("By GPUs", lambda r: f"{r.source} {r.gpus} GPUs")):
        if key is None:
            rows = [x for x in breakdown(g, lambda r: f"{r.source} {r.shape}") if x[0].startswith("multi")]
        else:
            rows = breakdown(g, key)
        lines += [f"## {title}", "", "| group | rows | MAPE | worst |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {n} | {_pct(m)} | {_pct(w)} |" for k, n, m, w in rows]
        lines.append("")
    lines += ["## Worst scored rows", "", "| file:line | model | shape | micro | global | measured ms | predicted ms | error | method |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for x in worst_rows(g, 15):
        r = x.row
        lines.append(f"| {r.source}:{r.line} | {r.model} | {r.shape} | {r.micro_batch} | {r.global_batch} | "
                     f"{r.measured_ms:.1f} | {x.predicted_ms:.1f} | {x.error * 100:+.1f}% | {x.method} |")
    lines.append("")
    misses = best_pick_misses(g)
    lines += ["## Groups whose measured-fastest row is not in the predicted top three", ""]
    if not misses:
        lines.append("None.")
    for (source, model, gpus, gb), best, top in misses:
        lines.append(f"- {source} {model}, {gpus} GPUs, global batch {gb}: measured fastest {best.row.shape} micro "
                     f"{best.row.micro_batch} ({best.row.measured_ms:.1f} ms, predicted {best.predicted_ms:.1f}); predicted "
                     "top three: " + ", ".join(f"{t.row.shape} micro {t.row.micro_batch} ({t.predicted_ms:.1f} predicted, "
                                               f"{t.row.measured_ms:.1f} measured)" for t in top))
    lines += ["", "## Rows that cannot be expressed", ""]
    lines += [f"- {r.source}:{r.line}: {why}" for r, why in g.skipped] or ["None: every row is a pipetwin plan."]
    lines += [""] + extra_markdown(extra or []) + titan_markdown(titan or [], h100)
    return "\n".join(lines) + "\n"


def write_report(g: GroundTruth, out: str | Path, extra: list[dict] | None = None,
                 titan: list[dict] | None = None, h100=None) -> Path:
    """report.md, scatter.png, groundtruth.json and device-calibration.json (and h100-calibration.json with
    ``h100``) into ``out``."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    scatter(g, d / "scatter.png")
    (d / "report.md").write_text(markdown(g, "scatter.png", extra, titan, h100))
    (d / "groundtruth.json").write_text(json.dumps(to_json(g, extra, titan, h100), indent=1) + "\n")
    g.calibration.save(d / "device-calibration.json")
    if h100 is not None:
        h100.save(d / "h100-calibration.json")
    return d / "report.md"

