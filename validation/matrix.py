"""The validation matrix: calibrate each model on its calibration runs, then simulate and measure every held-out configuration."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from planner.trace import Trace
from validation.calibrate import Calibration, calibrate, measure_links
from validation.compare import compare_traces, run_spread, summarize
from validation.configs import CALIBRATION, FULL, MODELS, QUICK, Config


@dataclass
class MatrixResult:
    """What ``run_matrix`` produced.

    Attributes:
        rows: one per scored configuration: name, model, schedule, stages, replicas, microbatches,
            predicted, measured, error (see ``validation.compare.compare_traces``).
        summary: ``validation.compare.summarize`` of the rows.
        calibrations: model key → its Calibration.
        traces: configuration name → {"predicted": Trace, "measured": Trace}.
        elapsed_s: wall seconds of the whole matrix, calibration included.
    """

    rows: list[dict]
    summary: dict
    calibrations: dict[str, Calibration]
    traces: dict[str, dict[str, Trace]] = field(default_factory=dict)
    elapsed_s: float = 0.0


def calibrate_models(keys, *, links: bool = True, log=None, repeats: int = 1) -> dict[str, Calibration]:
    """Calibrate every model in ``keys`` on its calibration runs (``validation.configs.CALIBRATION``)."""
    say = log or (lambda *_: None)
    points = None
    if links:
        say("link benchmark (loopback, 2 processes)")
        points = measure_links()
    out = {}
    for key in keys:
        m = MODELS[key]
        cs = CALIBRATION[key]
        out[key] = calibrate(m.spec, [c.plan() for c in cs], names=[c.name for c in cs],
                             microbatch_size=m.microbatch_size, bench_points=points, log=say, repeats=repeats)
    return out


def run_config(cfg: Config, cal: Calibration, timeout_s: float = 120.0, repeats: int = 1) -> tuple[dict, Trace, Trace]:
    """Simulate (calibrated) and measure one configuration; the comparison row and both traces.

    With ``repeats`` > 1 the configuration is launched that many times and the launch of median
    throughput is the measurement (run-to-run spread on a shared CPU is tens of percent); the row keeps
    every launch's throughput (``measured_runs``) and their spread (``run_spread``).
    """
    from executor.launch import run_plan
    from planner.trace import throughput_samples_per_s

    plan = cfg.plan()
    predicted = cal.simulate(plan)
    runs = sorted((run_plan(plan, timeout_s=timeout_s).trace for _ in range(max(1, repeats))),
                  key=throughput_samples_per_s)
    measured = runs[(len(runs) - 1) // 2]
    rates = [throughput_samples_per_s(t) for t in runs]
    row = {"name": cfg.name, "model": cfg.model, "schedule": cfg.schedule, "stages": cfg.stages,
           "replicas": cfg.replicas, "chunks": cfg.chunks, "microbatches": cfg.microbatches,
           "workers": cfg.workers, **compare_traces(predicted, measured),
           # every launch's throughput, slowest first: how far identical launches of it lie apart
           "measured_runs": rates, "run_spread": run_spread(rates)}
    return row, predicted, measured


def run_matrix(quick: bool = False, configs: list[Config] | None = None, links: bool = True,
               calibrations: dict[str, Calibration] | None = None, log=None, repeats: int | None = None) -> MatrixResult:
    """Calibrate, then simulate and measure every held-out configuration (``QUICK`` or ``FULL`` by default).

    ``repeats``: launches per calibration run and per scored configuration (the median-throughput launch
    is scored); default 1 with ``quick``, else 3.
    """
    if repeats is None:
        repeats = 1 if quick else 3
    say = log or (lambda *_: None)
    t0 = time.perf_counter()
    configs = list(configs or (QUICK if quick else FULL))
    keys = sorted({c.model for c in configs}, key=list(MODELS).index)
    cals = dict(calibrations or {})
    points = None
    if links and any(k not in cals for k in keys):
        say("link benchmark (loopback, 2 processes)")
        points = measure_links()
    rows, traces = [], {}
    done = 0
    for key in keys:  # each model is calibrated right before its configurations run: the machine drifts
        if key not in cals:
            m, cs = MODELS[key], CALIBRATION[key]
            cals[key] = calibrate(m.spec, [c.plan() for c in cs], names=[c.name for c in cs],
                                  microbatch_size=m.microbatch_size, bench_points=points, log=say, repeats=repeats)
        for cfg in (c for c in configs if c.model == key):
            done += 1
            say(f"[{done}/{len(configs)}] {cfg.name}")
            row, pred, meas = run_config(cfg, cals[cfg.model], repeats=repeats)
            rows.append(row)
            traces[cfg.name] = {"predicted": pred, "measured": meas}
    return MatrixResult(rows, summarize(rows), cals, traces, time.perf_counter() - t0)


def used_for_calibration(result: MatrixResult) -> dict[str, list[str]]:
    """Model key → names of the runs its calibration used."""
    return {k: list(c.used) for k, c in result.calibrations.items()}


def save_calibrations(result: MatrixResult, out: str | Path) -> dict[str, dict[str, str]]:
    """Write every model's calibration files under ``out/calibration/<model>/``."""
    return {k: c.save(Path(out) / "calibration" / k) for k, c in result.calibrations.items()}
