"""Each lowering pass alone, on hand-written action dicts whose expected output is written out by hand.

Also hand-written programs the generators never emit: two adjacent stages on one rank,
M not a multiple of P, a single stage.
"""
from __future__ import annotations

import pytest

from planner.check import ProgramError, UnitCosts, check, dry_run
from planner.families import FAMILIES, FAMILY, ScheduleError, rank_of
from planner.program import Action, Kind, Program
from planner.schedulespec import make_spec, stage_workers, validate_spec
from planner.schedules import add_communication, add_steps, add_versions, generate
from planner.trace import makespan_s


def acts(text: str) -> list[Action]:
    return [Action.parse(t) for t in text.split()]


def strs(d: dict[int, list[Action]]) -> dict[int, str]:
    return {w: " ".join(map(str, a)) for w, a in d.items()}


# --- add_steps ------------------------------------------------------------------------
def test_add_steps_puts_one_step_after_each_batchs_last_backward():
    spec = make_spec("1f1b", 1, 2, batches=2)
    out = add_steps(spec, ((0,),), {0: acts("0F0 0F1 0B0 0B1 0F2 0B2 0F3 0B3")})
    assert strs(out) == {0: "0F0 0F1 0B0 0B1 0STEP0v1 0F2 0B2 0F3 0B3 0STEP1v2"}


def test_add_steps_all_reduces_a_replicated_stage_before_its_step():
    spec = make_spec("gpipe", 1, 2, replicas=(2,))
    out = add_steps(spec, ((0, 1),), {0: acts("0F0 0B0"), 1: acts("0F1 0B1")})
    assert strs(out) == {0: "0F0 0B0 0ALLREDUCE0 0STEP0v1", 1: "0F1 0B1 0ALLREDUCE0 0STEP0v1"}


def test_add_steps_for_pipedream_steps_after_every_backward_and_pads_short_replicas():
    spec = make_spec("pipedream", 1, 3, replicas=(2,))
    out = add_steps(spec, ((0, 1),), {0: acts("0F0 0B0 0F2 0B2"), 1: acts("0F1 0B1")})
    assert strs(out) == {0: "0F0 0B0 0ALLREDUCE0 0STEP0v1 0F2 0B2 0ALLREDUCE1 0STEP1v2",
                         1: "0F1 0B1 0ALLREDUCE0 0STEP0v1 0ALLREDUCE1 0STEP1v2"}


def test_add_steps_after_the_weight_gradient_when_the_backward_is_split():
    spec = make_spec("zb-h1", 1, 2)
    out = add_steps(spec, ((0,),), {0: acts("0F0 0F1 0BI0 0BI1 0BW0 0BW1")})
    assert strs(out) == {0: "0F0 0F1 0BI0 0BI1 0BW0 0BW1 0STEP0v1"}


# --- add_versions ---------------------------------------------------------------------
def test_add_versions_flush_uses_the_batch_index():
    spec = make_spec("1f1b", 1, 1, batches=2)
    out = add_versions(spec, {0: acts("0F0 0B0 0STEP0v1 0F1 0B1 0STEP1v2")})
    assert strs(out) == {0: "0F0 0B0 0STEP0v1 0F1v1 0B1v1 0STEP1v2"}


def test_add_versions_2bw_is_one_batch_stale():
    spec = make_spec("2bw", 1, 1, batches=3)
    out = add_versions(spec, {0: acts("0F0 0B0 0STEP0v1 0F1 0B1 0STEP1v2 0F2 0B2 0STEP2v3")})
    assert strs(out) == {0: "0F0 0B0 0STEP0v1 0F1 0B1 0STEP1v2 0F2v1 0B2v1 0STEP2v3"}


def test_add_versions_pipedream_stashes_the_forwards_version_for_its_backward():
    spec = make_spec("pipedream", 1, 3)
    out = add_versions(spec, {0: acts("0F0 0F1 0B0 0STEP0v1 0F2 0B1 0STEP1v2 0B2 0STEP2v3")})
    assert strs(out) == {0: "0F0 0F1 0B0 0STEP0v1 0F2v1 0B1 0STEP1v2 0B2v1 0STEP2v3"}


# --- add_communication ----------------------------------------------------------------
def test_add_communication_brackets_compute_with_receives_and_sends():
    spec = make_spec("gpipe", 2, 1)
    out = add_communication(spec, ((0,), (1,)), {0: acts("0F0 0B0"), 1: acts("1F0 1B0")}, lambda s: 10)
    assert strs(out) == {0: "0F0 0SEND0a>w1 0RECV0g<w1 0B0", 1: "1RECV0a<w0 1F0 1B0 1SEND0g>w0"}
    assert {a.nbytes for a in out[0] if a.kind in (Kind.SEND, Kind.RECV)} == {10}


def test_add_communication_sends_nothing_between_two_stages_on_one_worker():
    spec = make_spec("interleaved", 1, 1, chunks=2)
    out = add_communication(spec, ((0,), (0,)), {0: acts("0F0 1F0 1B0 0B0")})
    assert strs(out) == {0: "0F0 1F0 1B0 0B0"}


