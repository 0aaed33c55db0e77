"""A plan file records the optimizer it was sized for, and ``simulate --plan`` counts that optimizer's state.

Adam keeps two states per parameter, SGD with momentum one: the same plan simulated as Adam peaks one
parameter copy (the worker's stage's parameter bytes) higher on every worker than as SGD. A plan file without
the field (written before it existed) loads as SGD, as it did."""
from __future__ import annotations

import json

import pytest

from pipetwin.cli import main
from planner.costmodel import OPTIMIZER_STATE
from planner.plan import OPTIMIZERS, Plan, PlanError

PARAMS = 1e6
MODEL = f"uniform:layers=4,fwd=1e-3,bwd=2e-3,act=0,params={PARAMS:g}"


def _peaks(capsys, *argv) -> dict:
    assert main(list(argv)) == 0
    return {w: d["peak_memory_bytes"] for w, d in json.loads(capsys.readouterr().out)["per_device"].items()}


def test_the_plan_names_the_cost_models_optimizers():
    assert set(OPTIMIZERS) == set(OPTIMIZER_STATE)


def test_an_adam_plan_file_round_trips_and_is_simulated_with_adams_state(tmp_path, capsys):
    path = tmp_path / "adam.json"
    assert main(["plan", "--model", MODEL, "--topology", "ideal:2", "--optimizer", "adam", "-o", str(path)]) == 0
    capsys.readouterr()
    doc = json.loads(path.read_text())
    assert doc["optimizer"] == "adam"
    plan = Plan.load(path)
    assert plan.optimizer == "adam" and Plan.from_dict(plan.to_dict()) == plan
    del doc["optimizer"]  # a file from before the field: SGD, as it was read then
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    assert Plan.load(old).optimizer == "sgd"
    sim = ["simulate", "--model", MODEL, "--topology", "ideal:2", "--json", "--plan"]
    adam, sgd = _peaks(capsys, *sim, str(path)), _peaks(capsys, *sim, str(old))
    assert _peaks(capsys, *sim, str(path), "--optimizer-state", "1") == sgd  # the flag over the file
    layers = {w: 0 for w in adam}
    for s in plan.stages:
        for d in s.devices:
            layers[str(int(d[1:]))] += s.last_layer - s.first_layer + 1
    for w in adam:
        assert adam[w] - sgd[w] == pytest.approx(layers[w] * PARAMS, rel=1e-9)


def test_an_unknown_optimizer_in_a_plan_is_refused():
    with pytest.raises(PlanError, match="unknown optimizer 'lion'"):
        Plan.from_dict({"model": "m", "stages": [{"layers": [0, 0]}], "optimizer": "lion"})
