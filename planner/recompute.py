"""Activation recomputation: per layer range and mode, the time it adds to each backward pass and the bytes it keeps.

The one source of truth the cost model, the partitioner, the simulator's timing
and memory and the executor read, so a plan is costed the same wherever it is.

Modes (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models"):

- ``"none"``: every layer keeps its ``saved_bytes`` per sample from its forward
  until its backward.
- ``"full"``: every recomputable profile layer (``Layer.recomputable``: Megatron
  checkpoints the transformer blocks, not the embedding or the output head) is a
  checkpoint (Megatron's uniform method with one layer per checkpoint): it keeps
  only its input between forward and backward, and its backward first re-runs its
  forward (with that forward's TP all-reduces), which rebuilds its saved bytes for
  the duration of that layer's backward (one layer at a time). The
  input of layer i is layer i − 1's output (``activation_bytes``); layer 0's is
  taken as its own ``saved_bytes`` (what a first layer keeps is its input).
- ``"selective"``: only the part of each layer that is cheap to recompute and
  big to keep is dropped — in a transformer block the attention core (QKᵀ,
  softmax, dropout, attention over V: the 5·a·s/h term of s·h·(34 + 5·a·s/h)).
  ``Layer.attention_saved_bytes`` says how many of the layer's saved bytes that
  part is and ``Layer.attention_forward_s`` how long its forward takes
  (``planner.transformer_profile`` fills them for transformer blocks with Megatron's
  unfused attention). A flash attention block (``TransformerConfig.attention``,
  the llama family's default) keeps no scores and its kernel already recomputes
  them in its backward, so ``planner.transformer_profile`` gives it 0 for both; like a
  profile without those fields (every profile written before them, and
  non-transformer layers) it has nothing selective recomputation can drop: there
  selective is the same as none, in time and in memory.

A split backward (the zero-bubble families' BI, the input gradient, then BW, the
weight gradient) is timed as the executor runs it (``executor.runtime``: BI is
``autograd.grad`` of the stage output for its input with the graph kept, BW later
for the parameters; ``executor.recompute``). A full-recomputation checkpoint is one
autograd node whose backward re-runs the layer's forward and then its whole
backward, input and weight gradients (and its TP collectives) together, in every
pass that reaches it: its BI and its BW each take forward + backward, and nothing
of the split applies to it (``SimParams.bi_fraction``, ``split_factor``). Selective
recomputation's core sits on the path to the QKV weights, so both passes rebuild it:
each adds the core's forward to its share of the backward. ``pass_recompute_s``
says what recomputation adds to each pass; the cost model and the partition search
charge a microbatch's passes (``microbatch_recompute_s``), the simulator each pass
(``tests/test_recompute_split_time.py`` counts the executor's FLOPs per pass).

Amounts are per sample (bytes) and per reference microbatch (seconds), like the
profile's own fields; callers scale by the microbatch size.
"""
from __future__ import annotations

from planner.profile import Layer, ModelProfile
from planner.tpcollectives import TPCollective
from topologies.errors import InputError

MODES = ("none", "selective", "full")


class RecomputeError(InputError):
    """An unknown recomputation mode."""


def recompute_mode(value: str | bool | None) -> str:
    """Normalise a mode: True (the old boolean ``--recompute``) means "full", False/None "none"."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in MODES:
        raise RecomputeError(f"unknown recomputation mode {value!r}; choose one of {', '.join(MODES)}")
    return value


def layer_input_bytes(profile: ModelProfile, i: int) -> float:
    """Bytes per sample of layer ``i``'s input: the previous layer's output, or layer 0's own saved bytes."""
    return profile.layers[i - 1].activation_bytes if i > 0 else profile.layers[0].saved_bytes


def layer_extra_forward_s(layer: Layer, mode: str) -> float:
    """Seconds per reference microbatch a layer's backward spends re-running (part of) its forward."""
    if mode == "full":
        return layer.forward_s if layer.recomputable else 0.0
    if mode == "selective":
        return layer.attention_forward_s
    return 0.0


def checkpointed(layer: Layer, mode: str) -> bool:
    """Whether full recomputation makes ``layer`` a checkpoint (its backward one node: re-run forward, whole backward)."""
    return mode == "full" and layer.recomputable


def pass_recompute_s(layer: Layer, mode: str, kind: str, bi_fraction: float = 0.5, split_factor: float = 1.0) -> float:
    """Seconds per reference microbatch recomputation adds to one pass over ``layer`` (``kind`` "F", "B", "BI" or
    "BW"), beyond that pass without it: its share of the backward, ``backward_s · split_factor · bi_fraction`` in a
    BI and ``· (1 − bi_fraction)`` in a BW, as the simulator splits it. B: the re-run forward. A checkpoint's BI and
    BW: forward + backward each, less the share the split would have given the pass. Selective: the core's forward
    in every backward pass (B, BI and BW each rebuild it)."""
    if kind == "F":
        return 0.0
    if kind != "B" and checkpointed(layer, mode):
        share = bi_fraction if kind == "BI" else 1.0 - bi_fraction
        return layer.forward_s + layer.backward_s * (1.0 - split_factor * share)
    return layer_extra_forward_s(layer, mode)


