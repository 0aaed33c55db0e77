"""The dry run reproduces each family's closed form exactly (unit costs, free communication)."""
from __future__ import annotations

import pytest

from planner.check import UnitCosts, dry_run
from planner.program import Action, Kind
from planner.schedules import generate, make_spec
from planner.trace import bubble_fraction, makespan_s, worker_events

SIZES = [(1, 1), (2, 1), (2, 4), (3, 7), (4, 8), (8, 8), (8, 32), (16, 64), (5, 3)]


@pytest.mark.parametrize("family", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", SIZES)
@pytest.mark.parametrize("tf,tb", [(1.0, 2.0), (1.0, 1.0), (0.5, 1.5)])
def test_gpipe_and_1f1b_makespan_and_bubble_match_closed_form(family, P, M, tf, tb):
    t = dry_run(generate(make_spec(family, P, M)), UnitCosts(f=tf, b=tb))
    assert makespan_s(t) == pytest.approx((M + P - 1) * (tf + tb), abs=1e-12)
    assert bubble_fraction(t) == pytest.approx((P - 1) / (M + P - 1), abs=1e-12)


@pytest.mark.parametrize("P,M,V", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (4, 16, 3), (8, 16, 2), (3, 9, 4), (4, 4, 2)])
def test_interleaved_bubble_is_one_vth_of_1f1b(P, M, V):
    tf, tb = 1.0, 2.0
    t = dry_run(generate(make_spec("interleaved", P, M, chunks=V)), UnitCosts(f=tf, b=tb))
    bubble_time = makespan_s(t) - M * (tf + tb)
    assert bubble_time == pytest.approx((P - 1) * (tf + tb) / V, abs=1e-12)


@pytest.mark.parametrize("P,M", [(2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 24), (16, 32), (6, 7)])
def test_zb_h1_bubble_is_a_third_of_1f1b(P, M):
    u = UnitCosts(f=1, b=2, bi=1, bw=1)
    zb = makespan_s(dry_run(generate(make_spec("zb-h1", P, M)), u)) - 3 * M
    one = makespan_s(dry_run(generate(make_spec("1f1b", P, M)), u)) - 3 * M
    assert one == pytest.approx(3 * (P - 1))
    assert zb == pytest.approx(one / 3)


@pytest.mark.parametrize("P,M", [(2, 16), (4, 32), (8, 64), (3, 40)])
def test_pipedream_has_no_bubbles_once_the_pipeline_is_full(P, M):
    """Between the first backward and the last forward, every worker is busy all the time."""
    t = dry_run(generate(make_spec("pipedream", P, M)), UnitCosts(f=1, b=2))
    for w, evs in worker_events(t).items():
        comp = sorted((e for e in evs if e.is_compute), key=lambda e: e.start_s)
        first_b = next(i for i, e in enumerate(comp) if e.kind == "B")
        last_f = max(i for i, e in enumerate(comp) if e.kind == "F")
        for a, b in zip(comp[first_b:last_f], comp[first_b + 1:last_f + 1]):
            assert b.start_s == pytest.approx(a.end_s)
    # and the stream's steady rate is one minibatch per (tF + tB) on every stage
    ends = sorted(e.end_s for e in t.events if e.kind == "B" and Action.parse(e.action).stage == 0)
    gaps = {round(b - a, 9) for a, b in zip(ends[P:], ends[P + 1:])}
    assert gaps == {3.0}


def test_pipedream_with_replicated_first_stage_keeps_noam_in_flight():
    prog = generate(make_spec("pipedream", 3, 24, replicas=(2, 1, 1)))
    for w in prog.stage_workers[0]:
        cur = peak = 0
        for a in prog[w]:
            cur += a.kind is Kind.F
            cur -= a.kind is Kind.B
            peak = max(peak, cur)
        assert peak == 2  # ceil(4 workers / 2 replicas)


def test_steady_bubble_is_zero_for_pipedream_and_positive_for_flushed_batches():
    from planner.trace import steady_bubble_fraction

    pd = dry_run(generate(make_spec("pipedream", 4, 32)), UnitCosts())
    fl = dry_run(generate(make_spec("1f1b", 4, 8, batches=4)), UnitCosts())
    assert steady_bubble_fraction(pd) == pytest.approx(0.0, abs=1e-12)
    # three flushes inside the window, each idles (P-1)(tF+tB) per worker
    assert steady_bubble_fraction(fl) > 0.2


@pytest.mark.parametrize("P,M", [(2, 32), (4, 64), (8, 64)])
def test_stream_throughput_is_one_minibatch_per_stage_time(P, M):
    from planner.trace import throughput_samples_per_s

    t = dry_run(generate(make_spec("pipedream", P, M)), UnitCosts(f=1, b=2))
    assert throughput_samples_per_s(t) == pytest.approx(1 / 3, rel=1e-9)


def test_flush_throughput_excludes_the_first_batch():
    from planner.trace import throughput_samples_per_s

    P, M = 4, 8
    t = dry_run(generate(make_spec("1f1b", P, M, batches=4)), UnitCosts(f=1, b=2))
    assert throughput_samples_per_s(t) == pytest.approx(M / ((M + P - 1) * 3), rel=1e-9)
