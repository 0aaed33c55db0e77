"""What a program is generated from (``ScheduleSpec``) and the spec helpers every family shares.

Layout (``stage_workers``; ``rank_of`` is a family's placement, in ``planner.families``), bounds
(``inflight_limit``, ``interleaved_groups``, ``looped_warmup_extra``), the shared checks (``validate_spec``,
``chunks_for``) and ``make_spec``'s defaults. They sit beside ``ScheduleSpec``, below both ``planner.check`` and
``planner.schedules``, so neither imports the other.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from planner.families import FAMILY, Family, ScheduleError, family, rank_of
from planner.programfile import as_bool, as_count, as_list, get_field


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
            family=get_field(d, "family", where, name, "a schedule family name, e.g. 1f1b"),
            stages=get_field(d, "stages", where, as_count, "a stage count >= 1"),
            microbatches=get_field(d, "microbatches", where, as_count, "a microbatch count >= 1"),
            replicas=get_field(d, "replicas", where, lambda v: tuple(as_count(r) for r in as_list(v)),
                            "a list of replica counts, one per stage"),
            chunks=get_field(d, "chunks", where, as_count, "a chunk count >= 1", 1),
            vertical_sync=get_field(d, "vertical_sync", where, as_bool, "true or false", False),
            batches=get_field(d, "batches", where, as_count, "a batch count >= 1", 1),
        )


# --- spec helpers: layout, bounds and the checks every family shares ---------------------
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

