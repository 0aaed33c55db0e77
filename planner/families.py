"""The schedule families' registry: what each family promises (``Family``), one line per family in ``FAMILY``.

Every consumer (generators, check, passes, cost model, simulator, executor) reads a family's traits, never its
name; ``family`` looks one up, ``ScheduleError`` is the error of parameters no schedule of a family can satisfy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from topologies.errors import InputError


class ScheduleError(InputError):
    """Parameters no schedule of the family can satisfy; the message says what to change."""


@dataclass(frozen=True)
class Family:
    """What a schedule family promises: every consumer reads these traits, never the family's name.

    Attributes:
        name: the spelling on the command line and in plans.
        title: the name in messages.
        flush: each batch ends in a flush and one optimizer step (False: a stream, PipeDream and 2BW).
        versions: the weight version a microbatch uses: "batch" (batch b on version b),
            "stale" (2BW: max(0, b − 1)) or "stash" (PipeDream: the latest at its forward, kept by its backward).
        backward: "full" (B), "split" (BI then BW) or "mixed" (either, per (stage, microbatch)).
        placement: where virtual stage s = c·P + j lives: "linear" (one stage per rank, replicas on
            consecutive workers), "looped" (rank j holds j, j + P, ...) or "v" (chunk c runs down the
            ranks when c is even and back up when odd: rank r holds r and 2P − 1 − r).
        chunks: stages per rank the family fixes (2 for V shapes); 0: the spec's ``chunks`` (≥ 1).
        replicable: stages may have data-parallel replicas (with several stages per rank, every stage
            the same count R: replica r of each rank runs the pipeline over microbatches mb mod R = r).
        inflight: the family's in-flight bound per stage (forward done, input gradient not): "batch"
            (a whole batch, GPipe), "1f1b" (a·L + b with L = ⌈workers at or after the stage / replicas⌉,
            P − s, and (a, b) = ``inflight_scale``), "chunk" (a batch per chunk) or "none" (only the laws).
        inflight_scale: (a, b) of the "1f1b" bound: (1, 0) for 1F1B itself, (2, −1) for ZB-H2.
        open_cap: (a, b): at most a·L₀ + b microbatch-chunks per worker await their weight gradient
            (forward done, B or BW not), L₀ the "1f1b" bound of stage 0 (1F1B's peak; 2P for a V
            over 2P virtual stages, PV on a loop); a looped family adds (V − 1)·(g − P) for a first
            microbatch group g > P (its warm-up's extra chunks, see ``interleaved_groups``); None: no cap.
        held_whole: (a, b): a V family holds at most ⌊(P + b)/a⌋ whole microbatches per rank (its building block's
            lifespans: V-Half (2, 2), V-Min (3, 4), Qi et al.'s counts), tighter than ``open_cap``; the cost model's figure.
        in_order: each kind of action runs a stage's microbatches in increasing order (a convention).
        weight_copies: weight versions a stage holds: 1, 2 (2BW) or 0 (one per in-flight minibatch).
        bubble: the fill-and-drain the cost model charges (f in T_batch = t·(M + (P − 1)·f), t a rank's
            F + B): "full" (1: GPipe, 1F1B), "chunk" (1/V: interleaved, looped BFS), "split" (max(F, BI)/(F + B):
            ZB-H1, microbatch 0's round trip after stage 0's P forwards), "split2" ((F + BI − 2 BW)/(F + B), at least 0: ZB-H2 batch after batch), "split-chunk" (max(F, BI)/V over
            F + B, a V-th of ZB-H1's: interleaved zero bubble), "v" (a chunk's F over F + B: ZB-V, DualPipeV), "v-half" (about 1/2: V-Half), "v-min" (about 2/3: V-Min; both their unit-cost closed forms over 1F1B's) or "none" (a stream).
        generated: pipetwin generates it (False: "custom", a program read from elsewhere, e.g. torch's
            CSV, whose placement is whatever its ``stage_workers`` say and which only the laws bind).
        mixed_split: which backwards a "mixed" family splits (``split_share``): "v-legs" (DualPipeV: rank d splits
            P − ⌈d/2⌉ of its first-leg stage's and P − 1 − ⌊d/2⌋ of its second-leg stage's, M ≥ 2P); None: unknown.
    """

    name: str
    title: str
    flush: bool = True
    versions: str = "batch"
    backward: str = "full"
    placement: str = "linear"
    chunks: int = 1
    replicable: bool = True
    inflight: str = "1f1b"
    inflight_scale: tuple[int, int] = (1, 0)
    open_cap: tuple[float, int] | None = None
    held_whole: tuple[int, int] | None = None
    in_order: bool = True
    weight_copies: int = 1
    bubble: str = "full"
    generated: bool = True
    mixed_split: str | None = None

    @property
    def stream(self) -> bool:
        """No flush: a step per backward (PipeDream) or per batch of a stream (2BW)."""
        return not self.flush

    @property
    def batched(self) -> bool:
        """Microbatches come in batches of M (all but PipeDream, whose M is the stream's length)."""
        return self.versions != "stash"

    def open_cap_at(self, limit0: int) -> int | None:
        """``open_cap``'s a·L₀ + b for a pipeline whose 1F1B depth is ``limit0``, as the whole count of
        microbatch-chunks it is (V-Min's a and b are fractions); None when the family sets no cap."""
        if self.open_cap is None:
            return None
        return math.floor(self.open_cap[0] * limit0 + self.open_cap[1] + 1e-9)

    def split_share(self, stages: int, virtual_stage: int, microbatches: int) -> float:
        """Share of a stage's backwards per batch the family splits into BI and BW (1 split, 0 full; a "mixed"
        family's by ``mixed_split``, 0 where it is unknown: ``tests/test_recompute_split_time.py`` counts them on
        the generated programs)."""
        if self.backward != "mixed":
            return float(self.backward == "split")
        if self.mixed_split != "v-legs":
            return 0.0
        d = rank_of(self, stages, virtual_stage)
        n = stages - (d + 1) // 2 if virtual_stage == d else stages - 1 - d // 2
        return min(1.0, n / microbatches)

    @property
    def multi_stage(self) -> bool:
        """A rank may hold more than one stage."""
        return self.placement != "linear"


def rank_of(fam: Family, stages: int, virtual_stage: int) -> int:
    """The pipeline rank (device index along the pipeline) holding ``virtual_stage`` under the family's placement."""
    c, j = divmod(virtual_stage, stages)
    if fam.placement == "v" and c % 2:
        return stages - 1 - j
    return j


#: The registry: one line per family. A new family adds its line here and its order in planner.schedules.
FAMILY: dict[str, Family] = {f.name: f for f in (
    Family("gpipe", "GPipe", inflight="batch"),
    Family("1f1b", "1F1B"),
    Family("interleaved", "interleaved 1F1B", placement="looped", chunks=0, inflight="chunk", bubble="chunk"),
    Family("pipedream", "PipeDream", flush=False, versions="stash", weight_copies=0, bubble="none"),
    Family("2bw", "2BW", flush=False, versions="stale", weight_copies=2, bubble="none"),
    Family("zb-h1", "ZB-H1", backward="split", open_cap=(1, 0), bubble="split"),
    Family("zb-h2", "ZB-H2", backward="split", inflight_scale=(2, -1), open_cap=(2, -1), bubble="split2"),
    Family("looped-bfs", "looped BFS", placement="looped", chunks=0, inflight="batch", in_order=False, bubble="chunk"),
    Family("custom", "an imported program", backward="mixed", placement="given", chunks=0, inflight="none",
           in_order=False, generated=False),
    Family("v-half", "V-Half", backward="split", placement="v", chunks=2, replicable=False, inflight="none",
           open_cap=(0.5, 2), held_whole=(2, 2), bubble="v-half"),
    Family("v-min", "V-Min", backward="split", placement="v", chunks=2, replicable=False, inflight="none",
           open_cap=(1 / 3, 8 / 3), held_whole=(3, 4), bubble="v-min"),
    Family("zb-v", "ZB-V", backward="split", placement="v", chunks=2, replicable=False, inflight="none", open_cap=(1, 0),
           bubble="v"),
    Family("interleaved-zb", "interleaved zero bubble", backward="split", placement="looped", chunks=0, inflight="chunk",
           open_cap=(1, 0), bubble="split-chunk"),
    Family("dualpipe-v", "DualPipeV", backward="mixed", placement="v", chunks=2, replicable=False, inflight="none",
           open_cap=(1, 1), bubble="v", mixed_split="v-legs"),
)}
FAMILIES = tuple(n for n, f in FAMILY.items() if f.generated)
FLUSH_FAMILIES = frozenset(n for n, f in FAMILY.items() if f.flush)


def family(name: str) -> Family:
    """The registered family ``name``; ScheduleError naming the choices otherwise."""
    try:
        return FAMILY[name]
    except KeyError:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(FAMILIES)}") from None
