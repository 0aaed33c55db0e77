"""The program IR: per-worker ordered action lists that both interpreters run.

An ``Action`` prints compactly and parses back::

    2F0          stage 2, forward, microbatch 0 (weight version 0)
    2B7v3        stage 2, backward, microbatch 7, weight version 3
    1BI4 / 1BW4  input-gradient / weight-gradient halves of a split backward
    0SEND3a>w1   stage 0 sends microbatch 3's activation to worker 1
    1RECV3a<w0   stage 1 receives it from worker 0 ('g' instead of 'a': a gradient)
    0ALLREDUCE2  all-reduce of stage 0's gradients, round 2, among the stage's replicas
    0STEP2v3     stage 0 optimizer step number 2, producing weight version 3

A ``Program`` holds ``actions: dict[worker, list[Action]]`` with the spec it was
generated from and which workers hold which stage replica. With tensor
parallelism T, every stage replica is a group of T workers that run the same
compute actions (the TP collectives run inside each F/B/BI/BW); point-to-point
goes from TP rank t to TP rank t of the peer replica, and a stage's all-reduce
runs among the replicas' workers of one TP rank.

Why one module of ~700 lines: the IR (with its text and JSON forms), the schedule spec and the family
registry with its spec helpers (in-flight limits, interleaved groups, even layer ranges) are one
vocabulary that check, the generators, the passes and both interpreters read; the helpers sit beside
``ScheduleSpec`` on purpose, which is what broke the check <-> schedules import circle.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field, replace
from enum import Enum

from topologies.errors import InputError


class Kind(str, Enum):
    F = "F"
    B = "B"
    BI = "BI"
    BW = "BW"
    SEND = "SEND"
    RECV = "RECV"
    ALLREDUCE = "ALLREDUCE"
    STEP = "STEP"

    def __str__(self) -> str:  # noqa: D105
        return self.value


COMPUTE = frozenset({Kind.F, Kind.B, Kind.BI, Kind.BW})
BACKWARD = frozenset({Kind.B, Kind.BI})  # actions that produce the input gradient
WEIGHT_GRAD = frozenset({Kind.B, Kind.BW})  # actions that finish a microbatch's weight gradient
COMM = frozenset({Kind.SEND, Kind.RECV, Kind.ALLREDUCE})


@dataclass(frozen=True)
class Action:
    """One step of one worker.

    Attributes:
        stage: the (virtual) stage the action belongs to.
        kind: what it does.
        mb: microbatch (minibatch for PipeDream) index; for ALLREDUCE and STEP, the round / step number.
        version: weight version the action uses (for STEP: the version it produces).
        peer: the other worker of a SEND or RECV.
        grad: for SEND/RECV, True when the payload is a gradient (backward direction).
        nbytes: payload bytes of a SEND/RECV/ALLREDUCE (0 when unknown).
    """

    stage: int
    kind: Kind
    mb: int
    version: int = 0
    peer: int | None = None
    grad: bool = False
    nbytes: int = 0

    def __str__(self) -> str:
        s = f"{self.stage}{self.kind.value}{self.mb}"
        if self.version:
            s += f"v{self.version}"
        if self.kind in (Kind.SEND, Kind.RECV):
            s += ("g" if self.grad else "a") + (">" if self.kind is Kind.SEND else "<") + f"w{self.peer}"
        return s

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> "Action":
        m = _ACTION_RE.match(text.strip())
        if not m:
            raise ValueError(f"cannot parse action {text!r} (examples: 2F0, 1B3v2, 0SEND3a>w1, 0STEP2v3)")
        stage, kind, mb, version, payload, arrow, peer = m.groups()
        k = Kind(kind)
        if k in (Kind.SEND, Kind.RECV):
            if payload is None or peer is None or (arrow == ">") != (k is Kind.SEND):
                raise ValueError(f"action {text!r}: SEND needs 'a>wN' or 'g>wN', RECV 'a<wN' or 'g<wN'")
        elif payload is not None:
            raise ValueError(f"action {text!r}: only SEND/RECV carry a payload and peer")
        return cls(
            stage=int(stage),
            kind=k,
            mb=int(mb),
            version=int(version or 0),
            peer=int(peer) if peer is not None else None,
            grad=payload == "g",
        )

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE

    def to_json(self) -> dict:
        d = {"kind": self.kind.value, "stage": self.stage, "mb": self.mb, "version": self.version}
        if self.peer is not None:
            d["peer"] = self.peer
            d["grad"] = self.grad
        if self.nbytes:
            d["bytes"] = self.nbytes
        return d

    @classmethod
    def from_json(cls, d: dict, where: str = "action") -> "Action":
        """The action ``to_json`` wrote; a ProgramFileError naming the field (``where``) when it is not one."""
        kinds = ", ".join(k.value for k in Kind)
        return cls(
            stage=_field(d, "stage", where, _count, "a stage index >= 0"),
            kind=_field(d, "kind", where, Kind, f"one of {kinds}"),
            mb=_field(d, "mb", where, _count, "a microbatch index >= 0"),
            version=_field(d, "version", where, _count, "a weight version >= 0", 0),
            peer=_field(d, "peer", where, lambda v: None if v is None else _count(v), "a worker id >= 0", None),
            grad=_field(d, "grad", where, _bool, "true or false", False),
            nbytes=_field(d, "bytes", where, _count, "a byte count >= 0", 0),
        )


class ProgramFileError(InputError):
    """A program document that is not one ``Program.to_json`` writes; the message names the field and what it expects."""


_REQUIRED = object()


def _count(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError
    return v


def _bool(v) -> bool:
    if not isinstance(v, bool):
        raise TypeError
    return v


def _field(d, key: str, where: str, convert, expected: str, default=_REQUIRED):
    """``d[key]`` through ``convert``: a missing required field, a ``d`` that is not an object or a value
    ``convert`` refuses is one ProgramFileError line naming ``where.key`` and what it expects."""
    if not isinstance(d, dict):
        raise ProgramFileError(f"{where}: expected an object, got {json.dumps(d)[:60]}")
    if key not in d:
        if default is _REQUIRED:
            raise ProgramFileError(f"{where}.{key} is missing; expected {expected}")
        return default
    try:
        return convert(d[key])
    except ProgramFileError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError):
        raise ProgramFileError(f"{where}.{key}: expected {expected}, got {json.dumps(d[key])[:60]}") from None


def _list(v) -> list:
    if not isinstance(v, list):
        raise TypeError
    return v


def _layer_ranges(v) -> tuple[tuple[int, int], ...]:
    out, nxt = [], 0
    for r in _list(v):
        first, last = (_count(x) for x in _list(r))
        if first != nxt or last < first:
            raise ValueError
        out.append((first, last))
        nxt = last + 1
    if not out:
        raise ValueError
    return tuple(out)


def even_layers(num_layers: int, stages: int) -> tuple[tuple[int, int], ...]:
    """``num_layers`` split into ``stages`` contiguous near-equal (first, last) ranges: the one even split
    (``planner.plan.even_plan``, both interpreters on a program that names no layers)."""
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    return tuple((bounds[i], bounds[i + 1] - 1) for i in range(stages))


_ACTION_RE = re.compile(r"^(\d+)(ALLREDUCE|STEP|SEND|RECV|BI|BW|F|B)(\d+)(?:v(\d+))?(?:([ag])([<>])w(\d+))?$")

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


@dataclass(frozen=True)
class ScheduleSpec:
    """What a program was generated from.

    Attributes:
        family: one of FAMILIES.
        stages: number of pipeline stages P (devices in the pipeline; for interleaved, devices).
        microbatches: microbatches per batch M (for PipeDream: minibatches in the stream).
        replicas: replicas per (virtual) stage.
        chunks: model chunks (stages) per device V (families that place several stages on a rank, else 1).
        vertical_sync: PipeDream only: every stage uses the version stage 0 used.
        batches: batches (optimizer steps per stage) for flush schedules and 2BW.
    """

    family: str
    stages: int
    microbatches: int
    replicas: tuple[int, ...]
    chunks: int = 1
    vertical_sync: bool = False
    batches: int = 1

    @property
    def virtual_stages(self) -> int:
        return self.stages * self.chunks

    @property
    def traits(self) -> Family:
        return family(self.family)

    @property
    def total_microbatches(self) -> int:
        return self.microbatches * self.batches if self.traits.batched else self.microbatches

    def batch_of(self, mb: int) -> int:
        return mb // self.microbatches if self.traits.batched else 0

    def to_json(self) -> dict:
        return {
            "family": self.family,
            "stages": self.stages,
            "microbatches": self.microbatches,
            "replicas": list(self.replicas),
            "chunks": self.chunks,
            "vertical_sync": self.vertical_sync,
            "batches": self.batches,
        }

    @classmethod
    def from_json(cls, d: dict, where: str = "spec") -> "ScheduleSpec":
        """The spec ``to_json`` wrote; a ProgramFileError naming the field (``where``) when it is not one."""
        def name(v) -> str:
            if not isinstance(v, str):
                raise TypeError
            return v

        return cls(
            family=_field(d, "family", where, name, "a schedule family name, e.g. 1f1b"),
            stages=_field(d, "stages", where, _count, "a stage count >= 1"),
            microbatches=_field(d, "microbatches", where, _count, "a microbatch count >= 1"),
            replicas=_field(d, "replicas", where, lambda v: tuple(_count(r) for r in _list(v)),
                            "a list of replica counts, one per stage"),
            chunks=_field(d, "chunks", where, _count, "a chunk count >= 1", 1),
            vertical_sync=_field(d, "vertical_sync", where, _bool, "true or false", False),
            batches=_field(d, "batches", where, _count, "a batch count >= 1", 1),
        )


# --- spec helpers: layout, bounds and the checks every family shares ---------------------
def rank_of(fam: Family, stages: int, virtual_stage: int) -> int:
    """The pipeline rank (device index along the pipeline) holding ``virtual_stage`` under the family's placement."""
    c, j = divmod(virtual_stage, stages)
    if fam.placement == "v" and c % 2:
        return stages - 1 - j
    return j