def test_add_communication_routes_split_backward_gradients_from_the_input_half():
    spec = make_spec("zb-h1", 2, 1)
    out = add_communication(spec, ((0,), (1,)), {0: acts("0F0 0BI0 0BW0"), 1: acts("1F0 1BI0 1BW0")})
    assert strs(out) == {0: "0F0 0SEND0a>w1 0RECV0g<w1 0BI0 0BW0", 1: "1RECV0a<w0 1F0 1BI0 1SEND0g>w0 1BW0"}


# --- placement and shared checks ------------------------------------------------------
def test_looped_and_v_placements():
    assert stage_workers(make_spec("interleaved", 3, 3, chunks=2)) == ((0,), (1,), (2,), (0,), (1,), (2,))
    v = [f for f in FAMILY.values() if f.placement == "v"]
    for fam in v:
        P = 4
        ranks = [rank_of(fam, P, s) for s in range(2 * P)]
        assert ranks == [0, 1, 2, 3, 3, 2, 1, 0]  # rank r holds r and 2P − 1 − r


@pytest.mark.parametrize("name", FAMILIES)
def test_every_registered_family_has_an_order_and_generates_a_checked_program(name):
    from planner.schedules import ORDERS

    assert name in ORDERS
    fam = FAMILY[name]
    P, M = 3, 6
    prog = generate(make_spec(name, P, M, chunks=2 if fam.placement == "looped" else 1))
    # looped families run chunks=2 here; V families carry their own two stages per rank
    assert len(prog.stage_workers) == (P * (fam.chunks or 2) if fam.multi_stage else P)


def test_unknown_family_is_refused_with_the_choices():
    with pytest.raises(ScheduleError, match="choose one of"):
        validate_spec(make_spec("zigzag", 2, 2))


# --- hand-written programs --------------------------------------------------------------
def _program(family, stages, mbs, sw, text: dict[int, str]) -> Program:
    spec = make_spec(family, stages, mbs)
    return Program(spec, sw, {w: acts(t) for w, t in text.items()})


def test_a_hand_written_single_stage_program_checks_and_runs():
    p = _program("1f1b", 1, 3, ((0,),), {0: "0F0 0B0 0F1 0B1 0F2 0B2 0STEP0v1"})
    check(p)
    assert makespan_s(dry_run(p, UnitCosts(f=1, b=2))) == 9


def test_a_hand_written_program_with_m_not_a_multiple_of_p():
    p = _program("1f1b", 2, 3, ((0,), (1,)), {
        0: "0F0 0SEND0a>w1 0F1 0SEND1a>w1 0RECV0g<w1 0B0 0F2 0SEND2a>w1 0RECV1g<w1 0B1 0RECV2g<w1 0B2 0STEP0v1",
        1: "1RECV0a<w0 1F0 1B0 1SEND0g>w0 1RECV1a<w0 1F1 1B1 1SEND1g>w0 1RECV2a<w0 1F2 1B2 1SEND2g>w0 1STEP0v1"})
    check(p)
    assert makespan_s(dry_run(p, UnitCosts(f=1, b=2))) == (3 + 2 - 1) * 3


def test_two_adjacent_stages_on_one_rank_need_no_messages_between_them():
    # stages 1 and 2 both on worker 1 (a V's turn): 0 -> 1 -> 1 -> 0
    spec = make_spec("interleaved", 2, 2, chunks=2)
    sw = ((0,), (1,), (1,), (0,))
    p = Program(spec, sw, {
        0: acts("0F0 0SEND0a>w1 0F1 0SEND1a>w1 3RECV0a<w1 3F0 3B0 3SEND0g>w1 3RECV1a<w1 3F1 3B1 3SEND1g>w1 "
                "0RECV0g<w1 0B0 0RECV1g<w1 0B1 0STEP0v1 3STEP0v1"),
        1: acts("1RECV0a<w0 1F0 2F0 2SEND0a>w0 1RECV1a<w0 1F1 2F1 2SEND1a>w0 2RECV0g<w0 2B0 1B0 1SEND0g>w0 "
                "2RECV1g<w0 2B1 1B1 1SEND1g>w0 1STEP0v1 2STEP0v1")})
    check(p)
    t = dry_run(p, UnitCosts(f=1, b=2))
    # by hand, in units of a chunk's forward (a chunk of V=2 costs f/2, b/2 at unit costs):
    # w1 1F0 2F0 [1,3], 1F1 2F1 [3,5]; w0 3F0 3B0 [3,6], 3F1 3B1 [6,9];
    # w1 2B0 1B0 [6,10], 2B1 1B1 [10,14]; w0 0B0 [10,12], 0B1 [14,16] -> 16 half-units
    assert makespan_s(t) == 16 / 2
    broken = p.with_actions({**p.actions, 1: [a for a in p[1] if str(a) != "2F1"]})
    with pytest.raises(ProgramError, match="missing 2F1"):
        check(broken)
