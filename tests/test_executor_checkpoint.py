"""Stop-and-resume from a checkpoint gives the weights of an uninterrupted run: the weights and SGD's momentum buffer
come back; a checkpoint of another optimizer's state (plain SGD's, as every file from before the executor's SGD had
momentum) is refused in one line."""
from __future__ import annotations

import pytest
import torch

from executor.checkpoint import latest_complete_step, stage_path
from executor.errors import ExecutorError, WorkerFailed
from executor.launch import run_plan
from executor.faults import FAULT_ENV
from executor.reference import reference_weights
from pipetwin.cli import main
from planner.plan import even_plan

pytestmark = pytest.mark.dist


def _plan(schedule="1f1b", batches=4, **kw):
    return even_plan("mlp:layers=4,width=16", 4, 2, schedule=schedule, microbatches=4, batches=batches,
                     microbatch_size=2, lr=0.05, **kw)


@pytest.mark.timeout(120)
def test_killed_run_resumed_from_checkpoint_ends_with_uninterrupted_weights(tmp_path, monkeypatch):
    plan = _plan()
    whole = run_plan(plan, dtype="float64").weights

    ckdir = tmp_path / "ck"
    monkeypatch.setenv(FAULT_ENV, "1:1F13v3:kill")  # batch 3 of 4, after the step-2 checkpoint
    with pytest.raises(WorkerFailed):
        run_plan(plan, dtype="float64", checkpoint_dir=ckdir, checkpoint_every=2)
    monkeypatch.delenv(FAULT_ENV)
    assert latest_complete_step(ckdir, 2) == 2
    doc = torch.load(stage_path(ckdir, 2, 1), weights_only=True)
    assert doc["version"] == 2 and doc["optimizer"]["lr"] == 0.05
    opt = doc["optimizer"]
    assert opt["kind"] == "momentum" and opt["momentum"] == 0.9 and opt["state"].keys() == doc["weights"].keys()
    assert all(b.abs().max() > 0 and b.shape == doc["weights"][n].shape for n, b in opt["state"].items())
    # the buffer matters: the same two batches from the checkpoint's weights with zero buffers end elsewhere
    start = {f"stage{s}.{n}": t for s in range(2)
             for n, t in torch.load(stage_path(ckdir, 2, s), weights_only=True)["weights"].items()}
    cold = reference_weights(_plan(batches=2), dtype="float64", first_batch=2, start=start)
    assert max((cold[k] - whole[k]).abs().max().item() for k in whole) > 1e-6

    resumed = run_plan(plan, dtype="float64", checkpoint_dir=ckdir, checkpoint_every=2, resume=True)
    assert resumed.start_step == 2
    assert min(resumed.losses) == 2 * plan.microbatches  # data continues at batch 2
    for k in whole:
        torch.testing.assert_close(resumed.weights[k], whole[k], rtol=1e-12, atol=0)
    assert latest_complete_step(ckdir, 2) == 4

    done = run_plan(plan, dtype="float64", checkpoint_dir=ckdir, resume=True)  # nothing left: the checkpoint's weights
    assert done.start_step == 4 and done.program is None
    for k in whole:
        torch.testing.assert_close(done.weights[k], whole[k], rtol=1e-12, atol=0)


def test_checkpoint_written_for_another_partition_is_refused(tmp_path):
    plan = _plan()
    (tmp_path / "step1").mkdir()
    for s in range(2):
        torch.save({"model": plan.model, "layers": [0, 0], "weights": {}}, stage_path(tmp_path, 1, s))
    with pytest.raises(ExecutorError, match="use a fresh --checkpoint-dir"):
        run_plan(plan, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.timeout(120)
def test_a_plain_sgd_checkpoint_resumes_as_plain_sgd_and_a_momentum_run_refuses_it_in_one_line(tmp_path, capsys):
    """A plain-SGD file (``{"kind": "sgd", "state": {}}``, the one format of every checkpoint written before the
    executor's SGD had momentum) has no buffer to resume momentum from: refused before any process starts, with
    what to do; resumed as plain SGD (--optimizer none) it is the uninterrupted plain run. And the other way."""
    plain = _plan(optimizer="none")
    run_plan(_plan(batches=2, optimizer="none"), dtype="float64", checkpoint_dir=tmp_path / "old")
    doc = torch.load(stage_path(tmp_path / "old", 2, 0), weights_only=True)
    assert doc["optimizer"] == {"kind": "sgd", "lr": 0.05, "state": {}}
    with pytest.raises(ExecutorError, match="was written by plain SGD .*resume it with --optimizer none"):
        run_plan(_plan(), checkpoint_dir=tmp_path / "old", resume=True)
    path = tmp_path / "plan.json"
    _plan().save(path)
    assert main(["run", "--plan", str(path), "--checkpoint-dir", str(tmp_path / "old"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--optimizer none" in err and "Traceback" not in err
    resumed = run_plan(plain, dtype="float64", checkpoint_dir=tmp_path / "old", resume=True)
    assert resumed.start_step == 2
    want = reference_weights(plain, dtype="float64")
    for k in want:
        torch.testing.assert_close(resumed.weights[k], want[k], rtol=1e-12, atol=1e-15)
    run_plan(_plan(), dtype="float64", checkpoint_dir=tmp_path / "new", checkpoint_every=2)
    with pytest.raises(ExecutorError, match="holds SGD momentum buffers; resume it with --optimizer sgd"):
        run_plan(plain, checkpoint_dir=tmp_path / "new", resume=True)


def test_streaming_schedules_refuse_checkpoints(tmp_path):
    with pytest.raises(ExecutorError, match="checkpoints need a flush schedule"):
        run_plan(_plan("pipedream"), checkpoint_dir=tmp_path, checkpoint_every=1)
