"""Weight versions and stashing: a stage's parameter versions, which action frees which, and the SGD step.

A stage keeps ``versions: dict[version, (params, by_name)]`` of parameter
tensors. A forward binds its version's tensors into the module (as
``torch.func.functional_call`` would, without its per-call cost), and the
autograd graph of a microbatch already references the tensors of the version
its forward used, so its backward needs no restore (weight stashing). A
version is dropped right after its last use in the worker's action list (a
forward or backward tagged with it, or the STEP that reads it), so a stage
holds exactly the versions its in-flight microbatches (and, under vertical
sync, its future forwards) need, plus the newest. A STEP that is itself the
last use of the version it reads updates that version's tensors in place
(every STEP of a flush schedule; under PipeDream, a stage none of whose
in-flight microbatches still uses it); otherwise it writes into the tensors of
a version freed earlier (one is kept per stage) or into new ones.

Gradients accumulate per round (flush / 2BW: the batch; PipeDream: the
replica's k-th minibatch is round k) until the round's STEP.

The step is SGD with momentum μ (``torch.optim.SGD(momentum=μ)``, no dampening,
no Nesterov): ``b ← μ·b + g``, ``W(v+1) = W(v) − lr·b``. The momentum buffer
``b`` is the stage's one copy, zeros before the first STEP and updated by every
STEP in step order; it is not stashed. Weight stashing keeps the version a
backward's *gradient* is taken at; the update always applies to the newest
version with the one buffer (as PipeDream's ``OptimizerWithWeightStashing``
stashes parameters only), so under PipeDream, vertical sync and 2BW the buffer
accumulates the stale gradients in the order the stage steps. μ = 0 (the
plan's optimizer "none") keeps no buffer: plain SGD.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from planner.program import Action, Kind


class Entry:
    """A microbatch between its forward and its (weight-gradient) backward.

    Attributes:
        x: the stage input as a leaf (None on stage 0, whose input needs no gradient).
        out: the forward's output (the loss on the last stage): the root of its backward.
        version: the weight version the forward used.
        bufs: the receive buffer the input came in (released to the pool after the backward).
        saved_bytes: bytes autograd keeps for this microbatch's backward (and its output).
        gout: the output gradient, kept between a BI and its BW.
        chain: ZeRO-3, per unit of the stage its input leaf and output (``executor.zero.ShardedStage.forward``).
    """

    __slots__ = ("x", "out", "version", "bufs", "saved_bytes", "gout", "chain")

    def __init__(self, x, out, version, bufs, saved_bytes, chain=None):
        self.x, self.out, self.version, self.bufs, self.saved_bytes, self.gout = x, out, version, bufs, saved_bytes, None
        self.chain = chain


class StageState:
    """One (virtual) stage held by a worker: its module, weight versions, in-flight microbatches and gradients."""

    def __init__(self, index: int, first: int, last: int, layers: list[nn.Module], num_stages: int) -> None:
        self.index, self.first, self.last = index, first, last
        self.module = nn.Sequential(OrderedDict((str(first + i), m) for i, m in enumerate(layers)))
        named = list(self.module.named_parameters())
        self.names = tuple(n for n, _ in named)
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.versions: dict[int, tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]] = {}
        self.current = 0
        self.inflight: dict[int, Entry] = {}
        self.acc: dict[int, list[torch.Tensor]] = {}
        self.count: dict[int, int] = {}
        self.group = None
        self.param_bytes = sum(p.numel() * p.element_size() for _, p in named)
        self.numel = sum(p.numel() for _, p in named)
        self.spare: list[tuple[torch.Tensor, ...]] = []  # at most one freed version's tensors, reused by the next STEP
        # bytes one forward of this stage keeps for its backward, once measured (see StageWorker._forward)
        self.saved_bytes: int | None = None
        self.saved_varies = False
        self.forwards = 0
        self.slots: list = []
        self.bound = None
        self.shards: dict = {}  # parameter name -> ShardSpec, for a tensor-parallel shard (executor.tensor_parallel)
        self.sequence_partial: list[int] = []  # parameters whose gradients sequence parallelism leaves partial
        self.opt = None  # executor.zero.StageOptimizer: Adam, or ZeRO's sharded step (None: SGD, below)
        self.momentum = 0.0  # SGD's μ (0: plain SGD, no buffer)
        self.buf: list[torch.Tensor] | None = None  # the momentum buffer, one tensor per parameter (see the docstring)
        self.resumed_buf: list[torch.Tensor] | None = None  # a checkpoint's buffer, copied in by use_momentum's caller
        self.fsdp = None  # executor.zero.ShardedStage under ZeRO-3: the shards, in place of any version

    def set_version(self, v: int, params) -> None:
        params = tuple(params)
        self.versions[v] = (params, dict(zip(self.names, params)))

    def release_module_params(self) -> None:
        """Drop the module's own parameter storage and learn where each parameter lives, for :meth:`bind`.

        ``slots`` lists (submodule, attribute, index into a version's tensors) for every
        parameter reference, tied ones included (``remove_duplicate=False``).
        """
        index = {id(p): j for j, (_, p) in enumerate(self.module.named_parameters())}
        self.slots = []
        for name, p in self.module.named_parameters(remove_duplicate=False):
            owner, _, attr = name.rpartition(".")
            self.slots.append((self.module.get_submodule(owner) if owner else self.module, attr, index[id(p)]))
        for p in self.module.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.bound = None

    def bind(self, v: int) -> None:
        """Make the module compute with version ``v``'s tensors.

        The same as ``torch.func.functional_call`` with the version's tensors, at a
        dict store per parameter and only when the version changes: the tensors are
        put into the submodules' ``_parameters`` directly (they are leaves that
        require grad, not ``nn.Parameter``), and stay there until another version
        is bound. Autograd records the tensors a forward used, so a backward never
        needs a rebind.
        """
        params = self.versions[v][0]
        if self.bound is params:
            return
        for mod, attr, j in self.slots:
            mod._parameters[attr] = params[j]
        self.bound = params

    def weights(self, v: int | None = None) -> dict[str, torch.Tensor]:
        return dict(self.versions[self.current if v is None else v][1])

    def held_param_bytes(self) -> int:
        """Every live version plus the freed one kept for the next STEP to write into (ZeRO-3: the shards)."""
        shards = self.fsdp.param_bytes if self.fsdp is not None else 0
        return self.param_bytes * (len(self.versions) + len(self.spare)) + shards

    def accumulate(self, k: int, grads: Sequence[torch.Tensor]) -> bool:
        """Add a microbatch's parameter gradients into round ``k``; True when this opened the round's buffers."""
        acc = self.acc.get(k)
        if acc is None:
            self.acc[k] = list(grads)
            self.count[k] = 1
            return True
        torch._foreach_add_(acc, list(grads))
        self.count[k] += 1
        return False

    def free(self, v: int):
        """Drop version ``v``; its tensors when they are no longer kept (to stop counting them), else None."""
        got = self.versions.pop(v, None)
        if got is None:  # renamed to the next version by an in-place STEP
            return None
        if not self.spare:  # kept (as an allocator would cache it) for the next STEP to write into
            self.spare.append(got[0])
            return None
        return got[0]

    def use_momentum(self, momentum: float) -> int:
        """Keep a momentum buffer (zeros, shaped as version 0's tensors) for SGD with ``momentum``; its bytes."""
        self.momentum = float(momentum)
        if not self.momentum:
            self.buf = None
            return 0
        self.buf = [torch.zeros_like(p, requires_grad=False) for p in self.versions[self.current][0]]
        return sum(b.numel() * b.element_size() for b in self.buf)

    @property
    def state_bytes(self) -> int:
        """Bytes of the SGD optimizer state this stage holds: its momentum buffer (plain SGD: none)."""
        return sum(b.numel() * b.element_size() for b in self.buf) if self.buf is not None else 0

    def _direction(self, grads):
        """What the step subtracts ``lr`` times: the gradient (plain SGD), or the momentum buffer after
        ``b ← μ·b + g`` (a round without a gradient: ``g = 0``, so the buffer still decays and moves the weights)."""
        if self.buf is None:
            return grads
        torch._foreach_mul_(self.buf, self.momentum)
        if grads is not None:
            torch._foreach_add_(self.buf, list(grads))
        return self.buf

    def step(self, version: int, grads, lr: float, in_place: bool):
        """``W(version) = W(current) - lr * d`` (no gradient: a copy); the tensors written, unless updated in place (None).

        ``d`` is the gradient (plain SGD) or the momentum buffer ``μ·b + g`` (:meth:`_direction`). In place when
        ``in_place`` (nothing on this worker reads W(current) after this STEP, and every backward that used it is
        done), else into a spare (freed) version's tensors or new ones. Same arithmetic either way (``a + alpha * b``).
        """
        old_v = self.current
        cur = self.versions[old_v][0]
        with torch.no_grad():
            grads = self._direction(grads)
            if in_place:
                del self.versions[old_v]
                if grads is not None:
                    torch._foreach_add_(list(cur), grads, alpha=-lr)
                self.set_version(version, cur)
                new = None
            elif self.spare:
                new = self.spare.pop()
                if grads is None:
                    torch._foreach_copy_(list(new), list(cur))
                else:
                    for n, c, g in zip(new, cur, grads):
                        torch.add(c, g, alpha=-lr, out=n)
            elif grads is None:
                new = [p.detach().clone().requires_grad_(True) for p in cur]
            else:
                new = [t.requires_grad_(True) for t in torch._foreach_add(list(cur), list(grads), alpha=-lr)]
        if new is not None:
            self.set_version(version, new)
        self.current = version
        return new


def plan_frees(acts: Sequence[Action]) -> tuple[dict[int, list[tuple[int, int]]], frozenset[int]]:
    """``(frees, step_in_place)`` of one worker's action list.

    ``frees[i]``: (stage, version) pairs whose last use on this worker is action
    i (the newest version of a stage is kept). ``step_in_place``: the indices of
    STEPs that are the last use of the version they read, so they update it in
    place (always so for flush schedules).
    """
    last: dict[tuple[int, int], int] = {}
    newest: dict[int, int] = {}
    for i, a in enumerate(acts):
        if a.is_compute:
            last[(a.stage, a.version)] = i
        elif a.kind is Kind.STEP:
            last[(a.stage, a.version - 1)] = i
            newest[a.stage] = max(newest.get(a.stage, 0), a.version)
    frees: dict[int, list[tuple[int, int]]] = {}
    for (s, v), i in last.items():
        if v != newest.get(s, 0):
            frees.setdefault(i, []).append((s, v))
    in_place = frozenset(i for i, a in enumerate(acts) if a.kind is Kind.STEP and last.get((a.stage, a.version - 1)) == i)
    return frees, in_place
