"""A program file runs everywhere a plan does: `pipetwin run --program P.json --model M` executes exactly the file's
actions with torch.distributed (gloo, real processes), `simulate --program` takes the same file, and a bad file is one
line and exit 2 before any process starts.

Truth: the single-process reference trainer of the update rule (the parity suite's helpers) and the file itself —
each rank's executed action sequence, read back from the measured trace, must be the file's list.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from executor.reference import reference_weights
from pipetwin.cli import main
from planner.plan import Plan, StagePlan, even_plan
from planner.lowering import tensor_expand
from planner.families import FAMILIES, FAMILY
from planner.program import Program
from planner.schedulespec import chunks_for
from planner.schedules import generate, make_spec
from planner.trace import Trace
from tests.test_executor_parity import _assert_weights_equal

MODEL = "mlp:layers=6,width=16"
M, LR, MBS = 4, 0.05, 3


def _even_reference_plan(stages: int, batches: int) -> Plan:
    """The flush update rule (every program here is a flush schedule; partition and order do not change its
    arithmetic) on the model's layers split evenly, as the executor splits a program that names no layers."""
    return even_plan(MODEL, 6, stages, schedule="gpipe", microbatches=M, batches=batches, microbatch_size=MBS, lr=LR)


def _executed_order(trace_path: Path) -> dict[int, list[str]]:
    """Per worker lane of the measured trace file, its actions in the order they started (a stable sort: a
    worker's actions never overlap)."""
    out: dict[int, list[str]] = {}
    for e in sorted(Trace.load(trace_path).events, key=lambda e: e.start_s):
        if isinstance(e.lane, int):
            out.setdefault(e.lane, []).append(e.action)
    return out


def _file_order(path: Path) -> dict[int, list[str]]:
    program = Program.load(path)
    return {w: [str(a) for a in program[w]] for w in program.workers}


def _torch_csv(tmp_path: Path) -> Path:
    from tests.torch_schedules import order_csv, torch_schedule

    sch = torch_schedule("InterleavedZeroBubble", 2, M)
    if sch is None:
        pytest.skip("this torch has no ScheduleInterleavedZeroBubble")
    path = tmp_path / "izb.csv"
    path.write_text(order_csv(sch.pipeline_order))
    return path


def _write_program(kind: str, tmp_path: Path, capsys) -> tuple[Path, Plan]:
    """(program file written by `pipetwin schedule -o` as a user would, the plan of the reference update rule)."""
    out = tmp_path / f"{kind}.json"
    if kind == "plan-1f1b-uneven":  # a plan's program: its stages' layers (1 and 5 of 6) travel in the file
        plan = Plan(MODEL, (StagePlan(0, 0, 1, ("d0",)), StagePlan(1, 5, 1, ("d1",))), schedule="1f1b", microbatches=M,
                    microbatch_size=MBS, lr=LR, batches=2)
        plan.save(tmp_path / "plan.json")
        argv = ["schedule", "--plan", str(tmp_path / "plan.json")]
    elif kind == "zb-v":
        argv = ["schedule", "--kind", "zb-v", "--stages", "2", "--microbatches", str(M), "--batches", "2"]
    else:
        argv = ["schedule", "--from-torch", str(_torch_csv(tmp_path))]
    assert main([*argv, "-o", str(out)]) == 0
    capsys.readouterr()
    program = Program.load(out)
    if kind == "plan-1f1b-uneven":
        assert program.stage_layers == ((0, 0), (1, 5))
        return out, plan
    assert program.stage_layers is None and len(program.stage_workers) == 4  # two stages per rank, an even split
    return out, _even_reference_plan(4, program.spec.batches)


