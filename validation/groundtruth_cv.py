"""Cross-validation inside the calibration rows: does the per-shape block-time tier predict rows it was not fitted on?

The scored rows are never read here. The 321 calibration rows (``validation.groundtruth_rows``'s rule) are
split into K folds by their config hash (fold = ``(sha256 // 5) mod K``: the calibration rule already
used the hash mod 5, so the quotient is the next independent digit). For each fold the smooth model
(seven parameters and the gradient width) is fitted on the other folds, then the per-shape table on
the same other folds with those parameters held, and the fold's rows are predicted by the closed form
twice: smooth alone, and smooth + tier (the table's block time where the fold row's shape is listed,
the smooth model elsewhere). Printed: MAPE per file, worst row, and how many held-out rows the table
covered, for the design ``groundtruth`` would adopt (``SHAPE_MIN_ROWS``, ``SHAPE_PRIOR_ROWS``) and a
few variants for comparison.

The decision rule, fixed before this was first run: the tier is adopted iff, under 5-fold CV with the
primary design (min 2 rows per shape, 1 pseudo-row of shrinkage), the held-out MAPE is lower than the
smooth model's on the single-node rows **and** not higher by more than 0.1 points on the multi-node
rows. The variants are reported, never chosen among.

**NCCL's collective model** (issue 14, fourth session, helper ``nccl``; ``topologies.ncclcost``): the same CV is then run
a second time with every calibration row's all-reduces (TP and DP, both interpreters) timed by NCCL's published
tuning model (``collectives=nccl``: the protocol NCCL would pick for the message size, the fraction of the link
bandwidth it reaches, its latency) instead of the ideal link model (``collectives=ideal``), the smooth parameters,
the gradient width and the per-shape table refitted on each fold's training rows under that mode. The adoption
rule, written down and committed before this comparison was first run and before any scored figure under the
model was computed: **``COLLECTIVES = "nccl"`` is adopted in ``validation.groundtruth_plan`` iff, with the primary tier
design (what ``groundtruth`` scores), the held-out multi-node MAPE under ``nccl`` is lower than under ``ideal``
and the held-out single-node MAPE under ``nccl`` is not higher than under ``ideal`` by more than 0.1 points**
(``adopt_collectives``). Otherwise ``ideal`` stays the rows' mode and the model stays an option of the topology.

**Residuals by feature** (issue 14, fifth session, helper ``gt``): ``--by-feature`` also prints the primary design's
held-out errors grouped by one row feature at a time (:data:`FEATURES`: TP, DP, PP, microbatch size, microbatches
per pipeline stage, the (TP, DP) pair), per file: rows, signed mean error (negative: predicted too fast) and MAPE.
It reads the calibration rows only, like the rest of this module; it changes no prediction and chooses nothing.

**DeepSpeed's pipeline sends** (issue 14, sixth session, helper ``gt6``; ``validation.groundtruth_plan.P2P``): the
vTrain runs are Megatron-DeepSpeed's (vTrain's ``data/README.md``), whose pipeline goes through DeepSpeed's
``PipelineEngine``: a stage's send is synchronous (``deepspeed/runtime/pipe/p2p.py``: ``send`` refuses ``async_op``, so the
sender's stream waits for the transfer), and with TP > 1 each TP rank sends only its 1/T slice of the activation
(``PipelineEngine``: ``is_pipe_partitioned = is_model_parallel``); vTrain's own simulator, too, charges every pipeline
send to the sender's stream (``src/predictor.py``: the send's time is a gap after the sender's last layer). pipetwin's
rows so far send the whole activation from every TP rank and move on (``P2P = "posted"``). ``P2P = "deepspeed"`` is
the other reading: every TP rank sends 1/T of the activation (and of its gradient), and the sender waits until its send
is delivered (the simulator's ``overlap_comm=False``; the closed form adds each stage's outgoing sends to its forward
and backward). Not modelled: the TP group's all-gathers of the slices (3 per microbatch), and the rendezvous (the
sender also waiting for the receiver to post). The CV is run a second time under it (``--p2p posted,deepspeed``), the
smooth parameters, gradient width and per-shape table refitted per fold under each mode. The adoption rule, written
down and committed before this comparison was first run and before any scored figure under the mode: **``P2P =
"deepspeed"`` is adopted iff, with the primary tier design, its held-out multi-node MAPE is lower than under
``"posted"`` and its held-out single-node MAPE is not higher by more than 0.1 points** (``adopt_p2p``); otherwise the
rows stay ``"posted"`` and ``"deepspeed"`` stays an option of the rows' closed form and simulation.

    python -m validation.groundtruth_cv ../shared/data/vtrain [--folds 5] [--collectives ideal,nccl] [--p2p posted,deepspeed] [--by-feature]
"""
from __future__ import annotations

import argparse
import sys
import time

