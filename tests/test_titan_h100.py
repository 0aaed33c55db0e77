"""The H100 calibration fitted on torchtitan's plain-FSDP rows: it recovers known parameters, never scores its own
rows, and round-trips through the file every ``--device-calibration`` flag reads."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from planner.efficiency import DeviceCalibration, EfficiencyParams, load_device_calibration
from validation.groundtruth_rows import GroundTruthError
from validation.groundtruth_titan import (H100_FITTED, TITAN_KIND, fit_h100, is_h100_calibration_row, predict_titan,
                                          read_torchtitan, score_torchtitan, titan_summary)

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT.parent / "shared" / "data" / "published" / "torchtitan_llama3_h100_202412.csv"
HEADER = ("table,model,gpus,fsdp,tp,pp,cp,seq_len,local_batch,global_batch,activation_ckpt,techniques,schedule,"
          "tps_per_gpu,memory_gib")
#: Titan-like rows: the two calibration shapes (FSDP on 8 and 128 GPUs) and rows the rule must leave out.
LINES = ("1,Llama3.1-8B,8,8,1,1,1,,2,16,selective,FSDP,,5000,80",
         "3,Llama3.1-8B,128,128,1,1,1,,2,256,selective,FSDP,,5000,60",
         "1,Llama3.1-8B,8,8,1,1,1,,2,16,selective,FSDP+compile,,5000,80",
         "2,Llama3.1-8B,8,4,1,1,2,65536,1,,full,FSDP+CP+compile+Float8,,2000,80",
         "4,Llama3.1-70B,256,32,8,1,1,,16,512,full,2D+compile+Float8,,800,70")
#: An A100 fit to start from (its values are arbitrary but in bounds).
A100 = DeviceCalibration("a100-80gb", EfficiencyParams(0.86, 0.83, 4e-5, 6.4e-5, 5e-4, 4.2, 3e-3), fitted_on="vtrain")
needs_file = pytest.mark.skipif(not FILE.is_file(), reason="published data not beside the repo")


def _rows(tmp_path: Path, lines=LINES):
    p = tmp_path / "titan.csv"
    p.write_text("# source\n" + HEADER + "\n" + "\n".join(lines) + "\n")
    return read_torchtitan(p)


def _measured_by_model(rows, params: EfficiencyParams):
    """The rows with tokens/s as the model itself predicts them under ``params`` (synthetic truth)."""
    cal = DeviceCalibration(TITAN_KIND, params)
    return [replace(r, tps_per_gpu=predict_titan(r, cal).tps_per_gpu) for r in rows]


@pytest.mark.parametrize("true_gemm", [0.35, 0.42, 0.6])
def test_the_fit_recovers_the_gemm_fraction_that_generated_the_rows(tmp_path, true_gemm):
    true = replace(A100.params, gemm_efficiency=true_gemm)
    h = fit_h100(_measured_by_model(_rows(tmp_path), true), A100)
    assert h.params.gemm_efficiency == pytest.approx(true_gemm, rel=1e-4)
    assert h.rms_relative_error < 1e-6 and h.n_rows == 2
    for f in fields(EfficiencyParams):  # the others are the A100 fit's, untouched
        if f.name not in H100_FITTED:
            assert getattr(h.params, f.name) == getattr(A100.params, f.name)
    assert h.device_kind == TITAN_KIND and h.block_timings == () and h.gradient_bytes_per_param == 4


def test_the_fit_sees_only_the_calibration_rows(tmp_path):
    """Scaling every scored row's measured tokens/s changes nothing the fit returns; scaling a calibration row does."""
    rows = _measured_by_model(_rows(tmp_path), replace(A100.params, gemm_efficiency=0.45))
    base = fit_h100(rows, A100)
    scored_moved = [r if is_h100_calibration_row(r) else replace(r, tps_per_gpu=3 * r.tps_per_gpu) for r in rows]
    assert fit_h100(scored_moved, A100) == base
    cal_moved = [replace(r, tps_per_gpu=0.8 * r.tps_per_gpu) if is_h100_calibration_row(r) else r for r in rows]
    assert fit_h100(cal_moved, A100).params.gemm_efficiency < 0.9 * base.params.gemm_efficiency


def test_no_calibration_row_is_refused_in_words(tmp_path):
    with pytest.raises(GroundTruthError, match="no H100 calibration row"):
        fit_h100(_rows(tmp_path, LINES[2:]), A100)


@needs_file
def test_the_split_follows_the_rule_and_no_calibration_row_is_scored():
    """The rule read from the raw CSV (8B, techniques exactly 'FSDP', no TP/PP/CP) against the module's split."""
    with FILE.open() as fh:
        raw = list(csv.DictReader(line for line in fh if not line.startswith("#")))
    by_rule = {i for i, d in enumerate(raw) if d["model"] == "Llama3.1-8B" and d["techniques"] == "FSDP"
               and d["tp"] == d["pp"] == d["cp"] == "1"}
    rows = read_torchtitan(FILE)
    assert {i for i, r in enumerate(rows) if is_h100_calibration_row(r)} == by_rule
    assert len(by_rule) == 2
    scored = score_torchtitan(rows, fit_h100(rows, A100))
    s = titan_summary(scored)
    assert s["n_rows"] == len(rows) - len(by_rule) and s["n_calibration"] == len(by_rule)
    kept = [x for x in scored if not x["calibration"]]
    assert {x["line"] for x in kept}.isdisjoint({rows[i].line for i in by_rule})
    assert s["mape_tps"] == pytest.approx(sum(abs(x["tps_error"]) for x in kept) / len(kept))


def test_the_file_round_trips_and_commands_take_it_for_its_kind(tmp_path):
    rows = _measured_by_model(_rows(tmp_path), replace(A100.params, gemm_efficiency=0.42))
    h = fit_h100(rows, A100)
    path = tmp_path / "h100.json"
    h.save(path)
    back = load_device_calibration(path)
    assert back == h
    assert json.loads(path.read_text())["device_kind"] == TITAN_KIND
    base = [sys.executable, "-m", "pipetwin", "whatif", "--model", "llama3-8b", "--devices", "8", "--global-batch", "8",
            "--simulate", "none", "--device-calibration", str(path), "--json"]
    slow = tmp_path / "slow.json"  # the same file at half the GEMM fraction: a compute-bound sweep slows down
    replace(h, params=replace(h.params, gemm_efficiency=h.params.gemm_efficiency / 2)).save(slow)

    def throughput(cal: Path) -> float:
        cmd = [str(cal) if x == str(path) else x for x in base] + ["--device-kinds", TITAN_KIND]
        ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert ok.returncode == 0, ok.stderr
        (point,) = json.loads(ok.stdout)["points"]
        assert point["status"] == "ok" and point["device_kind"] == TITAN_KIND
        return point["throughput_samples_per_s"]

    assert 1.5 < throughput(path) / throughput(slow) <= 2.0 + 1e-9
    bad = subprocess.run(base + ["--device-kinds", "a100-80gb"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and f"calibration is for {TITAN_KIND}" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0


def test_saving_an_h100_calibration_without_titan_rows_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pipetwin", "groundtruth", "--torchtitan", "none",
                        "--save-calibration-h100", str(tmp_path / "h.json")], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "--save-calibration-h100" in r.stderr and r.stderr.strip().count("\n") == 0
    assert not (tmp_path / "h.json").exists()
