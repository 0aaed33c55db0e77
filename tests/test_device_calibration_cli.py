"""`--device-calibration FILE` on every command that times an analytic model (plan, simulate, whatif, search,
compare-schedules): the flag moves the prediction as the calibration says, and a bad file is one line, exit 2.

The compute-bound case: a small GPT on the catalogue's ``emulated`` kind (peak FLOP/s equal to its memory
bandwidth, so the streamed bytes and the GEMMs' operand traffic are a fraction of a percent of the time) with
no launch or per-layer overhead. Its forward + backward then takes ``3 · F / (peak · gemm_efficiency)``, F the
forward FLOPs counted here from the transformer's shapes (not from the efficiency model's kernel inventory);
halving ``gemm_efficiency`` doubles every compute time.
"""
from __future__ import annotations

import json

import pytest

from pipetwin.cli import main
from planner.efficiency import DeviceCalibration, EfficiencyParams
from topologies.devices import device_kind

LAYERS, HIDDEN, HEADS, SEQ, VOCAB, MB = 2, 1024, 8, 512, 512, 2
MODEL = f"gpt:layers={LAYERS},hidden={HIDDEN},heads={HEADS},seq={SEQ},vocab={VOCAB}"
KIND = "emulated"
FAST, SLOW = 0.8, 0.4


def forward_flops() -> float:
    """One microbatch's forward FLOPs: per block the QKV, projection and two MLP GEMMs (24·N·h²) and the
    attention scores and values (4·N·s·h), N = b·s tokens; the logits GEMM 2·N·V·h."""
    n = MB * SEQ
    return LAYERS * (24.0 * n * HIDDEN**2 + 4.0 * n * SEQ * HIDDEN) + 2.0 * n * VOCAB * HIDDEN


def compute_s(gemm_efficiency: float) -> float:
    """Forward + backward of one microbatch (backward: two GEMMs per forward GEMM) at that efficiency."""
    return 3.0 * forward_flops() / (device_kind(KIND).peak_flops * gemm_efficiency)


@pytest.fixture(scope="module")
def cals(tmp_path_factory):
    d = tmp_path_factory.mktemp("cal")
    out = {}
    for name, g in (("fast", FAST), ("slow", SLOW)):
        path = d / f"{name}.json"
        DeviceCalibration(KIND, EfficiencyParams(g, 1.0, 0.0, 0.0, 0.0, 4.0), fitted_on="test").save(path)
        out[name] = str(path)
    wrong = d / "a100.json"
    DeviceCalibration("a100-80gb", EfficiencyParams()).save(wrong)
    out["a100"] = str(wrong)
    return out


def _json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_the_compute_bound_case_is_compute_bound():
    """The model's own profile under each calibration is within 0.5% of the FLOP count's time (the premise)."""
    from planner.analytic import load_model

    for g in (FAST, SLOW):
        cal = DeviceCalibration(KIND, EfficiencyParams(g, 1.0, 0.0, 0.0, 0.0, 4.0))
        p = load_model(MODEL, calibration=cal, microbatch_size=MB)
        assert p.microbatch_size == MB and p.device == KIND
        assert sum(l.forward_s + l.backward_s for l in p.layers) == pytest.approx(compute_s(g), rel=5e-3)


# ---------------------------------------------------------------------- (a) the flag moves the prediction
def test_plan(capsys, cals):
    def stage_compute(cal):
        d = _json(capsys, ["plan", "--model", MODEL, "--topology", "ideal:1", "--stages", "1", "--microbatch-size",
                           str(MB), "--microbatches", "1", "--schedule", "gpipe", "--json", "--device-calibration", cal])
        return d["stages"][0]["compute_s"]

    fast, slow = stage_compute(cals["fast"]), stage_compute(cals["slow"])
    assert fast == pytest.approx(compute_s(FAST), rel=5e-3)
    assert slow == pytest.approx(compute_s(SLOW), rel=5e-3)
    assert slow / fast == pytest.approx(2.0, rel=5e-3)


def test_simulate(capsys, cals):
    def busy(cal):
        d = _json(capsys, ["simulate", "--model", MODEL, "--topology", "ideal:1", "--stages", "1", "--microbatches",
                           "1", "--microbatch-size", str(MB), "--schedule", "gpipe", "--json",
                           "--device-calibration", cal])
        return d["per_device"]["0"]["busy_s"]

    fast, slow = busy(cals["fast"]), busy(cals["slow"])
    assert fast == pytest.approx(compute_s(FAST), rel=5e-3)
    assert slow == pytest.approx(compute_s(SLOW), rel=5e-3)


