"""What calibration measures with torch and the executor: gradient-add cost, a chain's saved bytes, loopback links, where runs go.

Where the runs go is the executor's one backend/device rule (``executor.resolve_backend_device``),
resolved once for the widest run so that calibration and scored runs share one backend.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from executor.backend import resolve_backend_device
from executor.launch import run_plan
from executor.memory import storage_keys, tensor_bytes
from executor.models import build_layers, build_stage, loss_fn, make_batch, num_layers
from executor.netbench import run_netbench
from executor.profiler import profile_model
from validation.errors import CalibrationError


def accumulate_s_per_byte(spec: str, microbatch_size: int = 1, repeats: int = 20, seed: int = 0,
                          device: str = "cpu") -> float:
    """Seconds per parameter byte of adding a backward's gradients into a running sum, as the executor does.

    Timed right after a backward of the whole model (``torch.autograd.grad``, one thread), on the gradients it
    just made, median of ``repeats``: there the add costs about 1.5x what it costs on warm tensors alone
    (mlp: 0.17 against 0.11 ms for 4 MB). The difference of backwards timed with and without the add says
    the same on real compute but drowns in the timed waits of emulated layers. ``device="cuda"``: on the
    current GPU, the add timed between synchronizations.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    model = torch.nn.Sequential(*build_layers(spec, seed=seed)).to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    nbytes = sum(p.numel() * p.element_size() for p in params)
    if not params or nbytes == 0:
        return 0.0
    x, y = (t.to(dev) for t in make_batch(spec, microbatch_size, 0, seed))
    loss = loss_fn(spec)
    acc = [torch.zeros_like(p) for p in params]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = []
    try:
        for _ in range(repeats + 2):
            grads = list(torch.autograd.grad(loss(model(x), y), params, allow_unused=True, materialize_grads=True))
            if cuda:
                torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            torch._foreach_add_(acc, grads)
            if cuda:
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return float(np.median(times[2:])) / nbytes


def chain_saved_bytes(spec: str, microbatch_size: int = 1, seed: int = 0) -> list[float]:
    """Per layer, the bytes per sample a forward of the whole chain and its loss keeps for backward.

    One forward of every layer and the loss under ``saved_tensors_hooks``; every saved storage is counted
    once (parameters and buffers excluded) and goes to the last layer that saves it, the loss counting as
    the last layer. A boundary tensor that a layer keeps as its output and the next as its input (a
    ReLU, then a Linear) is so counted once, where a stage boundary there puts it: with the consumer,
    whose copy arrives in a receive buffer, while the producer's stage keeps its output anyway until the
    backward (``sim.memory``). The profiler measures layers one by one and counts it in both.
    (``executor.memory.SavedBytes`` counts the same storages, once per count, but cannot say which layer
    saved one last: it keeps a total, not bytes per storage.)
    """
    n = num_layers(spec)
    layers = build_stage(spec, 0, n - 1, seed)
    x, y = make_batch(spec, microbatch_size, 0, seed)
    exclude = storage_keys(t for layer in layers for t in (*layer.parameters(), *layer.buffers()))
    owner: dict[int, tuple[int, int]] = {}  # storage -> (last layer that saved it, bytes)
    at = 0

    def pack(t):  # the keys and sizes of executor.memory.SavedBytes (which counts per stage, not per layer)
        try:
            st = t.untyped_storage()
            if st.data_ptr() not in exclude:
                owner[st.data_ptr()] = (at, st.nbytes())
        except (RuntimeError, NotImplementedError):  # a tensor without storage: its own elements
            owner[-id(t)] = (at, tensor_bytes(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h = x
        for at, layer in enumerate(layers):
            h = layer(h)
        at = n - 1
        loss_fn(spec)(h, y)
    out = [0.0] * n
    for i, nbytes in owner.values():
        out[i] += nbytes / microbatch_size
    return out


def run_options(device: str = "cpu", backend: str = "auto", workers: int | None = None) -> dict:
    """``run_plan`` keywords for runs on ``device`` ("cpu" or "cuda"), one backend for all of them.

    The executor's one rule decides (``executor.resolve_backend_device``), for the largest run
    (``workers``; None: one): the CPU always uses gloo (a machine with GPUs would otherwise pick NCCL and
    the GPUs for runs that were profiled on the CPU); on "cuda", "auto" is NCCL when there is a GPU per
    worker of that run, else gloo with the workers sharing the GPUs, so that calibration and scored runs
    never mix two backends' links. An explicit "nccl" with fewer GPUs is refused before anything runs.
    """
    if device not in ("cpu", "cuda"):
        raise CalibrationError(f"unknown device {device!r}; choose cpu or cuda")
    backend, device = resolve_backend_device(backend, device, workers or 1)
    return {"device": device, "backend": backend}


def measure_links(sizes=(256, 4096, 65536, 1 << 20, 4 << 20), repeats: int = 8) -> list[tuple[float, float]]:
    """(bytes, one-way seconds) points of the loopback link benchmark between two local processes."""
    rep = run_netbench(workers=2, sizes=sizes, repeats=repeats, warmup=2)
    return [(float(b), float(t)) for link in rep["links"] for b, t in link["points"]]


@dataclass(frozen=True)
class Instruments:
    """How validation measures: what launches a plan, profiles a model, times a gradient add, benchmarks the links.

    The real ones by default; a test hands in recorders or fakes instead of patching modules.

    Attributes:
        launch: ``executor.run_plan``-like: (plan, timeout_s=..., device=..., backend=...) → a result with ``.trace``.
        profile: ``executor.profile_model``-like: (spec, microbatch_size=..., repeats=..., warmup=..., device=...).
        accumulate: ``accumulate_s_per_byte``-like: (spec, microbatch_size, device=...) → seconds per byte.
        links: ``measure_links``-like: () → (bytes, one-way seconds) points.
    """

    launch: Callable = run_plan
    profile: Callable = profile_model
    accumulate: Callable = accumulate_s_per_byte
    links: Callable = measure_links
