"""A failing worker stops the run fast with one error naming rank, stage and action; bad input is one clear line."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from executor.errors import ExecutorError, WorkerFailed
from executor.launch import run_plan
from executor.faults import FAULT_ENV
from planner.plan import even_plan

pytestmark = pytest.mark.dist


def _plan(**kw):
    return even_plan("mlp:layers=6,width=16", 6, 3, schedule="1f1b", microbatches=4, batches=2, **kw)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode,rank,action", [("raise", 1, "1B2"), ("kill", 1, "1F3"), ("exit", 2, "2F0"),
                                              ("raise", 0, "0STEP0v1")])
def test_failed_worker_is_named_with_its_stage_and_action(monkeypatch, mode, rank, action):
    monkeypatch.setenv(FAULT_ENV, f"{rank}:{action}:{mode}")
    t = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        run_plan(_plan(), timeout_s=20)
    err = info.value
    assert (err.rank, err.stage, err.action) == (rank, int(action[0]), action)
    assert f"worker {rank} (stage {action[0]})" in str(err) and action in str(err)
    assert "\n" not in str(err)
    assert ">>" + action + "<<" in err.grid
    assert time.monotonic() - t < 30


@pytest.mark.timeout(60)
def test_hung_worker_is_found_when_its_peers_time_out(monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1:1B1:hang")
    t = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        run_plan(_plan(), timeout_s=3)
    assert (info.value.rank, info.value.action) == (1, "1B1")
    assert "stopped making progress" in str(info.value)
    assert time.monotonic() - t < 30


def test_plan_that_does_not_match_the_model_is_an_executor_error(tmp_path):
    plan = even_plan("mlp:layers=6,width=16", 6, 2).to_dict()
    plan["model"] = "mlp:layers=8,width=16"
    with pytest.raises(ExecutorError, match="covers 6 layers but model 'mlp:layers=8,width=16' has 8"):
        run_plan(plan)
    with pytest.raises(ExecutorError, match="does not exist"):
        run_plan(tmp_path / "missing.json")
    with pytest.raises(ExecutorError, match="unknown model"):
        run_plan({**plan, "model": "nosuch:x=1"})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content,needle", [("{not json", "not valid JSON"),
                                            (json.dumps({"model": "mlp:layers=4", "stages": [{"layers": [0, 2]}]}),
                                             "covers 3 layers"),
                                            (json.dumps({"model": "mlp:layers=4"}), "missing or has a malformed field")])
def test_cli_bad_plan_file_exits_2_with_one_line(tmp_path, content, needle):
    path = tmp_path / "plan.json"
    path.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "pipetwin", "run", "--plan", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipetwin run: error:") and needle in lines[0]


@pytest.mark.timeout(60)
def test_peer_of_a_sender_thread_dies_and_the_dead_worker_is_named(monkeypatch):
    # 32 x 1024 float32 activations (128 KiB): rank 0 sends them from its sender thread
    monkeypatch.setenv(FAULT_ENV, "1:1F2:kill")
    plan = even_plan("mlp:layers=4,width=1024", 4, 2, schedule="1f1b", microbatches=4, batches=2, microbatch_size=32)
    t = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        run_plan(plan, timeout_s=10)
    assert (info.value.rank, info.value.stage, info.value.action) == (1, 1, "1F2")
    assert time.monotonic() - t < 30
