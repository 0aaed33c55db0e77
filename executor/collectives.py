"""Collectives: the process groups (stage replicas, tensor-parallel groups) and the ALLREDUCE of a round's gradients.

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
    """stage -> the data-parallel group of ``rank`` for that stage (with tensor parallelism: the same TP rank of
    every replica), for the stages of ``rank`` that have more than one replica.

    A collective call: every rank creates every group, in the same order.
    """
    out = {}
    for s in range(len(program.stage_workers)):
        for t in range(program.tensor_parallel):
            ws = program.replica_workers(s, t)
            if len(ws) > 1:
                g = dist.new_group(list(ws))
                if rank in ws:
                    out[s] = g
    return out


def tensor_group(program: Program, rank: int):
    """The process group of ``rank``'s stage replica's TP ranks (None without tensor parallelism).

    A collective call: every rank creates every TP group (each distinct group once), in the same order.
    """
    T = program.tensor_parallel
    if T == 1:
        return None
    mine, seen = None, set()
    for ws in program.stage_workers:
        for r in range(len(ws) // T):
            members = tuple(ws[r * T:(r + 1) * T])
            if members in seen:  # interleaved: a device's chunks share its group
                continue
            seen.add(members)
            g = dist.new_group(list(members))
            if rank in members:
                mine = g
    return mine


def all_reduce(t: torch.Tensor, group, staged: bool, op=dist.ReduceOp.SUM) -> None:
    """Sum ``t`` in place over ``group`` (or reduce it by ``op``: the maximum); ``staged``: through a host copy
    (gloo on a GPU)."""
    if staged:
        host = t.to("cpu")
        dist.all_reduce(host, op=op, group=group)
        t.copy_(host)
    else:
        dist.all_reduce(t, op=op, group=group)


def all_gather_dim(t: torch.Tensor, dim: int, group, size: int, staged: bool) -> torch.Tensor:
    """Every rank's ``t`` of ``group`` (``size`` ranks), concatenated along ``dim`` in rank order."""
    local = t.detach().to("cpu") if staged else t.detach()
    pieces = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    return torch.cat(pieces, dim=dim).to(t.device)


def reduce_scatter_dim(t: torch.Tensor, dim: int, group, size: int, rank: int, staged: bool) -> torch.Tensor:
    """The sum over ``group`` of ``t``, this rank's ``1/size`` along ``dim`` only."""
    local = t.detach().to("cpu") if staged else t.detach()
    chunks = [c.contiguous() for c in local.chunk(size, dim=dim)]
    out = torch.empty_like(chunks[rank])
    dist.reduce_scatter(out, chunks, group=group)
    return out.to(t.device)


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
