"""The compute fit: measured action durations against profile times, into a calibrated profile and per-action costs.

A measured compute action lasts ``scale · profile_time + per_layer_s · layers + action_s + overhead_s``
(``fit_compute``, least squares on relative residuals); per-layer corrections, the split of a backward
into BI and BW, the optimizer step and the overlap slowdown are read from the same traces.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import least_squares

from planner.plan import Plan
from planner.profile import ModelProfile
from planner.program import Action
from planner.trace import Trace
from validation.errors import CalibrationError
from validation.events import steady_events


@dataclass(frozen=True)
class ComputeRow:
    """One fitting row: mean measured seconds of ``count`` actions whose profile time is ``base_s`` over ``layers`` layers."""

    label: str
    base_s: float
    layers: int
    measured_s: float
    count: int = 1
    kind: str = ""
    first: int = -1


@dataclass(frozen=True)
class ComputeFit:
    """``measured ≈ scale · base_s + per_layer_s · layers + action_s + overhead_s``; residuals are relative.

    ``overhead_s`` is what every action pays (the simulator's ``SimParams.overhead_s``), ``action_s`` what a
    compute action pays on top of it (autograd, hooks, the call into the stage).
    """

    scale: float
    per_layer_s: float
    action_s: float
    overhead_s: float
    rms_relative_error: float
    residuals: dict[str, float] = field(default_factory=dict)

    def predict_s(self, base_s: float, layers: int) -> float:
        if not layers and not base_s:
            return self.overhead_s
        return self.scale * base_s + self.per_layer_s * layers + self.action_s + self.overhead_s


def fit_compute(rows: list[ComputeRow], overhead_s: float | None = None) -> ComputeFit:
    """Least-squares fit of (scale, per-layer, per-compute-action) costs on relative residuals, weighted by sqrt(count).

    Args:
        rows: compute rows (base_s > 0) and pure-overhead rows (SENDs: base_s == 0, layers == 0).
        overhead_s: the per-action overhead; default: the count-weighted mean of the pure-overhead rows
            (0 without any).
    """
    rows = [r for r in rows if r.measured_s > 0 and math.isfinite(r.measured_s)]
    comp = [r for r in rows if r.base_s > 0 or r.layers]
    pure = [r for r in rows if not (r.base_s > 0 or r.layers)]
    if not comp:
        raise CalibrationError("the calibration runs timed no compute action to fit: give calibrate() plans whose "
                               "traces have F and B events (a run of at least one microbatch)")
    if overhead_s is None:
        n = sum(r.count for r in pure)
        overhead_s = sum(r.measured_s * r.count for r in pure) / n if n else 0.0
        # a SEND that blocks on a busy peer is no per-action cost; keep the fixed cost below every compute action
        overhead_s = min(overhead_s, 0.5 * min(r.measured_s for r in comp))
    base = np.array([r.base_s for r in comp])
    n = np.array([float(r.layers) for r in comp])
    y = np.array([r.measured_s for r in comp])
    w = np.sqrt(np.array([float(r.count) for r in comp]))

    def model(th):
        return th[0] * base + th[1] * n + th[2] + overhead_s

    def resid(th):
        return (model(th) - y) / y * w

    ok = base > 0
    ratio = float(np.median((y[ok] - overhead_s) / base[ok])) if ok.any() else 1.0
    if len(set(n.tolist())) >= 2:
        sol = least_squares(resid, [max(ratio, 1e-3), 0.0, 0.0], bounds=([1e-6, 0.0, 0.0], [np.inf, np.inf, np.inf]),
                            x_scale="jac")
        th = sol.x
    else:  # every stage has as many layers: per-layer and per-action costs cannot be told from the scale
        sol = least_squares(lambda t: resid([t[0], 0.0, 0.0]), [max(ratio, 1e-3)], bounds=([1e-6], [np.inf]))
        th = np.array([sol.x[0], 0.0, 0.0])
    res = {r.label: float(e) for r, e in zip(comp, (model(th) - y) / y)}
    res.update({r.label: (overhead_s - r.measured_s) / r.measured_s for r in pure})
    rel = np.array(list(res.values()))
    return ComputeFit(float(th[0]), float(th[1]), float(th[2]), float(overhead_s), float(np.sqrt(np.mean(rel ** 2))), res)


def _stage_base(profile: ModelProfile, plan: Plan, stage: int, kind: str, bi_fraction: float) -> tuple[float, int]:
    a, b = plan.stages[stage].layers
    k = plan.microbatch_size / profile.microbatch_size
    if kind == "F":
        base = profile.forward_s(a, b)
    elif kind == "B":
        base = profile.backward_s(a, b)
    elif kind == "BI":
        base = profile.backward_s(a, b) * bi_fraction
    else:
        base = profile.backward_s(a, b) * (1.0 - bi_fraction)
    return base * k, b - a + 1


def compute_rows(trace: Trace, plan: Plan, profile: ModelProfile, bi_fraction: float = 0.5,
                 tag: str = "", adds: dict[tuple, float] | None = None) -> list[ComputeRow]:
    """Rows for :func:`fit_compute` from a trace of ``plan``: mean duration per (worker, stage, kind), and SENDs.

    Split backwards (BI/BW) are left out: their split is fitted apart (:func:`fit_bi_fraction`).
    ``adds``: what each backward that adds into its round's gradient paid for that (:func:`accumulation_s`;
    the simulator adds it back, ``SimParams.accumulate_s_per_byte``); taken off those backwards first.
    """
    groups: dict[tuple, list[float]] = {}
    adds = adds or {}
    for e in steady_events(trace):
        if e.kind in ("F", "B"):
            st = Action.parse(e.action).stage
            groups.setdefault((e.lane, st, e.kind), []).append(e.duration_s - adds.get((e.lane, e.action), 0.0))
        elif e.kind == "SEND":
            groups.setdefault((e.lane, -1, "SEND"), []).append(e.duration_s)
    rows = []
    for (w, st, kind), ds in sorted(groups.items()):
        mean = float(np.mean(ds))
        if kind == "SEND":  # posting a message; the median, as a send that finds the socket full waits out a transfer
            rows.append(ComputeRow(f"{tag}w{w} SEND", 0.0, 0, float(np.median(ds)), len(ds)))
            continue
        base, n = _stage_base(profile, plan, st, kind, bi_fraction)
        rows.append(ComputeRow(f"{tag}w{w} {st}{kind}", base, n, mean, len(ds), kind, plan.stages[st].first_layer))
    return rows


def layer_corrections(rows: list[ComputeRow], fit: ComputeFit, profile: ModelProfile,
                      microbatch_size: int) -> dict[str, list[float]]:
    """Per layer and kind (F, B): measured over fitted layer time of the stages that held the layer.

    The global fit leaves what differs between stages (a last stage that also runs the loss, a first stage
    that computes no input gradient, the process that shares its core with a busier neighbour); each layer
    takes the count-weighted mean ratio of the rows it was in (1.0 where it was never measured).
    """
    n = len(profile.layers)
    k = microbatch_size / profile.microbatch_size
    acc = {kind: [[0.0, 0.0] for _ in range(n)] for kind in ("F", "B")}
    for r in rows:
        if r.kind not in acc or r.first < 0:
            continue
        layer_part = fit.scale * r.base_s + fit.per_layer_s * r.layers
        want = r.measured_s - fit.action_s - fit.overhead_s
        if layer_part <= 0 or want <= 0:
            continue
        for i in range(r.first, min(n, r.first + r.layers)):
            acc[r.kind][i][0] += want / layer_part * r.count
            acc[r.kind][i][1] += r.count
    return {kind: [s / c if c else 1.0 for s, c in v] for kind, v in acc.items()}


def calibrated_profile(profile: ModelProfile, fit: ComputeFit, saved_bytes: list[float] | None = None,
                       corrections: dict[str, list[float]] | None = None) -> ModelProfile:
    """Every layer time ``c · (scale · t + per_layer_s)`` (c: the layer's correction); ``saved_bytes`` (per layer,
    per sample; :func:`chain_saved_bytes`) replace the profile's."""
    layers = []
    cf = (corrections or {}).get("F") or [1.0] * len(profile.layers)
    cb = (corrections or {}).get("B") or [1.0] * len(profile.layers)
    for i, l in enumerate(profile.layers):
        l2 = replace(l, forward_s=cf[i] * (fit.scale * l.forward_s + fit.per_layer_s),
                     backward_s=cb[i] * (fit.scale * l.backward_s + fit.per_layer_s))
        if saved_bytes is not None:
            l2 = replace(l2, saved_bytes=float(saved_bytes[i]))
        layers.append(l2)
    return replace(profile, layers=tuple(layers), device=f"{profile.device} (calibrated)")


