"""Which torch.distributed backend and device a run uses, and how a worker process joins the group.

:func:`resolve_backend_device` is the one rule for turning "auto" into a
backend and a device, used by the local launcher, the torchrun entry and
calibration runs alike:

* the CPU always uses gloo (NCCL only moves GPU memory);
* "cuda" with backend "auto" uses NCCL when there is a GPU per worker
  (``workers``: the widest run the caller means to launch on this node), else
  gloo with the workers sharing the GPUs there are; an explicit "nccl" with
  fewer GPUs than workers is refused before anything runs;
* device "auto" means the GPUs under NCCL and the CPU under gloo, and backend
  "auto" with device "auto" picks NCCL when there is a GPU per worker.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from executor.errors import ExecutorError

BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")


def resolve_backend_device(backend: str = "auto", device: str = "auto", workers: int = 1) -> tuple[str, str]:
    """``(backend, device)`` with "auto" resolved for a run of ``workers`` processes on this node (rules above)."""
    if backend not in BACKENDS:
        raise ExecutorError(f"unknown backend {backend!r}; choose auto, gloo or nccl")
    if device not in DEVICES:
        raise ExecutorError(f"unknown device {device!r}; choose auto, cpu or cuda")
    need = max(1, int(workers))
    if device == "cpu":
        if backend == "nccl":
            raise ExecutorError("NCCL communicates between GPUs: use --device cuda (or auto), or --backend gloo")
        return "gloo", "cpu"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "cuda":
        if not gpus:
            raise ExecutorError("--device cuda: this machine has no GPU that torch can use; use --device cpu")
        if backend == "nccl" and gpus < need:
            raise ExecutorError(f"NCCL needs one GPU per worker: the run has {need} workers, this machine {gpus} "
                                f"GPUs; use --backend gloo (workers share the GPUs) or launch on more nodes")
        if backend == "auto":
            backend = "nccl" if gpus >= need else "gloo"
        return backend, "cuda"
    # device "auto"
    if backend == "auto":
        backend = "nccl" if gpus >= need else "gloo"
    return backend, "cuda" if backend == "nccl" else "cpu"


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the kernel.

    Every backward returns fresh gradient tensors of a stage's parameter size;
    with glibc's defaults such allocations are mmapped (or the heap is trimmed
    when they are freed), so each one page-faults its memory in again — about
    0.7 ms per backward of a 4 x Linear(512) stage, a fifth of its time. A
    fixed mmap threshold (32 MiB, glibc's maximum) and no trimming keep the
    freed blocks in the heap. Process-wide, done once per worker process; a
    no-op off glibc or with ``PIPETWIN_MALLOC_TUNE=0``.
    """
    if os.environ.get("PIPETWIN_MALLOC_TUNE", "1") == "0" or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 * 2**20)
        libc.mallopt(m_trim_threshold, 2**30)
    except (OSError, AttributeError):
        pass


def init_process_group(backend: str, device: str, timeout_s: float, rank: int, world: int, store=None) -> torch.device:
    """Join the run's process group (one compute thread, the run's timeout); the device this rank computes on."""
    torch.set_num_threads(1)
    keep_freed_memory()
    timeout = timedelta(seconds=float(timeout_s))
    kw = {}
    if backend == "nccl" or device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank)) % max(1, torch.cuda.device_count())
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        if backend == "nccl":
            kw = {"device_id": dev}
    else:
        dev = torch.device("cpu")
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout, **kw)
    else:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kw)
    return dev
