"""executor.profiler against closed forms: parameter, activation and saved bytes; emulated layer times."""
from __future__ import annotations

import json

import pytest
import torch

from executor.models import build_layers
from executor.profiler import profile_model, saved_tensor_bytes
from pipetwin.cli import main
from planner.profile import ModelProfile

torch.set_num_threads(1)


def test_param_and_activation_bytes_closed_form():
    spec = "gpt:layers=1,hidden=16,heads=2,seq=8,vocab=30"
    prof = profile_model(spec, microbatch_size=2, repeats=1, warmup=0)
    layers = build_layers(spec)
    assert [l.param_bytes for l in prof.layers] == [sum(p.numel() * 4 for p in m.parameters()) for m in layers]
    h, s, v = 16, 8, 30
    assert [l.activation_bytes for l in prof.layers] == [s * h * 4, s * h * 4, s * v * 4]  # per sample
    assert prof.microbatch_size == 2 and len(prof) == 3
    assert all(l.forward_s > 0 and l.backward_s > 0 for l in prof.layers)


def test_saved_bytes_of_linear_layers_are_their_input_bytes():
    w = 24
    prof = profile_model(f"mlp:layers=2,width={w}", microbatch_size=3, repeats=1, warmup=0)
    first, last = prof.layers
    assert last.saved_bytes == w * 4  # Linear keeps its input (weights are parameters, not counted)
    assert first.saved_bytes == 2 * w * 4  # Linear input + ReLU output
    assert first.activation_bytes == last.activation_bytes == w * 4


def test_saved_bytes_count_a_storage_once_and_skip_parameters():
    class Square(torch.nn.Module):
        def forward(self, x):
            return x * x  # saves x twice (self and other): one storage

    x = torch.randn(5, 7, requires_grad=True)
    _, nbytes = saved_tensor_bytes(Square(), x)
    assert nbytes == 5 * 7 * 4
    lin = torch.nn.Linear(7, 3)
    _, nbytes = saved_tensor_bytes(lin, x)
    assert nbytes == 5 * 7 * 4  # the weight it also saves is a parameter


def test_uniform_profile_recovers_emulated_times_and_sizes():
    fwd, bwd, act, params = 0.02, 0.03, 4096, 1000
    prof = profile_model(f"uniform:layers=2,fwd={fwd},bwd={bwd},act={act},params={params}", microbatch_size=2,
                         repeats=3, warmup=1)
    for l in prof.layers:
        assert fwd <= l.forward_s < fwd + 0.01
        assert bwd <= l.backward_s < bwd + 0.01
        assert l.activation_bytes == act and l.saved_bytes == act and l.param_bytes == params


def test_cli_profile_json_and_output_round_trip(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["profile", "--model", "mlp:layers=2,width=8", "--repeats", "1", "--warmup", "0", "--json",
                 "-o", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = ModelProfile.from_dict(json.loads(out.read_text()))
    assert ModelProfile.from_dict(printed).layers == saved.layers and len(saved) == 2


def test_cli_profile_table_and_bad_model(capsys):
    assert main(["profile", "--model", "cnn:blocks=1,channels=4,size=8", "--repeats", "1", "--warmup", "0"]) == 0
    text = capsys.readouterr().out
    assert "ResidualBlock" in text and "fwd ms" in text
    assert main(["profile", "--model", "resnet9000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown model 'resnet9000'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("spec", ["uniform:layers=2,fwd=0,bwd=0,act=400,params=64",
                                  "uniform:layers=2,fwd=0,bwd=0,act=400,params=0,saved=1000"])
def test_uniform_bytes_agree_with_the_planners_reading_of_the_same_spec(spec):
    from planner.profile import parse_uniform_spec

    measured = profile_model(spec, microbatch_size=2, repeats=1, warmup=1)
    planned = parse_uniform_spec(spec)
    for m, p in zip(measured.layers, planned.layers):
        assert (m.activation_bytes, m.saved_bytes, m.param_bytes) == (p.activation_bytes, p.saved_bytes, p.param_bytes)
