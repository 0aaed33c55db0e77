"""Emulated accelerator layers: compute is a timed wait, tensors are real.

An :class:`EmulatedLayer` behaves, seen from the host, like a layer running on
an accelerator: its forward takes ``forward_s`` of wall time and its backward
``backward_s``, spent in ``time.sleep`` (the GIL is released and no CPU is
used), while it moves real tensors of the sizes a real layer would:

* output: ``out_elems`` float32 values per sample;
* parameter: one real ``nn.Parameter`` of ``param_elems`` float32 values
  (possibly empty) that receives a real gradient, so optimizer steps,
  gradient all-reduce and weight stashing are exercised;
* saved for backward: the layer's input and its parameter, as ``nn.Linear``
  keeps its input and weight — so, as with a real layer, updating the
  parameter in place between a forward and its backward is caught by
  autograd's version check (weight stashing has to keep the old version);
  optionally ``extra_saved_elems`` more values per sample (an uninitialised
  tensor: real memory, no CPU spent filling it).

The arithmetic is cheap, deterministic and depends on both the input and the
parameter, so numerical parity between a pipelined run and a single-process
reference is meaningful::

    s      = sum(param)
    factor = 1 + GAIN * tanh(s)
    out    = factor * resize(x)          # resize: identity when sizes agree

so ``d out / d x = factor`` (depends on the weights) and every parameter
element gets the same gradient ``GAIN * (1 - tanh(s)^2) * sum(grad_out * resize(x))``.

Times are per microbatch, whatever its size. The wait is to a deadline taken
at the start of the call, so the small real arithmetic is absorbed in the
emulated time rather than added to it.

A backward split in two (ZB-H1's BI, the input gradient with the graph kept,
then BW, the weight gradient) spends the backward time once, split as the
simulator splits it: a pass that does not need the parameter's gradient (BI)
waits ``bi_fraction`` of ``backward_s``; the pass that then needs it (BW)
waits the rest. A backward that needs the parameter's gradient with no input
pass before it (an unsplit backward, or the BW of a first stage, whose BI has
no input gradient to compute) waits the whole ``backward_s``. Which gradients
a pass needs is read from the autograd engine: the parameter enters the
function through a view, and the engine says whether it will run that view's
node in the current backward.
"""
from __future__ import annotations

import time

import torch
from torch import nn

GAIN = 0.05
#: share of ``backward_s`` spent on the input gradient when the backward is split (``SimParams.bi_fraction``'s default)
BI_FRACTION = 0.5
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)


def _wait_until(deadline: float) -> None:
    """Sleep until ``time.perf_counter()`` reaches ``deadline`` (no busy waiting)."""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        time.sleep(left)


