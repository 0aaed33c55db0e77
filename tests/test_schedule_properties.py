"""Hypothesis: the schedule invariants hold for every family, verified independently of check().

Each property recomputes what it claims from the program or from the dry-run
timeline with its own code, then also asserts that check() accepts the program.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from planner.check import UnitCosts, check, dry_run
from planner.families import FAMILIES, FAMILY, ScheduleError
from planner.program import Action, Kind, Program
from planner.schedules import REQUIRES, generate, make_spec

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@st.composite
def specs(draw, family: str):
    fam = FAMILY[family]
    P = draw(st.integers(1, 16))
    if fam.multi_stage:
        V = fam.chunks or draw(st.integers(1, 4))
        R = draw(st.integers(1, 3)) if fam.replicable else 1
        M = draw(st.integers(R, 64))
        spec = make_spec(family, P, M, (R,) * (P * V), chunks=V, batches=draw(st.integers(1, 2)))
        try:  # what the family needs beyond the shared checks
            REQUIRES.get(family, lambda s: None)(spec)
        except ScheduleError:
            assume(False)
        return spec
    replicas = tuple(draw(st.lists(st.integers(1, 4), min_size=P, max_size=P)))
    if family == "pipedream":
        M = draw(st.integers(1, 64))
        vs = draw(st.booleans())
        if vs:
            replicas = (replicas[0],) * P
        return make_spec(family, P, M, replicas, vertical_sync=vs)
    lo = max(replicas)
    if family == "2bw":
        lo = max(math.ceil(sum(replicas[s:]) / replicas[s]) for s in range(P))
        lo = max(lo, max(replicas))
    M = draw(st.integers(lo, max(lo, 64)))
    return make_spec(family, P, M, replicas, batches=draw(st.integers(1, 2)))


def _compute_events(prog: Program):
    """(kind, stage, mb) -> (worker, start, end) from the dry run at F=1, B=2 (BI=BW=1)."""
    trace = dry_run(prog, UnitCosts())
    out = {}
    for e in trace.events:
        if e.is_compute:
            a = Action.parse(e.action)
            out[(a.kind, a.stage, a.mb)] = (e.lane, e.start_s, e.end_s)
    return out


def every_microbatch_runs_once_in_dependency_order_without_deadlock(family, spec, prog):
    ev = _compute_events(prog)  # the dry run raises on deadlock
    S, N = len(prog.stage_workers), spec.total_microbatches
    backward = FAMILY[family].backward  # "mixed": B or BI + BW, per (stage, microbatch)
    n_compute = sum(1 for acts in prog.actions.values() for a in acts if a.is_compute)
    split_at = {(s, i): backward == "split" or (backward == "mixed" and (Kind.BI, s, i) in ev) for s in range(S) for i in range(N)}
    assert n_compute == sum(3 if sp else 2 for sp in split_at.values())
    for s in range(S):
        reps = prog.stage_workers[s]
        for i in range(N):
            split = split_at[(s, i)]
            bwd = Kind.BI if split else Kind.B
            assert (Kind.B, s, i) in ev or split  # a full backward where not split
            wf, f0, f1 = ev[(Kind.F, s, i)]
            wb, b0, b1 = ev[(bwd, s, i)]
            assert wf == wb == reps[i % len(reps)]  # round robin on a worker holding the stage
            assert f1 <= b0  # backward after its own forward
            if s > 0:
                assert ev[(Kind.F, s - 1, i)][2] <= f0  # forward after the previous stage's
            if s < S - 1:
                nxt = Kind.BI if split_at[(s + 1, i)] else Kind.B
                assert ev[(nxt, s + 1, i)][2] <= b0  # backward after the next stage's
            if split:
                assert b1 <= ev[(Kind.BW, s, i)][1]  # BW after BI


def every_send_has_exactly_one_matching_receive(family, spec, prog):
    sends, recvs = [], []
    for w, acts in prog.actions.items():
        for a in acts:
            if a.kind is Kind.SEND:
                sends.append((w, a.peer, a.grad, a.mb, a.stage + (-1 if a.grad else 1)))
            elif a.kind is Kind.RECV:
                recvs.append((a.peer, w, a.grad, a.mb, a.stage))
    assert sorted(sends) == sorted(recvs)
    assert len(set(sends)) == len(sends)


def weight_versions_follow_the_family_rule(family, spec, prog):
    fver = {}
    for acts in prog.actions.values():
        for a in acts:
            if a.kind is Kind.F:
                fver[(a.stage, a.mb)] = a.version
    for w, acts in prog.actions.items():
        steps: dict[int, int] = {}
        live: dict[int, dict[int, int]] = {}
        for a in acts:
            if a.kind is Kind.STEP:
                steps[a.stage] = steps.get(a.stage, 0) + 1
                assert a.version == steps[a.stage]
            if not a.is_compute:
                continue
            assert a.version == fver[(a.stage, a.mb)]  # stashing: backward uses its forward's version
            b = a.mb // spec.microbatches
            if FAMILY[family].versions == "batch":
                assert a.version == b  # one version per batch
            elif FAMILY[family].versions == "stale":
                assert a.version == max(0, b - 1)
            elif spec.vertical_sync:
                assert a.version == fver[(0, a.mb)]
            if a.kind is Kind.F:
                assert a.version <= steps.get(a.stage, 0)  # a version is used only once it exists
                live.setdefault(a.stage, {})[a.mb] = a.version
                held = set(live[a.stage].values()) | {steps.get(a.stage, 0)}
                if FAMILY[family].weight_copies:
                    assert len(held) <= FAMILY[family].weight_copies
                stashed = set(live[a.stage].values())
                assert len(stashed) <= len(live[a.stage])
            elif a.kind in (Kind.B, Kind.BW):
                live[a.stage].pop(a.mb)


def in_flight_microbatches_respect_the_family_bound(family, spec, prog):
    """GPipe holds a whole batch; the 1F1B-bound families a·⌈workers at or after / replicas⌉ + b (P − s for 1F1B)."""
    fam = FAMILY[family]
    if fam.inflight not in ("batch", "1f1b") or fam.versions == "stale":  # 2BW streams across batches
        return
    W = sum(spec.replicas)
    for s, reps in enumerate(prog.stage_workers):
        r = len(reps)
        for rep, w in enumerate(reps):
            cur = peak = 0
            for a in prog[w]:
                if a.stage != s:  # a rank may hold several stages: the bound is per stage
                    continue
                if a.kind is Kind.F:
                    cur += 1
                    peak = max(peak, cur)
                elif a.kind in (Kind.B, Kind.BI):
                    cur -= 1
            if not fam.batched:  # PipeDream: one stream
                mine = len(range(rep, spec.total_microbatches, r))
            else:  # flushed batches: the replica's largest share of one batch
                M = spec.microbatches
                mine = max(sum(1 for i in range(b * M, (b + 1) * M) if i % r == rep) for b in range(spec.batches))
            a, b = fam.inflight_scale  # (1, 0): 1F1B's own limit; (2, -1): ZB-H2's doubled warm-up
            if fam.inflight == "batch":
                assert peak == mine  # all of its microbatches of a batch
            elif r == 1 and all(x == 1 for x in spec.replicas):
                assert peak == min(a * (spec.stages - s) + b, mine)  # P - s
            elif fam.backward == "split":  # list-scheduled: never above the 1F1B bound
                assert peak <= min(a * math.ceil(sum(spec.replicas[s:]) / r) + b, mine)
            else:
                assert peak == min(a * math.ceil(sum(spec.replicas[s:]) / r) + b, mine)
            if not fam.batched and s == 0:
                assert peak == min(math.ceil(W / r), mine)  # PipeDream's NOAM


@pytest.mark.parametrize("family", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_every_generated_program_keeps_every_invariant(family, data):
    """One program per example (generate() also runs check()), held against each invariant above."""
    spec = data.draw(specs(family))
    prog = generate(spec)
    every_microbatch_runs_once_in_dependency_order_without_deadlock(family, spec, prog)
    every_send_has_exactly_one_matching_receive(family, spec, prog)
    weight_versions_follow_the_family_rule(family, spec, prog)
    in_flight_microbatches_respect_the_family_bound(family, spec, prog)


# --- mutations: a broken program is rejected and the error names the action --------------
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_swapping_a_dependent_pair_is_rejected_naming_the_action(family, data):
    prog = generate(data.draw(specs(family)))
    # pairs (i, i+1) on one worker where the second depends on the first
    cands = []
    for w in prog.workers:
        acts = prog[w]
        for i in range(len(acts) - 1):
            a, b = acts[i], acts[i + 1]
            dep = (
                (a.kind is Kind.RECV and b.is_compute and b.mb == a.mb)
                or (a.is_compute and b.kind is Kind.SEND and b.mb == a.mb)
                or (a.kind is Kind.F and b.kind in (Kind.B, Kind.BI) and (a.stage, a.mb) == (b.stage, b.mb))
                or (a.kind is Kind.BI and b.kind is Kind.BW and (a.stage, a.mb) == (b.stage, b.mb))
                or (a.is_compute and b.kind is a.kind and a.stage == b.stage and FAMILY[family].in_order)  # a convention
                or (b.kind is Kind.STEP and a.kind in (Kind.B, Kind.BW, Kind.ALLREDUCE) and a.stage == b.stage)
                or (b.kind is Kind.ALLREDUCE and a.kind in (Kind.B, Kind.BW) and a.stage == b.stage)
                or (a.kind is Kind.STEP and b.is_compute and b.stage == a.stage and b.version >= a.version)
            )
            if dep:
                cands.append((w, i))
    if not cands:
        return
    w, i = data.draw(st.sampled_from(cands))
    acts = list(prog[w])
    acts[i], acts[i + 1] = acts[i + 1], acts[i]
    bad = prog.with_actions({**prog.actions, w: acts})
    with pytest.raises(Exception) as err:
        check(bad)
    assert err.value.worker is not None and err.value.action is not None
    assert str(err.value.action) in str(err.value)


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_dropping_a_send_is_rejected_naming_the_action(family, data):
    prog = generate(data.draw(specs(family)))
    sends = [(w, i) for w in prog.workers for i, a in enumerate(prog[w]) if a.kind is Kind.SEND]
    if not sends:
        return
    w, i = data.draw(st.sampled_from(sends))
    acts = list(prog[w])
    del acts[i]
    with pytest.raises(Exception) as err:
        check(prog.with_actions({**prog.actions, w: acts}))
    assert err.value.action is not None and err.value.action.kind is Kind.RECV


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_changing_a_version_is_rejected_naming_the_action(family, data):
    prog = generate(data.draw(specs(family)))
    comp = [(w, i) for w in prog.workers for i, a in enumerate(prog[w]) if a.is_compute]
    w, i = data.draw(st.sampled_from(comp))
    acts = list(prog[w])
    a = acts[i]
    acts[i] = Action(a.stage, a.kind, a.mb, a.version + data.draw(st.integers(1, 3)), a.peer, a.grad, a.nbytes)
    with pytest.raises(Exception) as err:
        check(prog.with_actions({**prog.actions, w: acts}))
    assert err.value.action is not None
    assert (err.value.action.stage, err.value.action.mb) == (a.stage, a.mb)
