"""The tensor-parallel collectives inside one compute action: which, of how many bytes, after how much compute.

Read from the per-TP-rank profile (``Layer.tp_collectives``, every collective as issued) and ``planner.recompute``
(full recomputation re-runs each recomputed layer's forward, its collectives included, just before that layer's
backward; a split backward's BI and BW each run a checkpoint whole: ``planner.recompute.pass_tp_collectives``).
"""
from __future__ import annotations

from planner.profile import ModelProfile
from planner.recompute import checkpointed, layer_extra_forward_s, recomputed_tp_collectives

Segments = tuple[tuple[tuple[float, float, str], ...], float]


def tp_segments(profile: ModelProfile, first: int, last: int, k: float, microbatch_size: int,
                recompute: str, bi_fraction: float = 0.5, split_factor: float = 1.0) -> dict[str, Segments]:
    """Per stage, the TP collectives inside each pass, by kind ("F", "B", "BI", "BW"): (pieces, raw_s), each piece
    (seconds of compute before it, bytes, kind: ``planner.tpcollectives.KINDS``), a layer's compute split evenly
    before its collectives; raw_s the pass's compute seconds at the run's microbatch (before speed), what
    recomputation re-runs included, BI and BW split by ``bi_fraction`` and ``split_factor`` as ``sim.engine``
    splits them (``planner.recompute.pass_recompute_s``)."""
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
    bwd = build(bwd_parts)
    out = {"F": fwd, "B": bwd}
    if recompute == "none":  # BI: the backward's collectives at its share of the compute; BW none
        out["BI"], out["BW"] = bwd, ((), 0.0)
        return out
    for kind, share in (("BI", bi_fraction), ("BW", 1.0 - bi_fraction)):
        parts = []
        for l in reversed(layers):
            if checkpointed(l, recompute):  # the checkpoint whole, in either pass
                parts += [(l.forward_s * k, l.tp_forward), (l.backward_s * k, l.tp_backward)]
            else:  # selective's core re-run, then the pass's share (the input gradient's collectives in the BI)
                parts += [(layer_extra_forward_s(l, recompute) * k, ()),
                          (l.backward_s * split_factor * share * k, l.tp_backward if kind == "BI" else ())]
        out[kind] = build(parts)
    return out
