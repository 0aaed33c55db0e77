"""torch.distributed.pipelining schedules both ways: read its schedule CSV into a Program, write a Program as its CSV.

torch writes one row per pipeline rank (no leading rank column) of action strings
``<stage><type>[<microbatch>]``: compute ``F``, ``I`` (input gradient = pipetwin's BI),
``W`` (weight gradient = BW), ``B`` (full backward); communication ``SEND_F``,
``RECV_F``, ``SEND_B``, ``RECV_B``; ``UNSHARD``/``RESHARD`` (FSDP parameter gathering,
no microbatch) and ``REDUCE_GRAD`` (the data-parallel gradient reduction at the end);
``(a;b)OVERLAP_F_B`` for a forward and a backward run overlapped (DualPipeV).
Empty cells are idle steps. pipetwin's own CSV (``Program.to_csv``) leads each row
with the worker id; a first cell that is a bare number is read that way.

Reading keeps the compute order exactly, rank by rank; the stage → rank placement is
where each stage's compute runs. Communication is re-derived by pipetwin's lowering
(a receive right before its consumer, a send right after its producer), after checking
that torch's own sends and receives sit on the ranks of their stages; UNSHARD/RESHARD
and REDUCE_GRAD carry no pipeline semantics pipetwin models and are dropped (the
step after a stage's last weight gradient stands for REDUCE_GRAD). The result is a
one-batch program of the ``custom`` family: ``check`` holds it to the laws only.

Writing emits compute-only rows (torch's ``_load_csv`` default) or rows with
communication (``format="compute_comms"``: SEND/RECV at pipetwin's positions).
No torch import here: the format is text.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Callable

from planner.families import ScheduleError
from planner.program import Action, Kind, Program
from planner.schedulespec import ScheduleSpec

__all__ = ["TorchAction", "parse_torch_action", "read_torch_csv", "program_from_torch", "to_torch_rows",
           "write_torch_csv", "TorchFormatError"]

COMPUTE = {"F": Kind.F, "I": Kind.BI, "W": Kind.BW, "B": Kind.B}
COMMS = ("SEND_F", "RECV_F", "SEND_B", "RECV_B")
DROPPED = ("UNSHARD", "RESHARD", "REDUCE_GRAD")
_ACTION = re.compile(r"^(\d+)(UNSHARD|RESHARD|REDUCE_GRAD|SEND_F|RECV_F|SEND_B|RECV_B|F|I|W|B)(\d*)$")
_TO_TORCH = {Kind.F: "F", Kind.BI: "I", Kind.BW: "W", Kind.B: "B"}


class TorchFormatError(ScheduleError):
    """A torch schedule that cannot be read or written; the message names the cell and what to do."""


@dataclass(frozen=True)
class TorchAction:
    """One torch action: ``kind`` is torch's type string (``F``, ``I``, ``SEND_F``, ...); ``mb`` None for UNSHARD etc."""

    stage: int
    kind: str
    mb: int | None = None

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{'' if self.mb is None else self.mb}"


def parse_torch_action(text: str) -> list[TorchAction]:
    """One CSV cell → its actions (none for an idle cell, two for an ``OVERLAP_F_B``)."""
    t = text.strip()
    if not t or t == "None":
        return []
    if t.startswith("(") and t.endswith(")OVERLAP_F_B"):
        return [a for part in t[1:-len(")OVERLAP_F_B")].split(";") for a in parse_torch_action(part)]
    m = _ACTION.match(t)
    if not m:
        raise TorchFormatError(f"cannot read torch action {t!r}; expected <stage><F|I|W|B|SEND_F|RECV_F|SEND_B|RECV_B|"
                               f"UNSHARD|RESHARD|REDUCE_GRAD>[<microbatch>], e.g. 0F1, 7I0, 0REDUCE_GRAD")
    stage, kind, mb = m.groups()
    if (kind in COMPUTE or kind in COMMS) and not mb:
        raise TorchFormatError(f"torch action {t!r} needs a microbatch index (e.g. {stage}{kind}0)")
    return [TorchAction(int(stage), kind, int(mb) if mb else None)]


def read_torch_csv(text: str) -> dict[int, list[TorchAction]]:
    """Rank → actions, from torch's CSV (a row per rank) or pipetwin's (a leading worker id per row)."""
    rows = [r for r in csv.reader(io.StringIO(text))]
    while rows and not any(c.strip() for c in rows[-1]):
        rows.pop()
    if not rows:
        raise TorchFormatError("the schedule CSV is empty; give one row of actions per pipeline rank")
    out: dict[int, list[TorchAction]] = {}
    for n, row in enumerate(rows):
        rank = n
        if row and re.fullmatch(r"\s*\d+\s*", row[0]):
            rank, row = int(row[0]), row[1:]
        try:
            out[rank] = [a for cell in row for a in parse_torch_action(cell)]
        except TorchFormatError as e:
            raise TorchFormatError(f"row {n + 1}: {e.args[0]}") from None
    return out


