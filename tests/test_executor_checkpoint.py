"""Stop-and-resume from a checkpoint gives the weights of an uninterrupted run."""
from __future__ import annotations

import pytest
import torch

from executor.checkpoint import latest_complete_step, stage_path
from executor.errors import ExecutorError, WorkerFailed
from executor.launch import run_plan
from executor.faults import FAULT_ENV
from planner.plan import even_plan

pytestmark = pytest.mark.dist


def _plan(schedule="1f1b"):
    return even_plan("mlp:layers=4,width=16", 4, 2, schedule=schedule, microbatches=4, batches=4, microbatch_size=2,
                     lr=0.05)


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


def test_streaming_schedules_refuse_checkpoints(tmp_path):
    with pytest.raises(ExecutorError, match="checkpoints need a flush schedule"):
        run_plan(_plan("pipedream"), checkpoint_dir=tmp_path, checkpoint_every=1)
