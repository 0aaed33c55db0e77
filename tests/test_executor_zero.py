"""ZeRO-1 and ZeRO-2 in the executor: a 2-stage x 2-replica Adam run ends on the single-process reference's weights,
each rank holds the optimizer state planner.sharding counts for it, and a failing rank still stops the run fast."""
from __future__ import annotations

import time

import pytest
import torch

from executor.errors import ExecutorError, WorkerFailed
from executor.faults import FAULT_ENV
from executor.launch import run_plan
from executor.reference import reference_weights
from pipetwin.cli import main
from planner.costmodel import OPTIMIZER_STATE
from planner.plan import even_plan
from planner.sharding import zero_state_bytes

pytestmark = pytest.mark.dist

MODEL = "mlp:layers=4,width=16"
REPLICAS = (2, 2)


def _plan(zero: int, optimizer: str = "adam", **kw):
    return even_plan(MODEL, 4, 2, REPLICAS, schedule="1f1b", microbatches=4, batches=3, microbatch_size=3, lr=0.05,
                     optimizer=optimizer, zero_stage=zero, **kw)


def _stage_numel(weights: dict, s: int) -> int:
    return sum(t.numel() for k, t in weights.items() if k.startswith(f"stage{s}."))


@pytest.mark.timeout(120)
def test_zero_1_and_2_adam_runs_end_on_the_reference_and_hold_the_planned_optimizer_state():
    want = reference_weights(_plan(0), dtype="float64")
    sgd = reference_weights(_plan(0, "sgd"), dtype="float64")
    assert any(not torch.allclose(want[k], sgd[k]) for k in want)  # Adam is not SGD: the check can fail
    losses = {}
    for zero in (0, 1, 2):
        res = run_plan(_plan(zero), dtype="float64", timeout_s=30)
        assert res.weights.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(res.weights[k], want[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"ZeRO {zero} {k}: {m}")
        losses[zero] = res.losses
        per = res.summary()["per_device"]
        program = res.program
        for s, workers in enumerate(program.stage_workers):
            param_bytes = _stage_numel(res.weights, s) * 8  # float64
            planned = zero_state_bytes(param_bytes, len(workers), zero, OPTIMIZER_STATE["adam"]).optimizer_bytes
            for w in workers:
                assert per[str(w)]["optimizer_state_bytes"] == planned, (zero, s, w)
    assert losses[1].keys() == losses[0].keys() and len(losses[0]) == 3 * 4
    for zero in (1, 2):
        for mb, v in losses[0].items():
            assert losses[zero][mb] == pytest.approx(v, rel=1e-10)


@pytest.mark.timeout(60)
def test_a_rank_failing_in_its_sharded_step_stops_the_run_fast(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "2:1STEP0v1:raise")  # rank 2 (stage 1, replica 0) dies; rank 3 waits in its gather
    t = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        run_plan(_plan(2), timeout_s=10)
    assert (info.value.rank, info.value.action) == (2, "1STEP0v1")
    assert time.monotonic() - t < 30


def test_zero_3_schedules_with_several_versions_and_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    for plan, what in ((_plan(3, "sgd", recompute="full"), "ZeRO-3 without recomputation"),
                       (even_plan(MODEL, 4, 2, REPLICAS, schedule="pipedream", microbatches=4, zero_stage=1),
                        "shards one weight version")):
        with pytest.raises(ExecutorError, match=what):
            run_plan(plan)
    with pytest.raises(ExecutorError, match="checkpoints keep SGD.s momentum but not Adam.s moments or ZeRO.s shards"):
        run_plan(_plan(1), checkpoint_dir=tmp_path)
    with pytest.raises(ExecutorError, match="checkpoints keep SGD.s momentum but not Adam.s moments or ZeRO.s shards"):
        run_plan(_plan(3), checkpoint_dir=tmp_path)
    path = tmp_path / "z3.json"
    _plan(3, "sgd", recompute="full").save(path)
    assert main(["run", "--plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--zero 2" in err and "Traceback" not in err
