"""V-Half (Qi et al., Pipeline Parallelism with Controllable Memory, NeurIPS 2024): the V at half of 1F1B's memory.

The same V placement as ZB-V (rank r holds stages r and 2P − 1 − r, half stages). The
order is the V-shape building block (``planner.schedules._v_block``, one idle slot
between the forwards of the upward leg) repeated every microbatch; each rank holds as
many microbatch-chunks awaiting their weight gradient as the block's lifespans overlap:
2·⌊(P + 2)/2⌋ half stages, i.e. the paper's ⌊(P + 2)/2⌋ whole microbatches against
1F1B's P. At tF = tBI = tBW = 1 (a chunk costs half) the makespan is 3M + (3P − 4)/2
for P ≥ 3 and M ≥ P: a bubble of (3P − 4)/2 against 1F1B's 3(P − 1), under half of
it and tending to half as P grows (benchmarks/bench_schedules.py tables it). The Hypothesis
property over both V families (closed form and memory bound, 200 examples each) is in
tests/test_family_v_min.py.
"""
from __future__ import annotations

import pytest

from planner.check import UnitCosts, dry_run, measured_bounds
from planner.program import Kind
from planner.profile import uniform_profile
from planner.schedules import _v_block, generate, make_spec
from planner.trace import makespan_s
from sim.engine import peak_memory

U = UnitCosts(f=1, b=2, bi=1, bw=1)
SIZES = [(1, 1), (1, 4), (2, 2), (2, 8), (3, 7), (4, 4), (4, 16), (5, 11), (6, 3), (8, 5), (8, 8), (8, 32), (11, 23), (16, 16)]


def closed_form_bubble(P: int) -> float:
    """Derived: (3P − 4)/2 for P ≥ 3; P = 2 is V-Min's 3/2 (the upward leg has one hop, no gap to add); P = 1 none."""
    return 0.0 if P == 1 else 1.5 if P == 2 else (3 * P - 4) / 2


def one_f_one_b_peak_whole(P: int, M: int) -> int:
    return min(P, M)


def _bubble(family: str, P: int, M: int) -> float:
    return makespan_s(dry_run(generate(make_spec(family, P, M)), U)) - 3 * M


def lifespan_overlap(P: int, up_offset: int) -> dict[int, int]:
    """Per rank, the most chunk lifespans (forward start to weight-gradient end) of the block repeated every
    6 slots that cover one slot: the steady state's microbatch-chunks awaiting a weight gradient."""
    block = _v_block(P, up_offset)
    out = {}
    for r in range(P):
        spans = [(block[(Kind.F, s)], block[(Kind.BW, s)] + 1) for s in (r, 2 * P - 1 - r)]
        horizon = max(e for _, e in spans) + 6
        out[r] = max(sum(1 for f, e in spans for k in range(-horizon, horizon) if f + 6 * k <= t < e + 6 * k)
                     for t in range(horizon))
    return out


@pytest.mark.parametrize("P,M", SIZES)
def test_v_half_holds_at_most_half_of_1f1bs_peak_plus_one_microbatch_in_the_simulator(P, M):
    """The same 2P-layer model: 1F1B on P stages of 2 layers, V-Half on 2P stages of 1; saved bytes only."""
    saved = 1000.0
    prof = uniform_profile(2 * P, 1e-3, 2e-3, act=0.0, params=0.0, saved=saved)
    half = peak_memory(generate(make_spec("v-half", P, M)), prof)
    one = peak_memory(generate(make_spec("1f1b", P, M)), prof, stage_layers=[(2 * s, 2 * s + 1) for s in range(P)])
    one_peak = max(one.values())
    assert one_peak == pytest.approx(one_f_one_b_peak_whole(P, M) * 2 * saved)
    for r in range(P):
        if M >= P:  # a full pipe: half of 1F1B's P plus at most one microbatch (two half stages)
            assert half[r] <= one_peak / 2 + 2 * saved + 1e-9
        else:  # fewer microbatches than ranks: every one is in the V at once, still no more than 1F1B holds
            assert half[r] <= one_peak + 1e-9
    if M >= P:  # the paper's (p + 2) // 2 whole microbatches on the busiest rank
        assert max(half.values()) == pytest.approx((P + 2) // 2 * 2 * saved)


@pytest.mark.parametrize("P", [1, 2, 3, 4, 5, 8, 13])
def test_the_blocks_lifespans_set_the_peak_a_rank_holds(P):
    """Memory read off the block alone (its lifespans, repeated every 6 slots) equals what the program holds."""
    got = measured_bounds(generate(make_spec("v-half", P, 3 * P + 6)))["awaiting_weight_grad"]
    assert got == lifespan_overlap(P, 2)


@pytest.mark.parametrize("P,M", [(3, 3), (4, 16), (6, 24), (8, 8), (8, 32), (16, 64)])
def test_v_half_idles_about_half_as_long_as_1f1b(P, M):
    one = _bubble("1f1b", P, M)
    assert one == pytest.approx(3 * (P - 1))
    assert 0.4 * one <= _bubble("v-half", P, M) <= 0.5 * one


@pytest.mark.parametrize("P", [3, 4, 6, 9, 16])
def test_v_half_trades_memory_for_bubble_between_v_min_and_zb_v(P):
    M = 2 * P
    held = {f: max(measured_bounds(generate(make_spec(f, P, M)))["awaiting_weight_grad"].values())
            for f in ("v-min", "v-half", "zb-v")}
    assert held["v-min"] <= held["v-half"] <= held["zb-v"]
    assert _bubble("zb-v", P, M) <= _bubble("v-half", P, M) <= _bubble("v-min", P, M)
