"""Ground truth on real GPUs: vTrain's published A100 runs expressed as pipetwin plans, predicted and scored.

The argument, one module a step:

* **Rows** (``validation.groundtruth_rows``): each row of ``ground_truth_single.csv`` (2–8 A100s) and
  ``ground_truth_multi.csv`` (64–512) is a Megatron-DeepSpeed GPT run: TP × DP × PP, micro and global batch, full
  activation recomputation, 1F1B. A row is a **calibration row** iff the SHA-256 of its canonical config string,
  read as a big-endian integer, is 0 mod 5 (fixed before any row was scored, never changed by looking at errors);
  the efficiency model is fitted on calibration rows only and every other row is scored; a calibration row is
  never scored.
* **Plan** (``validation.groundtruth_plan``): pipetwin expresses the row as its own plan — the analytic model per
  TP rank timed by the fitted kernel-level efficiency model, the row's A100 cluster, Megatron's rank order and
  even layer split — and simulates it where the time budget allows.
* **Closed form** (``validation.groundtruth_closed_form``): 1F1B with flush from the stage costs on the real
  links, then each stage's DP all-reduce and Adam step, plus the fitted per-iteration overhead.
* **Per-shape tier** (``validation.shape_table``): the calibration also holds a table of block times keyed by
  the block's GEMM shape (``planner.efficiency.BlockTiming``: hidden, heads, sequence, TP degree, microbatch),
  fitted on the calibration rows (the smooth model's block times scaled by one factor per shape, shrunk
  towards 1); a row whose shape is listed takes the table's block times, the others the smooth model, and
  each row says which (``block_timing``). Adopted by the calibration rows' own cross-validation
  (``validation.groundtruth_cv``), never by a scored row.
* **Fit and score** (here): :func:`fit_calibration` on the calibration rows' closed forms (fp32 or fp16
  gradients, whichever fits them better), then :func:`run` predicts every row. The command simulates every
  row whose estimated simulation time fits the per-row budget (``SIMULATE_BUDGET_S``): TP ranks and replicas
  folded by ``sim.fold`` — one worker per stage, or every TP rank of one replica per stage where the TP group
  spans servers (its ring crosses them, so its ranks differ) — so a TP ring on identical links is one flow per
  stage replica simulated; the summary's ``simulated_workers`` counts what the traces say was walked. The
  others take the closed form and their ``why_closed_form`` says so; the two agree to rounding on small cases
  (tests).

The report lives in ``validation.groundtruth_report``, the extra published tables in
``validation.groundtruth_published`` and ``validation.groundtruth_titan``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from planner.efficiency import BlockTiming, DeviceCalibration, fit
from topologies.topology import Topology
from validation.groundtruth_closed_form import GRADIENT_BYTES_CHOICES, RowModel, closed_form_terms_s, row_model
from validation.groundtruth_plan import COLLECTIVES, P2P, VTRAIN_KIND, simulate_row, why_closed_form
from validation.groundtruth_rows import CALIBRATION_RULE, GroundTruthError, Row, load_rows, why_not_expressible
from validation.shape_table import SHAPE_TABLE, fit_shape_table, predict_row_s


# ---------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Scored:
    row: Row
    predicted_ms: float
    method: str  # "simulated" or "closed-form"
    closed_form_ms: float
    why_closed_form: str = ""  # why the closed form replaced simulation ("" when simulated)
    block_timing: str = "smooth"  # "shape-table": the calibration's per-shape block time; "smooth": the 7 parameters
    terms_ms: dict[str, float] = field(default_factory=dict, compare=False)  # the closed form split (``closed_form_terms_s``)
    workers_simulated: int = 0  # workers the simulator walked (the trace's own count; 0 under the closed form)

    @property
    def error(self) -> float:
        return self.predicted_ms / self.row.measured_ms - 1.0

    def to_dict(self) -> dict:
        d = self.row.config()
        d.update(measured_ms=self.row.measured_ms, predicted_ms=round(self.predicted_ms, 4), error=round(self.error, 6),
                 calibration=self.row.calibration, method=self.method, closed_form_ms=round(self.closed_form_ms, 4),
                 why_closed_form=self.why_closed_form, block_timing=self.block_timing,
                 workers_simulated=self.workers_simulated, shape=self.row.shape, parallelism=self.row.parallelism,
                 closed_form_terms_ms={k: round(v, 4) for k, v in self.terms_ms.items()})
        return d


@dataclass(frozen=True)
class GroundTruth:
    scored: tuple[Scored, ...]
    skipped: tuple[tuple[Row, str], ...]
    calibration: DeviceCalibration
    seconds: float
    collectives: str = "ideal"  # how the all-reduces were timed (``COLLECTIVES``, ``topologies.ncclcost``)
    p2p: str = "posted"  # how the pipeline sends ran (``P2P``)

    def rows(self, calibration: bool | None = None, source: str | None = None) -> list[Scored]:
        return [s for s in self.scored if (calibration is None or s.row.calibration == calibration)
                and (source is None or s.row.source == source)]

    def summary(self) -> dict:
        test = self.rows(calibration=False)
        mape = lambda xs: (sum(abs(x.error) for x in xs) / len(xs)) if xs else float("nan")
        sim = [s for s in self.scored if s.method == "simulated"]
        worst = max(test, key=lambda s: abs(s.error), default=None)
        hits, groups = best_pick(test)
        return {
            "mape_single": mape(self.rows(False, "single")),
            "mape_multi": mape(self.rows(False, "multi")),
            "max_abs_error": abs(worst.error) if worst else float("nan"),
            "n_scored": len(test),
            "n_calibration": len(self.rows(calibration=True)),
            "n_skipped": len(self.skipped),
            "n_simulated": len(sim),
            "n_closed_form": len(self.scored) - len(sim),
            "simulated_workers": simulated_workers_summary(sim),
            "n_shape_table": sum(1 for s in test if s.block_timing == "shape-table"),
            "max_sim_vs_closed_form": max((abs(s.predicted_ms / s.closed_form_ms - 1) for s in sim), default=0.0),
            "best_in_top3": hits,
            "best_groups": groups,
            "calibration_rms": self.calibration.rms_relative_error,
            "collectives": self.collectives,
            "p2p": self.p2p,
            "seconds": self.seconds,
        }


def simulated_workers_summary(sim: list[Scored]) -> dict:
    """What the simulator walked on the simulated rows, from each trace's own count: rows where it walked one
    worker per stage (TP ranks and replicas folded), rows where it walked every TP rank of one replica per stage
    (a TP group spanning servers, whose ranks ``sim.fold`` cannot fold), rows of any other count, and the range of
    workers walked against the GPUs the rows stand for."""
    one = sum(1 for s in sim if s.workers_simulated == s.row.pp)
    tp = sum(1 for s in sim if s.workers_simulated != s.row.pp and s.workers_simulated == s.row.pp * s.row.tp)
    walked = [s.workers_simulated for s in sim]
    return {"one_per_stage": one, "every_tp_rank_per_stage": tp, "other": len(sim) - one - tp,
            "min": min(walked, default=0), "max": max(walked, default=0),
            "max_gpus": max((s.row.gpus for s in sim), default=0)}


def simulated_workers_sentence(sim: dict) -> str:
    """The summary's ``simulated_workers`` as words: what the simulator walked on the simulated rows."""
    parts = [f"one worker per stage on {sim['one_per_stage']}"]
    if sim["every_tp_rank_per_stage"]:
        parts.append(f"every TP rank of one replica per stage on {sim['every_tp_rank_per_stage']} "
                     "(their TP group spans servers, so its ranks are not folded)")
    if sim["other"]:
        parts.append(f"another count on {sim['other']}")
    return (f"TP ranks and replicas folded by sim.fold: {'; '.join(parts)}; {sim['min']}–{sim['max']} workers "
            f"walked per row, for rows of up to {sim['max_gpus']} GPUs")


