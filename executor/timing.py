"""Timing: marks on the wall clock or CUDA events, action times on a GPU, and warm-ups kept off the clock.

Every action is timed with ``time.perf_counter``; on a GPU the compute actions
(F, B, BI, BW, STEP) are timed by CUDA events recorded around their kernels
(:class:`CudaActionTimes`), read after the run, so a time is the GPU's and not
the launch's. Lazy set-up (torch's first ``autograd.grad``, CUDA's handles,
kernels and allocator blocks) is paid before the clock starts.
"""
from __future__ import annotations

import time

import torch
from torch import nn


class Clock:
    """Marks points in time: ``perf_counter`` on the CPU, CUDA events on a GPU (read after a synchronize)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class CudaActionTimes:
    """CUDA events around compute actions; :meth:`resolve` puts their GPU times into the run's action times."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list = []
        torch.cuda.synchronize(device)
        self.base = torch.cuda.Event(enable_timing=True)
        self.base.record()

    def run(self, i: int, handler, a) -> int:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        nbytes = handler(a)
        e1.record()
        self.events.append((i, e0, e1))
        return nbytes

    def resolve(self, times: list[tuple[int, float, float, int]]) -> list[tuple[int, float, float, int]]:
        """``times`` with each evented action's start and end replaced by its GPU times (s since the base event)."""
        torch.cuda.synchronize(self.device)
        by_index = {i: (e0, e1) for i, e0, e1 in self.events}
        fixed = []
        for i, s, e, nb in times:
            if i in by_index:
                e0, e1 = by_index[i]
                s = self.base.elapsed_time(e0) / 1e3
                e = self.base.elapsed_time(e1) / 1e3
            fixed.append((i, s, e, nb))
        return fixed


def warm_up_stage(module: nn.Module, params, in_meta: tuple, device: torch.device) -> None:
    """One forward and backward of ``module`` on a zero input of ``in_meta`` = (shape, dtype) that leaves no trace.

    On a GPU the first forward and backward of a stage pay CUDA's lazy set-up
    (cuBLAS handles, kernel loading, the caching allocator's first blocks),
    which a timed run would otherwise count against its first microbatch.
    Nothing the run computes changes: the gradients are returned and dropped
    (``autograd.grad``, no ``.grad``), buffers such as batch-norm statistics
    are put back, and the random number generators are forked, so dropout
    masks later in the run are the ones they would have been.
    """
    shape, dt = in_meta
    buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        x = torch.zeros(shape, dtype=dt, device=device)
        if x.is_floating_point():
            x.requires_grad_(True)
        out = module(x)
        want = [p for p in params if p.requires_grad] + ([x] if x.requires_grad else [])
        if want and out.requires_grad:
            torch.autograd.grad(out.float().sum(), want, allow_unused=True)
    with torch.no_grad():
        for n, b in module.named_buffers():
            b.copy_(buffers[n])


def warm_up_autograd() -> None:
    """Pay torch's lazy imports of a first ``autograd.grad`` with gradient tensors (about 0.5 s) before the clock starts."""
    w = torch.ones(2, requires_grad=True)
    torch.autograd.grad(w * 2.0, (w,), torch.ones(2), allow_unused=True, materialize_grads=True)
