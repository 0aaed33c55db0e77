"""Memory accounting: the one saved-tensor counter, and the bytes a worker holds between actions.

:class:`SavedBytes` is a ``saved_tensors_hooks`` pack/unpack pair that adds up
the bytes autograd keeps for backward, each storage once, excluded storages
(parameters, buffers, receive buffers) skipped; a tensor without a storage
(sparse, nested) counts its own elements. The runtime, the profiler and
calibration count with it.

:class:`HeldBytes` is what a worker holds between actions on the CPU, counted
exactly: for the microbatches in flight, the bytes autograd saves for backward
and the stage's output (the root of the backward); live parameter versions
plus the freed one kept for reuse; gradient buffers; optimizer state (SGD's
momentum buffer, Adam's moments; plain SGD none); input gradients waiting for their SEND; and every pooled receive
buffer (the pool never frees one, and receives are posted ahead). Transients
inside one action and messages the transport holds are not counted.
``sim.memory`` models the same quantity. On a GPU the runtime reports
``torch.cuda`` allocator figures instead.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import Tensor


def tensor_bytes(t) -> int:
    """Bytes of a tensor's elements (summed over tuples and lists; 0 for anything else)."""
    if isinstance(t, Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (tuple, list)):
        return sum(tensor_bytes(x) for x in t)
    return 0


def storage_keys(tensors: Iterable[Tensor]) -> set[int]:
    """The storages of ``tensors`` as :class:`SavedBytes` keys (empty storages left out)."""
    out = {t.untyped_storage().data_ptr() for t in tensors}
    out.discard(0)
    return out


class SavedBytes:
    """saved_tensors_hooks pack/unpack that adds up the bytes of each saved storage once, excluded storages skipped.

    Attributes:
        exclude: storage keys (``untyped_storage().data_ptr()``) never counted.
        nbytes: bytes counted since the last :meth:`start`.
    """

    __slots__ = ("exclude", "seen", "nbytes")

    def __init__(self, exclude: Iterable[int] = ()) -> None:
        self.exclude: set[int] = set(exclude)
        self.seen: set[int] = set()
        self.nbytes = 0

    def pack(self, t: Tensor):
        try:
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in self.exclude and key not in self.seen:
                self.seen.add(key)
                self.nbytes += s.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, ...)
            key = -id(t)
            if key not in self.seen:
                self.seen.add(key)
                self.nbytes += tensor_bytes(t)
        return t

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t

    def start(self) -> None:
        """Forget what was counted: the next pack starts a new count."""
        self.seen.clear()
        self.nbytes = 0

    @contextmanager
    def counting(self) -> Iterator["SavedBytes"]:
        """A fresh count of what autograd saves inside the block."""
        self.start()
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            yield self


class HeldBytes:
    """A worker's held bytes by kind, kept up to date by the runtime as its actions run (CPU only).

    Attributes:
        exact: counting is on (memory tracked, on the CPU); every method is a no-op otherwise.
        saved: bytes the in-flight microbatches keep for backward (outputs included).
        grads: gradient buffers of rounds not yet stepped.
        pool: pooled receive buffers (never freed).
        counter: the saved-tensor counter; its ``exclude`` holds every parameter and pooled storage.
    """

    def __init__(self, exact: bool) -> None:
        self.exact = exact
        self.saved = 0
        self.grads = 0
        self.optimizer = 0  # optimizer state held from the start (executor.zero.StageOptimizer.state_bytes)
        self.pool = 0
        self.pool_storages: set[int] = set()
        self.counter = SavedBytes()

    def add_pooled(self, buf: Tensor) -> None:
        """Count a buffer the receive pool now owns (once; it is never freed) and keep it out of the saved bytes."""
        if not self.exact:
            return
        key = buf.untyped_storage().data_ptr()
        if key not in self.pool_storages:
            self.pool_storages.add(key)
            self.pool += buf.untyped_storage().nbytes()
            self.counter.exclude.add(key)

    def add_params(self, tensors: Iterable[Tensor]) -> None:
        """Parameter tensors: never counted as saved (their bytes are counted per version)."""
        if self.exact:
            self.counter.exclude.update(t.untyped_storage().data_ptr() for t in tensors)

    def drop_params(self, tensors: Iterable[Tensor]) -> None:
        if self.exact:
            for t in tensors:
                self.counter.exclude.discard(t.untyped_storage().data_ptr())

    def total(self, param_bytes: int, outgoing: int) -> float:
        """Everything held: saved + parameters (every live version and kept spare) + gradients + optimizer state
        (SGD's momentum buffer, Adam's moments; plain SGD none) + pooled buffers + input gradients waiting for their SEND."""
        return float(self.saved + param_bytes + self.grads + self.optimizer + self.pool + outgoing)
