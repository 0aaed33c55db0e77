"""DualPipeV (DeepSeek's DualPipe cut in half; torch's ScheduleDualPipeV): V placement, full B mixed with BI/BW.

Rank r holds the down stage r and the up stage 2P − 1 − r, each half of a 1F1B stage.
The steady phase runs DualPipe's two F&B pairs (forward down with full backward up,
forward up with full backward down); the fill and the drain split their backwards so
the weight gradients fill the bubbles. What the family promises, each checked against
an independent truth:

* M ≥ 2P (torch refuses fewer too), with a one-line error naming the fix otherwise;
* at tF = tBI = tBW (a chunk costs half) the only idle time left is the tip's wait for its
  first input, (P − 1) chunk forwards: makespan 3M + (P − 1)/2, ZB-V's. DeepSeek's
  published bubble (PP/2 − 1)(F&B + B − 3W), PP = 2P chunks, counts F&B as one
  overlapped pair; pipetwin runs a pair's two halves in order (torch's runtime does too,
  without an overlap callback), and the published form gives our figure when the pair
  takes B (the forward hidden under the backward): (P − 1)(2·1 − 3·½) = (P − 1)/2;
* torch's own program is the same action order (an OVERLAP_F_B read as its F then its B), so
  its unit-cost dry run is ours;
* a rank holds at most 2P + 1 chunk-microbatches awaiting their weight gradient (DeepSeek's
  PP + 1): 1F1B's peak plus one chunk, the simulator's activation memory says the same;
  one weight copy per stage (the V holds distinct stages; DualPipe's 2× parameters are
  the bidirectional version's two copies, which the V folds away).
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from planner.check import ProgramError, UnitCosts, dry_run, measured_bounds
from planner.families import FAMILY, ScheduleError
from planner.program import Action, Kind
from planner.profile import uniform_profile
from planner.schedules import ORDERS, generate, lower, make_spec, stage_workers
from planner.trace import makespan_s
from sim.engine import peak_memory

U = UnitCosts(f=1, b=2, bi=1, bw=1)


def _published_bubble(P: int, f_and_b: float, b: float, w: float) -> float:
    """DeepSeek's DualPipeV bubble with PP = 2P pipeline stages (chunks)."""
    return (2 * P / 2 - 1) * (f_and_b + b - 3 * w)


@settings(max_examples=200, deadline=None)
@given(P=st.integers(1, 8), extra=st.integers(0, 16))
def test_the_makespan_is_3m_plus_the_tips_fill(P, extra):
    M = 2 * P + extra
    prog = generate(make_spec("dualpipe-v", P, M))
    t = dry_run(prog, U)
    busy: dict[int, float] = {}
    for e in t.events:
        busy[e.lane] = busy.get(e.lane, 0.0) + (e.end_s - e.start_s)
    assert all(v == pytest.approx(3 * M) for v in busy.values())  # every rank does a whole batch's work
    span = makespan_s(t)
    assert span == pytest.approx(3 * M + (P - 1) / 2)
    assert span - 3 * M == pytest.approx(_published_bubble(P, f_and_b=1.0, b=1.0, w=0.5))  # F&B = B: F hidden


@settings(max_examples=200, deadline=None)
@given(P=st.integers(1, 8), extra=st.integers(0, 16))
def test_backwards_are_full_in_the_steady_phase_and_split_in_fill_and_drain(P, extra):
    """Counted from the action lists, per rank.

    Rank r splits k = P − 1 − r up-stage backwards in the fill, r + 1 in the drain's backward pairs and k
    down-stage ones at the end: 2k + r + 1 BIs, each with its BW; the rest are full B.
    """
    M = 2 * P + extra
    prog = generate(make_spec("dualpipe-v", P, M))
    assert measured_bounds(prog)["backward"] == "mixed"
    for r in range(P):
        acts = [a for a in prog[r] if a.is_compute]
        k = P - 1 - r
        n_bi = sum(a.kind is Kind.BI for a in acts)
        assert n_bi == 2 * k + r + 1 == sum(a.kind is Kind.BW for a in acts)
        assert sum(a.kind is Kind.B for a in acts) == 2 * M - n_bi
        for stage in (r, 2 * P - 1 - r):
            backs = [a.mb for a in acts if a.stage == stage and a.kind in (Kind.B, Kind.BI)]
            assert backs == list(range(M))  # each stage's backwards in microbatch order
        cur = peak = 0
        for a in acts:
            cur += a.kind is Kind.F
            cur -= a.kind in (Kind.B, Kind.BW)
            peak = max(peak, cur)
        assert peak <= 2 * P + 1  # DeepSeek's PP + 1
        if r == 0:
            assert peak == 2 * P + 1


