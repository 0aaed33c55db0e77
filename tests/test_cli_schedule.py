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


def test_schedule_writes_torch_csv_and_reads_it_back_checked_by_the_laws(tmp_path, capsys):
    csv_path, prog_path = tmp_path / "zbv.csv", tmp_path / "zbv.json"
    assert main(["schedule", "--kind", "zb-v", "--stages", "2", "--microbatches", "4", "--to-torch", str(csv_path),
                 "-o", str(prog_path)]) == 0
    first = capsys.readouterr().out
    assert csv_path.read_text().splitlines()[0].startswith("0F0,0F1,")
    assert json.loads(prog_path.read_text())["spec"]["family"] == "zb-v"
    assert main(["schedule", "--from-torch", str(csv_path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["family"] == "custom" and doc["measured_bounds"]["backward"] == "split"
    assert f"makespan {doc['makespan_units']:g} units" in first  # the same program, the same dry run


@pytest.mark.parametrize("text,needle", [("0F0,0REDUCE_GRAD,7I0\n", "never compute"), ("0F0,0Q1\n", "cannot read torch action"),
                                         ("1B0,1F0\n0F0,0B0\n", "backward before its own forward")])
def test_bad_torch_csv_is_one_line_exit_2(tmp_path, capsys, text, needle):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    assert main(["schedule", "--from-torch", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_an_imported_torch_schedule_simulates_as_the_program_it_came_from(tmp_path, capsys):
    """schedule -o → torch CSV → schedule --from-torch -o → simulate --program: both programs, one prediction."""
    own, csv_path, imported = tmp_path / "own.json", tmp_path / "s.csv", tmp_path / "imported.json"
    assert main(["schedule", "--kind", "zb-v", "--stages", "2", "--microbatches", "4", "-o", str(own), "--to-torch", str(csv_path)]) == 0
    assert main(["schedule", "--from-torch", str(csv_path), "-o", str(imported)]) == 0
    capsys.readouterr()
    spans = []
    for path in (own, imported):
        assert main(["simulate", "--program", str(path), "--model", "uniform:layers=8,fwd=0.001,bwd=0.002",
                     "--topology", "ideal:2", "--json"]) == 0
        spans.append(json.loads(capsys.readouterr().out)["makespan_s"])
    # 2P = 4 chunks of 2 layers: a chunk's F is 2 ms, and the dry run's 12.5 units of a whole stage (4 ms) each
    assert spans[0] == pytest.approx(spans[1]) == pytest.approx(12.5 * 4e-3)
