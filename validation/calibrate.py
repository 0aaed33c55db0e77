"""Calibration: fit what the cluster model needs from the profiler, the link benchmark and short measured runs.

What is fitted (least squares throughout: ``scipy.optimize.least_squares``, and for link lines the
benchmark's own relative-residual fit, ``executor.netbench.fit_latency_bandwidth``):

* compute, per model: a measured compute action lasts
  ``scale · profile_time + per_layer_s · layers + overhead_s`` — the profile's
  time stretched by what a real pipeline does to it (two processes on two
  cores interfere; an emulated layer oversleeps), a fixed cost per layer
  call, and a fixed framework cost per action. Rows are the mean measured
  duration of every (worker, stage, kind) of the calibration runs, taken
  inside the pipeline rather than from isolated layers; a SEND, which only
  posts a message, is a row of pure ``overhead_s``. ``scale`` and
  ``per_layer_s`` go into the calibrated profile's layer times,
  ``overhead_s`` into ``SimParams`` (every simulated action pays it);
* links: one-way time ``latency_s + bytes / bandwidth_bytes_per_s``, fitted on
  the link benchmark's points, piecewise by message size where one line fits
  badly; what the calibration runs' transfers (SEND start to RECV end while the
  receiver was already waiting) took beyond that becomes ``recv_wake_s``, the
  wake-up of a blocked receiver, paid only by a RECV that waits (without
  benchmark points the links are fitted on those transfers alone); the mean
  duration of the receives whose message should already have been there
  (:func:`ready_durations`) beyond ``overhead_s`` becomes ``recv_ready_s``:
  gloo's rendezvous and copy run on progress threads that a busy CPU starves,
  so on two busy cores even an early 512 KB message cost its receiver 0.3-0.8 ms
  on average;
* the optimizer step: ``step_time_s`` from the measured STEP actions;
* gradient accumulation: ``accumulate_s_per_byte``, timed on the model's parameter shapes
  (``validation.measure.accumulate_s_per_byte``). A backward after the first of its optimizer round adds its
  gradients into the round's (flush schedules and 2BW: M/r − 1 of a worker's M/r, PipeDream: none), about 0.2 ms on an
  mlp stage of 4 MB; it is taken off those backwards before the compute fit and the simulator adds
  it back, so a calibration on 1F1B does not charge it to PipeDream's backwards;
* ``bi_fraction``: the input-gradient share of a split backward, when a
  calibration run splits it;
* the overlap slowdown: compute actions that ran while a message of theirs was
  in flight against those that did not (reported; the simulator has no knob
  for it, so a real slowdown stays inside ``scale``);
* memory: the optimizer state factor is the calibration runs' optimizer's
  (``planner.costmodel.OPTIMIZER_STATE``: "sgd", SGD with momentum, keeps one
  buffer, 1; the executor holds exactly that), and
  saved bytes are taken from one forward of the whole chain and its loss
  (:func:`chain_saved_bytes`): the last layer's gain what the loss saves for
  backward (the executor counts it, the profiler does not), and a tensor two
  neighbouring layers both save (one's output, the next one's input) counts
  once, as in the executor, not once per layer as the profiler has it.

The fits live in their own modules (``validation.compute``, ``validation.links`` with the receive
costs, ``validation.accumulation``; what is measured with torch in ``validation.measure``); this one
orchestrates them (:func:`calibrate`, :func:`refine`) and holds their result. A :class:`Calibration` saves as ``profile.json``, ``topology.json`` and
``sim_params.json`` (the files every command accepts) plus ``calibration.json``
(link segments, residuals, and which configurations were used).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from scipy.optimize import least_squares

from planner.costmodel import OPTIMIZER_STATE
from planner.plan import Plan
from planner.profile import ModelProfile, load_profile
from planner.trace import Trace, summary
from sim.engine import simulate_plan
from sim.params import SimParams
from topologies.presets import load_topology
from topologies.topology import Topology
from validation.accumulation import accumulation_s
from validation.compute import (ComputeRow, calibrated_profile, compute_rows, fit_bi_fraction, fit_compute,
                                fit_split_factor, layer_corrections, overlap_slowdown, step_time_s, with_action_cost)
from validation.errors import CalibrationError
from validation.links import LinkSegment, early_receive_cost, fit_link_model, segment_for, transfer_points
from validation.measure import Instruments, chain_saved_bytes, run_options

__all__ = ["Calibration", "calibrate", "refine", "in_sample_errors", "CalibrationError"]


@dataclass
class Calibration:
    """Everything the simulator needs for one model on this machine, fitted.

    Attributes:
        model: the model spec.
        profile: the calibrated profile.
        params: the calibrated simulator knobs.
        links: link segments by message size (one-way).
        devices: devices of the calibrated topology (``d0..``).
        residuals: fit quality (relative errors) and diagnostics.
        used: names of the configurations the fit used (never scored).
    """

    model: str
    profile: ModelProfile
    params: SimParams
    links: list[LinkSegment]
    devices: int = 8
    residuals: dict = field(default_factory=dict)
    used: list[str] = field(default_factory=list)
    action_s: float = 0.0
    reference_plan: dict | None = None

    def profile_for(self, plan: Plan) -> ModelProfile:
        """The calibrated profile with the per-compute-action cost folded into ``plan``'s stages."""
        return with_action_cost(self.profile, plan, self.action_s)

    def topology(self, message_bytes: float | None = None, devices: int | None = None) -> Topology:
        """``local:N`` with the link segment for ``message_bytes`` (the first one when None).

        local:N is a star through a ``localhost`` hub: a message crosses two hops, so each hop gets half
        the one-way latency and the full bandwidth.
        """
        n = devices or self.devices
        seg = segment_for(self.links, message_bytes) if message_bytes is not None else self.links[0]
        topo = load_topology(f"local:{n}")
        return topo.with_link_params(latency_s=seg.latency_s / 2, bandwidth_bytes_per_s=seg.bandwidth_bytes_per_s)

    def topology_for(self, plan: Plan) -> Topology:
        """The calibrated topology with the link segment of the plan's activation message size."""
        nbytes = self.profile.boundary_bytes(plan.stages[0].last_layer) * plan.microbatch_size
        return self.topology(nbytes, max(self.devices, len(plan.devices)))

    def simulate(self, plan: Plan) -> Trace:
        """The calibrated prediction of ``plan``."""
        return simulate_plan(plan, self.profile_for(plan), self.topology_for(plan), self.params)

    # --- files ---------------------------------------------------------------------------------
    def save(self, out: str | Path) -> dict[str, str]:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {k: str(out / f"{k}.json") for k in ("profile", "topology", "sim_params", "calibration")}
        prof = self.profile
        if self.reference_plan is not None:  # the per-action cost folded in for the calibration partition
            prof = self.profile_for(Plan.from_dict(self.reference_plan))
        prof.save(paths["profile"])
        (out / "profile_per_layer.json").write_text(json.dumps(self.profile.to_dict(), indent=1))
        self.topology().save(paths["topology"])
        Path(paths["sim_params"]).write_text(json.dumps(asdict(self.params), indent=1))
        doc = {"model": self.model, "devices": self.devices, "used": self.used, "residuals": self.residuals,
               "action_s": self.action_s, "reference_plan": self.reference_plan,
               "links": [{"max_bytes": None if math.isinf(s.max_bytes) else s.max_bytes, "latency_s": s.latency_s,
                          "bandwidth_bytes_per_s": s.bandwidth_bytes_per_s} for s in self.links]}
        Path(paths["calibration"]).write_text(json.dumps(doc, indent=1))
        return paths

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        p = Path(path)
        if not (p / "calibration.json").exists():
            raise CalibrationError(f"{str(p)!r} holds no calibration.json; run `pipetwin calibrate -o {p}` first")
        doc = json.loads((p / "calibration.json").read_text())
        params = SimParams(**json.loads((p / "sim_params.json").read_text()))
        links = [LinkSegment(math.inf if s["max_bytes"] is None else s["max_bytes"], s["latency_s"],
                             s["bandwidth_bytes_per_s"]) for s in doc["links"]]
        prof = p / "profile_per_layer.json"
        return cls(doc["model"], load_profile(str(prof if prof.exists() else p / "profile.json")), params, links,
                   doc["devices"], doc.get("residuals", {}), doc.get("used", []), float(doc.get("action_s", 0.0)),
                   doc.get("reference_plan"))


