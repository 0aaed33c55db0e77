"""ZeRO-1 and ZeRO-2 in the executor, a stage's optimizer state sliced over its replica group; the SGD and Adam steps.

A stage's parameters, flattened in their order, are N elements; its replica group (with tensor parallelism: the
same TP rank of every replica, so each TP rank's own shard) has D ranks. Rank d owns the slice
``[d·c, min(N, (d + 1)·c))`` with ``c = ⌈N / D⌉`` (the last slices may be shorter or empty). For that slice it
keeps, from the start of the run (Rajbhandari et al. 2020; ``planner.sharding``'s table):

* the master copy of the weights, in the run's dtype (what ZeRO keeps in fp32 beside 16-bit weights; here the
  weights are already full precision, so it holds the same values — it is kept because it is what ZeRO
  holds and what ``planner.sharding`` counts), and
* the optimizer's moments: Adam's first and second (SGD: none).

At a round's ALLREDUCE:

* ZeRO-1: the gradients are all-reduced whole (every rank keeps the full reduced gradient until the STEP);
* ZeRO-2: they are reduce-scattered: each rank keeps only the reduced gradient of its own slice.

At the STEP each rank updates its slice (master copy and moments) and the updated slices are all-gathered into
every rank's full weights, in place. Flush schedules only (one weight version; the STEP is the last use of the
weights it reads). A stage with one replica (D = 1) owns everything and runs no collective.

Without ZeRO, Adam keeps its two moments over the whole stage (no master copy: ``planner.sharding``'s stage-0
count) and the existing all-reduce path reduces the gradients.

Adam here: β = (0.9, 0.999), ε = 1e-8, no weight decay, bias-corrected moments (Kingma and Ba 2015):
``m ← β₁m + (1 − β₁)g``, ``v ← β₂v + (1 − β₂)g²``, ``w ← w − (lr / (1 − β₁ᵗ)) · m / (√(v / (1 − β₂ᵗ)) + ε)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["ADAM_BETAS", "ADAM_EPS", "EXECUTOR_OPTIMIZERS", "shard_range", "Reduced", "StageOptimizer"]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: What the executor steps with for a plan's ``optimizer``: Adam, or plain SGD (the planner's "sgd" counts a
#: momentum buffer; the executor's SGD keeps none).
EXECUTOR_OPTIMIZERS = {"adam": "adam", "sgd": "sgd", "momentum": "sgd", "none": "sgd"}


def shard_range(numel: int, degree: int, index: int) -> tuple[int, int]:
    """The ``[lo, hi)`` slice of ``numel`` flat elements that rank ``index`` of ``degree`` owns."""
    c = -(-numel // degree)
    return min(numel, index * c), min(numel, (index + 1) * c)


class Reduced:
    """A round's gradient after its ALLREDUCE under ZeRO: ``flat`` is the whole (ZeRO-1) or this rank's slice
    (ZeRO-2); ``nbytes`` what it holds."""

    __slots__ = ("flat", "whole")

    def __init__(self, flat: torch.Tensor, whole: bool) -> None:
        self.flat, self.whole = flat, whole

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


class StageOptimizer:
    """One stage's optimizer on one rank: its slice of the weights' master copy and moments, and the ZeRO
    collectives over the stage's replica group.

    Args:
        params: the stage's parameters (version 0), in order.
        zero: ZeRO stage 0, 1 or 2.
        optimizer: "adam" or "sgd" (plain).
        group: the stage's replica group (None: one replica).
        staged: collectives through host copies (gloo on a GPU).
    """

    def __init__(self, params: Sequence[torch.Tensor], zero: int, optimizer: str, group, staged: bool) -> None:
        self.zero, self.optimizer, self.group, self.staged = zero, optimizer, group, staged
        self.numel = sum(p.numel() for p in params)
        self.degree = dist.get_world_size(group) if (zero and group is not None) else 1
        self.index = dist.get_rank(group) if self.degree > 1 else 0
        self.lo, self.hi = shard_range(self.numel, self.degree, self.index) if zero else (0, self.numel)
        self.chunk = -(-self.numel // self.degree)
        ref = params[0]
        self.master = _flatten(params)[self.lo:self.hi].clone() if zero else None
        n = self.hi - self.lo
        self.moments = ([torch.zeros(n, dtype=ref.dtype, device=ref.device) for _ in range(2)]
                        if optimizer == "adam" else [])
        self.t = 0

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds for the stage: the master slice and the moments."""
        held = ([self.master] if self.master is not None else []) + self.moments
        return sum(t.numel() * t.element_size() for t in held)

    # --- collectives ----------------------------------------------------------------
    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu") if self.staged else t

    def reduce(self, grads: Sequence[torch.Tensor] | None, like: Sequence[torch.Tensor]) -> Reduced:
        """The round's gradients (None: this replica had none) summed over the group: whole (ZeRO-1) or this
        rank's slice (ZeRO-2)."""
        ref = like[0]
        flat = (_flatten(grads) if grads is not None
                else torch.zeros(self.numel, dtype=ref.dtype, device=ref.device))
        if self.degree == 1:
            return Reduced(flat, True)
        if self.zero == 1:
            host = self._host(flat)
            dist.all_reduce(host, group=self.group)
            return Reduced(host.to(ref.device) if self.staged else host, True)
        c, D = self.chunk, self.degree
        padded = torch.zeros(c * D, dtype=flat.dtype, device=self._host(flat).device)
        padded[:self.numel] = self._host(flat)
        out = torch.empty(c, dtype=flat.dtype, device=padded.device)
        dist.reduce_scatter(out, list(padded.split(c)), group=self.group)
        return Reduced(out[:self.hi - self.lo].to(ref.device).clone(), False)

    def _gather(self, params: Sequence[torch.Tensor]) -> None:
        """Every rank's updated master slice into ``params`` (all of them, in place)."""
        if self.degree == 1:
            full = self.master
        else:
            c = self.chunk
            local = torch.zeros(c, dtype=self.master.dtype, device=self._host(self.master).device)
            local[:self.hi - self.lo] = self._host(self.master)
            pieces = [torch.empty_like(local) for _ in range(self.degree)]
            dist.all_gather(pieces, local, group=self.group)
            full = torch.cat(pieces)[:self.numel].to(self.master.device)
        _scatter_into(params, full)

    # --- the update -----------------------------------------------------------------
    def step(self, params: Sequence[torch.Tensor], grads, lr: float) -> None:
        """Update ``params`` in place with the round's gradient: a :class:`Reduced` (ZeRO), the reduced per-parameter
        gradients (no ZeRO, or one replica), or None (no gradient this round: the moments still advance)."""
        if grads is None:
            g = torch.zeros(self.hi - self.lo, dtype=params[0].dtype, device=params[0].device)
        elif isinstance(grads, Reduced):
            g = grads.flat[self.lo:self.hi] if grads.whole else grads.flat
        else:
            g = _flatten(grads)[self.lo:self.hi]
        with torch.no_grad():
            w = self.master if self.zero else _flatten(params)
            self._update(w, g, lr)
            if self.zero:
                self._gather(params)
            else:
                _scatter_into(params, w)

    def _update(self, w: torch.Tensor, g: torch.Tensor, lr: float) -> None:
        if self.optimizer != "adam":
            w.add_(g, alpha=-lr)
            return
        b1, b2 = ADAM_BETAS
        m, v = self.moments
        self.t += 1
        m.mul_(b1).add_(g, alpha=1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        denom = (v / (1.0 - b2 ** self.t)).sqrt_().add_(ADAM_EPS)
        w.addcdiv_(m, denom, value=-lr / (1.0 - b1 ** self.t))


def _scatter_into(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[off:off + n].view_as(p))
        off += n
