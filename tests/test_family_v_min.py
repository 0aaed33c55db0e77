"""V-Min (Qi et al., Pipeline Parallelism with Controllable Memory, NeurIPS 2024): the V at a third of 1F1B's memory.

V-Half's generator with the shortest building block: every action of one microbatch as
early as its dependency and its rank's free slots mod 6 allow (``_v_block`` with no gap).
The lifespans hold 2·⌊(P + 4)/3⌋ half-stage chunks per rank, the paper's ⌊(P + 4)/3⌋
whole microbatches against 1F1B's P. At tF = tBI = tBW = 1 (a chunk costs half) the
makespan is 3M + 2P − 5/2 once M ≥ P (3M + 2P − 3/2 when 3 divides P and P > 3: the
block's input-gradient chain meets a taken slot one more time), about two thirds of
1F1B's bubble 3(P − 1), as the paper's ~2p/3m.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from planner.check import UnitCosts, dry_run, measured_bounds
from planner.profile import uniform_profile
from planner.schedules import generate, make_spec
from planner.trace import makespan_s
from sim.engine import peak_memory
from tests.test_family_v_half import closed_form_bubble as half_bubble, lifespan_overlap

U = UnitCosts(f=1, b=2, bi=1, bw=1)


def closed_form_bubble(P: int) -> float:
    if P == 1:
        return 0.0
    return 2 * P - 2.5 + (1.0 if P % 3 == 0 and P > 3 else 0.0)


def _bubble(family: str, P: int, M: int) -> float:
    return makespan_s(dry_run(generate(make_spec(family, P, M)), U)) - 3 * M


@pytest.mark.parametrize("P,M", [(1, 3), (2, 4), (3, 7), (4, 4), (5, 11), (6, 12), (7, 3), (8, 8), (9, 27), (12, 12), (16, 16)])
def test_v_min_holds_about_a_third_of_1f1bs_peak_in_the_simulator(P, M):
    """The same 2P-layer model: 1F1B on P stages of 2 layers, V-Min on 2P stages of 1; saved bytes only."""
    saved = 1000.0
    prof = uniform_profile(2 * P, 1e-3, 2e-3, act=0.0, params=0.0, saved=saved)
    vmin = peak_memory(generate(make_spec("v-min", P, M)), prof)
    one = peak_memory(generate(make_spec("1f1b", P, M)), prof, stage_layers=[(2 * s, 2 * s + 1) for s in range(P)])
    assert max(one.values()) == pytest.approx(min(P, M) * 2 * saved)
    whole = (P + 4) // 3  # the paper's (p + 4) // 3
    assert max(vmin.values()) == pytest.approx(min(M, whole) * 2 * saved)
    if M >= P:  # a full pipe: a third of 1F1B's simulated peak, plus at most 4/3 of a microbatch
        assert max(vmin.values()) <= max(one.values()) / 3 + 4 / 3 * 2 * saved + 1e-9


@pytest.mark.parametrize("P", [1, 2, 3, 4, 6, 7, 12])
def test_the_shortest_blocks_lifespans_set_the_peak_a_rank_holds(P):
    got = measured_bounds(generate(make_spec("v-min", P, 3 * P + 6)))["awaiting_weight_grad"]
    assert got == lifespan_overlap(P, 1)


@pytest.mark.parametrize("family,whole,bubble", [("v-half", lambda P: (P + 2) // 2, half_bubble),
                                                  ("v-min", lambda P: (P + 4) // 3, closed_form_bubble)])
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(P=st.integers(1, 10), extra=st.integers(-9, 12), batches=st.integers(1, 2))
def test_each_v_family_meets_its_closed_form_and_its_memory_bound(family, whole, bubble, P, extra, batches):
    """Held microbatch-chunks never exceed the paper's count (nor the batch); a full pipe's makespan is the closed form."""
    M = max(1, P + extra)
    prog = generate(make_spec(family, P, M, batches=batches))
    held = measured_bounds(prog)["awaiting_weight_grad"]
    assert max(held.values()) <= min(2 * M, 2 * whole(P))
    if M >= P and batches == 1:
        assert makespan_s(dry_run(prog, U)) == pytest.approx(3 * M + bubble(P))


@pytest.mark.parametrize("P,M", [(3, 3), (4, 16), (6, 24), (8, 8), (16, 64)])
def test_v_min_idles_about_two_thirds_as_long_as_1f1b(P, M):
    one = _bubble("1f1b", P, M)
    assert one == pytest.approx(3 * (P - 1))
    assert 0.55 * one <= _bubble("v-min", P, M) <= 0.72 * one


@pytest.mark.parametrize("family,up_offset", [("v-half", 2), ("v-min", 1)])
def test_a_rank_holding_more_than_its_blocks_count_is_rejected_naming_the_forward(family, up_offset):
    """Mutation: defer one rank's weight gradients until after its last forward; check names the first forward
    that takes the rank past the family's cap (a·2P + b microbatch-chunks awaiting BW, from the registry)."""
    from planner.check import ProgramError, open_cap
    from planner.program import Kind
    from planner.schedules import _v_repeat, lower, stage_workers

    P, M = 6, 12
    spec = make_spec(family, P, M)
    order = _v_repeat(spec, up_offset)
    acts = order[0]
    last_f = max(i for i, a in enumerate(acts) if a.kind is Kind.F)
    order[0] = ([a for a in acts[:last_f + 1] if a.kind is not Kind.BW] + [a for a in acts[:last_f + 1] if a.kind is Kind.BW]
                + acts[last_f + 1:])
    with pytest.raises(ProgramError, match="await their weight gradient") as err:
        lower(spec, stage_workers(spec), order)
    cap = open_cap(generate(spec))
    assert f"allows {cap}" in str(err.value) and f"{cap + 1} microbatches" in str(err.value)
    where = str(err.value).split(":")[0]  # e.g. "w0[40] 0F7": a forward on rank 0
    assert where.startswith("w0[") and where.split()[1].split("F")[1].isdigit()
