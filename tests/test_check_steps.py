"""The law *every stage steps*: every update point a worker owes has one STEP, after what it covers.

A worker owes stage s a step for every batch in which it runs a weight gradient of s (flush families and
2BW), for every backward in PipeDream's stream (round k: minibatch k·R + r), and for every round it
all-reduces. Mutations of generated programs of every family, and of programs imported from torch's
schedules (whose CSVs carry no STEP: the lowering adds them), must be refused naming the stage, the
worker and the round; the test works out which update point it broke from the mutation itself.
"""
from __future__ import annotations

import json

import pytest

from planner.check import ProgramError, check
from planner.families import FAMILIES, FAMILY, ScheduleError
from planner.program import Action, Kind, Program
from planner.schedulespec import chunks_for
from planner.schedules import REQUIRES, generate, make_spec


def _specs(name: str):
    """Small specs of the family with two batches where it has batches, and replicas where it takes them
    (PipeDream with M = 5 over two replicas: replica 1 joins the last round with no minibatch of its own)."""
    fam = FAMILY[name]
    if fam.multi_stage:
        V = chunks_for(name, 2)
        shapes = [(2, 8, (2,) * (2 * V)), (3, 6, (1,) * (3 * V)), (4, 8, (1,) * (4 * V))]
        cands = [make_spec(name, P, M, reps if fam.replicable else (1,) * len(reps), chunks=V, batches=2)
                 for P, M, reps in shapes]
    elif fam.batched:
        cands = [make_spec(name, 3, 5, (2, 1, 1), batches=2), make_spec(name, 4, 8, batches=2)]
    else:
        cands = [make_spec(name, 3, 5, (2, 1, 1)), make_spec(name, 3, 6, (2, 2, 2), vertical_sync=True)]
    out = []
    for spec in cands:
        try:
            REQUIRES.get(name, lambda s: None)(spec)
            out.append(generate(spec))
        except ScheduleError:
            continue
    assert out, f"no small spec generates {name}"
    return out


def _steps(prog: Program):
    return [(w, i, a) for w in prog.workers for i, a in enumerate(prog[w]) if a.kind is Kind.STEP]


def _without(prog: Program, w: int, i: int) -> Program:
    acts = list(prog[w])
    del acts[i]
    return prog.with_actions({**prog.actions, w: acts})


def _owed_by(prog: Program, w: int, step: Action) -> int:
    """Index on ``w`` of the last action that owes ``step``'s update point: a weight gradient of its round
    (its batch, or PipeDream's minibatch k·R + r) or the round's all-reduce."""
    s, k = step.stage, step.mb
    R = len(prog.stage_workers[s])
    last = None
    for i, a in enumerate(prog[w]):
        if a.stage != s:
            continue
        if a.kind in (Kind.B, Kind.BW):
            rnd = a.mb // prog.spec.microbatches if prog.spec.traits.batched else a.mb // R
            last = i if rnd == k else last
        elif a.kind is Kind.ALLREDUCE and a.mb == k:
            last = i
    return last


@pytest.mark.parametrize("family", FAMILIES)
def test_deleting_any_step_is_refused_naming_its_stage_and_round(family):
    for prog in _specs(family):
        steps = _steps(prog)
        # every holder of every stage steps once per update point it owes
        per = {}
        for w, _, a in steps:
            per.setdefault((w, a.stage), []).append(a.mb)
        for s, ws in enumerate(prog.stage_workers):
            for w in ws:
                rounds = prog.spec.batches if prog.spec.traits.batched else -(-prog.spec.microbatches // len(ws))
                assert sorted(per[(w, s)]) == list(range(rounds)), (family, w, s)
        for w, i, a in steps:
            with pytest.raises(ProgramError) as err:
                check(_without(prog, w, i))
            e = err.value
            what = f"batch {a.mb}" if prog.spec.traits.batched else f"round {a.mb}"
            assert f"stage {a.stage} never steps for {what} on w{w}" in str(e), str(e)
            assert (e.worker, e.index) == (w, _owed_by(prog, w, a))
            assert str(Action(a.stage, Kind.STEP, a.mb, version=a.mb + 1)) in str(e)  # what to add


@pytest.mark.parametrize("family", FAMILIES)
def test_a_second_step_or_a_step_with_no_gradient_is_refused(family):
    prog = _specs(family)[0]
    w, i, a = _steps(prog)[-1]
    acts = list(prog[w])
    twice = prog.with_actions({**prog.actions, w: acts[:i + 1] + [a] + acts[i + 1:]})
    with pytest.raises(ProgramError, match=f"stage {a.stage} steps twice for round {a.mb}"):
        check(twice)
    k = a.mb + 1  # a round past the last: this worker computes no gradient of it
    extra = prog.with_actions({**prog.actions, w: acts + [Action(a.stage, Kind.STEP, k, version=a.version + 1)]})
    with pytest.raises(ProgramError, match=f"stage {a.stage} steps for round {k} on w{w}, which computes"):
        check(extra)


def test_a_program_file_without_its_last_step_is_one_line_exit_2(tmp_path, capsys):
    from pipetwin.cli import main

    prog = generate(make_spec("1f1b", 2, 4, batches=2))
    w, i, a = _steps(prog)[-1]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_without(prog, w, i).to_json()))
    code = main(["simulate", "--program", str(path), "--model", "uniform:layers=2,fwd=1e-3,bwd=2e-3",
                 "--topology", "ideal:2"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"stage {a.stage} never steps for batch 1 on w{w}" in err


def test_programs_imported_from_torch_step_every_stage_once():
    """torch's CSVs carry no STEP (the user's loop steps after the schedule): the import lowers them with one
    STEP per stage holder after its last weight gradient, and loses the law's protection on none of them."""
    pytest.importorskip("torch")
    from planner.torch_interop import program_from_torch, read_torch_csv
    from tests.torch_schedules import TORCH_SCHEDULES, order_csv, torch_schedule

    imported = 0
    for name in TORCH_SCHEDULES:
        sch = torch_schedule(name, 4, 8)
        if sch is None or name == "1F1B":  # torch's own validator refuses its 1F1B IR (test_torch_interop)
            continue
        prog = program_from_torch(read_torch_csv(order_csv(sch.pipeline_order)))
        imported += 1
        for w in prog.workers:
            for s in prog.stages_of(w):
                wg = [i for i, a in enumerate(prog[w]) if a.stage == s and a.kind in (Kind.B, Kind.BW)]
                st = [i for i, a in enumerate(prog[w]) if a.stage == s and a.kind is Kind.STEP]
                assert len(st) == 1 and st[0] > max(wg), (name, w, s)
                with pytest.raises(ProgramError, match=f"stage {s} never steps for batch 0 on w{w}"):
                    check(_without(prog, w, st[0]))
    assert imported >= 5
