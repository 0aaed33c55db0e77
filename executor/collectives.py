"""Collectives: the stage replica groups and the ALLREDUCE of a round's gradients.

``ALLREDUCE`` is one flat all-reduce (sum) of the round's gradients plus a
contribution count on the stage's replica group; PipeDream divides by the
count (replicas average their minibatch gradients), flush schedules and 2BW
sum (each replica's gradients are already scaled by 1/M). A GPU worker on gloo
stages the buffer through host memory.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from planner.program import Program


def replica_groups(program: Program, rank: int) -> dict[int, object]:
    """stage -> the process group of its replicas, for the stages of ``rank`` that have more than one.

    A collective call: every rank creates every group, in the same order.
    """
    out = {}
    for s, ws in enumerate(program.stage_workers):
        if len(ws) > 1:
            g = dist.new_group(list(ws))
            if rank in ws:
                out[s] = g
    return out


def all_reduce(t: torch.Tensor, group, staged: bool) -> None:
    """Sum ``t`` in place over ``group``; ``staged``: through a host copy (gloo on a GPU)."""
    if staged:
        host = t.to("cpu")
        dist.all_reduce(host, group=group)
        t.copy_(host)
    else:
        dist.all_reduce(t, group=group)


def reduce_gradients(grads: Sequence[torch.Tensor] | None, count: int, like: Sequence[torch.Tensor], group,
                     staged: bool, average: bool, dtype: torch.dtype, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All-reduce a round's gradients (None: this replica had none) and its contribution count.

    Returns views of the reduced flat buffer shaped like ``like`` (divided by the
    summed count when ``average``) and the flat buffer itself.
    """
    numel = sum(p.numel() for p in like)
    if grads is None:
        flat = torch.zeros(numel + 1, dtype=dtype, device=device)
    else:
        c = torch.tensor([float(count)], dtype=dtype, device=device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [c])
    all_reduce(flat, group, staged)
    if average:
        flat[:-1].div_(flat[-1].clamp(min=1.0))
    views, off = [], 0
    for p in like:
        views.append(flat[off:off + p.numel()].view_as(p))
        off += p.numel()
    return views, flat
