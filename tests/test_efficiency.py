"""planner.efficiency: kernel timing against closed forms, the fit against known parameters, the calibration file."""
from __future__ import annotations

import json
import random

import pytest

from planner.transformer import PRESETS, TransformerConfig
from planner.transformer_profile import block_work, embedding_work, head_work, transformer_profile
from planner.efficiency import (DEFAULT_PARAMS, PARAM_BOUNDS, CalibrationFileError, DeviceCalibration, EfficiencyParams,
                                Gemm, Work, fit, load_device_calibration, optimizer_step_s, work_time_s)
from topologies.devices import device_kind

A100 = device_kind("a100-80gb")


def test_a_huge_gemm_runs_at_the_fitted_fraction_of_peak():
    p = EfficiencyParams(gemm_efficiency=0.8, memory_efficiency=0.9, kernel_launch_s=0.0, layer_overhead_s=0.0)
    g = Gemm(16384, 16384, 16384)
    t = work_time_s(Work((g,)), A100, p)
    assert t == pytest.approx(g.flops / (A100.peak_flops * 0.8), rel=2e-3)  # the memory term is negligible


def test_a_streaming_kernel_runs_at_the_fitted_fraction_of_bandwidth():
    p = EfficiencyParams(memory_efficiency=0.5, kernel_launch_s=0.0, layer_overhead_s=0.0)
    assert work_time_s(Work((), 1e9), A100, p) == pytest.approx(1e9 / (A100.memory_bytes_per_s * 0.5))


def test_host_and_device_time_add_at_exponent_one_and_overlap_at_large_exponents():
    dev = Work((), 1e9)
    d = 1e9 / (A100.memory_bytes_per_s * 0.7)
    add = EfficiencyParams(memory_efficiency=0.7, kernel_launch_s=0.0, layer_overhead_s=d, overlap_exponent=1.0)
    hide = EfficiencyParams(memory_efficiency=0.7, kernel_launch_s=0.0, layer_overhead_s=d / 4, overlap_exponent=16.0)
    assert work_time_s(dev, A100, add) == pytest.approx(2 * d)
    assert work_time_s(dev, A100, hide) == pytest.approx(d, rel=1e-6)


def test_backward_has_a_weight_and_an_input_gradient_gemm_per_forward_gemm_with_the_same_flops():
    w, _ = block_work(PRESETS["gpt3-1.3b"], microbatch_size=2, tensor_parallel=2)
    b = w.backward()
    assert len(b.gemms) == 2 * len(w.gemms)
    assert b.flops == pytest.approx(2 * w.flops)
    assert b.kernels == 2 * w.kernels
    emb = Work((), 1e6, 3, input_grad=False)
    assert emb.backward().gemms == ()


def test_profile_timed_by_the_efficiency_model_is_the_work_time_of_its_kernels():
    c = TransformerConfig(4, 1024, 16, seq=1024, vocab=51200)
    p = EfficiencyParams(0.7, 0.6, 8e-6, 40e-6, 0.0, 3.0)
    prof = transformer_profile(c, tensor_parallel=2, microbatch_size=4, efficiency=p)
    w, _ = block_work(c, 4, 2)
    assert prof.microbatch_size == 4
    assert prof.layers[1].forward_s == pytest.approx(work_time_s(w, A100, p))
    assert prof.layers[1].backward_s == pytest.approx(work_time_s(w.backward(), A100, p))
    assert prof.layers[-1].forward_s == pytest.approx(work_time_s(head_work(c, 4, 2), A100, p))


def test_adam_step_streams_its_state_at_the_fitted_bandwidth():
    p = EfficiencyParams(memory_efficiency=0.5)
    assert optimizer_step_s(1e9, A100, p) == pytest.approx(38e9 / (A100.memory_bytes_per_s * 0.5))


