"""Every writer of a path the user names makes its folder: the README's ``-o out/plan.json`` works in a fresh clone.

Each writer is pointed at a file two missing folders deep, and what it wrote is read back by the
matching reader (so a writer that made the folder but wrote nothing, or wrote it elsewhere, fails).
"""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from pipetwin.cli import main

ROOT = Path(__file__).resolve().parents[1]
UNIFORM = "uniform:layers=4,fwd=1e-3,bwd=2e-3,act=1e3,params=1e3"


def test_the_cli_writers_make_missing_folders(tmp_path, capsys, monkeypatch):
    from planner.plan import Plan
    from planner.program import Program
    from planner.torch_interop import read_torch_csv
    from planner.trace import Trace

    monkeypatch.chdir(tmp_path)  # relative paths, as the README gives them
    assert main(["schedule", "--kind", "1f1b", "--stages", "2", "--microbatches", "2",
                 "--chart", "a/1/grid.png", "--to-torch", "b/2/t.csv", "-o", "c/3/p.json"]) == 0
    assert main(["plan", "--model", UNIFORM, "--topology", "ideal:2", "--schedule", "1f1b", "-o", "d/4/plan.json"]) == 0
    assert main(["simulate", "--plan", "d/4/plan.json", "--steps", "1", "--trace", "e/5/sim.json",
                 "--chart", "f/6/sim.png"]) == 0
    capsys.readouterr()

    assert Path("a/1/grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert Path("f/6/sim.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(read_torch_csv(Path("b/2/t.csv").read_text())) == 2  # one row per rank
    assert len(Program.load("c/3/p.json").actions) == 2
    assert Plan.load("d/4/plan.json").schedule == "1f1b"
    assert Trace.load("e/5/sim.json").events


def test_the_library_writers_make_missing_folders(tmp_path):
    from planner.efficiency import DEFAULT_PARAMS, DeviceCalibration, load_device_calibration
    from planner.profile import load_profile, parse_uniform_spec
    from planner.trace import Event, Trace, save_side_by_side
    from topologies.presets import load_topology
    from topologies.topology import Topology
    from whatif.pool import open_cache, read_cache

    prof = parse_uniform_spec(UNIFORM)
    prof.save(tmp_path / "p" / "q" / "profile.json")
    assert len(load_profile(str(tmp_path / "p" / "q" / "profile.json"))) == 4

    topo = load_topology("ideal:2")
    for name in ("topology.json", "topology.yaml"):
        topo.save(tmp_path / "t" / name.split(".")[1] / name)
        assert len(Topology.load(tmp_path / "t" / name.split(".")[1] / name).devices) == 2

    cal = DeviceCalibration("a100-80gb", DEFAULT_PARAMS, n_rows=3)
    cal.save(tmp_path / "c" / "d" / "cal.json")
    assert load_device_calibration(tmp_path / "c" / "d" / "cal.json") == cal

    tr = Trace(events=[Event(0, "0F0", 0.0, 1.0, "F")])
    tr.save(tmp_path / "tr" / "a" / "one.json")
    assert Trace.load(tmp_path / "tr" / "a" / "one.json").events[0].action == "0F0"
    save_side_by_side({"x": tr, "y": tr}, tmp_path / "tr" / "b" / "two.json")
    doc = json.loads((tmp_path / "tr" / "b" / "two.json").read_text())
    assert sum(e.get("ph") == "X" for e in doc["traceEvents"]) == 2

    with open_cache(tmp_path / "w" / "x" / "cache.jsonl") as sink:
        sink.write(json.dumps({"key": "k", "record": {"v": 1}}) + "\n")
    assert read_cache(tmp_path / "w" / "x" / "cache.jsonl") == {"k": {"v": 1}}


def test_saved_weights_make_missing_folders(tmp_path):
    import torch

    from executor.launch import _save_weights

    _save_weights(types.SimpleNamespace(weights={"stage0.w": torch.ones(2)}), tmp_path / "o" / "p" / "w.pt")
    assert torch.equal(torch.load(tmp_path / "o" / "p" / "w.pt")["stage0.w"], torch.ones(2))


def test_a_folder_that_is_a_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    code = main(["plan", "--model", UNIFORM, "--topology", "ideal:2", "-o", str(tmp_path / "out" / "plan.json")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a file, not a folder" in err


def test_no_writer_makes_its_folder_by_hand():
    """One helper (``topologies.files.output_path``), not copies: ``.parent.mkdir`` appears nowhere else."""
    hits = [f"{p.relative_to(ROOT)}:{i}" for pkg in ("topologies", "planner", "sim", "executor", "validation",
                                                     "whatif", "pipetwin")
            for p in sorted((ROOT / pkg).rglob("*.py")) if p.name != "files.py"
            for i, line in enumerate(p.read_text().splitlines(), 1) if ".parent.mkdir(" in line]
    assert not hits, "use topologies.files.output_path: " + ", ".join(hits)


@pytest.mark.parametrize("flag", ["--save-weights", "--trace"])
def test_run_refuses_an_unwritable_output_before_any_process_starts(tmp_path, capsys, monkeypatch, flag):
    """A bad --save-weights / --trace path used to surface after the whole run; now it is refused up front."""
    import executor.launch

    def no_launch(*a, **k):
        raise AssertionError("the run started")

    monkeypatch.setattr(executor.launch, "run_plan", no_launch)
    (tmp_path / "out").write_text("not a folder")
    code = main(["run", "--model", "mlp:layers=4,width=16", "--pp", "2", flag, str(tmp_path / "out" / "x")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a file, not a folder" in err
