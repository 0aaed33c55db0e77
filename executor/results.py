"""Results of a run: what each worker reports, gathered on rank 0 and merged into one RunResult.

Each worker's part is a dict: ``rank``, ``times`` (action index, start s, end s,
bytes; seconds since the common barrier), ``memory`` (time s, bytes),
``losses`` (global microbatch -> loss), ``weights`` (``stage{s}.{param}`` of
the stages whose replica 0 it holds), ``device``, ``cpu_s``, ``wall_s`` and ``optimizer_state_bytes`` (its
optimizer's state tensors: ZeRO's master slice and moments, Adam's moments, SGD's momentum buffer; plain SGD
none); under ZeRO-3 also ``param_shard_bytes`` (the weights it holds between passes: its shards) and ``collectives`` (each gather and
reduce-scatter it ran: action index, op, unit, bytes).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from executor import checkpoint as ckpt
from executor.prepare import Prepared, RunConfig
from planner.plan import Plan
from planner.program import Program
from planner.trace import Event, MemorySample, Trace, summary


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        trace: the measured trace (lane = worker id; meta source "measured").
        weights: final weights of every stage, keys ``stage{s}.{param}`` (CPU tensors).
        losses: loss of every (global) microbatch index that ran.
        plan: the plan that ran (None when a program file ran).
        program: the program of this run (the batches left after a resume).
        start_step: optimizer steps already done by a checkpoint this run resumed from.
        backend: the process-group backend used.
        wall_s: seconds from launch to the merged result.
    """

    trace: Trace
    weights: dict[str, torch.Tensor]
    losses: dict[int, float]
    plan: Plan | None
    program: Program | None
    start_step: int = 0
    backend: str = "gloo"
    wall_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """``planner.trace.summary`` of the trace plus the run's own keys."""
        out = summary(self.trace)
        out["final_loss"] = list(self.losses.values())[-1] if self.losses else None
        out["backend"] = self.backend
        out["device"] = self.trace.meta.get("device_kind", "cpu")
        out["start_step"] = self.start_step
        out["wall_s"] = self.wall_s
        state = self.trace.meta.get("optimizer_state_bytes", {})
        shards = self.trace.meta.get("param_shard_bytes", {})
        for w, d in out["per_device"].items():  # what each rank's optimizer holds (executor.zero)
            d["optimizer_state_bytes"] = int(state.get(str(w), 0))
            if any(shards.values()):  # ZeRO-3: the weights each rank holds between passes
                d["param_shard_bytes"] = int(shards.get(str(w), 0))
        return out


def gather_results(payload: dict, rank: int) -> list[dict] | None:
    """Every worker's results on rank 0 (None elsewhere)."""
    out = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(payload, out, dst=0)
    return out


def result_from_parts(parts: list[dict], prep: Prepared, backend: str, wall_s: float = 0.0) -> RunResult:
    """One RunResult from every worker's part."""
    trace = merge_trace(prep, parts)
    trace.meta["backend"] = backend
    collectives = {p["rank"]: [tuple(e) for e in p.get("collectives", [])] for p in parts}
    return RunResult(trace=trace, weights=merge_weights(parts),
                     losses=merge_losses(parts), plan=prep.plan, program=prep.program, start_step=prep.start_step,
                     backend=backend, wall_s=wall_s,
                     extra={"collectives": collectives} if any(collectives.values()) else {})


def merge_trace(prep: Prepared, parts: list[dict]) -> Trace:
    """One measured Trace from every worker's results (times are seconds since the common barrier)."""
    program = prep.program
    trace = Trace(meta={"source": "measured", "family": prep.family, "microbatch_size": prep.microbatch_size,
                        "model": prep.model, "devices": {str(p["rank"]): p["device"] for p in parts},
                        "device_kind": "cuda" if any(str(p["device"]).startswith("cuda") for p in parts) else "cpu",
                        "cpu_s": {str(p["rank"]): p.get("cpu_s", 0.0) for p in parts},
                        "optimizer_state_bytes": {str(p["rank"]): p.get("optimizer_state_bytes", 0) for p in parts},
                        "param_shard_bytes": {str(p["rank"]): p.get("param_shard_bytes", 0) for p in parts}})
    for p in parts:
        w = p["rank"]
        acts = program[w]
        for i, s, e, nb in p["times"]:
            a = acts[i]
            trace.events.append(Event(w, str(a), s, e, a.kind.value, int(nb)))
        for t, b in p["memory"]:
            trace.memory.append(MemorySample(w, t, b))
    trace.events.sort(key=lambda e: (e.start_s, str(e.lane)))
    return trace


def merge_weights(parts: list[dict]) -> dict[str, torch.Tensor]:
    """Every part's weights, ordered by stage then name."""
    out: dict[str, torch.Tensor] = {}
    for p in parts:
        out.update(p["weights"])
    return dict(sorted(out.items(), key=lambda kv: (int(kv[0].split(".")[0][5:]), kv[0])))


def merge_losses(parts: list[dict]) -> dict[int, float]:
    out: dict[int, float] = {}
    for p in parts:
        out.update(p["losses"])
    return dict(sorted(out.items()))


def weights_from_checkpoint(prep: Prepared, cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Final weights of a resumed run that had nothing left to do."""
    out = {}
    for s, layers in enumerate(prep.layers):
        doc = ckpt.load_stage(cfg.checkpoint_dir, prep.start_step, s, model=prep.model, layers=layers)
        for n, t in doc["weights"].items():
            out[f"stage{s}.{n}"] = t
    return out