def _synthetic_iterations(seed: int):
    """Iterations of many shapes: m microbatches of L layers (forward, recomputed forward, backward) plus a
    step; the layers are blocks, output heads or embeddings (different launch counts per layer)."""
    rng = random.Random(seed)
    cases = []
    for _ in range(150):
        h = rng.choice([512, 1024, 2048, 4096])
        c = TransformerConfig(8, h, 16, seq=rng.choice([512, 1024, 2048]), vocab=51200)
        t, b = rng.choice([1, 2, 4, 8]), rng.choice([1, 2, 4, 8])
        w = rng.choice([block_work(c, b, t)[0], head_work(c, b, t), embedding_work(c, b, t)])
        cases.append((w, w.backward(), rng.randint(4, 24), rng.randint(1, 16), h * h * 12 * 8 / t))
    return cases


def _predict(cases, p):
    return [m * layers * (2 * work_time_s(f, A100, p) + work_time_s(b, A100, p)) + optimizer_step_s(n, A100, p)
            + p.iteration_overhead_s for f, b, layers, m, n in cases]


def test_fit_recovers_known_parameters_from_noisy_synthetic_iterations():
    truth = EfficiencyParams(gemm_efficiency=0.72, memory_efficiency=0.61, kernel_launch_s=12e-6,
                             layer_overhead_s=150e-6, iteration_overhead_s=0.02, overlap_exponent=3.0)
    cases = _synthetic_iterations(1)
    rng = random.Random(2)
    measured = [t * (1 + rng.gauss(0, 0.01)) for t in _predict(cases, truth)]
    res = fit(lambda p: _predict(cases, p), measured)
    got = res.params
    assert res.success
    assert got.gemm_efficiency == pytest.approx(truth.gemm_efficiency, rel=0.03)
    assert got.memory_efficiency == pytest.approx(truth.memory_efficiency, rel=0.03)
    assert got.kernel_launch_s == pytest.approx(truth.kernel_launch_s, rel=0.15)
    assert got.layer_overhead_s == pytest.approx(truth.layer_overhead_s, rel=0.15)
    assert got.overlap_exponent == pytest.approx(truth.overlap_exponent, rel=0.25)
    assert res.rms_relative_error == pytest.approx(0.01, rel=0.3)  # what is left is the noise


def test_fit_with_a_fixed_parameter_keeps_it():
    cases = _synthetic_iterations(3)[:40]
    truth = EfficiencyParams(0.6, 0.7, 5e-6, 50e-6, 0.01, 2.0)
    res = fit(lambda p: _predict(cases, p), _predict(cases, truth), fixed={"overlap_exponent": 2.0})
    assert res.params.overlap_exponent == 2.0
    assert res.params.gemm_efficiency == pytest.approx(0.6, rel=0.02)


def test_calibration_file_round_trips_and_bad_files_say_what_is_wrong(tmp_path):
    cal = DeviceCalibration("a100", EfficiencyParams(0.8, 0.7, 1e-5, 1e-4, 1e-3, 4.0), "synthetic", "rule", 7, 0.05)
    path = tmp_path / "cal.json"
    cal.save(path)
    back = load_device_calibration(path)
    assert back == DeviceCalibration("a100-80gb", cal.params, "synthetic", "rule", 7, 0.05)
    assert load_device_calibration(None) is None
    with pytest.raises(CalibrationFileError, match="does not exist"):
        load_device_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationFileError, match="not valid JSON"):
        load_device_calibration(tmp_path / "bad.json")
    d = cal.to_dict()
    del d["params"]["gemm_efficiency"]
    (tmp_path / "lack.json").write_text(json.dumps(d))
    with pytest.raises(CalibrationFileError, match="lacks gemm_efficiency"):
        load_device_calibration(tmp_path / "lack.json")
    d = cal.to_dict()
    d["params"]["gemm_efficiency"] = 3.0
    (tmp_path / "range.json").write_text(json.dumps(d))
    with pytest.raises(CalibrationFileError, match="outside"):
        load_device_calibration(tmp_path / "range.json")
    d = cal.to_dict()
    d["gradient_bytes_per_param"] = 3
    (tmp_path / "grad.json").write_text(json.dumps(d))
    with pytest.raises(CalibrationFileError, match="2 or 4"):
        load_device_calibration(tmp_path / "grad.json")


def test_default_parameters_lie_inside_the_fit_bounds():
    for (lo, hi), v in zip(PARAM_BOUNDS, DEFAULT_PARAMS.as_vector()):
        assert lo <= v <= hi