@pytest.mark.dist
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["plan-1f1b-uneven", "zb-v", "torch-interleaved-zero-bubble"])
def test_a_program_file_runs_exactly_as_written_and_matches_the_reference(kind, tmp_path, capsys):
    path, ref_plan = _write_program(kind, tmp_path, capsys)
    weights, trace = tmp_path / "w.pt", tmp_path / "trace.json"
    code = main(["run", "--program", str(path), "--model", MODEL, "--microbatch-size", str(MBS), "--lr", str(LR),
                 "--dtype", "float64", "--timeout", "20", "--save-weights", str(weights), "--trace", str(trace)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"program {path}" in out and "on 2 workers" in out
    assert _executed_order(trace) == _file_order(path)
    _assert_weights_equal(torch.load(weights), reference_weights(ref_plan, dtype="float64"))
    # the same file simulates
    assert main(["simulate", "--program", str(path), "--model", "uniform:layers=6,fwd=1e-3,bwd=2e-3",
                 "--topology", "ideal:2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["makespan_s"] > 0


def test_a_plan_program_carries_its_layers_through_the_file(tmp_path):
    """A plan's program names which layers each stage holds, and the file keeps them (the executor and the
    simulator then need nothing from the plan)."""
    from planner.lowering import plan_to_program

    plan = Plan(MODEL, (StagePlan(0, 0), StagePlan(1, 4), StagePlan(5, 5)), schedule="1f1b", microbatches=M)
    program = plan_to_program(plan)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(program.to_json()))
    back = Program.load(path)
    assert back.stage_layers == ((0, 0), (1, 4), (5, 5)) == tuple(s.layers for s in plan.stages)
    assert back.layers(6) == back.stage_layers


# --- bad input: one line, exit 2, nothing launched ------------------------------------------------------------
def _program_doc() -> dict:
    return generate(make_spec("1f1b", 2, 2)).to_json()


def _unknown_action(d):
    d["workers"]["0"][0]["kind"] = "FWD"


def _stage_on_no_rank(d):
    d["stage_workers"][1] = []


def _action_on_a_stage_its_worker_lacks(d):
    d["workers"]["0"][0]["stage"] = 1


def _layers_not_the_model(d):
    d["stage_layers"] = [[0, 1], [2, 3]]


def _layers_not_contiguous(d):
    d["stage_layers"] = [[0, 2], [4, 5]]


def _workers_not_ranks(d):
    """Worker 1 renamed 2 everywhere: a consistent program (the simulator places it), but no run's ranks."""
    for acts in d["workers"].values():
        for a in acts:
            if a.get("peer") == 1:
                a["peer"] = 2
    d["workers"] = {"0": d["workers"]["0"], "2": d["workers"]["1"]}
    d["stage_workers"] = [[0], [2]]


def _spec_stages_3(d):
    d["spec"]["stages"] = 3


def _no_workers(d):
    d["workers"], d["stage_workers"] = {}, []


BAD = {
    "unknown action": (_unknown_action, "kind: expected one of"),
    "stage on no rank": (_stage_on_no_rank, "stage 1 is on no worker"),
    "action on a stage its worker lacks": (_action_on_a_stage_its_worker_lacks, "does not hold stage 1"),
    "layers not the model's": (_layers_not_the_model, "cover 4 layers but the model has 6"),
    "layers not contiguous": (_layers_not_contiguous, "stage_layers"),
    "workers not ranks 0..W-1": (_workers_not_ranks, "number the workers from 0"),
    "spec stages not the stage list": (_spec_stages_3, "3 stages x 1 chunks = 3 but program.stage_workers lists 2"),
    "no workers": (_no_workers, "no stages or no workers"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_generated_program_agrees_with_its_own_shape(family):
    """check_shape (what run and simulate ask of a file first) holds for what pipetwin writes: every family,
    with replicas where it takes them and tensor-parallel expanded."""
    fam = FAMILY[family]
    V = chunks_for(family, 1)
    n = 3 * V if fam.multi_stage else 3
    for reps in ((1,) * n, (2,) * n if fam.replicable else (1,) * n):
        program = generate(make_spec(family, 3, 6, reps, V, batches=2 if fam.batched else 1))
        program.check_shape()
        tensor_expand(program, 2).check_shape()


def test_every_torch_schedule_import_agrees_with_its_own_shape():
    from planner.torch_interop import program_from_torch, read_torch_csv
    from tests.torch_schedules import TORCH_SCHEDULES, order_csv, torch_schedule

    seen = 0
    for name in TORCH_SCHEDULES:
        sch = torch_schedule(name, 2, 4)
        if sch is None:
            continue
        try:
            program = program_from_torch(read_torch_csv(order_csv(sch.pipeline_order)))
        except ValueError:  # torch's own off-by-one 1F1B IR, which check refuses (README)
            continue
        program.check_shape()
        seen += 1
    assert seen >= 4

def _one_line_exit_2(argv, capsys, needle):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err


def _bad_file(case: str, tmp_path: Path) -> Path:
    d = copy.deepcopy(_program_doc())
    BAD[case][0](d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_program_is_one_line_and_exit_2_in_run(case, tmp_path, capsys):
    _one_line_exit_2(["run", "--program", str(_bad_file(case, tmp_path)), "--model", MODEL, "--timeout", "5"], capsys,
                     BAD[case][1])


@pytest.mark.parametrize("case", [c for c in BAD if c != "workers not ranks 0..W-1"])
def test_simulate_refuses_the_same_bad_files(case, tmp_path, capsys):
    _one_line_exit_2(["simulate", "--program", str(_bad_file(case, tmp_path)), "--model", "uniform:layers=6",
                      "--topology", "ideal:2"], capsys, BAD[case][1])


@pytest.mark.parametrize("argv,needle", [
    (["--plan", "x.json"], "drop --plan"),
    (["--pp", "2"], "drop --pp"),
    (["--resume", "--checkpoint-dir", "ck"], "--resume needs --plan"),
])
def test_run_program_refuses_flags_that_would_change_the_file(argv, needle, tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_program_doc()))
    _one_line_exit_2(["run", "--program", str(path), "--model", MODEL, *argv], capsys, needle)


def test_run_program_needs_the_model_and_a_readable_file(tmp_path, capsys):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_program_doc()))
    _one_line_exit_2(["run", "--program", str(path)], capsys, "--program needs --model")
    _one_line_exit_2(["run", "--program", str(tmp_path / "missing.json"), "--model", MODEL], capsys, "cannot read it")
    path.write_text("{not json")
    _one_line_exit_2(["run", "--program", str(path), "--model", MODEL], capsys, "is not JSON")


def test_torchrun_worker_refuses_a_world_that_is_not_the_programs(tmp_path, capsys, monkeypatch):
    """Under torchrun the world size comes from the launcher: 3 processes for a 2-worker program is one line,
    exit 2, before any process group is joined."""
    from executor.worker import main as worker_main

    path = tmp_path / "p.json"
    path.write_text(json.dumps(_program_doc()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert worker_main(["--program", str(path), "--model", MODEL, "--backend", "gloo", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs 2 workers but the run has 3 processes" in err, err


@pytest.mark.parametrize("argv,needle", [(["--timeout", "0"], "--timeout must be > 0"),
                                         (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0")])
def test_torchrun_worker_refuses_the_settings_the_launcher_refuses(argv, needle, tmp_path, capsys, monkeypatch):
    """The timeout and checkpoint interval are checked in prepare, the route both launchers take: under torchrun
    a zero timeout was handed to the process group (only the local launcher refused it)."""
    from executor.worker import main as worker_main

    path = tmp_path / "p.json"
    path.write_text(json.dumps(_program_doc()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert worker_main(["--program", str(path), "--model", MODEL, "--backend", "gloo", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_a_worker_that_hangs_in_a_program_run_is_named_within_the_timeout(tmp_path, monkeypatch):
    """A distributed failure never hangs the run: worker 1 sleeps at its first backward, worker 0 times out
    waiting for the gradient, and the launcher names worker 1 in one error."""
    from executor.errors import WorkerFailed
    from executor.launch import run_program

    monkeypatch.setenv("PIPETWIN_FAULT", "1:1B0:hang")
    with pytest.raises(WorkerFailed) as err:
        run_program(_program_doc(), MODEL, timeout_s=3)
    assert err.value.rank == 1 and err.value.action == "1B0", str(err.value)
