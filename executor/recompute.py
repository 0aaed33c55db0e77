"""Activation recomputation in the executor: the plan's ``recompute`` mode (``planner.recompute``) made real.

* ``"full"``: every chain layer is a checkpoint. Its forward runs without
  keeping anything for backward except its input (and its parameters, which
  are weights, not activations); its backward first re-runs the forward on
  that input with the weights the forward used, then backpropagates through
  the rebuilt graph. A stage so keeps one input per layer per microbatch in
  flight (the first layer's input is the receive buffer, which the pool
  counts), as ``planner.recompute`` says.
* ``"selective"``: only the attention core of each transformer block (QKᵀ,
  mask, softmax, attention over V) is recomputed: it keeps its query, key and
  value (one storage, the QKV projection's output) instead of the scores and
  probabilities. Other layers keep what they always keep. A fused core
  (``fused_core``: the llama block's SDPA, flash attention) keeps no scores, so
  selective leaves it as it is, as ``planner.recompute`` charges it nothing.

Both are autograd functions whose kept tensors go through
``save_for_backward``, so the runtime's saved-tensor counter
(:class:`executor.memory.SavedBytes`) sees exactly what is kept. What a
backward rebuilds lives inside that one action and is not counted, like every
transient inside an action. A split backward (ZB-H1: BI then BW) rebuilds in
its BI and again in its BW, holding nothing rebuilt between the two.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn


class _Checkpoint(torch.autograd.Function):
    """``run(x, params)`` with only ``x`` and ``params`` kept; re-run in backward."""

    @staticmethod
    def forward(ctx, run, x: Tensor, *params: Tensor) -> Tensor:
        ctx.run = run
        ctx.save_for_backward(x, *params)
        return run(x, params)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, *params = ctx.saved_tensors
        with torch.enable_grad():
            xd = x.detach().requires_grad_(x.requires_grad and x.is_floating_point())
            pd = [p.detach().requires_grad_(True) for p in params]
            out = ctx.run(xd, pd)
            wrt = ([xd] if xd.requires_grad else []) + pd
            grads = torch.autograd.grad(out, wrt, g, allow_unused=True)
        gx = grads[0] if xd.requires_grad else None
        return (None, gx, *grads[len(wrt) - len(pd):])


def checkpoint_layer(layer: nn.Module) -> None:
    """Make ``layer`` a full-recomputation checkpoint (in place; its parameter names stay as they are).

    Its forward runs as :class:`_Checkpoint` over the tensors bound into the layer at
    the time (the weight version of that forward); the rebuild in backward puts those
    same tensors back for its duration, whatever version is bound by then.
    """
    inner = layer.forward
    slots = []
    index: dict[int, int] = {}
    for name, p in layer.named_parameters(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        slots.append((layer.get_submodule(owner) if owner else layer, attr, index.setdefault(id(p), len(index))))
    def bound() -> list[Tensor]:
        out: list = [None] * len(index)
        for mod, attr, j in slots:
            out[j] = mod._parameters[attr]
        return out

    def run(x: Tensor, params) -> Tensor:
        held = [mod._parameters[attr] for mod, attr, _ in slots]
        for mod, attr, j in slots:
            mod._parameters[attr] = params[j]
        try:
            return inner(x)
        finally:
            for (mod, attr, _), t in zip(slots, held):
                mod._parameters[attr] = t

    def forward(x: Tensor) -> Tensor:
        return _Checkpoint.apply(run, x, *bound())

    layer.forward = forward


def attention_probabilities_times_values(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The attention core: causal softmax(q·kᵀ/√d)·v over (batch, heads, seq, head_dim) tensors."""
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1) @ v


class _RecomputedCore(torch.autograd.Function):
    """``core(q, k, v)`` keeping only q, k and v; the scores and probabilities are rebuilt in backward."""

    @staticmethod
    def forward(ctx, core, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        ctx.core = core
        ctx.save_for_backward(q, k, v)
        return core(q, k, v)

    @staticmethod
    def backward(ctx, g: Tensor):
        q, k, v = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
        with torch.enable_grad():
            out = ctx.core(q, k, v)
            return (None, *torch.autograd.grad(out, (q, k, v), g))


def attention_core(q: Tensor, k: Tensor, v: Tensor, recompute: bool = False,
                   core: Callable[[Tensor, Tensor, Tensor], Tensor] = attention_probabilities_times_values) -> Tensor:
    """The attention core ``core(q, k, v)`` (default: the gpt block's), recomputed in backward when ``recompute``
    (selective recomputation)."""
    if recompute:
        return _RecomputedCore.apply(core, q, k, v)
    return core(q, k, v)


def apply_recompute(layers: list[nn.Module], mode: str) -> list[nn.Module]:
    """The stage's layers set up for ``mode`` ("none", "selective", "full"), in place."""
    if mode == "full":
        for layer in layers:
            checkpoint_layer(layer)
    elif mode == "selective":
        for layer in layers:
            for sub in layer.modules():
                if hasattr(sub, "recompute_core") and not getattr(sub, "fused_core", False):
                    sub.recompute_core = True
    return layers
