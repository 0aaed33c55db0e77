"""Tensor parallelism (Megatron) in the executor: 2 stages x 2 TP ranks of a small gpt equal the single-process reference.

Every multi-process test runs 4 gloo processes of a tiny model (2 cores). The
reference (executor/reference.py) trains the whole, unsharded model in one
process; the executor runs the column/row-parallel shards with their
all-reduces in each TP group, and gathers the shards into whole weights. The
vocabulary (160, padded to 256 for T = 2) puts real words on both ranks'
embedding and head slices, and padding on rank 1's.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from executor import ExecutorError, run_plan
from executor.checkpoint import latest_complete_step, stage_path
from executor.models import num_layers
from executor.reference import reference_weights
from executor.tensor_parallel import TP_FAULT_ENV, ShardSpec, shard, unshard
from planner.plan import plan_from_flags

MODEL = "gpt:layers=2,hidden=16,heads=2,seq=8,vocab=160"
ROOT = Path(__file__).resolve().parents[1]


def _plan(schedule: str = "1f1b", pp: int = 2, dp: int = 1, tp: int = 2, microbatches: int = 4, batches: int = 2,
          sequence_parallel: bool = False):
    return plan_from_flags(MODEL, num_layers(MODEL), pp=pp, dp=dp, tp=tp, schedule=schedule,
                           microbatches=microbatches, batches=batches, microbatch_size=2, lr=0.1,
                           sequence_parallel=sequence_parallel)


def _max_diff(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    return max((got[k] - want[k]).abs().max().item() for k in want)


def _assert_weights_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_shards_put_back_together_give_the_whole_parameter():
    w = torch.arange(24.0).reshape(6, 4)
    for spec in (ShardSpec(0, 3), ShardSpec(0), ShardSpec(1), ShardSpec(0, length=6, padded=8)):
        pieces = [shard(w, spec, t, 2) for t in range(2)]
        assert torch.equal(unshard(pieces, spec), w)
    # vocabulary rows: 6 padded to 8, rank 1 holds rows 4, 5 and two rows of zeros
    assert shard(w, ShardSpec(0, length=6, padded=8), 1, 2).tolist() == w[4:].tolist() + [[0.0] * 4] * 2
    # QKV: each rank takes its heads' rows of q, of k and of v (3 blocks of 2 rows, 1 row each per rank)
    assert shard(w, ShardSpec(0, 3), 1, 2)[:, 0].tolist() == [4.0, 12.0, 20.0]


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe", "pipedream"])
def test_two_stages_by_two_tp_ranks_equal_the_reference(schedule):
    plan = _plan(schedule, microbatches=6 if schedule == "pipedream" else 4)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    assert len(res.program.workers) == 4 and res.program.tensor_parallel == 2
    want = reference_weights(plan, dtype="float64")
    start = reference_weights(replace(plan, lr=0.0), dtype="float64")
    assert _max_diff(want, start) > 1e-3  # training moved the weights, so equality is not trivial
    _assert_weights_equal(res.weights, want)


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_data_parallel_replicas_of_tp_groups_equal_the_reference():
    """1 stage x 2 replicas x 2 TP ranks: each TP rank all-reduces its shard's gradients with the same rank of the other replica."""
    plan = _plan("1f1b", pp=1, dp=2)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    _assert_weights_equal(res.weights, reference_weights(plan, dtype="float64"))


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_parity_fails_when_a_tp_all_reduce_is_skipped(direction, monkeypatch):
    """Without the row-parallel output reduction (forward) or the column-parallel input-gradient reduction
    (backward) the run drifts from the reference: the parity test can tell a missing collective."""
    plan = _plan("gpipe")
    monkeypatch.setenv(TP_FAULT_ENV, direction)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    assert _max_diff(res.weights, reference_weights(plan, dtype="float64")) > 1e-3


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_tp_checkpoint_holds_whole_weights_and_resume_reshards_them(tmp_path):
    plan = _plan("1f1b", batches=2)
    ck = tmp_path / "ck"
    run_plan(plan, dtype="float64", timeout_s=60, checkpoint_dir=ck, checkpoint_every=1)
    assert latest_complete_step(ck, 2) == 2
    after_one = reference_weights(replace(plan, batches=1), dtype="float64")
    for s in range(2):
        doc = torch.load(stage_path(ck, 1, s), weights_only=True)
        _assert_weights_equal({f"stage{s}.{n}": t for n, t in doc["weights"].items()},
                              {k: v for k, v in after_one.items() if k.startswith(f"stage{s}.")})
    shutil.rmtree(ck / "step2")
    resumed = run_plan(plan, dtype="float64", timeout_s=60, checkpoint_dir=ck, resume=True)
    assert resumed.start_step == 1
    _assert_weights_equal(resumed.weights, reference_weights(plan, dtype="float64"))