def microbatch_recompute_s(profile: ModelProfile, first: int, last: int, mode: str, split: bool = False) -> float:
    """Seconds per reference microbatch recomputation adds to one microbatch's backward of layers first..last: a B's
    re-run forwards, or (``split``) what it adds to BI and BW together at an even split (``bi_fraction`` 0.5,
    ``split_factor`` 1: the closed forms'): a checkpoint 2·forward + backward, selective two core forwards."""
    mode = recompute_mode(mode)
    if mode == "none":
        return 0.0
    return sum(layer_microbatch_recompute_s(l, mode, split) for l in profile.layers[first:last + 1])


def layer_microbatch_recompute_s(layer: Layer, mode: str, split: bool = False) -> float:
    """``microbatch_recompute_s`` of one layer."""
    if not split:
        return layer_extra_forward_s(layer, mode)
    return pass_recompute_s(layer, mode, "BI") + pass_recompute_s(layer, mode, "BW")


def extra_forward_s(profile: ModelProfile, first: int, last: int, mode: str) -> float:
    """Seconds per reference microbatch that layers first..last add before (inside) their backward."""
    mode = recompute_mode(mode)
    if mode == "none":
        return 0.0
    return sum(layer_extra_forward_s(l, mode) for l in profile.layers[first:last + 1])


def layer_kept_bytes(profile: ModelProfile, i: int, mode: str) -> float:
    """Bytes per sample layer ``i`` keeps from its forward until its backward."""
    layer = profile.layers[i]
    if mode == "full" and layer.recomputable:
        return layer_input_bytes(profile, i)
    if mode == "selective":
        return layer.saved_bytes - min(layer.attention_saved_bytes, layer.saved_bytes)
    return layer.saved_bytes


def layer_rebuilt_bytes(profile: ModelProfile, i: int, mode: str) -> float:
    """Bytes per sample layer ``i``'s backward rebuilds and holds beyond what it kept (full: its saved bytes
    less its input, which is kept; selective: its attention core; none: nothing)."""
    layer = profile.layers[i]
    if mode == "full":
        return max(0.0, layer.saved_bytes - layer_input_bytes(profile, i)) if layer.recomputable else 0.0
    if mode == "selective":
        return min(layer.attention_saved_bytes, layer.saved_bytes)
    return 0.0


def recomputed_tp_collectives(layer: Layer, mode: str) -> tuple[TPCollective, ...]:
    """TP collectives a layer's backward adds by re-running its forward: full recomputation re-runs them all;
    selective re-runs only the attention core, which has none."""
    return layer.tp_forward if mode == "full" and layer.recomputable else ()


def backward_tp_collectives(layer: Layer, mode: str) -> tuple[TPCollective, ...]:
    """TP collectives inside one backward of a layer, in issue order: the re-run forward's (recomputation runs
    it just before the layer's own backward), then the backward's own."""
    return recomputed_tp_collectives(layer, mode) + layer.tp_backward


def pass_tp_collectives(layer: Layer, mode: str, kind: str) -> tuple[TPCollective, ...]:
    """TP collectives inside one pass over a layer (``kind`` "F", "B", "BI" or "BW"), in issue order: F its forward's;
    B ``backward_tp_collectives``; a checkpoint's BI and BW each its re-run forward's then its backward's; any other
    layer's BI its backward's (the input gradient's all-reduces), its BW none."""
    if kind == "F":
        return layer.tp_forward
    if kind == "B" or (checkpointed(layer, mode) and kind in ("BI", "BW")):
        return backward_tp_collectives(layer, mode)
    return layer.tp_backward if kind == "BI" else ()


def tp_collectives_run(layer: Layer, mode: str, split: bool = False) -> tuple[TPCollective, ...]:
    """TP collectives one microbatch of a layer runs: its forward's, then its backward's (re-run forward first), or
    (``split``) its BI's then its BW's."""
    if not split:
        return layer.tp_forward + backward_tp_collectives(layer, mode)
    return layer.tp_forward + pass_tp_collectives(layer, mode, "BI") + pass_tp_collectives(layer, mode, "BW")


def kept_bytes(profile: ModelProfile, first: int, last: int, mode: str) -> float:
    """Bytes per sample layers first..last keep from forward until backward (the stage input included)."""
    mode = recompute_mode(mode)
    if mode == "none":
        return profile.saved_bytes(first, last)
    return sum(layer_kept_bytes(profile, i, mode) for i in range(first, last + 1))


def rebuilt_bytes(profile: ModelProfile, first: int, last: int, mode: str) -> float:
    """Bytes per sample a backward of layers first..last holds at its peak beyond ``kept_bytes``: the most any
    one layer rebuilds, since layers are recomputed one at a time just before their own backward."""
    mode = recompute_mode(mode)
    if mode == "none":
        return 0.0
    return max(layer_rebuilt_bytes(profile, i, mode) for i in range(first, last + 1))