@pytest.mark.parametrize("P,M", [(2, 4), (4, 8), (4, 13), (8, 16), (8, 32)])
def test_peak_activation_memory_is_within_one_chunk_of_1f1bs_in_the_simulator(P, M):
    """The same 2P-layer model: 1F1B on P stages of 2 layers, DualPipeV on 2P one-layer chunks (saved bytes only)."""
    saved = 1000.0
    prof = uniform_profile(2 * P, 1e-3, 2e-3, act=0.0, params=0.0, saved=saved)
    dp = peak_memory(generate(make_spec("dualpipe-v", P, M)), prof)
    one = peak_memory(generate(make_spec("1f1b", P, M)), prof, stage_layers=[(2 * s, 2 * s + 1) for s in range(P)])
    assert max(one.values()) == pytest.approx(2 * P * saved)
    assert dp[0] == pytest.approx((2 * P + 1) * saved)
    for r in range(P):
        assert dp[r] <= max(one.values()) + saved + 1e-9


def test_one_weight_copy_and_no_replicas():
    fam = FAMILY["dualpipe-v"]
    assert fam.weight_copies == 1 and fam.placement == "v" and fam.chunks == 2 and not fam.replicable


@pytest.mark.parametrize("P,M", [(2, 3), (4, 7), (8, 1)])
def test_fewer_than_2p_microbatches_are_refused_naming_the_fix(P, M):
    with pytest.raises(ScheduleError, match=f"--microbatches {2 * P}"):
        generate(make_spec("dualpipe-v", P, M))


# --- torch's own program ----------------------------------------------------------------------
torch_schedules = pytest.importorskip("tests.torch_schedules")


@pytest.mark.parametrize("P,M", [(1, 2), (2, 4), (2, 7), (4, 8), (4, 13), (8, 16), (8, 25), (16, 32)])
def test_torchs_program_is_ours_action_for_action(P, M):
    from planner.torch_interop import program_from_torch, read_torch_csv

    sch = torch_schedules.torch_schedule("DualPipeV", P, M, 2)
    theirs = program_from_torch(read_torch_csv(torch_schedules.order_csv(sch.pipeline_order)))
    ours = generate(make_spec("dualpipe-v", P, M))
    assert theirs.actions == ours.actions
    assert makespan_s(dry_run(theirs, U)) == pytest.approx(makespan_s(dry_run(ours, U)))


# --- mutations: the family's cap and the laws of a mixed backward ------------------------------
@pytest.mark.parametrize("P,M", [(1, 2), (2, 4), (4, 8), (8, 19)])
def test_a_forward_past_the_weight_gradient_cap_is_rejected_naming_it(P, M):
    from tests.test_family_interleaved_zb import weight_grad_pushed_past_a_forward_at_the_peak

    spec = make_spec("dualpipe-v", P, M)
    compute = ORDERS["dualpipe-v"](spec)
    w, f = weight_grad_pushed_past_a_forward_at_the_peak(compute, 2 * P + 1)
    with pytest.raises(ProgramError, match="await their weight gradient") as err:
        lower(spec, stage_workers(spec), compute)
    assert err.value.worker == w and (err.value.action.stage, err.value.action.kind, err.value.action.mb) == (f.stage, f.kind, f.mb)


def _first(acts, kind):
    return next(j for j, a in enumerate(acts) if a.kind is kind)


def test_a_full_backward_split_in_place_still_keeps_every_law():
    """Mixed is per (stage, microbatch): B → BI, BW at the same spot is another valid DualPipeV program."""
    spec = make_spec("dualpipe-v", 4, 8)
    compute = ORDERS["dualpipe-v"](spec)
    acts = compute[1]
    j = _first(acts, Kind.B)
    a = acts[j]
    acts[j:j + 1] = [Action(a.stage, Kind.BI, a.mb), Action(a.stage, Kind.BW, a.mb)]
    lower(spec, stage_workers(spec), compute)  # check() runs


def _both_kinds(acts):
    a = acts[_first(acts, Kind.B)]
    acts.append(Action(a.stage, Kind.BW, a.mb))
    return "both a full backward and a split one"


def _bw_dropped(acts):
    bi = acts[_first(acts, Kind.BI)]
    acts.remove(Action(bi.stage, Kind.BW, bi.mb))
    return f"missing {bi.stage}BW{bi.mb}"


@pytest.mark.parametrize("mutate", [_both_kinds, _bw_dropped])
def test_a_mixed_backward_still_needs_one_b_or_one_bi_and_bw_per_microbatch(mutate):
    spec = make_spec("dualpipe-v", 4, 8)
    compute = ORDERS["dualpipe-v"](spec)
    with pytest.raises(ProgramError, match=mutate(compute[2])):
        lower(spec, stage_workers(spec), compute)
