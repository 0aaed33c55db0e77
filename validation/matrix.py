"""The validation matrix: calibrate each model on its calibration runs, then simulate and measure every held-out configuration."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from planner.trace import Trace
from validation.calibrate import Calibration, calibrate
from validation.measure import Instruments, run_options
from validation.compare import compare_traces, median_launch, run_spread, summarize
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


def calibrate_models(keys, *, links: bool = True, log=None, repeats: int = 1, device: str = "cpu",
                     backend: str = "auto", instruments: Instruments = Instruments()) -> dict[str, Calibration]:
    """Calibrate every model in ``keys`` on its calibration runs (``validation.configs.CALIBRATION``); on a GPU
    without the loopback link benchmark (it times host memory)."""
    say = log or (lambda *_: None)
    where = run_options(device, backend, max(c.workers for k in keys for c in CALIBRATION[k]))
    points = None
    if links and device == "cpu":
        say("link benchmark (loopback, 2 processes)")
        points = instruments.links()
    out = {}
    for key in keys:
        m = MODELS[key]
        cs = CALIBRATION[key]
        out[key] = calibrate(m.spec, [c.plan() for c in cs], names=[c.name for c in cs],
                             microbatch_size=m.microbatch_size, bench_points=points, log=say, repeats=repeats,
                             instruments=instruments, **where)
    return out


def run_config(cfg: Config, cal: Calibration, timeout_s: float = 120.0, repeats: int = 1,
               measured: list[Trace] | None = None, device: str = "cpu", backend: str = "auto",
               instruments: Instruments = Instruments()) -> tuple[dict, Trace, Trace]:
    """Simulate (calibrated) and measure one configuration; the comparison row and both traces.

    With ``repeats`` > 1 the configuration is launched that many times and the launch of median
    throughput is the measurement (run-to-run spread on a shared CPU is tens of percent); the row keeps
    every launch's throughput (``measured_runs``) and their spread (``run_spread``). ``measured``: traces
    of launches already made (nothing is launched then). ``device``, ``backend``: see
    ``validation.measure.run_options``; ``instruments``: what launches (``validation.measure.Instruments``).
    """
    plan = cfg.plan()
    predicted = cal.simulate(plan)
    if measured is None:
        where = run_options(device, backend, cfg.workers)
        measured = [instruments.launch(plan, timeout_s=timeout_s, **where).trace for _ in range(max(1, repeats))]
    median_run, rates = median_launch(measured)
    row = {"name": cfg.name, "model": cfg.model, "schedule": cfg.schedule, "stages": cfg.stages,
           "replicas": cfg.replicas, "chunks": cfg.chunks, "microbatches": cfg.microbatches,
           "workers": cfg.workers, "device": median_run.meta.get("device_kind", "cpu"),
           "backend": median_run.meta.get("backend", "gloo"), **compare_traces(predicted, median_run),
           # every launch's throughput, slowest first: how far identical launches of it lie apart
           "measured_runs": rates, "run_spread": run_spread(rates)}
    return row, predicted, median_run


def launch_interleaved(cal_configs: list[Config], configs: list[Config], repeats: int, timeout_s: float = 120.0,
                       log=None, device: str = "cpu", backend: str = "auto",
                       instruments: Instruments = Instruments()) -> tuple[list[Trace], dict[str, list[Trace]]]:
    """Launch a model's calibration runs and scored configurations in ``repeats`` rounds, each round every one
    of them once, so that a machine whose speed drifts over minutes weighs on calibration and scored runs alike.

    Returns the calibration traces in ``calibrate``'s order (each calibration run's launches together) and
    each scored configuration's traces by name.
    """
    say = log or (lambda *_: None)
    where = run_options(device, backend, max(c.workers for c in [*cal_configs, *configs]))
    cal_plans = [c.plan() for c in cal_configs]
    plans = {c.name: c.plan() for c in configs}
    cal_runs: list[list[Trace]] = [[] for _ in cal_configs]
    runs: dict[str, list[Trace]] = {c.name: [] for c in configs}
    for r in range(repeats):
        for i, c in enumerate(cal_configs):
            say(f"round {r + 1}/{repeats}: calibration run {c.name}")
            cal_runs[i].append(instruments.launch(cal_plans[i], timeout_s=timeout_s, **where).trace)
        for c in configs:
            say(f"round {r + 1}/{repeats}: {c.name}")
            runs[c.name].append(instruments.launch(plans[c.name], timeout_s=timeout_s, **where).trace)
    return [t for ts in cal_runs for t in ts], runs


def run_matrix(quick: bool = False, configs: list[Config] | None = None, links: bool = True,
               calibrations: dict[str, Calibration] | None = None, log=None, repeats: int | None = None,
               device: str = "cpu", backend: str = "auto", instruments: Instruments = Instruments()) -> MatrixResult:
    """Calibrate, then simulate and measure every held-out configuration (``QUICK`` or ``FULL`` by default).

    ``repeats``: launches per calibration run and per scored configuration (the median-throughput launch
    is scored); default 1 with ``quick``, else 5 (with 3, three full runs on the 2-core machine had worst errors of 13-20%).
    ``device``: where the profiles, calibration runs and scored runs compute, "cpu" or "cuda"; ``backend``
    how the runs communicate (``validation.measure.run_options``: the CPU always with gloo; "cuda" with
    "auto" resolves once for the matrix's widest run: NCCL with a GPU per worker of it, else gloo with the
    workers sharing the GPUs). On "cuda" the loopback link benchmark is not run (``links`` is ignored).
    ``instruments``: what launches, profiles, times and benchmarks (``validation.measure.Instruments``).
    """
    if repeats is None:
        repeats = 1 if quick else 5
    say = log or (lambda *_: None)
    t0 = time.perf_counter()
    configs = list(configs or (QUICK if quick else FULL))
    keys = sorted({c.model for c in configs}, key=list(MODELS).index)
    # one backend for every launch of the matrix (resolved for its widest run), refused before anything runs
    widest = max([c.workers for c in configs] + [c.workers for k in keys if k not in (calibrations or {})
                                                 for c in CALIBRATION[k]])
    where = run_options(device, backend, widest)
    if device == "cuda":
        links = False  # the loopback benchmark times host memory and gloo, not the GPUs' links
    cals = dict(calibrations or {})
    points = None
    if links and any(k not in cals for k in keys):
        say("link benchmark (loopback, 2 processes)")
        points = instruments.links()
    rows, traces = [], {}
    for key in keys:
        mine = [c for c in configs if c.model == key]
        measured: dict[str, list[Trace]] = {}
        if key not in cals:
            # the machine drifts (this one: the same launches 25% faster half an hour later), so a model's
            # calibration runs and its scored configurations are launched in rounds, each round all of them
            m, cs = MODELS[key], CALIBRATION[key]
            cal_traces, measured = launch_interleaved(list(cs), mine, repeats, log=say, instruments=instruments,
                                                      **where)
            cals[key] = calibrate(m.spec, [c.plan() for c in cs], names=[c.name for c in cs],
                                  microbatch_size=m.microbatch_size, bench_points=points, log=say, repeats=repeats,
                                  traces=cal_traces, instruments=instruments, **where)
        for cfg in mine:
            row, pred, meas = run_config(cfg, cals[cfg.model], repeats=repeats, measured=measured.get(cfg.name),
                                         instruments=instruments, **where)
            rows.append(row)
            traces[cfg.name] = {"predicted": pred, "measured": meas}
    return MatrixResult(rows, summarize(rows), cals, traces, time.perf_counter() - t0)


def used_for_calibration(result: MatrixResult) -> dict[str, list[str]]:
    """Model key → names of the runs its calibration used."""
    return {k: list(c.used) for k, c in result.calibrations.items()}


def save_calibrations(result: MatrixResult, out: str | Path) -> dict[str, dict[str, str]]:
    """Write every model's calibration files under ``out/calibration/<model>/``."""
    return {k: c.save(Path(out) / "calibration" / k) for k, c in result.calibrations.items()}
