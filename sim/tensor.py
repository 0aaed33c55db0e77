"""The tensor-parallel collectives inside one compute action: which, of how many bytes, after how much compute.

Read from the per-TP-rank profile (``Layer.tp_collectives``, every collective as issued) and ``planner.recompute``
(full recomputation re-runs each recomputed layer's forward, its collectives included, just before that layer's
backward).
"""
from __future__ import annotations

from planner.profile import ModelProfile
from planner.recompute import layer_extra_forward_s, recomputed_tp_collectives

Segments = tuple[tuple[tuple[float, float, str], ...], float]


def tp_segments(profile: ModelProfile, first: int, last: int, k: float, microbatch_size: int,
                recompute: str) -> tuple[Segments, Segments]:
    """Per stage, the TP collectives inside a forward and inside a backward (with what recomputation re-runs):
    ((pieces, raw_s) forward, (pieces, raw_s) backward), each piece (seconds of compute before it, bytes, kind:
    ``planner.tpcollectives.KINDS``), a layer's compute split evenly before its collectives; raw_s the action's
    compute seconds at the run's microbatch (before speed and splitting)."""
    def build(parts):
        pieces, pending, total = [], 0.0, 0.0
        for t, cols in parts:
            total += t
            if not cols:
                pending += t
                continue
            n = len(cols)
            for c in cols:
                pieces.append((pending + t / n, c.nbytes * microbatch_size, c.kind))
                pending = 0.0
        return tuple(pieces), total

    layers = profile.layers[first:last + 1]
    fwd = build([(l.forward_s * k, l.tp_forward) for l in layers])
    bwd_parts = []
    for l in reversed(layers):  # each layer re-runs its forward (recomputation) just before its own backward
        bwd_parts.append((layer_extra_forward_s(l, recompute) * k, recomputed_tp_collectives(l, recompute)))
        bwd_parts.append((l.backward_s * k, l.tp_backward))
    return fwd, build(bwd_parts)