def _resize(x: torch.Tensor, out_elems: int) -> torch.Tensor:
    """(mb, in) -> (mb, out): identity when equal, else cyclic repetition / truncation of features."""
    n = x.shape[1]
    if n == out_elems:
        return x
    if out_elems < n:
        return x[:, :out_elems]
    reps = -(-out_elems // n)
    return x.repeat(1, reps)[:, :out_elems]


def _resize_back(g: torch.Tensor, in_elems: int) -> torch.Tensor:
    """Adjoint of :func:`_resize`: fold an (mb, out) gradient back onto (mb, in)."""
    out_elems = g.shape[1]
    if out_elems == in_elems:
        return g
    if out_elems < in_elems:
        return torch.nn.functional.pad(g, (0, in_elems - out_elems))
    reps = -(-out_elems // in_elems)
    padded = torch.nn.functional.pad(g, (0, reps * in_elems - out_elems))
    return padded.view(g.shape[0], reps, in_elems).sum(1)


class _EmulatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, param: torch.Tensor, out_elems: int, forward_s: float, backward_s: float,
                extra_saved_elems: int = 0, bi_fraction: float = BI_FRACTION):
        deadline = time.perf_counter() + forward_s
        t = torch.tanh(param.sum())
        y = _resize(x, out_elems) * (1.0 + GAIN * t)
        if extra_saved_elems > 0:  # more kept for backward than the input: real (unused, unfilled) memory
            ctx.save_for_backward(x, param, x.new_empty(x.shape[0], extra_saved_elems))
        else:
            ctx.save_for_backward(x, param)
        ctx.backward_s = backward_s
        ctx.bi_fraction = bi_fraction
        ctx.input_done = False  # an input-gradient-only pass (BI) has spent its share
        ctx.out_elems = out_elems
        _wait_until(deadline)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        start = time.perf_counter()
        x, param = ctx.saved_tensors[:2]
        # the parameter came in through a view (EmulatedLayer.forward): the engine knows whether this pass needs it
        node = param.grad_fn if ctx.needs_input_grad[1] else None
        weight = node is None or _will_execute is None or bool(_will_execute(node))
        if weight:
            wait = ctx.backward_s * (1.0 - ctx.bi_fraction) if ctx.input_done else ctx.backward_s
        else:
            wait = 0.0 if ctx.input_done else ctx.backward_s * ctx.bi_fraction
            ctx.input_done = True
        t = torch.tanh(param.sum())
        grad_x = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_x = _resize_back(grad_out * (1.0 + GAIN * t), x.shape[1])
        if ctx.needs_input_grad[1] and weight:
            g = GAIN * (1.0 - t * t) * (grad_out * _resize(x, ctx.out_elems)).sum()
            grad_p = g.expand(param.shape).contiguous()
        _wait_until(start + wait)
        return grad_x, grad_p, None, None, None, None, None


class EmulatedLayer(nn.Module):
    """A layer whose compute is a timed wait on real tensors (see the module docstring).

    Args:
        in_elems: float32 input values per sample.
        out_elems: float32 output values per sample (>= 1).
        param_elems: float32 parameter values (>= 0).
        forward_s: wall seconds of one forward call (per microbatch).
        backward_s: wall seconds of one backward call (per microbatch).
        generator: the generator the parameter is initialised from (deterministic weights).
        extra_saved_elems: float32 values per sample kept for backward beyond the input (an
            uninitialised tensor), to emulate a layer that saves more than its input.
        bi_fraction: share of ``backward_s`` an input-gradient-only pass (ZB-H1's BI) waits; the
            weight-gradient pass after it waits the rest (see the module docstring).
    """

    def __init__(self, in_elems: int, out_elems: int, param_elems: int, forward_s: float, backward_s: float,
                 generator: torch.Generator | None = None, extra_saved_elems: int = 0,
                 bi_fraction: float = BI_FRACTION) -> None:
        super().__init__()
        if in_elems < 1 or out_elems < 1 or param_elems < 0:
            raise ValueError("EmulatedLayer needs in_elems >= 1, out_elems >= 1, param_elems >= 0")
        if forward_s < 0 or backward_s < 0:
            raise ValueError("EmulatedLayer needs non-negative forward_s and backward_s")
        if not 0.0 <= bi_fraction <= 1.0:
            raise ValueError("EmulatedLayer needs bi_fraction in [0, 1]")
        self.in_elems, self.out_elems = int(in_elems), int(out_elems)
        self.forward_s, self.backward_s = float(forward_s), float(backward_s)
        self.extra_saved_elems = max(0, int(extra_saved_elems))
        self.bi_fraction = float(bi_fraction)
        init = torch.randn(int(param_elems), generator=generator) * (1.0 / max(1, param_elems) ** 0.5)
        self.weight = nn.Parameter(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_elems:
            raise ValueError(f"EmulatedLayer expects input (microbatch, {self.in_elems}), got {tuple(x.shape)}")
        w = self.weight
        # through a view, so that the backward can ask the engine whether this pass needs the weight gradient
        return _EmulatedFn.apply(x, w.view_as(w), self.out_elems, self.forward_s, self.backward_s,
                                 self.extra_saved_elems, self.bi_fraction)

    def extra_repr(self) -> str:
        return (f"in={self.in_elems}, out={self.out_elems}, params={self.weight.numel()}, "
                f"forward_s={self.forward_s:g}, backward_s={self.backward_s:g}")
