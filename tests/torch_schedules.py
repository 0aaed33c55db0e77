"""torch's schedules built without a process group (as torch's own tests build them), for tests and benchmarks.

A stand-in stage object carries only the indices a schedule's constructor reads.
"""
from __future__ import annotations

import csv
import io

import torch
from torch.distributed.pipelining import schedules as S
from torch.distributed.pipelining.stage import _PipelineStageBase

#: every schedule class torch.distributed.pipelining ships (a name this torch lacks is skipped by callers)
TORCH_SCHEDULES = ["GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV"]


class _Stage(_PipelineStageBase):
    """Just the indices a schedule's constructor reads; no process group, no module to run."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int):
        self.stage_index, self.num_stages, self.group_size, self.group_rank = stage_index, num_stages, group_size, 0
        self.submod = torch.nn.Identity()
        self.stage_index_to_group_rank = {}
        self.has_backward = True
        self.dw_builder = None

    def _create_grad_recv_info(self, *a, **k):
        return ()

    def _prepare_forward_infra(self, *a, **k):
        return ()

    def _prepare_backward_infra(self, *a, **k):
        return ()

    @property
    def is_first(self):
        return self.stage_index == 0

    @property
    def is_last(self):
        return self.stage_index == self.num_stages - 1


def torch_schedule(name: str, P: int, M: int, V: int = 2):
    """torch's Schedule<name> for P ranks and M microbatches (V stages per rank for the multi-stage ones); None if absent."""
    cls = getattr(S, f"Schedule{name}", None)
    if cls is None:
        return None
    if issubclass(cls, S.PipelineScheduleMulti):
        from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

        style = "v" if name in ("ZBVZeroBubble", "DualPipeV") else "loop"
        placement = generate_stage_to_rank_mapping(P, P * V, style=style)
        return cls([_Stage(s, P * V, P) for s in range(P * V) if placement[s] == 0], n_microbatches=M, loss_fn=lambda a, b: a)
    return cls(_Stage(0, P, P), n_microbatches=M, loss_fn=lambda a, b: a)


def order_csv(order: dict) -> str:
    """torch's CSV of a pipeline order: one row per rank, as its ``_dump_csv`` writes."""
    buf = io.StringIO()
    wr = csv.writer(buf)
    for r in sorted(order):
        wr.writerow(["" if a is None else str(a) for a in order[r]])
    return buf.getvalue()


def torch_steps(sch, num_stages: int) -> int:
    """torch's own unit-cost timer: steps of ``_simulate_comms_compute`` (each action, SEND/RECV included, one step).

    An ``OVERLAP_F_B`` (DualPipeV) counts as its forward and its backward, run one after the other as torch's
    runtime runs them without an overlap callback (the timer itself stops on the compound action).
    """
    drop = ("UNSHARD", "RESHARD", "REDUCE_GRAD")
    keep = {r: [x for a in v if a is not None for x in (a.sub_actions or (a,)) if x.computation_type.value not in drop]
            for r, v in sch.pipeline_order_with_comms.items()}
    sim = S._simulate_comms_compute(keep, lambda s: sch.stage_index_to_group_rank[s], num_stages)
    return max(len(v) for v in sim.values())


def torch_steps_of(program) -> int:
    """torch's timer on a pipetwin program: its compute order exported, lowered by torch's own ``_add_send_recv``."""
    from planner.torch_interop import to_torch_rows

    rank_of = {s: ws[0] for s, ws in enumerate(program.stage_workers)}
    compute = {r: [S._Action.from_str(t) for t in row] for r, row in to_torch_rows(program).items()}
    comms = S._add_send_recv(compute, stage_to_rank=lambda s: rank_of[s], num_stages=len(rank_of))
    sim = S._simulate_comms_compute(comms, lambda s: rank_of[s], len(rank_of))
    return max(len(v) for v in sim.values())