def _block_shard_param_bytes(h: int, T: int, itemsize: int) -> int:
    """One pre-LN block's parameters on one of T ranks: norms and row-parallel biases whole, the rest split."""
    replicated = 2 * h + 2 * h + h + h  # ln1, ln2 (weight + bias), proj bias, fc2 bias
    split = (3 * h * h + 3 * h) + h * h + (4 * h * h + 4 * h) + 4 * h * h  # qkv, proj weight, fc1, fc2 weight
    return (replicated + split // T) * itemsize


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_memory_is_counted_per_tp_rank():
    """At the start a worker holds its own shard of the weights, SGD's momentum buffer of that shard, plus the receive
    buffers posted ahead (closed form)."""
    h, seq, mbs, T, f64 = 16, 8, 2, 2, 8
    rows = 128  # the vocabulary 160 padded to 256 (a multiple of 128·T), split in two
    plan = _plan("1f1b")
    res = run_plan(plan, dtype="float64", timeout_s=60)
    embed, head = (rows * h + seq * h) * f64, (2 * h + rows * h) * f64  # positions and the final norm whole
    boundary = mbs * seq * h * f64
    for w in res.program.workers:
        s = res.program.stages_of(w)[0]
        params = _block_shard_param_bytes(h, T, f64) + (embed if s == 0 else head)
        recvs = sum(1 for a in res.program[w] if a.kind.value == "RECV")
        first = next(m.nbytes for m in res.trace.memory if m.worker == w and m.time_s == 0.0)
        assert first == 2 * params + min(8, recvs) * boundary, w


def test_tp_refuses_models_and_degrees_it_cannot_split():
    with pytest.raises(ExecutorError, match="gpt and llama models only"):
        run_plan(plan_from_flags("mlp:layers=4,width=8", 4, pp=2, tp=2))
    with pytest.raises(ExecutorError, match="must divide the model's 3 attention heads"):
        m = "gpt:layers=2,hidden=12,heads=3,seq=4,vocab=16"
        run_plan(plan_from_flags(m, num_layers(m), pp=2, tp=2))


@pytest.mark.dist
@pytest.mark.timeout(120)
def test_cli_runs_tp_by_pp_with_sequence_parallelism_and_recomputation(tmp_path):
    out = tmp_path / "w.pt"
    proc = subprocess.run([sys.executable, "-m", "pipetwin", "run", "--model", MODEL, "--tp", "2", "--pp", "2",
                           "--sequence-parallel", "--recompute", "full",
                           "--microbatches", "4", "--microbatch-size", "2", "--lr", "0.1", "--batches", "2",
                           "--dtype", "float64", "--save-weights", str(out)],
                          capture_output=True, text=True, timeout=110, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "on 4 workers (tensor-parallel groups of 2, sequence-parallel) with full recomputation" in proc.stdout
    _assert_weights_equal(torch.load(out, weights_only=True), reference_weights(_plan("1f1b"), dtype="float64"))


@pytest.mark.dist
@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_sequence_parallel_equals_the_reference_and_sends_a_tp_share_of_the_sequence(schedule):
    plan = _plan(schedule, sequence_parallel=True)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    _assert_weights_equal(res.weights, reference_weights(plan, dtype="float64"))
    h, seq, mbs, T, f64 = 16, 8, 2, 2, 8
    sends = {e.nbytes for e in res.trace.events if e.kind == "SEND"}
    assert sends == {mbs * (seq // T) * h * f64}  # a stage boundary carries its TP rank's half of the tokens


@pytest.mark.dist
@pytest.mark.timeout(180)
@pytest.mark.parametrize("direction", ["forward", "backward", "sequence-grads"])
def test_sequence_parallel_parity_fails_without_each_of_its_reductions(direction, monkeypatch):
    plan = _plan("1f1b", sequence_parallel=True)
    monkeypatch.setenv(TP_FAULT_ENV, direction)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    assert _max_diff(res.weights, reference_weights(plan, dtype="float64")) > 1e-4


def test_sequence_parallel_needs_a_sequence_the_tp_ranks_divide():
    m = "gpt:layers=2,hidden=16,heads=2,seq=7,vocab=16"
    with pytest.raises(ExecutorError, match="must divide seq=7"):
        run_plan(plan_from_flags(m, num_layers(m), pp=2, tp=2, sequence_parallel=True))
