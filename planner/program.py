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

The IR's neighbours: the family registry is ``planner.families``, the spec and its shared helpers
``planner.schedulespec``, the file's field checks ``planner.programfile``.
"""
from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field, replace
from enum import Enum

from planner.families import FAMILY
from planner.programfile import ProgramFileError, as_bool, as_count, as_layer_ranges, as_list, get_field
from planner.schedulespec import ScheduleSpec


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
            stage=get_field(d, "stage", where, as_count, "a stage index >= 0"),
            kind=get_field(d, "kind", where, Kind, f"one of {kinds}"),
            mb=get_field(d, "mb", where, as_count, "a microbatch index >= 0"),
            version=get_field(d, "version", where, as_count, "a weight version >= 0", 0),
            peer=get_field(d, "peer", where, lambda v: None if v is None else as_count(v), "a worker id >= 0", None),
            grad=get_field(d, "grad", where, as_bool, "true or false", False),
            nbytes=get_field(d, "bytes", where, as_count, "a byte count >= 0", 0),
        )


def even_layers(num_layers: int, stages: int) -> tuple[tuple[int, int], ...]:
    """``num_layers`` split into ``stages`` contiguous near-equal (first, last) ranges: the one even split
    (``planner.plan.even_plan``, both interpreters on a program that names no layers)."""
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    return tuple((bounds[i], bounds[i + 1] - 1) for i in range(stages))


_ACTION_RE = re.compile(r"^(\d+)(ALLREDUCE|STEP|SEND|RECV|BI|BW|F|B)(\d+)(?:v(\d+))?(?:([ag])([<>])w(\d+))?$")


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
                                for i, a in enumerate(get_field(v, w, "program.workers", as_list, "a list of actions"))]
                    for w in v}

        return cls(
            spec=get_field(d, "spec", "program", lambda v: ScheduleSpec.from_json(v, "program.spec"),
                        "an object with family, stages, microbatches and replicas"),
            stage_workers=get_field(d, "stage_workers", "program", lambda v: tuple(tuple(as_count(w) for w in as_list(ws))
                                                                                 for ws in as_list(v)),
                                 "a list of worker-id lists, one per stage"),
            actions=get_field(d, "workers", "program", workers, "an object mapping worker ids to action lists"),
            tensor_parallel=get_field(d, "tensor_parallel", "program", as_count, "a tensor-parallel degree >= 1", 1),
            stage_layers=get_field(d, "stage_layers", "program", as_layer_ranges,
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
