"""ZeRO-1, 2 and 3 in the executor, a stage's training state sliced over its replica group; the SGD and Adam steps.

A stage's parameters, flattened in their order, are N elements; its replica group (with tensor parallelism: the
same TP rank of every replica, so each TP rank's own shard) has D ranks. Rank d owns the slice
``[d·c, min(N, (d + 1)·c))`` with ``c = ⌈N / D⌉`` (the last slices may be shorter or empty). For that slice it
keeps, from the start of the run (Rajbhandari et al. 2020; ``planner.sharding``'s table):

* the master copy of the weights, in the run's dtype (what ZeRO keeps in fp32 beside 16-bit weights; here the
  weights are already full precision, so it holds the same values — it is kept because it is what ZeRO
  holds and what ``planner.sharding`` counts), and
* the optimizer's moments: Adam's first and second, SGD's momentum buffer (plain SGD, the plan's optimizer
  "none": none).

At a round's ALLREDUCE:

* ZeRO-1: the gradients are all-reduced whole (every rank keeps the full reduced gradient until the STEP);
* ZeRO-2: they are reduce-scattered: each rank keeps only the reduced gradient of its own slice.

At the STEP each rank updates its slice (master copy and moments) and the updated slices are all-gathered into
every rank's full weights, in place. Flush schedules only (one weight version; the STEP is the last use of the
weights it reads). A stage with one replica (D = 1) owns everything and runs no collective.

ZeRO-3 (:class:`ShardedStage`; FSDP full shard, ``planner.sharding``'s stage 3) shards the weights too, per
unit: a unit is one layer of the stage (one profile layer, the unit the planner gathers). Each unit's parameters,
flattened in order, are ``N`` elements padded with zeros to ``D·c`` (``c = planner.sharding.shard_numel(N, D)``);
rank d keeps elements ``[d·c, (d + 1)·c)`` as its shard, which is the weights themselves (FSDP keeps no separate
master copy) beside the optimizer's moments of the shard (Adam's two, SGD's momentum buffer). Per microbatch, without prefetch
(``planner.sharding.fsdp_pass_collectives``):

* F: per unit, first to last: all-gather its weights, run it, drop the gathered copy. What autograd saves of the
  gathered weights is kept as a token (a saved-tensors hook), not the tensor, so the copy is freed.
* B: per unit, last to first: all-gather its weights again (the tokens unpack to views of this copy), its
  backward, then the reduce-scatter of its weight gradient (the backward of the gather), so each rank keeps
  its shard's gradient only; the copy is dropped. The units are chained through detached boundaries, so each
  unit's backward is its own ``autograd.grad``.

The round's ALLREDUCE runs nothing (the passes reduce-scattered); the STEP updates each shard in place.
Flush schedules of F and B passes, one stage per device, without tensor parallelism or recomputation
(``executor.prepare`` refuses the rest in one line).

Without ZeRO, Adam keeps its two moments over the whole stage (no master copy: ``planner.sharding``'s stage-0
count) and the existing all-reduce path reduces the gradients; SGD steps through ``executor.versions`` (its
momentum buffer there, one per stage, so it runs every schedule).

Adam here: β = (0.9, 0.999), ε = 1e-8, no weight decay, bias-corrected moments (Kingma and Ba 2015):
``m ← β₁m + (1 − β₁)g``, ``v ← β₂v + (1 − β₂)g²``, ``w ← w − (lr / (1 − β₁ᵗ)) · m / (√(v / (1 − β₂ᵗ)) + ε)``.
SGD here: momentum μ (the plan's, 0.9 by default), no dampening or Nesterov (``torch.optim.SGD(momentum=μ)``):
``b ← μb + g``, ``w ← w − lr·b``; plain SGD (μ = 0) ``w ← w − lr·g``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

__all__ = ["ADAM_BETAS", "ADAM_EPS", "EXECUTOR_OPTIMIZERS", "STATE_TENSORS", "shard_range", "Reduced", "StageOptimizer",
           "ShardedUnit", "ShardedStage"]

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
#: What the executor steps with for a plan's ``optimizer``: Adam, SGD with momentum (the planner's "sgd" and
#: "momentum", one buffer: ``planner.costmodel.OPTIMIZER_STATE`` 1), or plain SGD ("none", no state).
EXECUTOR_OPTIMIZERS = {"adam": "adam", "sgd": "momentum", "momentum": "momentum", "none": "sgd"}
#: State tensors per parameter element each executor optimizer keeps (beside ZeRO's master copy).
STATE_TENSORS = {"adam": 2, "momentum": 1, "sgd": 0}


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
        optimizer: "adam", "momentum" (SGD with ``momentum``) or "sgd" (plain).
        group: the stage's replica group (None: one replica).
        staged: collectives through host copies (gloo on a GPU).
        momentum: SGD's μ with "momentum".
    """

    def __init__(self, params: Sequence[torch.Tensor], zero: int, optimizer: str, group, staged: bool,
                 momentum: float = 0.9) -> None:
        self.zero, self.optimizer, self.group, self.staged = zero, optimizer, group, staged
        self.momentum = float(momentum)
        self.numel = sum(p.numel() for p in params)
        self.degree = dist.get_world_size(group) if (zero and group is not None) else 1
        self.index = dist.get_rank(group) if self.degree > 1 else 0
        self.lo, self.hi = shard_range(self.numel, self.degree, self.index) if zero else (0, self.numel)
        self.chunk = -(-self.numel // self.degree)
        ref = params[0]
        self.master = _flatten(params)[self.lo:self.hi].clone() if zero else None
        n = self.hi - self.lo
        self.moments = [torch.zeros(n, dtype=ref.dtype, device=ref.device) for _ in range(STATE_TENSORS[optimizer])]
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
        self.t += 1
        _update(self.optimizer, w, g, self.moments, self.t, lr, self.momentum)


def _update(optimizer: str, w: torch.Tensor, g: torch.Tensor, moments, t: int, lr: float, momentum: float) -> None:
    """One step (the ``t``-th, from 1) of ``optimizer`` on flat ``w`` in place, its moments updated in place."""
    if optimizer == "adam":
        _adam(w, g, moments, t, lr)
    elif optimizer == "momentum":
        (b,) = moments
        b.mul_(momentum).add_(g)
        w.add_(b, alpha=-lr)
    else:
        w.add_(g, alpha=-lr)


def _adam(w: torch.Tensor, g: torch.Tensor, moments, t: int, lr: float) -> None:
    """Step ``t`` (from 1) of Adam on ``w`` in place, its moments ``(m, v)`` updated in place."""
    b1, b2 = ADAM_BETAS
    m, v = moments
    m.mul_(b1).add_(g, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    denom = (v / (1.0 - b2 ** t)).sqrt_().add_(ADAM_EPS)
    w.addcdiv_(m, denom, value=-lr / (1.0 - b1 ** t))


def _scatter_into(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    off = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[off:off + n].view_as(p))
        off += n


# --- ZeRO-3 -------------------------------------------------------------------------
class _Token:
    """What autograd keeps of a saved view of a unit's gathered weights: where the view lies in them."""

    __slots__ = ("unit", "size", "stride", "offset")

    def __init__(self, unit: "ShardedUnit", t: torch.Tensor) -> None:
        self.unit, self.size, self.stride, self.offset = unit, t.size(), t.stride(), t.storage_offset()


class _Gather(torch.autograd.Function):
    """A unit's flat weights from its shard: all-gathered forward; backward, their gradient reduce-scattered."""

    @staticmethod
    def forward(ctx, shard, unit):  # noqa: D102 - the class says it
        ctx.unit = unit
        return unit.gather()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return ctx.unit.reduce_scatter(grad), None


class ShardedUnit:
    """One unit (layer) of a ZeRO-3 stage on one rank: its shard of the flat weights, the optimizer's moments of it
    (``STATE_TENSORS``), and its collectives over the replica group.

    Args:
        index: the unit's place in the stage (forward order).
        params: the unit's parameters, whole (every replica starts from the same ones).
        group: the stage's replica group (None: one replica, which owns everything and runs no collective).
        staged: collectives through host copies (gloo on a GPU).
        log: where each collective is recorded as ``(op, unit, bytes of the gathered or reduced tensor)``.
        moments: how many moment tensors of the shard the optimizer keeps (Adam 2, SGD with momentum 1).
    """

    def __init__(self, index: int, params: Sequence[torch.Tensor], group, staged: bool, log: list,
                 moments: int = 2) -> None:
        from planner.sharding import shard_numel

        self.index, self.group, self.staged, self.log = index, group, staged, log
        self.degree = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        self.shapes = [p.shape for p in params]
        self.numel = sum(p.numel() for p in params)
        self.chunk = shard_numel(self.numel, self.degree)
        ref = params[0]
        padded = torch.zeros(self.degree * self.chunk, dtype=ref.dtype, device=ref.device)
        padded[:self.numel] = _flatten(params)
        self.shard = padded[rank * self.chunk:(rank + 1) * self.chunk].clone().requires_grad_(True)
        self.moments = [torch.zeros_like(self.shard, requires_grad=False) for _ in range(moments)]
        self.full: torch.Tensor | None = None  # the weights gathered for a backward, while it runs
        self.action = None  # the action running, set by the runtime (for the log)

    @property
    def shard_bytes(self) -> int:
        return self.chunk * self.shard.element_size()

    def _host(self, t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu") if self.staged else t

    def gather(self) -> torch.Tensor:
        """The unit's ``numel`` flat weights, every rank's shard gathered (one replica: a copy of its own)."""
        local = self.shard.detach()
        if self.degree == 1:
            return local[:self.numel].clone()
        local = self._host(local)
        pieces = [torch.empty_like(local) for _ in range(self.degree)]
        dist.all_gather(pieces, local, group=self.group)
        self.log.append((self.action, "all_gather", self.index, self.degree * self.shard_bytes))
        return torch.cat(pieces)[:self.numel].to(self.shard.device)

    def reduce_scatter(self, grad: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``grad`` (the unit's flat weight gradient) summed over the group."""
        if self.degree == 1:
            out = torch.zeros_like(self.shard, requires_grad=False)
            out[:self.numel] = grad
            return out
        padded = torch.zeros(self.degree * self.chunk, dtype=grad.dtype, device=self._host(grad).device)
        padded[:self.numel] = self._host(grad).reshape(-1)
        out = torch.empty(self.chunk, dtype=grad.dtype, device=padded.device)
        dist.reduce_scatter(out, list(padded.split(self.chunk)), group=self.group)
        self.log.append((self.action, "reduce_scatter", self.index, self.degree * self.shard_bytes))
        return out.to(self.shard.device)

    def views(self, full: torch.Tensor) -> list[torch.Tensor]:
        """The unit's parameters as views of its flat ``full`` weights."""
        out, off = [], 0
        for shape in self.shapes:
            n = shape.numel()
            out.append(full[off:off + n].view(shape))
            off += n
        return out


class ShardedStage:
    """A ZeRO-3 stage on one rank: its units (one per layer of ``module``, those without parameters included),
    each sharded (:class:`ShardedUnit`), run and differentiated unit by unit.

    Args:
        module: the stage's layers (``nn.Sequential``), whose parameters ``slots`` says how to bind
            (``executor.versions.StageState.slots``: (submodule, attribute, index into ``params``)).
        names: the parameters' names, in ``params``' order.
        params: the stage's parameters (version 0).
        group, staged: as :class:`ShardedUnit`.
        optimizer: "adam", "momentum" (SGD with ``momentum``) or "sgd" (plain), as :class:`StageOptimizer`.
    """

    def __init__(self, module, names: Sequence[str], params: Sequence[torch.Tensor], slots, group,
                 staged: bool, optimizer: str = "adam", momentum: float = 0.9) -> None:
        self.module, self.names = module, tuple(names)
        self.optimizer, self.momentum = optimizer, float(momentum)
        self.log: list = []
        children = list(module.named_children())
        unit_of = {name: j for j, (name, _) in enumerate(children)}
        owner = [unit_of[n.split(".", 1)[0]] for n in self.names]
        self.slots: list[list] = [[] for _ in children]  # per unit: (submodule, attribute, index in the unit)
        self.members: list[list[int]] = [[] for _ in children]  # per unit: its parameters' indices in ``params``
        for j, u in enumerate(owner):
            self.members[u].append(j)
        for mod, attr, j in slots:
            u = owner[j]
            if not any(mod is m for m in children[u][1].modules()):
                raise ValueError(f"parameter {self.names[j]} is shared by two layers; ZeRO-3 shards each layer alone")
            self.slots[u].append((mod, attr, self.members[u].index(j)))
        self.layers = [m for _, m in children]
        self.units = [ShardedUnit(u, [params[j] for j in self.members[u]], group, staged, self.log,
                                  STATE_TENSORS[optimizer])
                      if self.members[u] else None for u in range(len(children))]
        self.t = 0
        ref = params[0]
        self._empty = torch.empty(0, dtype=ref.dtype, device=ref.device)
        self.unbind()

    # --- what it holds ----------------------------------------------------------------
    @property
    def sharded(self) -> list[ShardedUnit]:
        return [u for u in self.units if u is not None]

    @property
    def param_bytes(self) -> int:
        """Bytes of weights this rank holds between passes: its shards (padding included)."""
        return sum(u.shard_bytes for u in self.sharded)

    @property
    def state_bytes(self) -> int:
        """Bytes of optimizer state: the optimizer's moments of the shards (the shards are the master copy)."""
        return sum(m.numel() * m.element_size() for u in self.sharded for m in u.moments)

    @property
    def shards(self) -> list[torch.Tensor]:
        return [u.shard for u in self.sharded]

    def set_action(self, action) -> None:
        for u in self.sharded:
            u.action = action

    # --- binding ----------------------------------------------------------------------
    def _bind(self, u: int, tensors) -> None:
        for mod, attr, j in self.slots[u]:
            mod._parameters[attr] = tensors[j] if tensors is not None else self._empty

    def unbind(self) -> None:
        """Leave every layer without weights (nothing but the shards holds them between passes)."""
        for u in range(len(self.units)):
            self._bind(u, None)

    # --- the passes -------------------------------------------------------------------
    def forward(self, x: torch.Tensor, pack=None):
        """The stage's output and its chain (per unit: its input leaf, its output), each unit's weights gathered
        before it runs and dropped after; ``pack``: the saved-tensor hook to pass everything else to."""
        chain = []
        for j, layer in enumerate(self.layers):
            xin = x if j == 0 else x.detach().requires_grad_(x.is_floating_point())
            unit = self.units[j]
            if unit is None:
                y = layer(xin)
            else:
                full = _Gather.apply(unit.shard, unit)
                key = full.untyped_storage().data_ptr()
                self._bind(j, unit.views(full))

                def keep(t, unit=unit, key=key):
                    try:
                        if t.untyped_storage().data_ptr() == key:
                            return _Token(unit, t)
                    except (RuntimeError, NotImplementedError):
                        pass
                    return pack(t) if pack is not None else t

                try:
                    with torch.autograd.graph.saved_tensors_hooks(keep, _unpack):
                        y = layer(xin)
                finally:
                    self._bind(j, None)
                del full
            chain.append((xin, y))
            x = y
        return x, chain

    def backward(self, chain, root: torch.Tensor, gout, need_input: bool):
        """Per unit, last to first, its backward: ``root`` (the stage's output, or the loss) with output gradient
        ``gout`` (None: a loss). Returns (each sharded unit's shard gradient, the stage input's gradient or None)."""
        grads: list = [None] * len(self.units)
        g = gout
        for j in range(len(self.layers) - 1, -1, -1):
            xin, y = chain[j]
            out = root if j == len(self.layers) - 1 else y
            unit = self.units[j]
            wants = []
            want_x = xin.requires_grad and (j > 0 or need_input)
            if want_x:
                wants.append(xin)
            if unit is not None:
                unit.full = unit.gather()
                wants.append(unit.shard)
            try:
                got = torch.autograd.grad(out, wants, g, allow_unused=True, materialize_grads=True) if wants else ()
            finally:
                if unit is not None:
                    unit.full = None
            chain[j] = None
            if unit is not None:
                grads[j] = got[-1]
            g = got[0] if want_x else None
        return [t for t, u in zip(grads, self.units) if u is not None], g

    # --- the update and the whole weights ---------------------------------------------
    def step(self, grads, lr: float) -> None:
        """The optimizer on every shard in place with the round's shard gradients (None: no gradient; the moments
        still advance)."""
        self.t += 1
        with torch.no_grad():
            for k, u in enumerate(self.sharded):
                g = grads[k] if grads is not None else torch.zeros_like(u.shard, requires_grad=False)
                _update(self.optimizer, u.shard, g, u.moments, self.t, lr, self.momentum)

    def whole_weights(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, by name (a collective over the group: every rank of it calls this; not logged)."""
        out = {}
        for u, unit in enumerate(self.units):
            if unit is None:
                continue
            log, unit.log = unit.log, []
            try:
                with torch.no_grad():
                    full = unit.gather()
            finally:
                unit.log = log
            for j, t in zip(self.members[u], unit.views(full)):
                out[self.names[j]] = t.clone()
        return dict(sorted(out.items(), key=lambda kv: self.names.index(kv[0])))


def _unpack(x):
    if isinstance(x, _Token):
        full = x.unit.full
        if full is None:
            raise RuntimeError(f"unit {x.unit.index}'s weights were not gathered before its backward")
        return full.as_strided(x.size, x.stride, x.offset)
    return x
