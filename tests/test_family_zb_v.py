"""ZB-V (Qi et al., Pipeline Parallelism with Controllable Memory, 2024): V placement, closed form, memory.

Rank r holds stages r and 2P − 1 − r, each half of a 1F1B stage (so a chunk's F, BI
and BW cost half of tF, tBI, tBW). The forward runs down the ranks and back up, so
rank 0 holds both the first and the last stage and starts backwards as soon as a
microbatch has crossed the V. At tF = tBI = tBW = 1 the only idle time left is rank
P − 1 waiting for its first input, (P − 1)·tF/2: the makespan is 3M + (P − 1)/2 once
M ≥ 2P (smaller M leave the critical path longer than the work). Every rank holds
at most 2P half-stage microbatches: 1F1B's peak (P whole-stage microbatches on its
first stage), spread evenly instead of piled on stage 0.
"""
from __future__ import annotations

import pytest

from planner.check import UnitCosts, dry_run
from planner.profile import uniform_profile
from planner.schedules import generate, make_spec
from planner.trace import makespan_s
from sim.engine import peak_memory

U = UnitCosts(f=1, b=2, bi=1, bw=1)


def test_zb_v_places_rank_r_on_stages_r_and_2p_minus_1_minus_r():
    P = 4
    prog = generate(make_spec("zb-v", P, 8))
    assert prog.stage_workers == tuple((min(s, 2 * P - 1 - s),) for s in range(2 * P))
    for r in range(P):
        assert {a.stage for a in prog[r] if a.is_compute} == {r, 2 * P - 1 - r}


@pytest.mark.parametrize("P,M", [(1, 1), (1, 5), (2, 4), (2, 7), (3, 6), (4, 8), (4, 13), (4, 16), (8, 16), (8, 25),
                                 (8, 32), (16, 32), (16, 49), (16, 64)])
def test_zb_v_makespan_is_3m_plus_half_a_forward_per_rank_of_fill(P, M):
    assert makespan_s(dry_run(generate(make_spec("zb-v", P, M)), U)) == pytest.approx(3 * M + (P - 1) / 2)


@pytest.mark.parametrize("P,M", [(2, 2), (4, 4), (8, 8), (16, 16), (8, 12)])
def test_zb_v_is_never_slower_than_zb_h1_or_1f1b(P, M):
    v = makespan_s(dry_run(generate(make_spec("zb-v", P, M)), U))
    assert v <= makespan_s(dry_run(generate(make_spec("zb-h1", P, M)), U)) + 1e-9
    assert v <= makespan_s(dry_run(generate(make_spec("1f1b", P, M)), U)) + 1e-9


@pytest.mark.parametrize("P,M", [(2, 8), (4, 4), (4, 16), (8, 8), (8, 32), (16, 33)])
def test_zb_v_peak_activation_memory_is_within_1f1bs_on_every_rank_in_the_simulator(P, M):
    """The same 2P-layer model: 1F1B on P stages of 2 layers, ZB-V on 2P stages of 1 layer.

    Saved-activation bytes only (no parameters, no boundary tensors), so the simulator's peak per
    worker is the activation memory. Every ZB-V rank stays within 1F1B's peak (its first stage's).
    """
    saved = 1000.0
    prof = uniform_profile(2 * P, 1e-3, 2e-3, act=0.0, params=0.0, saved=saved)
    v = peak_memory(generate(make_spec("zb-v", P, M)), prof)
    one = peak_memory(generate(make_spec("1f1b", P, M)), prof, stage_layers=[(2 * s, 2 * s + 1) for s in range(P)])
    assert max(one.values()) == pytest.approx(min(P, M) * 2 * saved)
    for r in range(P):
        assert v[r] <= max(one.values()) + 1e-9
