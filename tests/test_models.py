"""executor.models and executor.emulated against independent truths (closed forms, torch's own ops)."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from executor import models as M
from executor.emulated import EmulatedLayer, _EmulatedFn
from planner.profile import ModelSpecError

torch.set_num_threads(1)

SMALL = {
    "mlp": "mlp:layers=3,width=16",
    "gpt": "gpt:layers=2,hidden=32,heads=4,seq=8,vocab=50",
    "cnn": "cnn:blocks=2,channels=8,size=8,classes=5",
    "uniform": "uniform:layers=3,fwd=0,bwd=0,act=64,params=40",
}


def _forward(layers, x):
    for layer in layers:
        x = layer(x)
    return x


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_chain_shapes_counts_and_loss(kind):
    spec = SMALL[kind]
    layers = M.build_layers(spec, seed=3)
    assert len(layers) == M.num_layers(spec)
    x, y = M.make_batch(spec, 2, 0, seed=3)
    assert tuple(x.shape) == M.input_shape(spec, 2)
    out = _forward(layers, x)
    loss = M.loss_fn(spec)(out, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for l in layers for p in l.parameters())


def test_num_layers_closed_form():
    assert M.num_layers("mlp:layers=5") == 5
    assert M.num_layers("gpt:layers=3") == 3 + 2
    assert M.num_layers("cnn:blocks=4") == 4 + 2
    assert M.num_layers("uniform:layers=16") == 16
    assert M.num_layers("uniform") == 8  # planner.profile.parse_uniform_spec's default


def test_mlp_equals_hand_written_reference():
    spec = "mlp:layers=3,width=8"
    layers = M.build_layers(spec, seed=1)
    x, y = M.make_batch(spec, 4, 0, seed=1)
    h = x
    for i, layer in enumerate(layers):
        lin = layer if isinstance(layer, torch.nn.Linear) else layer[0]
        h = h @ lin.weight.T + lin.bias
        if i < 2:
            h = torch.clamp(h, min=0)
    out = _forward(layers, x)
    torch.testing.assert_close(out, h)
    torch.testing.assert_close(M.loss_fn(spec)(out, y), ((out - y) ** 2).mean())


def test_weights_and_batches_are_deterministic():
    spec = SMALL["gpt"]
    a, b, c = M.build_layers(spec, 7), M.build_layers(spec, 7), M.build_layers(spec, 8)
    for la, lb in zip(a, b):
        for pa, pb in zip(la.parameters(), lb.parameters()):
            assert torch.equal(pa, pb)
    assert not torch.equal(a[1].attn.qkv.weight, c[1].attn.qkv.weight)
    x1, y1 = M.make_batch(spec, 3, 5, seed=2)
    x2, y2 = M.make_batch(spec, 3, 5, seed=2)
    x3, _ = M.make_batch(spec, 3, 6, seed=2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    stage = M.build_stage(spec, 1, 2, seed=7)
    for la, lb in zip(a[1:3], stage):
        assert all(torch.equal(p, q) for p, q in zip(la.state_dict().values(), lb.state_dict().values()))


def test_gpt_attention_matches_torch_sdpa_and_is_causal():
    spec = "gpt:layers=1,hidden=16,heads=2,seq=6,vocab=20"
    block = M.build_layers(spec)[1]
    attn = block.attn
    x = torch.randn(2, 6, 16)
    q, k, v = attn.qkv(x).split(16, dim=2)
    q, k, v = (z.view(2, 6, 2, 8).transpose(1, 2) for z in (q, k, v))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 6, 16)
    torch.testing.assert_close(attn(x), attn.proj(ref), rtol=1e-5, atol=1e-6)
    ids, target = M.make_batch(spec, 2, 0)
    assert ids.dtype == torch.int64 and torch.equal(ids[:, 1:], target[:, :-1])  # next-token target
    layers = M.build_layers(spec)
    changed = ids.clone()
    changed[:, 4] = (changed[:, 4] + 1) % 20
    a, b = _forward(layers, ids), _forward(layers, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])  # positions before the change do not see it
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_cnn_residual_block_is_relu_of_input_when_second_conv_is_zero():
    block = M.build_layers("cnn:blocks=1,channels=4,size=6")[1]
    with torch.no_grad():
        block.conv2.weight.zero_()
    x = torch.randn(3, 4, 6, 6)
    torch.testing.assert_close(block(x), torch.relu(x))  # bn2 of zeros is its bias, 0


def test_spec_errors_are_one_clear_line():
    for bad, words in [("resnet", "unknown model"), ("mlp:depth=3", "unknown parameter 'depth'"),
                       ("mlp:width=abc", "not an integer"), ("gpt:hidden=30,heads=4", "multiple of heads"),
                       ("mlp:layers=0", ">= 1"), ("uniform:fwd", "key=value"), ("nosuch_pkg.mod:fn", "cannot import"),
                       ("no/such/file.py:fn", "no file")]:
        with pytest.raises(ModelSpecError, match=words) as e:
            M.build_layers(bad)
        assert "\n" not in str(e.value)
    assert issubclass(ModelSpecError, ValueError)


def test_user_model_from_file(tmp_path):
    (tmp_path / "usermodels.py").write_text(
        "import torch\n"
        "def tiny():\n    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))\n"
        "tiny_input_shape = (3,)\n"
        "def listed():\n    return [torch.nn.Linear(4, 4)]\n"
        "def listed_batch(mb, index, seed):\n    g = torch.Generator().manual_seed(index)\n"
        "    return torch.randn(mb, 4, generator=g), torch.zeros(mb, 4)\n"
        "def listed_loss(out, target):\n    return out.abs().mean()\n"
        "def nothing():\n    return [torch.nn.Linear(2, 2)]\n")
    path_spec = f"{tmp_path / 'usermodels.py'}:tiny"
    layers = M.build_layers(path_spec, seed=1)
    assert len(layers) == 3 == M.num_layers(path_spec)
    x, y = M.make_batch(path_spec, 4, 0)
    assert x.shape == (4, 3) and y.shape == (4, 2) and M.input_shape(path_spec, 4) == (4, 3)
    assert M.loss_fn(path_spec) is not None and M.loss_fn(path_spec)(y, y) == 0
    x, y = M.make_batch(f"{tmp_path / 'usermodels.py'}:listed", 2, 1)
    assert torch.equal(y, torch.zeros(2, 4))
    out = _forward(M.build_layers(f"{tmp_path / 'usermodels.py'}:listed"), x)
    torch.testing.assert_close(M.loss_fn(f"{tmp_path / 'usermodels.py'}:listed")(out, y), out.abs().mean())
    with pytest.raises(ModelSpecError, match="nothing_input_shape"):
        M.make_batch(f"{tmp_path / 'usermodels.py'}:nothing", 1, 0)
    with pytest.raises(ModelSpecError, match="no function 'absent'"):
        M.build_layers(f"{tmp_path / 'usermodels.py'}:absent")


def test_user_model_by_dotted_module_path(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_pt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("import torch\ndef two():\n    return [torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)]\n"
                                 "two_input_shape = lambda: (2,)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = "userpkg_pt.nets:two"
    assert M.num_layers(spec) == 2
    x, y = M.make_batch(spec, 5, 0)
    assert x.shape == (5, 2) and y.shape == (5, 1)


# --- emulated accelerator layers ---------------------------------------------------------
def test_emulated_layer_waits_without_cpu_and_moves_real_tensors():
    spec = "uniform:layers=1,fwd=0.05,bwd=0.08,act=4096,params=8000"
    (layer,) = M.build_layers(spec)
    x, y = M.make_batch(spec, 3, 0)
    x.requires_grad_(True)
    w0, c0 = time.perf_counter(), time.process_time()
    out = layer(x)
    w1, c1 = time.perf_counter(), time.process_time()
    assert w1 - w0 >= 0.05 and c1 - c0 < 0.025
    assert out.numel() * 4 == 4096 * 3  # act bytes per sample
    assert layer.weight.numel() * 4 == 8000
    loss = M.loss_fn(spec)(out, y)
    w2, c2 = time.perf_counter(), time.process_time()
    loss.backward()
    w3, c3 = time.perf_counter(), time.process_time()
    assert w3 - w2 >= 0.08 and c3 - c2 < 0.04
    assert layer.weight.grad is not None and layer.weight.grad.shape == layer.weight.shape
    assert x.grad is not None and x.grad.abs().sum() > 0
    # the output depends on the parameter
    with torch.no_grad():
        layer.weight.add_(0.5)
    assert not torch.allclose(layer(x), out)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_split_backward_of_emulated_layers_spends_the_backward_time_once():
    """ZB-H1's BI (input gradient, graph kept) then BW (weight gradient), as the executor calls them, on a
    3-layer stage: BI waits bi_fraction of each layer's backward and BW the rest, so BI + BW is one backward
    (each used to wait a whole backward: twice the time). An unsplit backward, and a first stage's BW
    (no input gradient, so no BI before it), wait the whole backward."""
    L, bwd = 3, 0.04
    layers = M.build_stage(f"uniform:layers={L},fwd=0,bwd={bwd},act=64,params=64", 0, L - 1)
    params = [layer.weight for layer in layers]
    w = torch.ones(2, requires_grad=True)  # torch's lazy imports of a first grad with gradient tensors, off the clock
    torch.autograd.grad(w * 2.0, (w,), torch.ones(2))
    whole = L * bwd
    xin = torch.randn(2, 16).requires_grad_(True)
    out = _forward(layers, xin)
    g = torch.ones_like(out)
    bi = _timed(lambda: torch.autograd.grad(out, (xin,), g, retain_graph=True))
    bw = _timed(lambda: torch.autograd.grad(out, params, g))
    assert 0.5 * whole <= bi < 0.5 * whole + 0.03  # sleeps overshoot, never undershoot
    assert 0.5 * whole <= bw < 0.5 * whole + 0.03
    assert bi + bw < 1.25 * whole  # was 2 x whole
    out = _forward(layers, xin)
    b = _timed(lambda: torch.autograd.grad(out, params + [xin], torch.ones_like(out)))
    assert whole <= b < whole + 0.03
    out = _forward(layers, torch.randn(2, 16))  # a first stage: the input needs no gradient
    bw0 = _timed(lambda: torch.autograd.grad(out, params, torch.ones_like(out)))
    assert whole <= bw0 < whole + 0.03
    assert all(layer.bi_fraction == 0.5 for layer in layers)  # SimParams' default split


def test_emulated_split_follows_the_layer_bi_fraction_and_changes_no_value():
    layer = EmulatedLayer(4, 4, 8, 0.0, 0.1, generator=torch.Generator().manual_seed(0), bi_fraction=0.25)
    w = torch.ones(2, requires_grad=True)
    torch.autograd.grad(w * 2.0, (w,), torch.ones(2))
    xin = torch.randn(1, 4).requires_grad_(True)
    out = layer(xin)
    g = torch.ones_like(out)
    bi = _timed(lambda: torch.autograd.grad(out, (xin,), g, retain_graph=True))
    got = []
    bw = _timed(lambda: got.extend(torch.autograd.grad(out, (layer.weight,), g)))
    assert 0.025 <= bi < 0.045 and 0.075 <= bw < 0.095
    out = layer(xin)
    (gp_whole, _) = torch.autograd.grad(out, (layer.weight, xin), g)
    assert torch.equal(got[0], gp_whole)  # the split BW's weight gradient is the unsplit backward's
    with pytest.raises(ValueError, match="bi_fraction"):
        EmulatedLayer(4, 4, 8, 0.0, 0.1, bi_fraction=1.5)


@pytest.mark.parametrize("in_elems,out_elems,params", [(5, 5, 7), (6, 3, 2), (3, 8, 4), (4, 4, 0)])
def test_emulated_backward_is_the_true_gradient(in_elems, out_elems, params):
    x = torch.randn(2, in_elems, dtype=torch.float64, requires_grad=True)
    p = torch.randn(params, dtype=torch.float64, requires_grad=True)
    fn = lambda x, p: _EmulatedFn.apply(x, p, out_elems, 0.0, 0.0)
    assert torch.autograd.gradcheck(fn, (x, p))


def test_emulated_layer_catches_in_place_update_between_forward_and_backward():
    layer = EmulatedLayer(4, 4, 10, 0.0, 0.0, generator=torch.Generator().manual_seed(0))
    out = layer(torch.randn(2, 4))
    with torch.no_grad():
        layer.weight.add_(1.0)  # like an optimizer step without weight stashing
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_uniform_act_zero_means_one_element_and_params_zero_still_trains():
    spec = "uniform:layers=2,fwd=0,bwd=0"
    assert M.input_shape(spec, 3) == (3, 1)
    layers = M.build_layers(spec)
    assert all(l.weight.numel() == 0 for l in layers)
    x, y = M.make_batch(spec, 3, 0)
    M.loss_fn(spec)(_forward(layers, x), y).backward()
