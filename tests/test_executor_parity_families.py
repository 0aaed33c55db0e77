"""The newer families run in the executor and their weights equal the single-process reference (real gloo processes).

A V placement puts two stages on one rank (ZB-V, V-Half, V-Min: rank r holds r and 2P − 1 − r), and
interleaved now takes any M: the executor interprets the program as it is, so these
run unchanged. Helpers come from tests/test_executor_parity.py (h2's file).
"""
from __future__ import annotations

import pytest

from executor.launch import run_plan
from executor.reference import reference_weights
from tests.test_executor_parity import _assert_weights_equal, _plan

CASES = {
    "zb-v-2x2": dict(stages=4, schedule="zb-v", chunks=2),
    "zb-v-3x2-m5": dict(stages=6, schedule="zb-v", chunks=2, microbatches=5),
    "zb-h2-3": dict(stages=3, schedule="zb-h2", microbatches=5),
    "interleaved-2x2-m3": dict(stages=4, schedule="interleaved", chunks=2, microbatches=3),
    "v-half-3x2-m5": dict(stages=6, schedule="v-half", chunks=2, microbatches=5),
    "v-min-3x2-m4": dict(stages=6, schedule="v-min", chunks=2, microbatches=4),
    "interleaved-zb-2x2-m3": dict(stages=4, schedule="interleaved-zb", chunks=2, microbatches=3),
    "dualpipe-v-2x2-m5": dict(stages=4, schedule="dualpipe-v", chunks=2, microbatches=5),
}


@pytest.mark.dist
@pytest.mark.timeout(90)
@pytest.mark.parametrize("case", list(CASES))
def test_executed_weights_equal_the_reference_update_rule(case):
    plan = _plan(**CASES[case])
    result = run_plan(plan, dtype="float64", timeout_s=30)
    _assert_weights_equal(result.weights, reference_weights(plan, dtype="float64"))
