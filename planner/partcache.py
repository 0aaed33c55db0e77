"""What the partition searches share besides their problem and answer types: the digest that keys cached answers
and the :class:`PartitionCache` that keeps them across searches.

Why its own module: the flat programme (``planner.partition``) and the hierarchical one
(``planner.hierarchical``) both key and store their tables here; with it apart neither reads the other's
internals, and a cache's contents are one public interface (``flat``, ``times``, ``levels``, ``splits``).
"""
from __future__ import annotations

import hashlib

import numpy as np


def digest(*parts) -> bytes:
    """A collision-resistant digest of scalars (by ``repr``, exact for floats) and arrays (dtype, shape, bytes)."""
    h = hashlib.blake2b(digest_size=24)
    for p in parts:
        if isinstance(p, np.ndarray):
            a = np.ascontiguousarray(p)
            h.update(f"<{a.dtype.str}{a.shape}>".encode())
            h.update(a.tobytes())
        else:
            h.update(f"<{type(p).__name__}:{p!r}>".encode())
    return h.digest()


class TimeStore:
    """Stage-time tables by key, the oldest dropped beyond ``max_bytes`` (a pass over 64 devices holds ~30 MB)."""

    def __init__(self, max_bytes: float = 160e6) -> None:
        self._tables: dict[bytes, np.ndarray] = {}
        self._bytes, self.max_bytes = 0, max_bytes

    def get(self, key: bytes) -> np.ndarray | None:
        return self._tables.get(key)

    def put(self, key: bytes, t: np.ndarray) -> None:
        t.setflags(write=False)  # shared by every pass that reads it
        self._tables[key] = t
        self._bytes += t.nbytes
        while self._bytes > self.max_bytes and len(self._tables) > 1:
            self._bytes -= self._tables.pop(next(iter(self._tables))).nbytes


class PartitionCache:
    """Solver answers kept across searches; pass one to ``partition.solve_flat``, ``partition.solve_flat_per_count``
    and ``hierarchical.solve_hierarchical`` (``planner.search.plan_model`` takes one too).

    * ``flat``: the best partition over the first N devices, keyed by ``partition._Tables.key`` of their tables;
    * ``splits``: equal-work splits (``hierarchical.split_even``), keyed by the layer times and the part count;
    * ``times``: the flat programme's stage times, keyed by its time key and the grid: the families that update
      alike (every batched one at one M) and their passes share them;
    * ``levels``: each hierarchical level's dynamic-programme tables (the top level's first row only, all the
      search reads of it), keyed by the level's inputs (the cut costs and the per-unit-count stage times). A level
      over C units is the same, for every unit count up to C, as the level over fewer units with the same
      inputs, so a table is extended from the longest stored prefix instead of being recomputed.

    Not thread-safe; one per process (or per group of searches) is the intended use. ``hits`` and
    ``misses`` count flat answers and hierarchical levels; ``extended`` counts the misses that started
    from a stored prefix.
    """

    def __init__(self) -> None:
        self.flat: dict[bytes, object] = {}  # partition.Partition | None
        self.levels: dict[bytes, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.splits: dict[bytes, tuple[tuple[int, int], ...]] = {}
        self.times = TimeStore()
        self.hits = 0
        self.misses = 0
        self.extended = 0
