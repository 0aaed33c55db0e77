"""Plan: what the planner decides — stages, replicas, tensor parallelism, devices, schedule and optimizer semantics.

A plan is data (JSON on disk). ``planner.lowering.plan_to_program`` turns it into
the ``Program`` both interpreters run.

Devices form a grid, pipeline × data × tensor: with tensor parallelism T a stage
with R replicas names R·T devices, replica r's tensor group being
``devices[r*T:(r+1)*T]`` and its TP rank t ``devices[r*T + t]``. Every device is
one worker. ``plan_from_flags`` is the one rule from (pp, dp, tp, vp) flags to a plan.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict, replace
from pathlib import Path

from planner.families import FAMILIES, FAMILY, rank_of
from planner.schedulespec import chunks_for
from planner.recompute import MODES as RECOMPUTE_MODES, recompute_mode
from topologies.errors import InputError
from topologies.files import output_path

OPTIMIZERS = ("sgd", "momentum", "adam", "none")  # planner.costmodel.OPTIMIZER_STATE's names


class PlanError(InputError):
    """A plan that is inconsistent or cannot be read; the message says what to change."""


@dataclass(frozen=True)
class StagePlan:
    """One (virtual) stage.

    Attributes:
        first_layer: index of its first layer in the profile chain.
        last_layer: index of its last layer (inclusive).
        replicas: data-parallel replicas of this stage.
        devices: topology device names, replicas × T of them (T: the plan's tensor parallelism);
            replica r's tensor group is devices[r*T:(r+1)*T] (with T = 1: replica r on devices[r]).
    """

    first_layer: int
    last_layer: int
    replicas: int = 1
    devices: tuple[str, ...] = ()

    @property
    def layers(self) -> tuple[int, int]:
        return (self.first_layer, self.last_layer)

    def tensor_group(self, replica: int, tensor_parallel: int = 1) -> tuple[str, ...]:
        """The devices of one replica's tensor-parallel group (TP rank t at index t)."""
        return self.devices[replica * tensor_parallel:(replica + 1) * tensor_parallel]


@dataclass(frozen=True)
class Plan:
    """A partition plan.

    Attributes:
        model: the model spec or profile path the plan was made for.
        stages: (virtual) stages in pipeline order; for interleaved, P·V of them, stage s on device s mod P.
        schedule: schedule family, one of planner.families.FAMILIES.
        microbatch_size: samples per microbatch.
        microbatches: microbatches per batch (PipeDream: minibatches per run).
        chunks: model chunks per device (interleaved).
        vertical_sync: PipeDream vertical sync.
        batches: batches (optimizer steps) a run executes.
        lr: learning rate of the SGD update the executor and reference apply.
        topology: the topology spec or file the devices come from.
        tensor_parallel: T, the tensor-parallel degree of every stage replica (Megatron: one T for the plan).
        recompute: activation recomputation, one of planner.recompute.MODES ("none", "selective", "full").
        sequence_parallel: Megatron sequence parallelism inside each tensor group (needs tensor_parallel > 1).
        zero_stage: ZeRO sharding of every stage's training state over its replicas, 0 (none) to 3 (FSDP full
            shard); ``planner.sharding`` says what each stage holds and moves.
        optimizer: the optimizer whose state the plan was sized for, one of ``OPTIMIZERS`` ("sgd": momentum,
            1× the parameter bytes; "adam": 2×); ``pipetwin simulate --plan`` counts its state. The executor steps
            with it: "sgd" and "momentum" are SGD with momentum (one buffer per parameter), "none" plain SGD.
        momentum: SGD's momentum μ, 0 < μ < 1 (``torch.optim.SGD(momentum=μ)``, as PipeDream trained with 0.9);
            plain SGD is the optimizer "none".
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
    tensor_parallel: int = 1
    recompute: str = "none"
    sequence_parallel: bool = False
    zero_stage: int = 0
    optimizer: str = "sgd"
    momentum: float = 0.9

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        self.check_momentum(self.momentum)
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            raise PlanError(f"unknown ZeRO stage {self.zero_stage!r}; choose 0, 1, 2 or 3")
        if isinstance(self.recompute, bool) or self.recompute is None:
            object.__setattr__(self, "recompute", recompute_mode(self.recompute))
        if self.recompute not in RECOMPUTE_MODES:
            raise PlanError(f"unknown recompute mode {self.recompute!r}; choose one of {', '.join(RECOMPUTE_MODES)}")
        if not isinstance(self.tensor_parallel, int) or self.tensor_parallel < 1:
            raise PlanError(f"tensor_parallel must be a whole number >= 1 (got {self.tensor_parallel!r})")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise PlanError("sequence parallelism splits activations over the tensor-parallel ranks; it needs "
                            "tensor_parallel >= 2")
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
            T = self.tensor_parallel
            if s.devices and len(s.devices) != s.replicas * T:
                grid = f" x {T} tensor-parallel ranks = {s.replicas * T} devices" if T > 1 else ""
                raise PlanError(f"stage {i} has {s.replicas} replicas{grid} but names {len(s.devices)} devices")
            prev = s.last_layer
        if self.microbatches < 1 or self.microbatch_size < 1:
            raise PlanError("microbatches and microbatch_size must be >= 1")
        if self.chunks < 1 or len(self.stages) % self.chunks:
            raise PlanError(f"{len(self.stages)} stages do not split into {self.chunks} chunks per device")

    @staticmethod
    def check_momentum(momentum) -> None:
        """Refuse a momentum outside (0, 1) in one line (plain SGD is the optimizer "none")."""
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum < 1:
            raise PlanError(f"momentum must be a number strictly between 0 and 1 (got {momentum!r}); plain SGD "
                            f"is the optimizer 'none'")

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
        for k, default in (("tensor_parallel", 1), ("recompute", "none"), ("sequence_parallel", False),
                           ("zero_stage", 0), ("optimizer", "sgd"), ("momentum", 0.9)):  # absent at their defaults: old plans stay byte-identical
            if d[k] == default:
                del d[k]
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
                                    "batches", "lr", "topology", "predicted", "tensor_parallel", "recompute",
                                    "sequence_parallel", "zero_stage", "optimizer", "momentum") if k in d}
            return cls(model=str(d["model"]), stages=stages, **kw)
        except (KeyError, IndexError, TypeError) as e:
            raise PlanError(f"plan JSON is missing or has a malformed field ({e}); see `pipetwin plan -o plan.json` for the shape") from None

    def save(self, path: str | Path) -> None:
        output_path(path).write_text(json.dumps(self.to_dict(), indent=1))

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
    """Split ``num_layers`` into ``stages`` contiguous near-equal ranges on devices d0, d1, ... (for tests and CLI overrides).

    Devices are numbered along the grid with the tensor rank fastest, then the replica, then the
    pipeline position (Megatron's order): stage (position) p's replica r, TP rank t is
    ``d{offset(p) + r*T + t}``. Interleaved: virtual stage s sits on position s mod P.
    """
    if stages > num_layers:
        raise PlanError(f"{stages} stages but only {num_layers} layers: reduce --stages or use a deeper model")
    replicas = replicas or (1,) * stages
    if len(replicas) != stages:
        raise PlanError(f"--replicas gives {len(replicas)} values for {stages} stages")
    chunks = kw.get("chunks", 1)
    T = kw.get("tensor_parallel", 1)
    if chunks < 1 or stages % chunks:
        raise PlanError(f"{stages} stages do not split into {chunks} chunks per device")
    depth = stages // chunks
    fam = FAMILY.get(kw.get("schedule", "1f1b"))
    position = (lambda i: rank_of(fam, depth, i)) if fam is not None and fam.multi_stage else (lambda i: i % depth)
    for i in range(depth, stages):
        if replicas[i] != replicas[position(i)]:
            raise PlanError(f"virtual stages {position(i)} and {i} share devices but have {replicas[position(i)]} and "
                            f"{replicas[i]} replicas; give every chunk of a device the same replica count")
    offset = [0]
    for p in range(depth):
        offset.append(offset[-1] + replicas[p] * T)
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    out = []
    for i in range(stages):
        base = offset[position(i)]
        devs = tuple(f"d{base + j}" for j in range(replicas[i] * T))
        out.append(StagePlan(bounds[i], bounds[i + 1] - 1, replicas[i], devs))
    return Plan(model=model, stages=tuple(out), **kw)


def fill_degrees(devices: int | None, tp: int | None = None, pp: int | None = None, dp: int | None = None,
                 vp: int | None = None) -> tuple[int, int, int, int]:
    """(tp, pp, dp, vp) with the missing degrees filled so that tp·pp·dp = ``devices`` (when known).

    tp and vp default to 1; with neither pp nor dp given, the devices go to the pipeline (pp), else the
    missing one takes what is left. Raises PlanError when the product cannot be ``devices``.
    """
    tp, vp = tp or 1, vp or 1
    if devices is None:
        return tp, pp or 1, dp or 1, vp
    given = tp * (pp or 1) * (dp or 1)
    if pp is None and dp is None:
        pp, dp = (devices // tp if devices % tp == 0 else 0), 1
    elif pp is None:
        pp = devices // (tp * dp) if devices % (tp * dp) == 0 else 0
    elif dp is None:
        dp = devices // (tp * pp) if devices % (tp * pp) == 0 else 0
    if not pp or not dp or tp * pp * dp != devices:
        raise PlanError(f"--tp {tp} x --pp {pp or '?'} x --dp {dp or '?'} does not make {devices} devices "
                        f"(the degrees given multiply to {given}); give degrees whose product is {devices}")
    return tp, pp, dp, vp


def plan_from_flags(model: str, num_layers: int, *, pp: int, dp: int | tuple[int, ...] = 1, tp: int = 1, vp: int = 1,
                    schedule: str = "1f1b", microbatches: int | None = None, microbatch_size: int = 1, batches: int = 1,
                    vertical_sync: bool = False, recompute: str | bool = "none", topology: str | None = None,
                    devices: list[str] | None = None, lr: float | None = None, sequence_parallel: bool = False) -> Plan:
    """The plan that explicit degrees ask for: ``pp`` pipeline positions × ``dp`` data-parallel replicas × ``tp``
    tensor-parallel ranks, ``vp`` model chunks per position (interleaved), layers split evenly.

    Args:
        model: the model spec the plan is for; ``num_layers``: its profile's layer count.
        pp: pipeline depth P (devices along the pipeline).
        dp: replicas of every stage, or one count per position (``--replicas 2,1``).
        tp: tensor-parallel degree T.
        vp: chunks per device V; more than 1 needs the interleaved schedule (which then gets P·V virtual stages).
        microbatches: per batch (default: 4, or the smallest multiple of pp·dp that interleaved accepts).
        devices: topology devices to place the grid on, in order (tensor rank fastest, then replica, then
            position); default d0, d1, ... The plan takes the first pp·dp·tp of them.
        Other arguments are the plan's fields.

    Raises:
        PlanError: a degree below 1, chunks without the interleaved schedule, more stages than layers,
        or fewer devices than the grid needs.
    """
    reps = tuple(dp) if isinstance(dp, (tuple, list)) else (dp,) * pp
    for name, v in (("pp", pp), ("tp", tp), ("vp", vp)):
        if not isinstance(v, int) or v < 1:
            raise PlanError(f"--{name} must be a whole number >= 1 (got {v!r})")
    if len(reps) != pp or any(r < 1 for r in reps):
        raise PlanError(f"--dp/--replicas must give {pp} replica counts >= 1 (got {list(reps)})")
    fam = FAMILY.get(schedule)
    multi = fam is not None and fam.multi_stage
    vp = chunks_for(schedule, vp)
    if vp > 1 and not multi:
        multis = ", ".join(n for n, f in FAMILY.items() if f.multi_stage)
        raise PlanError(f"--vp {vp} (chunks per device) needs --schedule interleaved or another that places several "
                        f"stages on a device ({multis}; got {schedule})")
    if microbatches is None:
        microbatches = 4
        if multi:
            step = pp * max(reps)
            microbatches = -(-max(microbatches, step) // step) * step
    kw = dict(schedule=schedule, microbatches=microbatches, microbatch_size=microbatch_size, batches=batches,
              chunks=vp, vertical_sync=vertical_sync, topology=topology, tensor_parallel=tp,
              recompute=recompute_mode(recompute), sequence_parallel=sequence_parallel)
    if lr is not None:
        kw["lr"] = lr
    plan = even_plan(model, num_layers, pp * vp, reps * vp, **kw)
    if devices is None:
        return plan
    names = plan.devices
    if len(names) > len(devices):
        raise PlanError(f"the plan needs {len(names)} devices (pp {pp} x dp {'/'.join(map(str, sorted(set(reps))))} x "
                        f"tp {tp}) but only {len(devices)} are given; use smaller degrees or a larger topology")
    rename = dict(zip(names, devices))
    return plan.with_devices([tuple(rename[d] for d in s.devices) for s in plan.stages])
