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


# --- a fixed plan from --tp --pp --dp [--vp] -----------------------------------------------------------
GPT = "gpt:layers=4,hidden=64,heads=8,seq=32,vocab=100"


def _sim_json(capsys, *flags) -> dict:
    assert main(["simulate", "--model", GPT, "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_fixed_grid_simulates_the_plan_plan_from_flags_makes(capsys):
    from planner.analytic import load_model
    from planner.plan import plan_from_flags
    from planner.trace import summary
    from sim import simulate_plan
    from topologies.presets import load_topology

    topo = load_topology("dgx:servers=2,gpus=4")
    got = _sim_json(capsys, "--topology", "dgx:servers=2,gpus=4", "--tp", "2", "--pp", "2", "--dp", "2",
                    "--microbatches", "4", "--recompute")
    plan = plan_from_flags(GPT, 6, pp=2, dp=2, tp=2, microbatches=4, recompute="full", devices=topo.devices,
                           topology="dgx:servers=2,gpus=4")
    want = summary(simulate_plan(plan, load_model(GPT, tensor_parallel=2), topo))
    assert got["time_per_batch_s"] == want["time_per_batch_s"] and len(got["per_device"]) == 8
    # interleaved with replicas and TP; --dp filled in from the device count
    got = _sim_json(capsys, "--topology", "ideal:8", "--tp", "2", "--pp", "2", "--vp", "2", "--schedule",
                    "interleaved", "--microbatches", "8")
    assert len(got["per_device"]) == 8 and got["time_per_batch_s"] > 0


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own refusals
        return e.code


@pytest.mark.parametrize("model,flags,msg", [
    (GPT, ["--tp", "3", "--pp", "2", "--dp", "1"], "does not make 8 devices"),
    (GPT, ["--tp", "2", "--pp", "2", "--dp", "3"], "does not make 8 devices"),
    (GPT, ["--tp", "0"], "expects a whole number >= 1"),
    ("gpt:layers=4,hidden=48,heads=6,seq=32,vocab=96", ["--tp", "4", "--pp", "2"], "tensor parallelism 4 must divide heads=6"),
    (GPT, ["--tp", "2", "--stages", "2"], "give the plan's shape one way"),
    (GPT, ["--tp", "2", "--pp", "2", "--vp", "2", "--schedule", "1f1b"], "needs --schedule interleaved"),
    ("uniform:layers=8", ["--tp", "2"], "--tp 2 needs a transformer model"),
])
def test_bad_grids_are_one_line_and_exit_2(model, flags, msg, capsys):
    assert _exit_code(["simulate", "--model", model, "--topology", "ideal:8", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and msg in err, err


def test_the_header_names_the_whole_device_grid(capsys):
    """A TP x DP x PP plan says all three degrees and the device count, not only the stage count."""
    assert main(["simulate", "--model", "gpt3-1.3b", "--topology", "dgx:servers=1", "--tp", "2", "--pp", "2",
                 "--dp", "2", "--microbatches", "4"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == ("simulated 1f1b, 2 stages x 2 replicas x 2 tensor-parallel ranks (8 devices), "
                      "4 microbatches on dgx:servers=1")