def program_from_torch(order: dict[int, list[TorchAction]], act_bytes: Callable[[int], int] | None = None,
                       check_program: bool = True) -> Program:
    """A pipetwin Program (family ``custom``, one batch) running torch's compute order rank by rank.

    Raises TorchFormatError when a stage's compute is split over ranks, a stage or
    microbatch is missing, a rank runs nothing, or torch's communication names a rank
    that does not hold its stage; ProgramError (via ``check``) when the order breaks a law.
    """
    from planner.schedules import lower

    rank_of: dict[int, int] = {}
    mbs: set[int] = set()
    compute: dict[int, list[Action]] = {r: [] for r in order}
    for r, acts in sorted(order.items()):
        for a in acts:
            if a.kind not in COMPUTE:
                continue
            if rank_of.setdefault(a.stage, r) != r:
                raise TorchFormatError(f"stage {a.stage} computes on ranks {rank_of[a.stage]} and {r}; a stage lives on one rank")
            mbs.add(a.mb)
            compute[r].append(Action(a.stage, COMPUTE[a.kind], a.mb))
    if not rank_of:
        raise TorchFormatError("the schedule has no compute actions (F, I, W or B)")
    S, M = max(rank_of) + 1, max(mbs) + 1
    missing = [s for s in range(S) if s not in rank_of]
    if missing:
        raise TorchFormatError(f"stages {missing} never compute; torch's stages are numbered 0..{S - 1} without gaps")
    if sorted(mbs) != list(range(M)):
        raise TorchFormatError(f"microbatches {sorted(set(range(M)) - mbs)} never run; number them 0..{M - 1}")
    idle = [r for r in order if not compute[r]]
    if idle:
        raise TorchFormatError(f"ranks {idle} compute nothing; every pipeline rank holds at least one stage")
    for r, acts in order.items():
        for a in acts:
            if a.kind in COMMS and rank_of.get(a.stage) != r:
                raise TorchFormatError(f"rank {r} has {a} but stage {a.stage} computes on rank {rank_of.get(a.stage)}")
    ranks = sorted(order)
    if ranks != list(range(len(ranks))):
        raise TorchFormatError(f"ranks {ranks} are not numbered 0..{len(ranks) - 1}")
    P = len(ranks)
    spec = ScheduleSpec("custom", P, M, (1,) * S, chunks=S // P if S % P == 0 else 1)
    sw = tuple((rank_of[s],) for s in range(S))
    return lower(spec, sw, compute, act_bytes, check_program=check_program)


def to_torch_rows(program: Program, format: str = "compute_only") -> dict[int, list[str]]:
    """Rank → torch action strings. One batch, no replicated stages, one TP rank: torch schedules one pipeline."""
    if format not in ("compute_only", "compute_comms"):
        raise TorchFormatError(f"unknown torch CSV format {format!r}; use compute_only or compute_comms")
    spec = program.spec
    if spec.batches != 1 or not spec.traits.batched:
        raise TorchFormatError("torch schedules one batch per step; export a program of one batch of a flush schedule "
                               f"(this is {spec.family} with {spec.batches} batches)")
    if any(len(ws) != 1 for ws in program.stage_workers) or program.tensor_parallel != 1:
        raise TorchFormatError("torch's schedule is one pipeline; export an unreplicated program (replicas and TP ranks "
                               "are data/tensor parallelism around it)")
    out: dict[int, list[str]] = {}
    for w in program.workers:
        row = []
        for a in program[w]:
            if a.is_compute:
                row.append(f"{a.stage}{_TO_TORCH[a.kind]}{a.mb}")
            elif format == "compute_comms" and a.kind in (Kind.SEND, Kind.RECV):
                kind = ("SEND_" if a.kind is Kind.SEND else "RECV_") + ("B" if a.grad else "F")
                row.append(f"{a.stage}{kind}{a.mb}")
        out[w] = row
    return out


def write_torch_csv(program: Program, format: str = "compute_only") -> str:
    """torch's CSV text for ``program`` (``_load_csv(path, format=...)`` reads it back)."""
    buf = io.StringIO()
    wr = csv.writer(buf)
    for _, row in sorted(to_torch_rows(program, format).items()):
        wr.writerow(row)
    return buf.getvalue()