def calibrate(model: str, plans: list[Plan], *, names: list[str] | None = None, microbatch_size: int = 1,
              bench_points=None, devices: int = 8, profile_repeats: int = 5, timeout_s: float = 120.0,
              log=None, repeats: int = 1, traces: list[Trace] | None = None, device: str = "cpu",
              backend: str = "auto", instruments: Instruments = Instruments()) -> Calibration:
    """Profile ``model``, run ``plans`` for real, and fit a :class:`Calibration` (see the module docstring).

    Args:
        model: the model spec.
        plans: short calibration runs of that model (they should differ in layers per stage, so that
            per-layer and per-action costs separate).
        names: how the report names those runs.
        microbatch_size: the microbatch size the profile is taken at.
        bench_points: link benchmark points (``validation.measure.measure_links()``); None: links from the runs alone.
        devices: devices of the calibrated ``local:N`` topology.
        repeats: launches of every calibration plan; each launch is one more set of rows for the fits
            (the machine's run-to-run spread averages out).
        traces: measured traces of the plans, already launched by the caller (``repeats`` of each, in the
            order ``[p for p in plans for _ in range(repeats)]``); nothing is launched then. The validation
            matrix launches its calibration runs interleaved with the scored ones this way.
        device, backend: where the profile, the accumulation timing and the runs compute ("cpu" or
            "cuda") and how the runs communicate (see ``validation.measure.run_options``).
        instruments: what launches, profiles and times (``validation.measure.Instruments``; the real ones).
    """
    say = log or (lambda *_: None)
    if repeats < 1:
        raise CalibrationError("repeats must be >= 1")
    where = run_options(device, backend, max(len(p.devices) for p in plans) if plans else None)
    if device == "cuda" and bench_points:
        raise CalibrationError("the loopback link benchmark times host memory, not the GPUs' links: calibrate a "
                               "GPU without it (bench_points=None); its links are fitted from the runs")
    names = list(names) if names else [str(i) for i in range(len(plans))]
    used = list(names)
    if repeats > 1:
        plans = [p for p in plans for _ in range(repeats)]
        names = [f"{n}#{r + 1}" for n in names for r in range(repeats)]
    given = traces
    if given is not None and len(given) != len(plans):
        raise CalibrationError(f"{len(given)} traces given for {len(plans)} calibration launches")
    say(f"profiling {model} at microbatch {microbatch_size}")
    base = instruments.profile(model, microbatch_size=microbatch_size, repeats=profile_repeats, warmup=2, device=device)
    acc_per_byte = instruments.accumulate(model, microbatch_size, device=device)
    rows: list[ComputeRow] = []
    traces, adds = [], []
    for i, plan in enumerate(plans):
        if given is None:
            say(f"calibration run {names[i]}")
            tr = instruments.launch(plan, timeout_s=timeout_s, **where).trace
        else:
            tr = given[i]
        traces.append(tr)
        adds.append(accumulation_s(tr, plan, [acc_per_byte * base.param_bytes(*sp.layers) for sp in plan.stages]))
        rows += compute_rows(tr, plan, base, tag=f"{names[i]}: ", adds=adds[-1])
    fit = fit_compute(rows)
    bi = fit_bi_fraction(traces, adds)
    step = step_time_s(traces, fit.overhead_s)
    pipe_points = [p for tr in traces for p in transfer_points(tr)]
    links, link_info = fit_link_model(bench_points, pipe_points, fit.overhead_s)
    saved = chain_saved_bytes(model, microbatch_size)
    corr = layer_corrections(rows, fit, base, microbatch_size)
    prof = calibrated_profile(base, fit, saved, corr)
    recv_ready, early = early_receive_cost(traces, links, fit.overhead_s)
    link_info.update(early)
    params = SimParams(overhead_s=fit.overhead_s, step_time_s=step, bi_fraction=0.5 if bi is None else bi,
                       optimizer_state_factor=OPTIMIZER_STATE[plans[0].optimizer], first_stage_bi_free=True, accumulate_s_per_byte=acc_per_byte,
                       recv_wake_s=link_info.get("recv_wake_s", 0.0), recv_ready_s=recv_ready)
    cal = Calibration(model, prof, params, links, devices, residuals={"links": link_info}, used=used,
                      action_s=fit.action_s, reference_plan=plans[0].to_dict())
    split = fit_split_factor(cal, plans, traces, adds)
    if split is not None:
        cal = replace(cal, params=replace(cal.params, split_factor=split))
    before = in_sample_errors(cal, plans, traces, names)
    cal = refine(cal, plans, traces)
    cal.residuals = {
        "compute": {"scale": fit.scale, "per_layer_s": fit.per_layer_s, "action_s": fit.action_s,
                    "overhead_s": fit.overhead_s, "rms_relative_error": fit.rms_relative_error, "rows": fit.residuals,
                    "layer_corrections": corr},
        "links": link_info,
        "step_time_s": step,
        "accumulate_s_per_byte": acc_per_byte,
        "bi_fraction": bi,
        "split_factor": split,
        "saved_bytes_per_sample": saved,
        "overlap_slowdown": overlap_slowdown(traces),
        "refined": {"overhead_s": cal.params.overhead_s, "action_s": cal.action_s,
                    "latency_s": [s.latency_s for s in cal.links], "recv_wake_s": cal.params.recv_wake_s,
                    "recv_ready_s": cal.params.recv_ready_s},
        "runs_before_refinement": before,
        "runs": in_sample_errors(cal, plans, traces, names),
    }
    return cal


