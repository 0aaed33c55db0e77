"""Measure, plan, run: a plan made from `pipetwin profile`'s JSON runs the model that was profiled.

`plan --model out/profile.json` writes the profile's path as the plan's model (``simulate --plan`` reads the
costs from it); `run --plan` builds the model the profile names. Truth: the final weights of the two gloo
ranks equal the single-process reference trainer of the same plan on that model.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from executor.reference import reference_weights
from pipetwin.cli import main
from planner.plan import Plan
from tests.test_executor_parity import _assert_weights_equal

MODEL = "mlp:layers=4,width=8"


@pytest.mark.dist
@pytest.mark.timeout(90)
def test_a_plan_of_a_measured_profile_runs_the_profiled_model(tmp_path, capsys):
    profile, plan_path, weights = tmp_path / "profile.json", tmp_path / "plan.json", tmp_path / "w.pt"
    assert main(["profile", "--model", MODEL, "--repeats", "1", "-o", str(profile)]) == 0
    assert main(["plan", "--model", str(profile), "--topology", "local:2", "--stages", "2", "--schedule", "1f1b",
                 "-o", str(plan_path)]) == 0
    plan = Plan.load(plan_path)
    assert plan.model == str(profile) and len(plan.stages) == 2
    capsys.readouterr()
    assert main(["run", "--plan", str(plan_path), "--dtype", "float64", "--timeout", "20",
                 "--save-weights", str(weights), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["throughput_samples_per_s"] > 0
    _assert_weights_equal(torch.load(weights), reference_weights(replace(plan, model=MODEL), dtype="float64"))
