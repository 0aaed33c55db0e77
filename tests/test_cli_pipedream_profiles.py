"""`plan --cost-model pipedream` on a PipeDream profile name: the graph.txt's profiled batch only when the graph is read.

A name such as ``vgg16`` is PipeDream's measured graph.txt where the profiles are on disk, and an analytic
per-sample profile where they are not (a fresh clone without ``../shared/data``). The second must be costed
as the per-sample profile it is, exactly as its analytic twin ``vgg16-analytic``; it was once labelled as
128-sample minibatches, 128 times the throughput. The folder is found in one place
(``planner.cnn.pipedream_profiles_dir``), so $PIPETWIN_PIPEDREAM_PROFILES serves both reads.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import planner.cnn
from pipetwin.cli import main

FIX = Path(__file__).parent / "fixtures"
PIPEDREAM = ["--cost-model", "pipedream", "--levels", "4:1e9", "--json"]


def _predicted(capsys, model: str, flags: list[str] = PIPEDREAM) -> dict:
    assert main(["plan", "--model", model, *flags]) == 0
    return json.loads(capsys.readouterr().out)["predicted"]


def test_a_profile_name_without_its_graph_is_costed_as_its_analytic_per_sample_twin(monkeypatch, capsys):
    monkeypatch.setattr(planner.cnn, "pipedream_profiles_dir", lambda: None)
    fallback, twin = _predicted(capsys, "vgg16"), _predicted(capsys, "vgg16-analytic")
    assert fallback["samples_per_minibatch"] == 1
    assert fallback["pipeline_time_s"] == twin["pipeline_time_s"]
    assert fallback["throughput_samples_per_s"] == pytest.approx(twin["throughput_samples_per_s"], rel=1e-12)


def test_the_environment_folder_is_read_as_the_graph_states_it(monkeypatch, tmp_path, capsys):
    shutil.copy(FIX / "input_heavy.graph.txt", tmp_path / "vgg16.graph.txt")
    monkeypatch.setenv("PIPETWIN_PIPEDREAM_PROFILES", str(tmp_path))
    got = _predicted(capsys, "vgg16", ["--cost-model", "pipedream", "--levels", "1:1e9", "--json"])
    # one worker: the minibatch takes every layer's forward and backward (ms in the file; the Input node is free)
    assert got["samples_per_minibatch"] == planner.cnn.PIPEDREAM_BATCH["vgg16"]
    assert got["pipeline_time_s"] == pytest.approx((10 + 20 + 5 + 5 + 15 + 30) * 1e-3, rel=1e-9)
