"""Interleaved 1F1B for any M: Megatron's order when P divides M, groups of about P microbatches otherwise.

The closed form (P − 1)(tF + tB)/V of the bubble holds whenever P divides M; for any
other M the schedule is deadlock-free, keeps every law and never idles more than
plain 1F1B. torch (2.5+) relaxes M % P == 0 the same way (groups of M / rounds).
"""
from __future__ import annotations

import pytest

from planner.check import UnitCosts, check, dry_run
from planner.schedules import generate, interleaved_groups, make_spec
from planner.trace import makespan_s

U = UnitCosts(f=1, b=2)


@pytest.mark.parametrize("P,M", [(4, 4), (4, 8), (4, 5), (4, 7), (4, 9), (4, 13), (3, 10), (8, 17), (2, 3), (4, 1)])
def test_groups_cover_the_batch_with_at_least_p_each_when_m_allows(P, M):
    g = interleaved_groups(P, M)
    assert sum(g) == M and max(g) - min(g) <= 1
    assert min(g) >= min(P, M)
    if M % P == 0:
        assert g == [P] * (M // P)


@pytest.mark.parametrize("P,M,V", [(4, 5, 2), (4, 6, 2), (4, 7, 3), (4, 9, 2), (4, 13, 2), (3, 10, 4), (8, 17, 2),
                                   (8, 25, 3), (16, 33, 2), (2, 3, 2), (4, 2, 2), (5, 1, 3)])
def test_any_m_is_deadlock_free_and_idles_no_more_than_1f1b(P, M, V):
    prog = generate(make_spec("interleaved", P, M, chunks=V))
    check(prog)
    bubble = makespan_s(dry_run(prog, U)) - 3 * M
    assert bubble <= 3 * (P - 1) + 1e-9
    if M >= P:
        assert bubble < 3 * (P - 1)  # the chunks still shorten the fill and drain


@pytest.mark.parametrize("P,M,V", [(4, 12, 2), (8, 16, 3), (16, 32, 2), (3, 9, 4)])
def test_multiples_of_p_keep_the_one_vth_bubble(P, M, V):
    bubble = makespan_s(dry_run(generate(make_spec("interleaved", P, M, chunks=V)), U)) - 3 * M
    assert bubble == pytest.approx(3 * (P - 1) / V)
