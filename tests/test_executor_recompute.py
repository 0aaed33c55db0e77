"""The plan's recomputation mode in the executor: the same weights as the reference, and less kept for backward."""
from __future__ import annotations

import pytest
import torch

from tests.test_executor_parity import _assert_weights_equal as _assert_parity

from executor import run_plan
from executor.models import num_layers
from executor.reference import reference_weights
from planner.plan import plan_from_flags
from planner.program import Kind

MODEL = "gpt:layers=2,hidden=16,heads=2,seq=8,vocab=32"
H, SEQ, MBS, F64, I64 = 16, 8, 2, 8, 8

pytestmark = pytest.mark.dist


def _plan(mode: str, schedule: str = "1f1b", tp: int = 1):
    return plan_from_flags(MODEL, num_layers(MODEL), pp=2, tp=tp, schedule=schedule, microbatches=4, batches=2,
                           microbatch_size=MBS, lr=0.1, recompute=mode)


def _assert_weights_equal(got: dict, want: dict) -> None:
    _assert_parity(got, want, rtol=1e-9, atol=1e-12)  # float64 runs: tighter than the parity suite's default


def _first_forward_growth(res, worker: int) -> float:
    """Bytes a worker's first forward added to what it holds (the samples around that action)."""
    acts = res.program[worker]
    i = next(j for j, a in enumerate(acts) if a.kind is Kind.F)
    ev = next(e for e in res.trace.events if e.lane == worker and e.action == str(acts[i]))
    samples = sorted((m.time_s, m.nbytes) for m in res.trace.memory if m.worker == worker)
    before = [b for t, b in samples if t < ev.end_s][-1]
    after = next(b for t, b in samples if t == ev.end_s)
    return after - before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode,schedule,tp", [("full", "1f1b", 1), ("selective", "1f1b", 1), ("full", "zb-h1", 1),
                                              ("full", "pipedream", 1), ("full", "1f1b", 2), ("selective", "gpipe", 2)])
def test_recomputed_runs_equal_the_reference(mode, schedule, tp):
    plan = _plan(mode, schedule, tp)
    res = run_plan(plan, dtype="float64", timeout_s=60)
    _assert_weights_equal(res.weights, reference_weights(plan, dtype="float64"))


@pytest.mark.timeout(180)
def test_full_recomputation_keeps_only_each_layers_input():
    """Stage 0 (embedding + one block), per microbatch: the token ids, the block's input and the stage output (kept as
    the root of its backward) under full recomputation; selective keeps more, none the most."""
    grown = {mode: _first_forward_growth(run_plan(_plan(mode), dtype="float64", timeout_s=60), 0)
             for mode in ("none", "selective", "full")}
    assert grown["full"] == MBS * SEQ * I64 + 2 * MBS * SEQ * H * F64
    assert grown["full"] < grown["selective"] < grown["none"]
