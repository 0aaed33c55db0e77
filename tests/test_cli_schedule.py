"""`pipetwin schedule` end to end: grid, JSON keys, chart, bad input."""
from __future__ import annotations

import json

import pytest

from pipetwin.cli import main


@pytest.mark.parametrize("kind,extra", [("gpipe", []), ("1f1b", []), ("interleaved", ["--chunks", "2"]),
                                        ("pipedream", ["--replicas", "2,1,1,1"]), ("2bw", ["--batches", "2"]),
                                        ("zb-h1", []), ("pipedream", ["--vertical-sync"])])
def test_schedule_json_for_every_family(kind, extra, capsys):
    assert main(["schedule", "--kind", kind, "--stages", "4", "--microbatches", "8", "--json", *extra]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"workers", "makespan_units", "bubble_fraction"}
    kinds = {a["kind"] for acts in doc["workers"].values() for a in acts}
    assert "F" in kinds and "STEP" in kinds
    for acts in doc["workers"].values():
        for a in acts:
            assert {"kind", "stage", "mb", "version"} <= set(a)
            if a["kind"] in ("SEND", "RECV"):
                assert "peer" in a


def test_schedule_grid_and_chart(tmp_path, capsys):
    png = tmp_path / "s.png"
    assert main(["schedule", "--kind", "1f1b", "--stages", "4", "--microbatches", "8", "--chart", str(png)]) == 0
    out = capsys.readouterr().out
    assert "bubble fraction 0.2727" in out and "makespan 33 units" in out
    assert png.stat().st_size > 5000


@pytest.mark.parametrize("argv,needle", [
    (["--kind", "interleaved", "--stages", "4", "--microbatches", "6", "--replicas", "2,1,1,1"], "per virtual stage"),
    (["--kind", "1f1b", "--stages", "3", "--microbatches", "4", "--replicas", "1,2"], "3 stages"),
    (["--kind", "gpipe", "--stages", "0", "--microbatches", "4"], ">= 1"),
    (["--kind", "2bw", "--stages", "4", "--microbatches", "2"], "2BW"),
    (["--kind", "1f1b", "--stages", "2", "--microbatches", "2", "--replicas", "x"], "integers"),
])
def test_bad_schedule_input_is_one_line_exit_2(argv, needle, capsys):
    try:
        rc = main(["schedule", *argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1
