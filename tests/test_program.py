"""The program IR prints compactly and parses back; programs survive JSON and CSV."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from planner.program import Action, Kind, Program
from planner.schedules import generate, make_spec


@pytest.mark.parametrize("text,expect", [
    ("2F0", Action(2, Kind.F, 0)),
    ("1B7v3", Action(1, Kind.B, 7, 3)),
    ("0BI4", Action(0, Kind.BI, 4)),
    ("3BW12v1", Action(3, Kind.BW, 12, 1)),
    ("0SEND3a>w1", Action(0, Kind.SEND, 3, peer=1)),
    ("1RECV3g<w2", Action(1, Kind.RECV, 3, peer=2, grad=True)),
    ("0ALLREDUCE2", Action(0, Kind.ALLREDUCE, 2)),
    ("0STEP2v3", Action(0, Kind.STEP, 2, 3)),
])
def test_action_prints_and_parses_back(text, expect):
    assert Action.parse(text) == expect
    assert str(expect) == text


@given(st.integers(0, 99), st.sampled_from(list(Kind)), st.integers(0, 999), st.integers(0, 50),
       st.integers(0, 63), st.booleans())
def test_any_action_round_trips(stage, kind, mb, version, peer, grad):
    comm = kind in (Kind.SEND, Kind.RECV)
    a = Action(stage, kind, mb, version, peer if comm else None, grad if comm else False)
    assert Action.parse(str(a)) == a
    assert Action.from_json(json.loads(json.dumps(a.to_json()))) == a


@pytest.mark.parametrize("bad", ["", "F0", "2X0", "0SEND3", "0F3a>w1", "0RECV1a>w2"])
def test_malformed_action_text_is_refused(bad):
    with pytest.raises(ValueError):
        Action.parse(bad)


def test_program_round_trips_through_json_and_csv():
    p = generate(make_spec("pipedream", 3, 8, replicas=(2, 1, 1)))
    q = Program.from_json(json.loads(json.dumps(p.to_json())))
    assert q.actions == p.actions and q.spec == p.spec and q.stage_workers == p.stage_workers
    r = p.with_csv(p.to_csv())
    assert {w: [str(a) for a in acts] for w, acts in r.actions.items()} == {w: [str(a) for a in acts] for w, acts in p.actions.items()}


def test_grid_marks_one_action():
    p = generate(make_spec("1f1b", 2, 2))
    g = p.grid(mark=(1, 1))
    assert f">>{p[1][1]}<<" in g and g.count(">>") == 1


def _bad_program(mutate) -> dict:
    d = json.loads(json.dumps(generate(make_spec("1f1b", 2, 2)).to_json()))
    mutate(d)
    return d


@pytest.mark.parametrize("mutate,names", [
    (lambda d: d.__setitem__("spec", 3), "program.spec"),
    (lambda d: d.pop("stage_workers"), "program.stage_workers is missing"),
    (lambda d: d.__setitem__("stage_workers", [3, [1]]), "program.stage_workers"),
    (lambda d: d["workers"]["0"][0].__setitem__("kind", "ZZ"), "program.workers.0[0].kind"),
    (lambda d: d["workers"]["1"][0].__setitem__("mb", "x"), "program.workers.1[0].mb"),
    (lambda d: d["workers"].__setitem__("w0", []), "program.workers"),
    (lambda d: d["spec"].pop("family"), "program.spec.family is missing"),
])
def test_a_malformed_program_document_names_the_field_in_one_line(mutate, names):
    """Program.from_json says which field is wrong and what it expects, never a Python internal
    ('int' object is not subscriptable, a bare KeyError, 'ZZ' is not a valid Kind)."""
    from planner.programfile import ProgramFileError

    with pytest.raises(ProgramFileError) as e:
        Program.from_json(_bad_program(mutate))
    msg = str(e.value)
    assert names in msg and "expected" in msg and "\n" not in msg, msg
    assert "subscriptable" not in msg and "valid Kind" not in msg and "object" not in msg.split("expected")[0]


@pytest.mark.parametrize("family,R,batches", [("pipedream", 1, 1), ("pipedream", 2, 1), ("pipedream", 3, 1),
                                              ("1f1b", 2, 2), ("gpipe", 1, 3), ("2bw", 2, 3), ("zb-h1", 1, 2)])
def test_a_weight_gradients_round_is_the_step_that_follows_it_on_its_worker(family, R, batches):
    """Program.round_of, the one round rule, against the program itself: every B or BW of a stage on a worker
    joins the round of that stage's next STEP there (a batch; PipeDream: the replica's k-th minibatch, round k)."""
    prog = generate(make_spec(family, 2, 6, replicas=(R, R), batches=batches))
    checked = 0
    for w in prog.workers:
        pending: dict[int, list] = {}
        for a in prog[w]:
            if a.kind in (Kind.B, Kind.BW):
                pending.setdefault(a.stage, []).append(a)
            elif a.kind is Kind.STEP:
                for b in pending.pop(a.stage, []):
                    assert prog.round_of(b.stage, b.mb) == a.mb, (w, b, a)
                    checked += 1
    assert checked == 2 * prog.spec.total_microbatches  # every weight gradient of both stages was checked
