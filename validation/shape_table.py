"""The per-shape block-time tier of the ground truth's device calibration: fitted on the calibration rows.

A calibration's ``block_timings`` (``planner.efficiency.BlockTiming``) list a transformer block's forward
and backward seconds per GEMM shape (``planner.transformer_profile.block_key``: hidden, heads, sequence, TP degree,
microbatch). Here they are learnt from vTrain's calibration rows (:func:`fit_shape_table`): with the
smooth parameters held, the smooth model's block times scaled by one factor per shape, each a
one-dimensional fit on that shape's rows (``planner.efficiency.fit_shape_factors``) shrunk towards 1. A
row whose shape is listed takes the table's block times, the others the smooth model
(:func:`predict_row_s`). Whether ``groundtruth`` fits the tier at all (``SHAPE_TABLE``) was decided by the
calibration rows' own cross-validation (``validation.groundtruth_cv``), never by a scored row.

Its own module because it is a second, separate fit on top of the rows' closed form
(``validation.groundtruth_closed_form``); ``validation.groundtruth`` imports it for ``fit_calibration`` and ``run``;
rows are duck-typed (``validation.groundtruth_closed_form.RowModel``) so the import runs one way.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from planner.efficiency import BlockKey, BlockTiming, DeviceCalibration, EfficiencyParams, fit_shape_factors

if TYPE_CHECKING:
    from validation.groundtruth_closed_form import RowModel

__all__ = ["SHAPE_MIN_ROWS", "SHAPE_PRIOR_ROWS", "SHAPE_TABLE", "fit_shape_table", "predict_row_s"]

#: The per-shape tier's fit (``planner.efficiency.fit_shape_factors``): a shape needs this many calibration
#: rows, and its factor is shrunk towards the smooth model as if this many more rows agreed with it.
SHAPE_MIN_ROWS = 2
SHAPE_PRIOR_ROWS = 1.0
#: Whether ``groundtruth`` fits the per-shape tier (decided by the calibration rows' cross-validation,
#: ``validation.groundtruth_cv``; the README records the rule and its figures).
SHAPE_TABLE = True


def fit_shape_table(models: list[RowModel], p: EfficiencyParams, gradient_bytes: int,
                    min_rows: int = SHAPE_MIN_ROWS, prior_rows: float = SHAPE_PRIOR_ROWS) -> tuple[BlockTiming, ...]:
    """Per block shape of ``models`` (calibration rows), the block time that fits their measured iterations
    best with everything else timed by ``p``: the smooth model's block times scaled by one factor per shape."""
    groups: dict[BlockKey, list[RowModel]] = {}
    for m in models:
        groups.setdefault(m.key, []).append(m)
    smooth = {key: ms[0].smooth_block_s(p) for key, ms in groups.items()}

    def predictor(key: BlockKey):
        f, b = smooth[key]
        return lambda c: [m.predict_s(p, gradient_bytes, (c * f, c * b)) for m in groups[key]]

    factors = fit_shape_factors({key: (predictor(key), [m.row.measured_ms / 1e3 for m in ms])
                                 for key, ms in groups.items()}, prior_rows=prior_rows, min_rows=min_rows)
    return tuple(BlockTiming(key, c * smooth[key][0], c * smooth[key][1], len(groups[key]),
                             f"fitted on {len(groups[key])} vTrain calibration rows (factor {c:.3f} on the smooth model)")
                 for key, c in sorted(factors.items()))


def predict_row_s(m: RowModel, cal: DeviceCalibration) -> float:
    """The row's closed-form seconds under ``cal``: its per-shape block time where the table lists the shape."""
    t = cal.block_timing(m.key)
    return m.predict_s(cal.params, cal.gradient_bytes_per_param, (t.forward_s, t.backward_s) if t else None)
