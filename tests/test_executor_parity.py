"""Every schedule's executed weights equal the single-process reference of its update rule (real processes, gloo)."""
from __future__ import annotations


import pytest
import torch

from executor.launch import run_plan
from executor.reference import pipedream_version, reference_weights
from planner.lowering import plan_to_program
from planner.plan import even_plan
from planner.program import Kind

MODEL = "mlp:layers=6,width=16"

CASES = {
    "gpipe-2": dict(stages=2, schedule="gpipe"),
    "1f1b-3": dict(stages=3, schedule="1f1b"),
    "1f1b-replicas-2,1": dict(stages=2, schedule="1f1b", replicas=(2, 1)),
    "interleaved-2x2": dict(stages=4, schedule="interleaved", chunks=2),
    "zb-h1-3": dict(stages=3, schedule="zb-h1"),
    "2bw-2": dict(stages=2, schedule="2bw", batches=4),
    "pipedream-3": dict(stages=3, schedule="pipedream", microbatches=9),
    "pipedream-4-vertical-sync": dict(stages=4, schedule="pipedream", microbatches=9, vertical_sync=True),
    "pipedream-replicas-2,1": dict(stages=2, schedule="pipedream", microbatches=7, replicas=(2, 1)),
    "pipedream-replicas-1,2": dict(stages=2, schedule="pipedream", microbatches=7, replicas=(1, 2)),
}


def _plan(stages: int, schedule: str, replicas=None, microbatches: int = 4, batches: int = 3, **kw):
    return even_plan(MODEL, 6, stages, replicas, schedule=schedule, microbatches=microbatches, batches=batches,
                     microbatch_size=3, lr=0.05, **kw)


def _assert_weights_equal(got: dict, want: dict, rtol: float = 1e-5, atol: float = 1e-9) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.mark.dist
@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(CASES))
def test_executed_weights_equal_the_reference_update_rule(case):
    plan = _plan(**CASES[case])
    result = run_plan(plan, dtype="float64", timeout_s=30)
    _assert_weights_equal(result.weights, reference_weights(plan, dtype="float64"))


@pytest.mark.dist
@pytest.mark.timeout(60)
def test_float32_run_matches_reference_to_float32_tolerance():
    plan = _plan(stages=2, schedule="pipedream", microbatches=6)
    got = run_plan(plan, timeout_s=30).weights
    want = reference_weights(plan)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("replicas,vertical", [(None, False), (None, True), ((2, 1, 1), False), ((1, 2, 1), False),
                                               ((1, 1, 3), False), ((2, 2, 2), True)])
def test_reference_version_rule_is_the_version_each_pipedream_forward_carries(replicas, vertical):
    plan = even_plan(MODEL, 6, 3, replicas, schedule="pipedream", microbatches=11, vertical_sync=vertical)
    program = plan_to_program(plan)
    for w in program.workers:
        for a in program[w]:
            if a.kind is Kind.F:
                assert a.version == pipedream_version(plan, a.stage, a.mb), (w, a)


def test_update_rules_differ_so_parity_is_discriminating():
    flush = reference_weights(_plan(stages=2, schedule="1f1b", batches=4), dtype="float64")
    stale = reference_weights(_plan(stages=2, schedule="2bw", batches=4), dtype="float64")
    pd = reference_weights(_plan(stages=3, schedule="pipedream", microbatches=9), dtype="float64")
    pd_vs = reference_weights(_plan(stages=3, schedule="pipedream", microbatches=9, vertical_sync=True), dtype="float64")
    gap = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)
    assert gap(flush, stale) > 1e-6
    assert gap(pd, pd_vs) > 1e-6


def test_flush_reference_is_independent_of_partition_and_replication():
    a = reference_weights(_plan(stages=2, schedule="gpipe"), dtype="float64")
    b = reference_weights(_plan(stages=3, schedule="1f1b", replicas=(2, 1, 1)), dtype="float64")
    flat = lambda d: torch.cat([v.flatten() for _, v in sorted(d.items(), key=lambda kv: kv[0].split(".", 1)[1])])
    torch.testing.assert_close(flat(a), flat(b))


# Messages of 8 x 1024 float64 values (64 KiB) go through the worker's sender thread; weight updates are done
# in place where the STEP is the last use of its version, else into a freed version's tensors.
WIDE = "mlp:layers=4,width=1024"


@pytest.mark.dist
@pytest.mark.timeout(90)
@pytest.mark.parametrize("schedule,kw", [("pipedream", dict(microbatches=7)), ("1f1b", dict(microbatches=3, batches=2)),
                                         ("2bw", dict(microbatches=2, batches=3))])
def test_large_messages_and_in_place_steps_keep_the_reference_update_rule(schedule, kw):
    plan = even_plan(WIDE, 4, 2, schedule=schedule, microbatch_size=8, lr=0.05, **kw)
    result = run_plan(plan, dtype="float64", timeout_s=30)
    _assert_weights_equal(result.weights, reference_weights(plan, dtype="float64"))