from planner.efficiency import DeviceCalibration
from validation.groundtruth import fit_calibration
from validation.groundtruth_closed_form import RowModel, row_model
from validation.groundtruth_plan import P2P_MODES
from validation.groundtruth_rows import CALIBRATION_MODULUS, config_hash, load_rows, why_not_expressible
from validation.shape_table import SHAPE_MIN_ROWS, SHAPE_PRIOR_ROWS, fit_shape_table, predict_row_s

#: (min rows per shape, shrinkage pseudo-rows): the primary design first, then the variants reported beside it.
DESIGNS = ((SHAPE_MIN_ROWS, SHAPE_PRIOR_ROWS), (1, 0.0), (1, 1.0), (3, 1.0), (2, 0.0))


def fold_of(m: RowModel, folds: int) -> int:
    """The calibration row's fold: the config hash's next digit after the calibration rule's mod 5."""
    return (config_hash(m.row.canonical) // CALIBRATION_MODULUS) % folds


def cross_validate(models: list[RowModel], folds: int = 5, designs=DESIGNS) -> dict:
    """Held-out relative errors per design ("smooth" and each (min_rows, prior_rows)), per calibration row."""
    cal = [m for m in models if m.row.calibration]
    errors: dict = {"smooth": {}, **{d: {} for d in designs}}
    covered: dict = {d: set() for d in designs}
    for k in range(folds):
        train = [m for m in cal if fold_of(m, folds) != k]
        test = [m for m in cal if fold_of(m, folds) == k]
        smooth = fit_calibration(train, shape_table=False)
        for m in test:
            errors["smooth"][m.row.canonical] = predict_row_s(m, smooth) / (m.row.measured_ms / 1e3) - 1.0
        for d in designs:
            table = fit_shape_table(train, smooth.params, smooth.gradient_bytes_per_param, min_rows=d[0], prior_rows=d[1])
            tiered = DeviceCalibration(smooth.device_kind, smooth.params,
                                       gradient_bytes_per_param=smooth.gradient_bytes_per_param, block_timings=table)
            for m in test:
                errors[d][m.row.canonical] = predict_row_s(m, tiered) / (m.row.measured_ms / 1e3) - 1.0
                if tiered.block_timing(m.key):
                    covered[d].add(m.row.canonical)
    return {"errors": errors, "covered": covered, "rows": {m.row.canonical: m.row for m in cal}}


def summarise(cv: dict) -> list[dict]:
    rows = cv["rows"]
    out = []
    for name, errs in cv["errors"].items():
        line = {"design": "smooth" if name == "smooth" else f"tier min_rows={name[0]} prior_rows={name[1]:g}"}
        for src in ("single", "multi"):
            e = [abs(v) for c, v in errs.items() if rows[c].source == src]
            line[f"mape_{src}"] = sum(e) / len(e) if e else float("nan")
        worst = max(errs, key=lambda c: abs(errs[c]))
        line["worst"] = abs(errs[worst])
        line["worst_row"] = worst
        line["covered"] = len(cv["covered"].get(name, ()))
        line["n"] = len(errs)
        out.append(line)
    return out


def _per_stage_bucket(r) -> str:
    """Microbatches per pipeline stage (m / PP), in the buckets the bubble fraction (P - 1) / (m + P - 1) changes over."""
    q = r.microbatches / r.pp
    return "m/PP < 2" if q < 2 else "2 <= m/PP < 8" if q < 8 else "m/PP >= 8"


#: (name, row -> bucket) for ``by_feature``: the row features the worst rows' descriptions name.
FEATURES = (("TP", lambda r: r.tp), ("DP", lambda r: r.dp), ("PP", lambda r: r.pp), ("micro", lambda r: r.micro_batch),
            ("m/PP", _per_stage_bucket), ("(TP, DP)", lambda r: (r.tp, r.dp)))


def by_feature(cv: dict, design=None, features=FEATURES) -> dict:
    """Held-out errors of ``design`` (default: the primary one) grouped per file and feature:
    ``{source: {feature: {bucket: {"n", "mean", "mape"}}}}``, buckets sorted; mean is signed."""
    design = DESIGNS[0] if design is None else design
    errs, rows = cv["errors"][design], cv["rows"]
    out: dict = {}
    for src in ("single", "multi"):
        mine = [(rows[c], e) for c, e in errs.items() if rows[c].source == src]
        if not mine:
            continue
        out[src] = {}
        for name, key in features:
            groups: dict = {}
            for r, e in mine:
                groups.setdefault(key(r), []).append(e)
            out[src][name] = {k: {"n": len(v), "mean": sum(v) / len(v), "mape": sum(abs(x) for x in v) / len(v)}
                              for k, v in sorted(groups.items())}
    return out


def print_by_feature(table: dict) -> None:
    for src, feats in table.items():
        for name, groups in feats.items():
            cells = "  ".join(f"{k if isinstance(k, (int, str)) else '·'.join(map(str, k))}: n={g['n']} "
                              f"{100 * g['mean']:+.1f}%/{100 * g['mape']:.1f}%" for k, g in groups.items())
            print(f"  {src:6s} by {name:8s} (n, signed mean/MAPE)  {cells}")


def adopt(summary: list[dict]) -> bool:
    """The decision rule (module docstring) on the summary's smooth line and primary design line."""
    smooth, primary = summary[0], summary[1]
    return (primary["mape_single"] < smooth["mape_single"]
            and primary["mape_multi"] <= smooth["mape_multi"] + 0.001)


def adopt_collectives(ideal: dict, nccl: dict) -> bool:
    """The collectives adoption rule (module docstring) on the primary design's summary line under each mode."""
    return nccl["mape_multi"] < ideal["mape_multi"] and nccl["mape_single"] <= ideal["mape_single"] + 0.001


def adopt_p2p(posted: dict, deepspeed: dict) -> bool:
    """The pipeline-send adoption rule (module docstring) on the primary design's summary line under each mode."""
    return deepspeed["mape_multi"] < posted["mape_multi"] and deepspeed["mape_single"] <= posted["mape_single"] + 0.001


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m validation.groundtruth_cv", description=__doc__.split("\n")[0])
    ap.add_argument("data", help="folder with vTrain's ground_truth_single.csv and ground_truth_multi.csv")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--collectives", default="ideal,nccl",
                    help="collectives modes to cross-validate, comma-separated (ideal, nccl); both: the adoption rule")
    ap.add_argument("--p2p", default="posted",
                    help="pipeline-send modes to cross-validate, comma-separated (posted, deepspeed); both: the p2p rule")
    ap.add_argument("--by-feature", action="store_true",
                    help="also print the primary design's held-out errors grouped by TP, DP, PP, microbatch, m/PP")
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.collectives.split(",") if m.strip()]
    if not modes or any(m not in ("ideal", "nccl") for m in modes):
        print(f"--collectives must list ideal and/or nccl (got {a.collectives!r})", file=sys.stderr)
        return 2
    p2ps = [m.strip() for m in a.p2p.split(",") if m.strip()]
    if not p2ps or any(m not in P2P_MODES for m in p2ps):
        print(f"--p2p must list posted and/or deepspeed (got {a.p2p!r})", file=sys.stderr)
        return 2
    if a.folds < 2:
        print("--folds must be at least 2", file=sys.stderr)
        return 2
    from validation.groundtruth_rows import GroundTruthError

    t0 = time.perf_counter()
    try:
        rows = load_rows(a.data)
    except GroundTruthError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    topologies: dict = {}
    primary = {}
    for mode, p2p in [(m, q) for m in modes for q in p2ps]:
        models = [row_model(r, topologies, mode, p2p) for r in rows if r.calibration and not why_not_expressible(r)]
        cv = cross_validate(models, a.folds)
        summary = summarise(cv)
        primary[(mode, p2p)] = summary[1]
        print(f"{a.folds}-fold CV inside the {len(models)} calibration rows (closed form; scored rows never read), "
              f"collectives={mode}, p2p={p2p}")
        print(f"{'design':38s} {'single':>8s} {'multi':>8s} {'worst':>8s} {'covered':>8s}  worst row")
        for s in summary:
            print(f"{s['design']:38s} {100 * s['mape_single']:7.2f}% {100 * s['mape_multi']:7.2f}% "
                  f"{100 * s['worst']:7.1f}% {s['covered']:4d}/{s['n']:<3d}  {s['worst_row']}")
        print(f"decision rule (primary design vs smooth): {'ADOPT' if adopt(summary) else 'do not adopt'}  "
              f"[{time.perf_counter() - t0:.0f} s]")
        if a.by_feature:
            print(f"held-out errors of the primary design by feature, collectives={mode}, p2p={p2p}:")
            print_by_feature(by_feature(cv))
    if "ideal" in modes and "nccl" in modes:
        i, n = primary[("ideal", p2ps[0])], primary[("nccl", p2ps[0])]
        print(f"collectives rule (primary design, nccl vs ideal): single {100 * i['mape_single']:.2f}% -> "
              f"{100 * n['mape_single']:.2f}%, multi {100 * i['mape_multi']:.2f}% -> {100 * n['mape_multi']:.2f}%: "
              f"{'ADOPT nccl' if adopt_collectives(i, n) else 'keep ideal'}")
    if "posted" in p2ps and "deepspeed" in p2ps:
        q, d = primary[(modes[0], "posted")], primary[(modes[0], "deepspeed")]
        print(f"p2p rule (primary design, deepspeed vs posted, collectives={modes[0]}): single "
              f"{100 * q['mape_single']:.2f}% -> {100 * d['mape_single']:.2f}%, multi {100 * q['mape_multi']:.2f}% -> "
              f"{100 * d['mape_multi']:.2f}%: {'ADOPT deepspeed' if adopt_p2p(q, d) else 'keep posted'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