def best_pick(scored: list[Scored]) -> tuple[int, int]:
    """(groups whose measured-fastest row is among the three predicted fastest, groups): a group is the
    scored rows of one model, GPU count and global batch (the same work done differently) with 2+ rows."""
    groups: dict[tuple, list[Scored]] = {}
    for s in scored:
        groups.setdefault((s.row.source, s.row.model, s.row.gpus, s.row.global_batch), []).append(s)
    hits = n = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        n += 1
        best = min(members, key=lambda s: s.row.measured_ms)
        top = sorted(members, key=lambda s: s.predicted_ms)[:3]
        hits += best in top
    return hits, n


def fit_calibration(models: list[RowModel], kind: str = VTRAIN_KIND, shape_table: bool | None = None) -> DeviceCalibration:
    """Fit the efficiency parameters on the calibration rows' closed-form predictions, once per gradient
    width the DP all-reduce might send (fp32 4 bytes per parameter, Megatron's main gradients; fp16 2,
    DeepSpeed's fp16 engine), keeping the width whose fit leaves the smaller rms error on those rows.
    With ``shape_table`` (default ``SHAPE_TABLE``) the per-shape block times are then fitted on the same
    rows with the smooth parameters held (``validation.shape_table.fit_shape_table``)."""
    cal = [m for m in models if m.row.calibration]
    if not cal:
        raise GroundTruthError("no calibration rows: the rule picked none of the given rows; give more rows")
    measured = [m.row.measured_ms / 1e3 for m in cal]
    best = None
    for g in GRADIENT_BYTES_CHOICES:
        res = fit(lambda p, g=g: [m.predict_s(p, g) for m in cal], measured)
        if best is None or res.rms_relative_error < best[1].rms_relative_error:
            best = (g, res)
    g, res = best
    rms = res.rms_relative_error
    table: tuple[BlockTiming, ...] = ()
    if SHAPE_TABLE if shape_table is None else shape_table:
        table = fit_shape_table(cal, res.params, g)
        cal_of = DeviceCalibration(kind, res.params, block_timings=table)
        r = [predict_row_s(m, cal_of) / (m.row.measured_ms / 1e3) - 1.0 for m in cal]
        rms = math.sqrt(sum(x * x for x in r) / len(r))
    return DeviceCalibration(kind, res.params, fitted_on="vTrain ground_truth_single/multi.csv calibration rows",
                             rule=CALIBRATION_RULE, n_rows=len(cal), rms_relative_error=rms,
                             gradient_bytes_per_param=g, block_timings=table)


