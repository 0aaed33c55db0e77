"""The per-shape block-time tier: a device calibration's table of block times keyed by GEMM shape, its fit on
measured iterations, and both interpreters using it where a block's shape is listed."""
from __future__ import annotations

import json

import pytest

from planner.analytic import load_model
from planner.transformer import TransformerConfig
from planner.transformer_profile import block_key, transformer_profile
from planner.efficiency import (BlockTiming, CalibrationFileError, DeviceCalibration, EfficiencyParams,
                                fit_shape_factors, load_device_calibration)
from validation.groundtruth_closed_form import row_model
from validation.groundtruth_plan import simulate_row_s
from validation.groundtruth_rows import Row
from validation.shape_table import fit_shape_table, predict_row_s

P = EfficiencyParams(0.8, 0.8, 10e-6, 50e-6, 0.005, 4.0, 2e-3)


def _row(gpus, gb, micro, tp, dp, pp, hidden=512, heads=8, layers=8, seq=256, ms=100.0):
    return Row("single", 2, gpus, gb, micro, hidden, heads, layers, seq, tp, dp, pp, ms)


def test_factor_fit_recovers_per_shape_factors_of_a_linear_model_and_shrinks_a_lone_row():
    """Rows t = a + c·b (b: the rows' block time, a: the rest), known c per shape: exact recovery without
    shrinkage; one pseudo-row at 1 pulls a one-row shape to the closed-form minimiser; too few rows: none."""
    truth = {"x": 0.6, "y": 1.7, "z": 2.4}
    rows = {"x": [(0.1, 1.0), (0.3, 2.0), (0.05, 0.5)], "y": [(0.2, 1.0), (0.1, 3.0)], "z": [(0.0, 1.0)]}
    groups = {k: (lambda c, r=r: [a + c * b for a, b in r], [a + truth[k] * b for a, b in r]) for k, r in rows.items()}
    got = fit_shape_factors(groups, prior_rows=0.0, min_rows=1)
    assert got == pytest.approx(truth, rel=1e-4)
    # one row a=0, b=1, measured 2.4: minimise (c/2.4 − 1)² + (c − 1)²  →  c = (1/2.4 + 1) / (1/2.4² + 1)
    shrunk = fit_shape_factors(groups, prior_rows=1.0, min_rows=1)["z"]
    assert shrunk == pytest.approx((1 / 2.4 + 1) / (1 / 2.4 ** 2 + 1), rel=1e-4)
    assert set(fit_shape_factors(groups, prior_rows=0.0, min_rows=2)) == {"x", "y"}


def test_table_fit_recovers_known_block_factors_from_synthetic_iterations():
    """Iterations 'measured' as the closed form with each shape's block times scaled by a known factor: the
    fitted table's block times are those scaled times."""
    factors = {1: 1.35, 2: 0.8}  # per microbatch size: two block shapes
    rows = [_row(2, 16, 1, 1, 1, 2), _row(4, 16, 1, 1, 2, 2), _row(2, 8, 1, 2, 1, 1, layers=4),
            _row(2, 16, 2, 1, 1, 2), _row(4, 32, 2, 1, 4, 1)]
    models = [row_model(r) for r in rows]
    measured = []
    for m in models:
        f, b = m.smooth_block_s(P)
        c = factors[m.row.micro_batch] if m.row.tp == 1 else 1.0
        measured.append(m.predict_s(P, 4, (c * f, c * b)) * 1e3)
    models = [row_model(Row(**{**m.row.__dict__, "measured_ms": ms})) for m, ms in zip(models, measured)]
    table = fit_shape_table(models, P, 4, min_rows=2, prior_rows=0.0)
    by_key = {t.key: t for t in table}
    assert len(table) == 2  # the TP2 shape has one row: left to the smooth model
    for mb, c in factors.items():
        m = next(m for m in models if m.row.micro_batch == mb and m.row.tp == 1)
        f, b = m.smooth_block_s(P)
        t = by_key[m.key]
        assert (t.forward_s, t.backward_s) == pytest.approx((c * f, c * b), rel=1e-4)
        assert t.rows == 2
    cal = DeviceCalibration("a100-80gb", P, block_timings=table)
    for m in models:
        assert predict_row_s(m, cal) * 1e3 == pytest.approx(m.row.measured_ms, rel=1e-4)


