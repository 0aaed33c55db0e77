"""`pipetwin simulate --params FILE`: calibrated simulator parameters from a file, flags on top."""
from __future__ import annotations

import json

import pytest

from pipetwin.cli import main

BASE = ["simulate", "--model", "uniform:layers=4,fwd=1e-3,bwd=2e-3,act=1e3,params=1e3", "--topology", "ideal:2",
        "--stages", "2", "--schedule", "1f1b", "--microbatches", "4", "--json"]


def _tpb(capsys, *extra) -> float:
    assert main(BASE + list(extra)) == 0
    return json.loads(capsys.readouterr().out)["time_per_batch_s"]


def test_params_file_equals_the_same_flags_and_flags_override_it(tmp_path, capsys):
    f = tmp_path / "sim_params.json"
    f.write_text(json.dumps({"overhead_s": 5e-4, "step_time_s": 1e-3}))
    plain = _tpb(capsys)
    from_file = _tpb(capsys, "--params", str(f))
    # 1F1B on an ideal link, 2 stages, 4 microbatches, 2 layers per stage: (M+P-1)(tF+tB) of compute,
    # every compute action on the critical path pays the overhead, the last stage's step ends the batch
    assert plain == pytest.approx((4 + 2 - 1) * (2e-3 + 4e-3), rel=1e-9)
    assert from_file > plain + 1e-3  # the file's step time and overhead both count
    f2 = tmp_path / "step_only.json"
    f2.write_text(json.dumps({"step_time_s": 1e-3}))
    assert _tpb(capsys, "--params", str(f), "--overhead", "0") == _tpb(capsys, "--params", str(f2))


def test_bad_params_file_is_one_line_exit_2(tmp_path, capsys):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"overhead": 1}))
    assert main(BASE + ["--params", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown simulator parameters ['overhead']" in err
    f.write_text("{nope")
    assert main(BASE + ["--params", str(f)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(BASE + ["--params", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
