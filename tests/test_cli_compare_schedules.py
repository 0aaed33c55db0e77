"""`pipetwin compare-schedules` end to end: every family on one plan, figures that agree with the closed forms."""
from __future__ import annotations

import json

import pytest

from pipetwin.cli import main
from planner.families import FAMILIES

MODEL = "uniform:layers=8,fwd=0.001,bwd=0.002"  # no activations on the wire: the simulator's times are the dry run's


def test_every_family_is_compared_on_the_same_plan(tmp_path, capsys):
    png = tmp_path / "c.png"
    assert main(["compare-schedules", "--model", MODEL, "--topology", "ideal:4", "--stages", "4", "--microbatches", "8",
                 "--batches", "1", "--json", "--chart", str(png)]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["family"]: r for r in doc["families"]}
    assert set(rows) == set(FAMILIES) and all(r["fits"] for r in rows.values())
    per_stage_s = 2 * (1e-3 + 2e-3)  # two layers per rank: tF + tB of one 1F1B stage
    # one batch of 1F1B and GPipe: (M + P - 1)(tF + tB); ZB-V: 3M + (P - 1)/2 in those units
    assert rows["1f1b"]["time_per_batch_s"] == pytest.approx((8 + 3) * per_stage_s)
    assert rows["gpipe"]["time_per_batch_s"] == pytest.approx((8 + 3) * per_stage_s)
    unit_s = 2 * 1e-3  # a stage's tF (= its tBI = its tBW when the simulator splits B in halves)
    assert rows["zb-v"]["time_per_batch_s"] == pytest.approx((3 * 8 + 3 / 2) * unit_s)
    assert rows["zb-h1"]["time_per_batch_s"] == pytest.approx((3 * 8 + 3) * unit_s)
    assert all(len(r["peak_memory_bytes_per_stage"]) == 4 for r in rows.values())
    assert png.stat().st_size > 5000


def test_a_family_that_cannot_run_the_shape_says_why(capsys):
    # 3 layers: enough for 3 one-stage ranks, not for the 6 stages a V or an interleaving of 2 needs
    assert main(["compare-schedules", "--model", "uniform:layers=3,fwd=0.001,bwd=0.002", "--topology", "ideal:4",
                 "--stages", "3", "--json"]) == 0
    rows = {r["family"]: r for r in json.loads(capsys.readouterr().out)["families"]}
    assert rows["1f1b"]["fits"] and not rows["zb-v"]["fits"] and "layers" in rows["zb-v"]["reason"]


def test_bad_compare_input_is_one_line_exit_2(capsys):
    assert main(["compare-schedules", "--model", MODEL, "--topology", "ideal:4", "--stages", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert ">= 1" in err and len(err.splitlines()) == 1


def test_the_table_lists_fitting_families_fastest_first_with_their_memory_imbalance(capsys):
    argv = ["compare-schedules", "--model", "uniform:layers=8,fwd=0.001,bwd=0.002,act=1e6,params=1e6",
            "--topology", "ideal:4", "--stages", "4", "--microbatches", "8", "--batches", "1"]
    assert main(argv + ["--json"]) == 0
    rows = [r for r in json.loads(capsys.readouterr().out)["families"] if r["fits"]]
    assert main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("│")]
    cells = [[c.strip() for c in ln.strip("│").split("│")] for ln in lines]
    assert [c[0] for c in cells] == [r["family"] for r in sorted(rows, key=lambda r: -r["throughput_samples_per_s"])]
    by = {r["family"]: r for r in rows}
    for c in cells:
        peaks = by[c[0]]["peak_memory_bytes_per_stage"]
        assert float(c[5]) == pytest.approx(max(peaks) / min(peaks), abs=0.005)
        assert [float(x) for x in c[4].split()] == pytest.approx([p / 1e9 for p in peaks], rel=6e-3)  # printed to 3 digits