def _lag(cal: Calibration) -> float:
    """What refine moves besides the overhead: the receiver's wake-up where calibration fitted one, else the link latency."""
    return cal.params.recv_wake_s if cal.params.recv_wake_s > 0 else cal.links[0].latency_s


def _with(cal: Calibration, overhead_s: float, lag_s: float) -> Calibration:
    """The calibration with another per-action overhead (compute actions keep their fitted totals) and another
    receiver wake-up (where it has one) or link latency (see :func:`_lag`: the first segment's; the others
    shift with it)."""
    delta = overhead_s - cal.params.overhead_s
    # an early message's RECV keeps its measured mean (what it costs beyond the new overhead); none measured: none
    early = cal.residuals.get("links", {}).get("early_receive_mean_s")
    ready = max(0.0, early - overhead_s) if early is not None else cal.params.recv_ready_s
    if cal.params.recv_wake_s > 0:
        return replace(cal, params=replace(cal.params, overhead_s=overhead_s, recv_wake_s=lag_s, recv_ready_s=ready),
                       action_s=cal.action_s - delta)
    # every segment moves by as much as the first, so a piecewise link keeps the shape its fit gave it (a
    # segment whose latency would go below 0 stops at 0)
    shift = lag_s - cal.links[0].latency_s
    links = [replace(s, latency_s=max(0.0, s.latency_s + shift)) for s in cal.links]
    return replace(cal, params=replace(cal.params, overhead_s=overhead_s, recv_ready_s=ready), action_s=cal.action_s - delta,
                   links=links)