def run(data: str | Path, calibration: DeviceCalibration | None = None, simulate: bool = True,
        collectives: str | None = None) -> GroundTruth:
    """Load, express, fit (unless ``calibration`` is given), predict and score every row; ``collectives``: how the
    all-reduces are timed (default ``COLLECTIVES``, the mode the adoption rule chose)."""
    t0 = time.perf_counter()
    rows = load_rows(data)
    skipped, models = [], []
    topologies: dict[str, Topology] = {}
    for r in rows:
        why = why_not_expressible(r)
        if why:
            skipped.append((r, why))
        else:
            models.append(row_model(r, topologies, collectives))
    cal = calibration or fit_calibration(models)
    p, g = cal.params, cal.gradient_bytes_per_param
    out = []
    for m in models:
        timing = cal.block_timing(m.key)
        tier = "shape-table" if timing else "smooth"
        closed = predict_row_s(m, cal) * 1e3
        terms = {k: v * 1e3 for k, v in closed_form_terms_s(m, cal).items()}
        why = why_closed_form(m.row) if simulate else "--no-simulate"
        if not why:
            sim_s, walked = simulate_row(m.row, p, topologies, gradient_bytes=g, timing=timing, collectives=collectives)
            out.append(Scored(m.row, sim_s * 1e3, "simulated", closed, block_timing=tier, terms_ms=terms,
                              workers_simulated=walked))
        else:
            out.append(Scored(m.row, closed, "closed-form", closed, why, block_timing=tier, terms_ms=terms))
    return GroundTruth(tuple(out), tuple(skipped), cal, time.perf_counter() - t0,
                       COLLECTIVES if collectives is None else collectives, P2P)
