"""torchtitan's Llama 3.1 H100 rows: the loader, and one row's prediction against a hand computation."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from planner.efficiency import DeviceCalibration, EfficiencyParams
from topologies import devices
from validation.groundtruth_rows import GroundTruthError
from validation.groundtruth_titan import (DEFAULT_SEQ, NVLINK_BYTES_PER_S, TITAN_KIND, predict_titan, read_torchtitan,
                                          score_torchtitan, titan_summary)

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT.parent / "shared" / "data" / "published" / "torchtitan_llama3_h100_202412.csv"
HEADER = ("table,model,gpus,fsdp,tp,pp,cp,seq_len,local_batch,global_batch,activation_ckpt,techniques,schedule,"
          "tps_per_gpu,memory_gib")
GOOD = "1,Llama3.1-8B,8,8,1,1,1,,2,16,selective,FSDP,,5762,82.4"


def _write(tmp_path: Path, *lines: str) -> Path:
    p = tmp_path / "titan.csv"
    p.write_text("# source line\n" + HEADER + "\n" + "\n".join(lines) + "\n")
    return p


@pytest.mark.skipif(not FILE.is_file(), reason="published data not beside the repo")
def test_the_published_file_parses_all_18_rows():
    rows = read_torchtitan(FILE)
    assert len(rows) == 18
    assert {r.model for r in rows} == {"Llama3.1-8B", "Llama3.1-70B", "Llama3.1-405B"}
    assert all(r.fsdp * r.tp * r.pp * r.cp == r.gpus for r in rows)
    assert [r.seq for r in rows if r.table == 2] == [32768, 65536, 131072, 262144]
    assert all(r.seq == DEFAULT_SEQ and not r.seq_given for r in rows if r.table in (1, 3, 4, 5))
    scored = score_torchtitan(rows, DeviceCalibration("a100-80gb", EfficiencyParams()))
    s = titan_summary(scored)
    # scored: all but the two plain-FSDP 8B rows (the H100 calibration rows, and the only ones without compile)
    assert s["n_rows"] == 16 and s["n_calibration"] == 2 and s["n_all_modelled"] == 0
    assert s["mape_tps_all_modelled"] is None
    for x in scored:  # what a step is made of adds up to it
        assert sum(x["step_terms_s"].values()) == pytest.approx(x["step_s"], rel=1e-4)


@pytest.mark.parametrize("line,what", [
    ("1,Llama3.1-8B,8,8,1,1,1,,two,16,selective,FSDP,,5762,82.4", "bad field"),
    ("1,Llama3.1-8B,8,4,1,1,1,,2,16,selective,FSDP,,5762,82.4", "must equal gpus"),
    ("1,Llama3.1-9B,8,8,1,1,1,,2,16,selective,FSDP,,5762,82.4", "unknown model"),
    ("1,Llama3.1-8B,8,8,1,1,1,,2,16,selective,FSDP+ZeRO++,,5762,82.4", "unknown technique"),
    ("1,Llama3.1-8B,8,8,1,1,1,,2,16,selective,FSDP,,5762", "cells where the header has"),
    ("1,Llama3.1-8B,8,8,1,1,1,,0,16,selective,FSDP,,5762,82.4", "local_batch, seq_len .* must be positive"),
    ("1,Llama3.1-8B,8,8,1,1,1,0,2,16,selective,FSDP,,5762,82.4", "local_batch, seq_len .* must be positive"),
    ("1,Llama3.1-8B,8,8,1,1,1,,2,16,selective,FSDP,,-5762,82.4", "tps_per_gpu and memory_gib must be positive"),
    ("1,Llama3.1-8B,24,8,3,1,1,,2,16,selective,FSDP,,5762,82.4", "tensor parallelism 3 must divide heads=32"),
    ("1,Llama3.1-8B,512,8,1,64,1,,64,16,selective,FSDP,1F1B,5762,82.4", "64 pipeline stages .* has 32 blocks"),
])
def test_a_malformed_line_is_named(tmp_path, line, what):
    p = _write(tmp_path, GOOD, line)
    with pytest.raises(GroundTruthError, match=f"{p.name}:4: .*{what}"):
        read_torchtitan(p)


def test_the_command_refuses_a_bad_file_in_one_line(tmp_path):
    p = _write(tmp_path, GOOD, "1,Llama3.1-8B,8,8,1,1,1,,2,16,sometimes,FSDP,,5762,82.4")
    r = subprocess.run([sys.executable, "-m", "pipetwin", "groundtruth", "--torchtitan", str(p)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and f"{p}:4: activation_ckpt" in r.stderr


def test_one_row_equals_a_hand_computation(tmp_path, monkeypatch):
    """Table 1's FSDP row (Llama 3.1 8B, FSDP 8, local batch 2, selective AC) on a device with unbounded memory
    bandwidth and no host time, so every kernel is its FLOPs at the GEMM fraction of peak: the step and the memory
    written out from the model's shape."""
    kind = devices.DEVICE_KINDS[TITAN_KIND]
    monkeypatch.setitem(devices.DEVICE_KINDS, TITAN_KIND, replace(kind, memory_bytes_per_s=1e30))
    p = EfficiencyParams(gemm_efficiency=0.5, memory_efficiency=1.0, kernel_launch_s=0.0, layer_overhead_s=0.0,
                         iteration_overhead_s=0.01, overlap_exponent=4.0, loss_overhead_s=0.0)
    (row,) = read_torchtitan(_write(tmp_path, GOOD))
    got = predict_titan(row, DeviceCalibration("a100-80gb", p))

    L, h, kv, f, V, s, b, D = 32, 4096, 1024, 14336, 128256, 8192, 2, 8
    n = b * s
    rate = 912e12 * 0.5
    matmul = h * (h + 2 * kv) + h * h + 3 * h * f  # wq wk wv, wo, w1 w3 w2
    block_params = matmul + 2 * h
    emb_params, head_params = V * h, V * h + h
    dense = 2 * n * matmul
    redo = 2 * n * (h * kv + h * h + h * f)  # wk, wo, w3 re-run by the per-op policy
    flash = 4 * n * (s / 2) * h
    ring = (D - 1) / D / NVLINK_BYTES_PER_S  # seconds per byte of a ring all-gather / reduce-scatter

    def gather(params):  # bf16 weights, once per pass
        return 2 * params * ring

    def scatter(params):  # fp32 gradients
        return 4 * params * ring

    # every block's and the head's compute is far longer than any collective, so one communicator hides every
    # gather but these: the forward waits for the embedding's gather and then for block 1's (issued when the
    # embedding's zero-second compute starts); the backward for the head's; after the backward's last compute
    # (block 1's; the embedding's is zero) block 1's reduce-scatter and then the embedding's still run
    exposed = (gather(emb_params) + gather(block_params) + gather(head_params) + scatter(block_params)
               + scatter(emb_params))
    compute = L * (dense + flash + 2 * dense + 2.5 * flash + redo) / rate + 6 * n * V * h / rate
    step = compute + exposed + 0.01
    assert got.step_s == pytest.approx(step, rel=1e-9)
    assert got.terms["fsdp"] == pytest.approx(exposed, rel=1e-9)
    assert got.terms["recompute"] == pytest.approx(L * redo / rate, rel=1e-9)
    assert got.tps_per_gpu == pytest.approx(n / step, rel=1e-9)

    total = L * block_params + emb_params + head_params
    kept = 2 * n * (h + h + kv + h + f + h) + 4 * n * 32  # input, wq, wv, attention out, w1, w2; log-sum-exp
    # a Llama block's saved bytes, flash attention's log-sum-exp for its scores
    rebuilt = b * (8 * s * h + 2 * s * h + 4 * s * kv + 2 * s * h + 6 * s * f + 4 * s * 32)
    memory = 16 * total / D + (head_params + emb_params) * 8 + L * kept + rebuilt + 10 * n * V
    assert got.memory_bytes == pytest.approx(memory, rel=1e-9)