def with_action_cost(profile: ModelProfile, plan: Plan, action_s: float) -> ModelProfile:
    """The profile with each stage's per-action compute cost spread over its layers (exact for that partition)."""
    if not action_s:
        return profile
    k = profile.microbatch_size / plan.microbatch_size
    layers = list(profile.layers)
    for st in plan.stages:
        a, b = st.layers
        share = action_s * k / (b - a + 1)
        for i in range(a, b + 1):
            layers[i] = replace(layers[i], forward_s=layers[i].forward_s + share, backward_s=layers[i].backward_s + share)
    return replace(profile, layers=tuple(layers))


def fit_bi_fraction(traces: list[Trace], adds: list[dict[tuple, float]] | None = None) -> float | None:
    """Share of BI in BI + BW over the split backwards of stages > 0 (stage 0 computes no input gradient); None without any.

    ``adds``: per trace, the accumulation cost a BW paid (:func:`accumulation_s`), taken off it first: the
    simulator charges it apart, so it is no part of the split.
    """
    bi, bw = [], []
    for i, tr in enumerate(traces):
        add = adds[i] if adds else {}
        for e in steady_events(tr):
            if e.kind in ("BI", "BW") and Action.parse(e.action).stage > 0:
                (bi if e.kind == "BI" else bw).append(e.duration_s - add.get((e.lane, e.action), 0.0))
    if not bi or not bw:
        return None
    a, b = float(np.mean(bi)), float(np.mean(bw))
    return min(1.0, max(0.0, a / (a + b)))