def test_a_listed_shape_replaces_the_block_times_in_the_closed_form_and_the_simulator_alike():
    """PP = 1, TP = 1, full recomputation: each of m microbatches runs L blocks' forward, recomputed forward and
    backward, so block times (f', b') instead of (f, b) change the iteration by m·L·(2(f'−f) + (b'−b))."""
    r = _row(4, 32, 2, 1, 4, 1)
    m = row_model(r)
    f, b = m.smooth_block_s(P)
    timing = BlockTiming(m.key, 1.5 * f, 0.7 * b)
    cal = DeviceCalibration("a100-80gb", P, block_timings=(timing,))
    delta = r.microbatches * r.layers * (2 * (timing.forward_s - f) + (timing.backward_s - b))
    assert predict_row_s(m, cal) - m.predict_s(P) == pytest.approx(delta, rel=1e-9)
    assert simulate_row_s(r, P, timing=timing) - simulate_row_s(r, P) == pytest.approx(delta, rel=1e-6)
    other = DeviceCalibration("a100-80gb", P, block_timings=(BlockTiming(row_model(_row(4, 32, 1, 1, 4, 1)).key, f, b),))
    assert predict_row_s(m, other) == m.predict_s(P)  # another shape listed: the smooth model


def test_load_model_takes_the_table_for_a_listed_shape_and_the_smooth_model_elsewhere():
    c = TransformerConfig(4, 1024, 16, seq=512, vocab=51200)
    smooth = transformer_profile(c, "a100-80gb", tensor_parallel=2, microbatch_size=2, efficiency=P, vocab_multiple=128)
    key = block_key(c, 2, 2)
    cal = DeviceCalibration("a100-80gb", P, block_timings=(BlockTiming(key, 1e-3, 3e-3),))
    spec = "gpt:layers=4,hidden=1024,heads=16,seq=512,vocab=51200"
    got = load_model(spec, calibration=cal, tensor_parallel=2, microbatch_size=2)
    assert (got.layers[1].forward_s, got.layers[1].backward_s) == (1e-3, 3e-3)
    assert got.layers[1].attention_forward_s == pytest.approx(smooth.layers[1].attention_forward_s
                                                              * 1e-3 / smooth.layers[1].forward_s)
    assert got.layers[0] == smooth.layers[0] and got.layers[-1] == smooth.layers[-1]
    elsewhere = load_model(spec, calibration=cal, tensor_parallel=2, microbatch_size=1)
    assert elsewhere.layers[1].forward_s == transformer_profile(c, "a100-80gb", tensor_parallel=2, efficiency=P,
                                                                vocab_multiple=128).layers[1].forward_s


def test_calibration_file_with_and_without_the_table_loads_and_a_bad_entry_says_what_is_wrong(tmp_path):
    key = block_key(TransformerConfig(4, 1024, 16, seq=512, vocab=51200), 2, 2)
    cal = DeviceCalibration("a100-80gb", P, block_timings=(BlockTiming(key, 1e-3, 3e-3, 4, "fit"),))
    cal.save(tmp_path / "c.json")
    assert load_device_calibration(tmp_path / "c.json") == cal
    doc = json.loads((tmp_path / "c.json").read_text())
    del doc["block_timings"]  # a file written before the table existed
    (tmp_path / "old.json").write_text(json.dumps(doc))
    old = load_device_calibration(tmp_path / "old.json")
    assert old.block_timings == () and old.params == P and old.block_timing(key) is None
    for bad, what in (({"forward_s": -1.0}, "positive"), ({"hidden": "wide"}, "bad block_timings field")):
        d = json.loads((tmp_path / "c.json").read_text())
        d["block_timings"][0].update(bad)
        (tmp_path / "bad.json").write_text(json.dumps(d))
        with pytest.raises(CalibrationFileError, match=what):
            load_device_calibration(tmp_path / "bad.json")
    d = json.loads((tmp_path / "c.json").read_text())
    del d["block_timings"][0]["microbatch"]
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(CalibrationFileError, match="lacks microbatch"):
        load_device_calibration(tmp_path / "bad.json")
    d["block_timings"] = [cal.block_timings[0].to_dict()] * 2
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(CalibrationFileError, match="twice"):
        load_device_calibration(tmp_path / "bad.json")


def test_cv_folds_partition_the_calibration_rows_and_the_decision_rule_reads_single_and_multi(capsys):
    from validation.groundtruth_rows import canonical_config
    from validation.groundtruth_cv import adopt, fold_of, main

    rows = [_row(2, 16 * k, 1, 1, 1, 2) for k in range(1, 40)]
    folds = [fold_of(row_model(r), 5) for r in rows]
    assert set(folds) <= set(range(5)) and len(set(folds)) > 1
    assert all(fold_of(row_model(r), 5) == f for r, f in zip(rows, folds))  # a function of the config alone
    assert canonical_config("single", 2, 16, 1, 512, 8, 8, 256, 1, 1, 2) == rows[0].canonical
    smooth = {"mape_single": 0.06, "mape_multi": 0.08}
    assert adopt([smooth, {"mape_single": 0.03, "mape_multi": 0.0805}])
    assert not adopt([smooth, {"mape_single": 0.03, "mape_multi": 0.0815}])  # multi worse by more than 0.1 points
    assert not adopt([smooth, {"mape_single": 0.06, "mape_multi": 0.07}])  # single not better
    assert main(["/nonexistent/vtrain"]) == 2
    assert "not a folder" in capsys.readouterr().err