def stage_workers(spec: ScheduleSpec) -> tuple[tuple[int, ...], ...]:
    """For each (virtual) stage, the workers holding its replicas (stage 0's first).

    Several stages per rank: rank d's replica r is worker d·R + r (R replicas of every stage).
    """
    fam = spec.traits
    if fam.multi_stage:
        R = spec.replicas[0] if spec.replicas else 1
        return tuple(tuple(rank_of(fam, spec.stages, vs) * R + r for r in range(R)) for vs in range(spec.virtual_stages))
    out, w = [], 0
    for r in spec.replicas:
        out.append(tuple(range(w, w + r)))
        w += r
    return tuple(out)


def inflight_limit(spec: ScheduleSpec, stage: int) -> int:
    """Microbatches a replica of ``stage`` keeps in flight in 1F1B steady state.

    ⌈workers at or after the stage / replicas of the stage⌉: P − s without
    replication; for stage 0, PipeDream's NOAM ⌈workers / replicas of stage 0⌉.
    """
    r = spec.replicas
    return math.ceil(sum(r[stage:]) / r[stage])


def interleaved_groups(P: int, M: int) -> list[int]:
    """Microbatch group sizes for interleaved 1F1B: ⌊M/P⌋ groups (at least one) of ⌊M/groups⌋ or one more.

    Forwards cycle the chunks once per group, so every group must hold at least P
    microbatches for a chunk's output to be back on device 0 when its next chunk
    starts; with M a multiple of P every group is exactly P (Megatron's order).
    """
    rounds = max(1, M // P)
    base, extra = divmod(M, rounds)
    return [base + 1] * extra + [base] * (rounds - extra)


def looped_warmup_extra(P: int, V: int, M: int, R: int) -> int:
    """Chunk-microbatches beyond P·V that a worker of interleaved zero bubble holds awaiting their BW:
    (V − 1)·(g − P), g the largest first group (``interleaved_groups``) of any replica's share of M —
    ⌊M/R⌋ or ⌈M/R⌉, and the smaller share can have the larger group (P = 2: 3 makes one group of 3,
    4 two of 2); 0 when P divides every share."""
    first = max(interleaved_groups(P, n)[0] for n in {M // R, -(-M // R)} if n)
    return (V - 1) * max(0, first - P)


def validate_spec(spec: ScheduleSpec) -> None:
    """The checks every family shares, read from its traits (a family's own needs: planner.schedules)."""
    fam = family(spec.family)
    P, M = spec.stages, spec.microbatches
    if P < 1 or M < 1:
        raise ScheduleError("stages and microbatches must be >= 1")
    if spec.batches < 1:
        raise ScheduleError("batches must be >= 1")
    if fam.multi_stage:
        if fam.chunks and spec.chunks != fam.chunks:
            raise ScheduleError(f"{fam.title} places {fam.chunks} stages on each rank; use --chunks {fam.chunks} (got {spec.chunks})")
        if spec.chunks < 1:
            raise ScheduleError("--chunks must be >= 1")
    elif spec.chunks != 1:
        multi = ", ".join(n for n, f in FAMILY.items() if f.multi_stage)
        raise ScheduleError(f"--chunks is for the schedules that place several stages on a rank ({multi}); got {spec.chunks} with {spec.family}")
    if not fam.replicable and any(r != 1 for r in spec.replicas):
        raise ScheduleError(f"{fam.title} does not replicate stages; drop --replicas or pick another schedule")
    if len(spec.replicas) != spec.virtual_stages:
        if fam.multi_stage:
            raise ScheduleError(f"{spec.family} needs one replica count per virtual stage ({spec.virtual_stages})")
        raise ScheduleError(f"--replicas gives {len(spec.replicas)} values for {P} stages")
    if any(r < 1 for r in spec.replicas):
        raise ScheduleError("every stage needs at least 1 replica")
    if fam.multi_stage and len(set(spec.replicas)) > 1:
        raise ScheduleError(f"{fam.title} replicates every stage alike (each replica runs its own pipeline); give every "
                            f"stage the same replica count (got {list(spec.replicas)})")
    if spec.vertical_sync and fam.versions != "stash":
        raise ScheduleError("--vertical-sync applies to the pipedream schedule only")
    if spec.vertical_sync and len(set(spec.replicas)) > 1:
        raise ScheduleError("vertical sync needs the same replica count on every stage (versions advance once per "
                            "all-reduce round, so unequal replication makes stage versions incomparable)")
    if fam.batched and max(spec.replicas) > M:
        raise ScheduleError(f"a stage has {max(spec.replicas)} replicas but a batch has only {M} microbatches; use at least as many microbatches as replicas")


def chunks_for(family_name: str, chunks: int = 1) -> int:
    """Stages per rank a command should use: the family's fixed count, at least 2 for looped families, else ``chunks``.

    ``chunks`` = 1 is the flags' default (no ask). A V family given another count, or any count below 1, is
    refused (ScheduleError) rather than silently replaced: ``v-min --chunks 3`` used to run with 2.
    """
    if not isinstance(chunks, int) or chunks < 1:
        raise ScheduleError(f"--chunks/--vp must be a whole number >= 1 (got {chunks!r})")
    fam = FAMILY.get(family_name)
    if fam is None or not fam.multi_stage:
        return chunks
    if fam.chunks and chunks not in (1, fam.chunks):
        raise ScheduleError(f"{family_name} runs {fam.chunks} stages per device; --chunks/--vp {chunks} does not "
                            f"apply: drop it or give {fam.chunks}")
    return fam.chunks or max(chunks, 2)


def make_spec(family_name: str, stages: int, microbatches: int, replicas: tuple[int, ...] | None = None,
              chunks: int = 1, vertical_sync: bool = False, batches: int = 1) -> ScheduleSpec:
    """A spec with defaults filled in (one replica per stage; P·V virtual stages for multi-stage placements).

    A family that fixes its stages per rank (the V shapes) gets that many chunks whatever ``chunks`` says
    when ``chunks`` is left at 1.
    """
    fam = FAMILY.get(family_name)
    if fam is not None and fam.chunks and chunks == 1:
        chunks = fam.chunks
    n = stages * chunks if fam is not None and fam.multi_stage else stages
    return ScheduleSpec(family_name, stages, microbatches, tuple(replicas) if replicas else (1,) * n, chunks, vertical_sync, batches)


@dataclass(frozen=True)
class Program:
    """Per-worker action lists plus the spec and the stage → workers map.

    Attributes:
        spec: the schedule it came from.
        stage_workers: for each (virtual) stage, the workers holding its replicas: replica r's TP rank t
            at index r·T + t (with T = 1: replica r = index r).
        actions: worker → ordered actions.
        tensor_parallel: T, workers per stage replica (its tensor-parallel group).
        stage_layers: (first, last) model layer of every stage, inclusive and contiguous from layer 0, when the
            program says which layers each stage holds (a plan's program does); None: the interpreters split the
            model's layers evenly over the stages (``even_layers``).
    """

    spec: ScheduleSpec
    stage_workers: tuple[tuple[int, ...], ...]
    actions: dict[int, list[Action]] = field(hash=False)
    tensor_parallel: int = 1
    stage_layers: tuple[tuple[int, int], ...] | None = None

    def __getitem__(self, worker: int) -> list[Action]:
        return self.actions[worker]

    @property
    def workers(self) -> list[int]:
        return sorted(self.actions)

    def replica_workers(self, stage: int, tp_rank: int = 0) -> tuple[int, ...]:
        """The workers of TP rank ``tp_rank`` of every replica of ``stage`` (its data-parallel group)."""
        T = self.tensor_parallel
        return self.stage_workers[stage][tp_rank::T] if T > 1 else self.stage_workers[stage]

    def replica_count(self, stage: int) -> int:
        return len(self.stage_workers[stage]) // self.tensor_parallel

    def round_of(self, stage: int, mb: int) -> int:
        """The optimizer round (update point) a weight gradient of microbatch ``mb`` on ``stage`` joins: its batch
        (``Family.batched``), or in a stream of minibatches (PipeDream) k for minibatch k·R + r, replica r of R.
        The one rule the check, the simulator's memory and the executor's accumulation count rounds by."""
        if self.spec.traits.batched:
            return self.spec.batch_of(mb)
        return mb // self.replica_count(stage)

    def worker_of(self, stage: int, mb: int, tp_rank: int = 0) -> int:
        """Round robin: microbatch ``mb`` of ``stage`` runs on replica ``mb mod r`` (its TP rank ``tp_rank``)."""
        ws = self.replica_workers(stage, tp_rank)
        return ws[mb % len(ws)]

    def tp_group(self, worker: int) -> tuple[int, ...]:
        """The workers of ``worker``'s stage replica, TP rank t at index t (just ``(worker,)`` when T = 1)."""
        T = self.tensor_parallel
        if T == 1:
            return (worker,)
        for ws in self.stage_workers:
            if worker in ws:
                r = ws.index(worker) // T
                return ws[r * T:(r + 1) * T]
        raise KeyError(f"worker {worker} holds no stage")

    def tp_rank(self, worker: int) -> int:
        return self.tp_group(worker).index(worker)

    def tp_slice(self, tp_rank: int) -> "Program":
        """The program of one TP rank's workers: an ordinary (T = 1) program whose peers are that rank's."""
        sw = tuple(self.replica_workers(s, tp_rank) for s in range(len(self.stage_workers)))
        mine = {w for ws in sw for w in ws}
        return Program(self.spec, sw, {w: a for w, a in self.actions.items() if w in mine}, stage_layers=self.stage_layers)

    def stages_of(self, worker: int) -> list[int]:
        return [s for s, ws in enumerate(self.stage_workers) if worker in ws]

    def with_actions(self, actions: dict[int, list[Action]]) -> "Program":
        return replace(self, actions=actions)

    # --- text forms -----------------------------------------------------------------
    def to_json(self) -> dict:
        d = {
            "spec": self.spec.to_json(),
            "stage_workers": [list(ws) for ws in self.stage_workers],
            "workers": {str(w): [a.to_json() for a in acts] for w, acts in sorted(self.actions.items())},
        }
        if self.tensor_parallel > 1:
            d["tensor_parallel"] = self.tensor_parallel
        if self.stage_layers is not None:
            d["stage_layers"] = [list(r) for r in self.stage_layers]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Program":
        """The program ``to_json`` wrote; a ProgramFileError (one line naming the field and what it expects)
        when ``d`` is not one."""
        def worker(w: str) -> int:
            if not w.isdigit():
                raise ProgramFileError(f"program.workers: key {w!r} is not a worker id (expected \"0\", \"1\", ...)")
            return int(w)

        def workers(v) -> dict[int, list[Action]]:
            if not isinstance(v, dict):
                raise TypeError
            return {worker(w): [Action.from_json(a, f"program.workers.{w}[{i}]")
                                for i, a in enumerate(_field(v, w, "program.workers", _list, "a list of actions"))]
                    for w in v}

        return cls(
            spec=_field(d, "spec", "program", lambda v: ScheduleSpec.from_json(v, "program.spec"),
                        "an object with family, stages, microbatches and replicas"),
            stage_workers=_field(d, "stage_workers", "program", lambda v: tuple(tuple(_count(w) for w in _list(ws))
                                                                                 for ws in _list(v)),
                                 "a list of worker-id lists, one per stage"),
            actions=_field(d, "workers", "program", workers, "an object mapping worker ids to action lists"),
            tensor_parallel=_field(d, "tensor_parallel", "program", _count, "a tensor-parallel degree >= 1", 1),
            stage_layers=_field(d, "stage_layers", "program", _layer_ranges,
                                "a list of [first, last] layer pairs, one per stage, contiguous from layer 0", None),
        )

    @classmethod
    def load(cls, path) -> "Program":
        """The program file ``path`` (``to_json`` as JSON, e.g. ``pipetwin schedule -o``); a ProgramFileError in one
        line when it is missing, not JSON or not a program."""
        from pathlib import Path

        p = Path(path)
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            why = getattr(e, "strerror", None) or "not a text file"
            raise ProgramFileError(f"program file {str(p)!r}: cannot read it ({why}); write one with "
                                   f"`pipetwin schedule ... -o P.json`") from None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProgramFileError(f"program file {str(p)!r} is not JSON (line {e.lineno}: {e.msg}); write one with "
                                   f"`pipetwin schedule ... -o P.json`") from None
        try:
            return cls.from_json(doc)
        except ProgramFileError as e:
            raise ProgramFileError(f"program file {str(p)!r}: {e.args[0]}") from None

    def check_shape(self) -> None:
        """The document agrees with itself (what an interpreter needs before ``planner.check``'s laws): stages and
        workers exist, the spec's replica counts are the stages' worker counts, and a generated family's stage count
        is its stages × chunks. A ProgramFileError in one line naming the field otherwise."""
        S, T = len(self.stage_workers), self.tensor_parallel
        if not S or not self.actions:
            raise ProgramFileError("the program has no stages or no workers; write one with `pipetwin schedule ... -o P.json`")
        for s, ws in enumerate(self.stage_workers):
            if not ws:
                raise ProgramFileError(f"stage {s} is on no worker (program.stage_workers[{s}] is empty); give it a worker")
        spec = self.spec
        if len(spec.replicas) != S:
            raise ProgramFileError(f"program.spec.replicas gives {len(spec.replicas)} counts but program.stage_workers "
                                   f"lists {S} stages; give one replica count per stage")
        for s, (r, ws) in enumerate(zip(spec.replicas, self.stage_workers)):
            if r * T != len(ws):
                tp = f" x {T} tensor-parallel ranks" if T > 1 else ""
                raise ProgramFileError(f"stage {s}: program.spec.replicas says {r} replica(s){tp} but program.stage_workers "
                                       f"lists {len(ws)} worker(s); make the two agree")
        fam = FAMILY.get(spec.family)
        if fam is not None and fam.generated and spec.virtual_stages != S:
            raise ProgramFileError(f"program.spec says {spec.stages} stages x {spec.chunks} chunks = {spec.virtual_stages} "
                                   f"but program.stage_workers lists {S}; make the two agree")

    def layers(self, num_layers: int) -> tuple[tuple[int, int], ...]:
        """(first, last) layer of every stage on a model of ``num_layers`` layers: ``stage_layers`` when the program
        names them, else the even split; a ProgramFileError (one line: what is wrong, what to do) when they do not fit."""
        S = len(self.stage_workers)
        if self.stage_layers is None:
            if S == 0:
                raise ProgramFileError("the program has no stages; write one with `pipetwin schedule ... -o P.json`")
            if S > num_layers:
                raise ProgramFileError(f"the program has {S} stages but the model has only {num_layers} layers; use a "
                                       f"deeper model or a program with fewer stages")
            return even_layers(num_layers, S)
        if len(self.stage_layers) != S:
            raise ProgramFileError(f"program.stage_layers names {len(self.stage_layers)} stages but the program has {S}; "
                                   f"give one [first, last] pair per stage")
        covered = self.stage_layers[-1][1] + 1
        if covered != num_layers:
            raise ProgramFileError(f"the program's stages cover {covered} layers but the model has {num_layers}; give "
                                   f"the model the program was written for, or fix program.stage_layers")
        return self.stage_layers

    def to_csv(self) -> str:
        """One row per worker: the worker id then its actions in order (hand-editable)."""
        buf = io.StringIO()
        wr = csv.writer(buf)
        for w in self.workers:
            wr.writerow([w, *map(str, self.actions[w])])
        return buf.getvalue()

    def with_csv(self, text: str) -> "Program":
        """This program's spec and placement with the action lists read from ``to_csv`` text."""
        actions = {}
        for row in csv.reader(io.StringIO(text)):
            if row:
                actions[int(row[0])] = [Action.parse(x) for x in row[1:] if x.strip()]
        return self.with_actions(actions)

    def grid(self, mark: tuple[int, int] | None = None, compute_only: bool = False, width: int = 7) -> str:
        """Rows = workers, columns = action index; ``mark=(worker, index)`` brackets one cell."""
        lines = []
        for w in self.workers:
            cells = []
            for i, a in enumerate(self.actions[w]):
                if compute_only and not a.is_compute and (mark is None or mark != (w, i)):
                    continue
                t = str(a)
                if mark == (w, i):
                    t = f">>{t}<<"
                cells.append(t.ljust(width))
            lines.append(f"w{w:<3}| " + " ".join(cells).rstrip())
        return "\n".join(lines)