def fit_split_factor(cal: "Calibration", plans: list[Plan], traces: list[Trace],
                     adds: list[dict[tuple, float]] | None = None) -> float | None:
    """BI + BW over the backward they split, on stages that compute an input gradient (stage > 0).

    The calibrated simulator (factor 1) predicts those actions; the factor is measured over predicted
    compute, each side less its per-action overheads and the gradient accumulation that both charge to
    the same BWs (``adds``, per trace: :func:`accumulation_s`). None without split backwards.
    """
    ovh = cal.params.overhead_s
    meas_s = pred_s = 0.0
    for i, (plan, tr) in enumerate(zip(plans, traces)):
        add = adds[i] if adds else {}
        split = [e for e in steady_events(tr) if e.kind in ("BI", "BW") and Action.parse(e.action).stage > 0]
        if not split:
            continue
        pred = cal.simulate(plan)
        keys = {(e.lane, e.action) for e in split}
        p = [e for e in pred.events if (e.lane, e.action) in keys]
        if len(p) != len(split):
            continue
        paid = sum(add.get((e.lane, e.action), 0.0) for e in split)
        meas_s += sum(e.duration_s for e in split) - ovh * len(split) - paid
        pred_s += sum(e.duration_s for e in p) - ovh * len(p) - paid
    if meas_s <= 0 or pred_s <= 0:
        return None
    return meas_s / pred_s


def step_time_s(traces: list[Trace], overhead_s: float) -> float:
    """Mean measured STEP duration minus the per-action overhead (the simulator adds that back)."""
    ds = [e.duration_s for tr in traces for e in steady_events(tr, 0.0) if e.kind == "STEP"]
    if not ds:
        return 0.0
    return max(0.0, float(np.mean(ds)) - overhead_s)


def overlap_slowdown(traces: list[Trace]) -> float | None:
    """Mean duration of compute actions that overlapped one of the worker's own in-flight SENDs over those that did not.

    A SEND is counted in flight from its start until the matching RECV ends on the peer.
    """
    ratios = []
    for tr in traces:
        evs = steady_events(tr)
        recv_end = {}
        for e in evs:
            if e.kind == "RECV":
                a = Action.parse(e.action)
                src = a.stage + 1 if a.grad else a.stage - 1
                recv_end[(src, a.mb, a.grad)] = e.end_s
        flights: dict[int, list[tuple[float, float]]] = {}
        for e in evs:
            if e.kind == "SEND":
                a = Action.parse(e.action)
                end = recv_end.get((a.stage, a.mb, a.grad))
                if end is not None:
                    flights.setdefault(e.lane, []).append((e.start_s, end))
        by: dict[tuple, tuple[list, list]] = {}
        for e in evs:
            if e.kind not in ("F", "B"):
                continue
            over = any(s < e.end_s and t > e.start_s for s, t in flights.get(e.lane, ()))
            key = (e.lane, e.action[:1] + e.kind)
            by.setdefault(key, ([], []))[0 if over else 1].append(e.duration_s)
        for a, b in by.values():
            if len(a) >= 2 and len(b) >= 2:
                ratios.append(statistics.median(a) / statistics.median(b))
    return float(statistics.median(ratios)) if ratios else None

