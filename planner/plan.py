"""Plan: what the planner decides — stages, replicas, devices, schedule and optimizer semantics.

A plan is data (JSON on disk). ``planner.lowering.plan_to_program`` turns it into
the ``Program`` both interpreters run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict, replace
from pathlib import Path

from planner.program import FAMILIES, FAMILY, rank_of


class PlanError(ValueError):
    """A plan that is inconsistent or cannot be read; the message says what to change."""


@dataclass(frozen=True)
class StagePlan:
    """One (virtual) stage.

    Attributes:
        first_layer: index of its first layer in the profile chain.
        last_layer: index of its last layer (inclusive).
        replicas: data-parallel replicas of this stage.
        devices: topology device names, one per replica (replica r on devices[r]).
    """

    first_layer: int
    last_layer: int
    replicas: int = 1
    devices: tuple[str, ...] = ()

    @property
    def layers(self) -> tuple[int, int]:
        return (self.first_layer, self.last_layer)


@dataclass(frozen=True)
class Plan:
    """A partition plan.

    Attributes:
        model: the model spec or profile path the plan was made for.
        stages: (virtual) stages in pipeline order; for interleaved, P·V of them, stage s on device s mod P.
        schedule: schedule family, one of planner.program.FAMILIES.
        microbatch_size: samples per microbatch.
        microbatches: microbatches per batch (PipeDream: minibatches per run).
        chunks: model chunks per device (interleaved).
        vertical_sync: PipeDream vertical sync.
        batches: batches (optimizer steps) a run executes.
        lr: learning rate of the SGD update the executor and reference apply.
        topology: the topology spec or file the devices come from.
        predicted: what the planner predicted (free-form keys, e.g. time_per_sample_s).
    """

    model: str
    stages: tuple[StagePlan, ...]
    schedule: str = "1f1b"
    microbatch_size: int = 1
    microbatches: int = 4
    chunks: int = 1
    vertical_sync: bool = False
    batches: int = 1
    lr: float = 0.01
    topology: str | None = None
    predicted: dict = field(default_factory=dict, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.schedule not in FAMILIES:
            raise PlanError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(FAMILIES)}")
        if not self.stages:
            raise PlanError("a plan needs at least one stage")
        prev = -1
        for i, s in enumerate(self.stages):
            if s.first_layer != prev + 1 or s.last_layer < s.first_layer:
                raise PlanError(f"stage {i} covers layers {s.first_layer}..{s.last_layer}; stages must be contiguous from layer 0")
            if s.replicas < 1:
                raise PlanError(f"stage {i} has {s.replicas} replicas; need >= 1")
            if s.devices and len(s.devices) != s.replicas:
                raise PlanError(f"stage {i} has {s.replicas} replicas but {len(s.devices)} devices")
            prev = s.last_layer
        if self.microbatches < 1 or self.microbatch_size < 1:
            raise PlanError("microbatches and microbatch_size must be >= 1")
        if self.chunks < 1 or len(self.stages) % self.chunks:
            raise PlanError(f"{len(self.stages)} stages do not split into {self.chunks} chunks per device")

    @property
    def num_layers(self) -> int:
        return self.stages[-1].last_layer + 1

    @property
    def pipeline_depth(self) -> int:
        """Devices along the pipeline (P); for interleaved, virtual stages / chunks."""
        return len(self.stages) // self.chunks

    @property
    def replicas(self) -> tuple[int, ...]:
        return tuple(s.replicas for s in self.stages)

    @property
    def devices(self) -> list[str]:
        """Every distinct device the plan uses, in first-use order (worker w = devices[w])."""
        seen: dict[str, None] = {}
        for s in self.stages:
            for d in s.devices:
                seen.setdefault(d, None)
        return list(seen)

    @property
    def samples_per_batch(self) -> int:
        return self.microbatch_size * self.microbatches

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [
            {"layers": [s.first_layer, s.last_layer], "replicas": s.replicas, "devices": list(s.devices)}
            for s in self.stages
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        try:
            stages = tuple(
                StagePlan(int(s["layers"][0]), int(s["layers"][1]), int(s.get("replicas", 1)), tuple(s.get("devices", ())))
                for s in d["stages"]
            )
            kw = {k: d[k] for k in ("schedule", "microbatch_size", "microbatches", "chunks", "vertical_sync",
                                    "batches", "lr", "topology", "predicted") if k in d}
            return cls(model=str(d["model"]), stages=stages, **kw)
        except (KeyError, IndexError, TypeError) as e:
            raise PlanError(f"plan JSON is missing or has a malformed field ({e}); see `pipetwin plan -o plan.json` for the shape") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        p = Path(path)
        if not p.exists():
            raise PlanError(f"plan file {str(p)!r} does not exist")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan file {str(p)!r} is not valid JSON ({e})") from None

    def with_devices(self, devices_per_stage: list[tuple[str, ...]]) -> "Plan":
        return replace(self, stages=tuple(replace(s, devices=tuple(d)) for s, d in zip(self.stages, devices_per_stage)))


def even_plan(model: str, num_layers: int, stages: int, replicas: tuple[int, ...] | None = None, **kw) -> Plan:
    """Split ``num_layers`` into ``stages`` contiguous near-equal ranges on devices d0, d1, ... (for tests and CLI overrides)."""
    if stages > num_layers:
        raise PlanError(f"{stages} stages but only {num_layers} layers: reduce --stages or use a deeper model")
    replicas = replicas or (1,) * stages
    if len(replicas) != stages:
        raise PlanError(f"--replicas gives {len(replicas)} values for {stages} stages")
    chunks = kw.get("chunks", 1)
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    out, dev = [], 0
    depth = stages // chunks
    for i in range(stages):
        if chunks > 1:
            fam = FAMILY.get(kw.get("schedule", "1f1b"))
            rank = rank_of(fam, depth, i) if fam else i % depth
            devs = tuple(f"d{rank}" for _ in range(replicas[i]))
        else:
            devs = tuple(f"d{dev + r}" for r in range(replicas[i]))
            dev += replicas[i]
        out.append(StagePlan(bounds[i], bounds[i + 1] - 1, replicas[i], devs))
    return Plan(model=model, stages=tuple(out), **kw)