def test_compare_schedules(capsys, cals):
    def batch_s(cal):
        d = _json(capsys, ["compare-schedules", "--model", MODEL, "--topology", "ideal:1", "--stages", "1",
                           "--microbatches", "1", "--microbatch-size", str(MB), "--batches", "1", "--json",
                           "--device-calibration", cal])
        return {r["family"]: r["time_per_batch_s"] for r in d["families"] if r["fits"]}

    fast, slow = batch_s(cals["fast"]), batch_s(cals["slow"])
    assert fast["gpipe"] == pytest.approx(compute_s(FAST), rel=5e-3)
    for fam in fast:
        assert slow[fam] / fast[fam] == pytest.approx(2.0, rel=5e-3), fam


def test_whatif(capsys, cals):
    def per_sample(cal):
        d = _json(capsys, ["whatif", "--model", MODEL, "--devices", "1", "--interconnects", "ideal",
                           "--schedules", "gpipe", "--microbatch-sizes", str(MB), "--global-batch", str(MB),
                           "--simulate", "all", "--jobs", "1", "--json", "--device-calibration", cal])
        (p,) = d["points"]
        assert p["device_kind"] == KIND  # the sweep's kind defaults to the calibration's
        return p["time_per_sample_s"], p["simulated"]["throughput_samples_per_s"]

    (fast, fast_sim), (slow, slow_sim) = per_sample(cals["fast"]), per_sample(cals["slow"])
    assert fast * MB == pytest.approx(compute_s(FAST), rel=5e-3)
    assert slow * MB == pytest.approx(compute_s(SLOW), rel=5e-3)
    assert fast_sim / slow_sim == pytest.approx(2.0, rel=5e-3)


def test_search(capsys, cals):
    def best(cal):
        d = _json(capsys, ["search", "--model", MODEL, "--topology", "ideal:1", "--microbatch-sizes", str(MB),
                           "--global-batch", str(MB), "--schedules", "gpipe", "--top-k", "1", "--jobs", "1",
                           "--json", "--device-calibration", cal])
        r = d["best_analytic"]
        return r["analytic_throughput_samples_per_s"], r["simulated_throughput_samples_per_s"]

    (fast, fast_sim), (slow, slow_sim) = best(cals["fast"]), best(cals["slow"])
    assert MB / fast == pytest.approx(compute_s(FAST), rel=5e-3)
    assert MB / slow == pytest.approx(compute_s(SLOW), rel=5e-3)
    assert fast_sim / slow_sim == pytest.approx(2.0, rel=5e-3)


def test_whatif_points_with_and_without_a_calibration_have_different_cache_keys(cals):
    from planner.efficiency import load_device_calibration
    from whatif import SweepConfig
    from whatif.points import SweepPoint

    base = SweepConfig(model=MODEL, devices=(1,), device_kinds=(KIND,), interconnects=("ideal",))
    cal = load_device_calibration(cals["fast"])
    (plain,), (calibrated,) = base.points(), SweepConfig(**{**base.__dict__, "calibration": cal}).points()
    assert "calibration" not in plain.key() and plain.key() != calibrated.key()
    assert SweepPoint.from_key(calibrated.key()) == calibrated


# ---------------------------------------------------------------------- (b) a bad file: one line, exit 2
COMMANDS = {
    "plan": ["plan", "--model", MODEL, "--topology", "dgx:servers=1"],
    "simulate": ["simulate", "--model", MODEL, "--topology", "dgx:servers=1", "--stages", "2"],
    "compare-schedules": ["compare-schedules", "--model", MODEL, "--topology", "dgx:servers=1"],
    "whatif": ["whatif", "--model", MODEL, "--devices", "8", "--device-kinds", "h100", "--jobs", "1"],
    "search": ["search", "--model", MODEL, "--topology", "dgx:servers=1", "--jobs", "1"],
    "groundtruth": ["groundtruth", "--data", "nowhere"],  # the file is refused before the data is looked for
}


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as e:  # argparse: the file is read when the command line is parsed
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_missing_or_malformed_file_is_one_line_and_exit_2(capsys, tmp_path, command):
    argv = COMMANDS[command] + ["--device-calibration"]
    assert "does not exist" in _one_line_error(capsys, argv + [str(tmp_path / "nowhere.json")])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "not valid JSON" in _one_line_error(capsys, argv + [str(bad)])
    bad.write_text(json.dumps({"device_kind": "a100-80gb", "params": {"gemm_efficiency": 0.5}}))
    assert "params lacks" in _one_line_error(capsys, argv + [str(bad)])
    bad.write_text(json.dumps({"device_kind": "tpu9", "params": EfficiencyParams().__dict__}))
    assert "unknown device kind" in _one_line_error(capsys, argv + [str(bad)])


@pytest.mark.parametrize("command", sorted(set(COMMANDS) - {"groundtruth"}))  # groundtruth: no cluster to match
def test_a_calibration_of_another_device_kind_is_one_line_and_exit_2(capsys, cals, command):
    argv = COMMANDS[command] + ["--device-calibration", cals["fast"]]  # emulated, on A100s (whatif: H100s)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibration is for emulated" in err, err
