"""Reference models as ordered chains of layers, named by a spec string.

A spec is ``kind:key=value,key=value`` (every parameter optional):

* ``mlp:layers=8,width=512`` — each layer ``Linear(width, width) + ReLU``, the
  last one ``Linear`` only; MSE loss to a random target.
* ``gpt:layers=4,hidden=256,heads=4,seq=128,vocab=512`` — layer 0 token +
  position embedding, then ``layers`` pre-LN transformer blocks (causal
  self-attention, MLP of 4 x hidden), then final LayerNorm + LM head;
  next-token cross-entropy. Inputs are int64 token ids (microbatch, seq).
* ``llama:layers=4,hidden=256,heads=4,kv_heads=2,ffn=512,seq=128,vocab=512`` —
  Llama-style: layer 0 a token embedding (no positions: rotary inside the
  attention), then ``layers`` pre-norm blocks (RMSNorm; causal grouped-query
  attention, ``kv_heads`` key/value heads shared by ``heads/kv_heads`` query
  heads each, rotary position embedding on queries and keys; RMSNorm; SwiGLU
  MLP of inner size ``ffn``), no biases anywhere, then final RMSNorm + an
  untied LM head; next-token cross-entropy, inputs as ``gpt``'s. ``kv_heads=0``
  means ``heads`` (multi-head) and ``ffn=0`` means 4 x hidden, as in
  :mod:`planner.analytic`'s ``llama:`` spec (the same string names both).
* ``cnn:blocks=4,channels=32,size=32,classes=10`` — stem conv-bn-relu, residual
  blocks (conv-bn-relu-conv-bn + skip, relu; one chain layer each), then
  global average pooling + linear head; cross-entropy. Inputs (mb, 3, size, size).
* ``uniform:layers=8,fwd=1e-3,bwd=2e-3,act=0,params=0`` — emulated accelerator
  layers (:mod:`executor.emulated`): forward waits ``fwd`` s and backward
  ``bwd`` s per microbatch while moving real tensors of ``act`` bytes per
  sample (``act/4`` float32 values, at least 1) and a real parameter of
  ``params`` bytes. MSE loss. Defaults as :func:`planner.profile.parse_uniform_spec`,
  whose optional ``saved=B`` (bytes kept for backward per sample) is honoured
  too: a layer keeps its input (``act``) and, when ``saved`` is larger, an
  extra tensor of the difference; a ``saved`` below ``act`` still keeps the input.
* ``package.module:function`` or ``path/to/file.py:function`` — a user model:
  ``function()`` returns an ``nn.Sequential`` or a list of modules (the chain).
  It is called with torch's global RNG seeded by ``seed`` (and restored after).
  The same module may define, next to it (``NAME`` is the function's name):

  - ``NAME_batch(microbatch_size, index, seed) -> (input, target)`` — the data;
  - otherwise ``NAME_input_shape``: a tuple (per sample, without the batch
    dimension) or a function of no arguments returning one; inputs are then
    standard normal float32 and the target standard normal of the model's
    output shape (found by one no-grad forward pass);
  - ``NAME_loss(output, target) -> scalar`` — the loss; default MSE (mean).

Weights are deterministic given ``seed``: each layer ``i`` is built from its own
seed, so :func:`build_stage` gives exactly the weights :func:`build_layers`
gives for the same layers without building the others. Microbatch ``index`` of
:func:`make_batch` is deterministic given ``seed`` and independent of the
microbatch size of other calls.

The spec grammar and its parameters are :mod:`executor.modelspec`, the built-in models' layers
:mod:`executor.layers`, the ``module:function`` hook :mod:`executor.usermodels`; this module turns a spec into
layers (``build_stage``: any contiguous slice, with the weights the whole chain gives it), batches and a loss,
which is all the runtime, the reference and the profiler read.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from executor.emulated import EmulatedLayer
from executor.layers import GPTBlock, GPTEmbedding, GPTHead, LlamaBlock, LlamaEmbedding, LlamaHead, ResidualBlock
from executor.modelspec import ModelSpec, parse_spec
from executor.usermodels import user_batch, user_layers, user_module
from planner.profile import ModelSpecError

__all__ = ["build_layers", "build_stage", "input_shape", "make_batch", "loss_fn", "num_layers"]


def _elems(nbytes: float) -> int:
    return max(1, int(nbytes // 4))


def _layer_seed(seed: int, i: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (i + 1)) % (2**63 - 1)


def _build_one(ms: ModelSpec, i: int, seed: int) -> nn.Module:
    p = dict(ms.params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_layer_seed(seed, i))
        if ms.kind == "mlp":
            lin = nn.Linear(p["width"], p["width"])
            return lin if i == p["layers"] - 1 else nn.Sequential(lin, nn.ReLU())
        if ms.kind == "gpt":
            if i == 0:
                return GPTEmbedding(p["vocab"], p["seq"], p["hidden"])
            if i <= p["layers"]:
                return GPTBlock(p["hidden"], p["heads"])
            return GPTHead(p["hidden"], p["vocab"])
        if ms.kind == "llama":
            if i == 0:
                return LlamaEmbedding(p["vocab"], p["hidden"])
            if i <= p["layers"]:
                return LlamaBlock(p["hidden"], p["heads"], p["kv_heads"], p["ffn"])
            return LlamaHead(p["hidden"], p["vocab"])
        if ms.kind == "cnn":
            c = p["channels"]
            if i == 0:
                return nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            if i <= p["blocks"]:
                return ResidualBlock(c)
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, p["classes"]))
        if ms.kind == "uniform":
            gen = torch.Generator().manual_seed(_layer_seed(seed, i))
            act = _elems(p["act"])
            extra = 0 if p["saved"] is None else max(0, int(p["saved"] // 4) - act)
            return EmulatedLayer(act, act, int(p["params"] // 4), p["fwd"], p["bwd"], generator=gen,
                                 extra_saved_elems=extra)
    raise AssertionError(ms.kind)


def num_layers(spec: str) -> int:
    """Number of chain layers of the model ``spec`` (builds nothing for built-in models)."""
    ms = parse_spec(spec)
    p = dict(ms.params)
    if ms.kind in ("mlp", "uniform"):
        return p["layers"]
    if ms.kind in ("gpt", "llama"):
        return p["layers"] + 2
    if ms.kind == "cnn":
        return p["blocks"] + 2
    return len(build_layers(spec))


def build_stage(spec: str, first: int, last: int, seed: int = 0) -> list[nn.Module]:
    """Layers ``first..last`` (inclusive) of the chain, with the weights :func:`build_layers` gives them."""
    n = num_layers(spec)
    if not (0 <= first <= last < n):
        raise ModelSpecError(f"model {spec!r} has layers 0..{n - 1}; cannot build {first}..{last}")
    ms = parse_spec(spec)
    if ms.kind == "user":
        return build_layers(spec, seed)[first : last + 1]
    return [_build_one(ms, i, seed) for i in range(first, last + 1)]


def build_layers(spec: str, seed: int = 0) -> list[nn.Module]:
    """The model as an ordered chain of layers; deterministic given ``seed``. Modules are in training mode."""
    ms = parse_spec(spec)
    if ms.kind == "user":
        return user_layers(ms, seed)
    n = num_layers(spec)
    return [_build_one(ms, i, seed) for i in range(n)]


def input_shape(spec: str, microbatch_size: int) -> tuple[int, ...]:
    """Shape of one microbatch input tensor."""
    _check_mb(microbatch_size)
    ms = parse_spec(spec)
    p = dict(ms.params)
    if ms.kind == "mlp":
        return (microbatch_size, p["width"])
    if ms.kind in ("gpt", "llama"):
        return (microbatch_size, p["seq"])
    if ms.kind == "cnn":
        return (microbatch_size, 3, p["size"], p["size"])
    if ms.kind == "uniform":
        return (microbatch_size, _elems(p["act"]))
    return tuple(make_batch(spec, microbatch_size, 0)[0].shape)


def _check_mb(microbatch_size: int) -> None:
    if int(microbatch_size) != microbatch_size or microbatch_size < 1:
        raise ModelSpecError(f"microbatch size must be an integer >= 1, got {microbatch_size!r}")


def _generator(seed: int, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"pipetwin-batch:{int(seed)}:{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def make_batch(spec: str, microbatch_size: int, index: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(input, target)`` for microbatch ``index``; deterministic given (spec, size, index, seed)."""
    _check_mb(microbatch_size)
    ms = parse_spec(spec)
    p = dict(ms.params)
    g = _generator(seed, index)
    mb = microbatch_size
    if ms.kind == "mlp":
        return torch.randn(mb, p["width"], generator=g), torch.randn(mb, p["width"], generator=g)
    if ms.kind == "uniform":
        a = _elems(p["act"])
        return torch.randn(mb, a, generator=g), torch.randn(mb, a, generator=g)
    if ms.kind in ("gpt", "llama"):
        tokens = torch.randint(0, p["vocab"], (mb, p["seq"] + 1), generator=g, dtype=torch.int64)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if ms.kind == "cnn":
        x = torch.randn(mb, 3, p["size"], p["size"], generator=g)
        return x, torch.randint(0, p["classes"], (mb,), generator=g, dtype=torch.int64)
    return user_batch(ms, mb, index, seed, g)


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output, target)


def _gpt_ce(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def _ce(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target)


def loss_fn(spec: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss applied to the last layer's output and the target; a mean over the microbatch."""
    ms = parse_spec(spec)
    if ms.kind in ("mlp", "uniform"):
        return _mse
    if ms.kind in ("gpt", "llama"):
        return _gpt_ce
    if ms.kind == "cnn":
        return _ce
    return getattr(user_module(ms), f"{ms.get('function')}_loss", _mse)