def refine(cal: Calibration, plans: list[Plan], traces: list[Trace]) -> Calibration:
    """Refine the per-action overhead and the link latency so the calibration runs' predicted time per batch
    and throughput match the measured ones (least squares on log ratios, the simulator in the loop).

    Compute actions keep the durations the compute fit gave them; only what communication costs moves.
    A plan launched several times is one target, its launches' medians: a single slow launch (on this
    machine one in six ran 25% slow) otherwise raised the per-action overhead fourfold, which every
    held-out schedule with more actions per microbatch (PipeDream: a STEP each) then paid.
    """
    groups: dict[str, tuple[Plan, list[dict]]] = {}
    for plan, tr in zip(plans, traces):
        key = json.dumps(plan.to_dict(), sort_keys=True)
        groups.setdefault(key, (plan, []))[1].append(summary(tr))
    plans = [p for p, _ in groups.values()]
    targets = [(statistics.median(m["time_per_batch_s"] for m in ms),
                statistics.median(m["throughput_samples_per_s"] for m in ms)) for _, ms in groups.values()]
    floor = -min(cal.profile_for(p).forward_s(*p.stages[0].layers) for p in plans) * 0.5
    o0, l0 = cal.params.overhead_s, _lag(cal)

    def resid(th):
        c = _with(cal, th[0], th[1])
        out = []
        for plan, (tpb, thr) in zip(plans, targets):
            s = summary(c.simulate(plan))
            out.append(math.log(max(s["time_per_batch_s"], 1e-9) / tpb))
            out.append(math.log(max(thr, 1e-9) / max(s["throughput_samples_per_s"], 1e-9)))
        return out

    hi_o = max(o0 * 4, 1e-3)
    try:
        # the latency (or wake-up) may move within [l0 / 2, 1.5 l0]: with wider bounds it soaked up compute
        # misfit of the calibration runs (mlp: 0.4 -> 1.5 ms) and held-out stream schedules came out 15-19% slow
        sol = least_squares(resid, [o0, l0], bounds=([0.0, 0.5 * l0], [hi_o, max(1.5 * l0, 1e-9)]),
                            diff_step=0.05, max_nfev=40)
    except ValueError:
        return cal
    if sol.cost < 0.5 * sum(r * r for r in resid([o0, l0])) and cal.action_s - (sol.x[0] - o0) > floor:
        return _with(cal, float(sol.x[0]), float(sol.x[1]))
    return cal


def in_sample_errors(cal: Calibration, plans: list[Plan], traces: list[Trace], names=None) -> dict[str, dict]:
    """Relative error of the calibrated prediction on the calibration runs themselves (throughput, time per batch)."""
    out = {}
    for i, (plan, tr) in enumerate(zip(plans, traces)):
        pred = summary(cal.simulate(plan))
        meas = summary(tr)
        out[names[i] if names else str(i)] = {
            k: (pred[k] - meas[k]) / meas[k] if meas[k] else float("nan")
            for k in ("throughput_samples_per_s", "time_per_batch_s")}
    return out

