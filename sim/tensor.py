"""The tensor-parallel all-reduces inside one compute action: how many, of how many bytes, after how much compute.

Read from the per-TP-rank profile (``Layer.tp_*``) and ``planner.recompute`` (full
recomputation re-runs each recomputed layer's forward, its all-reduces included,
just before that layer's backward).
"""
from __future__ import annotations

from planner.profile import ModelProfile
from planner.recompute import layer_extra_forward_s, recomputed_tp_allreduces

Segments = tuple[tuple[tuple[float, float], ...], float]


def tp_segments(profile: ModelProfile, first: int, last: int, k: float, microbatch_size: int,
                recompute: str) -> tuple[Segments, Segments]:
    """Per stage, the TP all-reduces inside a forward and inside a backward (with what recomputation re-runs):
    ((pieces, raw_s) forward, (pieces, raw_s) backward), each piece (seconds of compute before it, bytes),
    raw_s the action's compute seconds at the run's microbatch (before speed and splitting)."""
    def build(parts):
        pieces, pending, total = [], 0.0, 0.0
        for t, n, nbytes in parts:
            total += t
            if n == 0:
                pending += t
                continue
            for _ in range(n):
                pieces.append((pending + t / n, nbytes))
                pending = 0.0
        return tuple(pieces), total

    layers = profile.layers[first:last + 1]
    fwd = build([(l.forward_s * k, l.tp_forward_allreduces, l.tp_allreduce_bytes * microbatch_size) for l in layers])
    bwd_parts = []
    for l in reversed(layers):  # each layer re-runs its forward (recomputation) just before its own backward
        bwd_parts.append((layer_extra_forward_s(l, recompute) * k, recomputed_tp_allreduces(l, recompute),
                          l.tp_allreduce_bytes * microbatch_size))
        bwd_parts.append((l.backward_s * k, l.tp_backward_allreduces, l.tp_allreduce_bytes * microbatch_size))
    return fwd, build(bwd_parts)
