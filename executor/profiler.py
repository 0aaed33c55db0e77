"""Per-layer profiler: measures a model spec into a :class:`planner.profile.ModelProfile`; per-shape block timer.

For every chain layer of :func:`executor.models.build_layers` it measures, at
one microbatch size, on one CPU thread or on a GPU (``device="cuda"``):

* forward and backward seconds: the median over ``repeats`` runs after
  ``warmup`` runs (wall clock on the CPU; CUDA events around the layer's kernels
  on a GPU, so the time is the GPU's, not the launch's). The layer's input is the real output of the layers before it
  (one no-grad pass over a real microbatch). The backward of a layer is the
  gradient of its output with respect to its parameters and its input (no input
  gradient for layer 0, as the first stage of a pipeline computes none). The
  last layer's forward and backward include the loss, as the last stage does.
* activation bytes per sample: bytes of the layer's output / microbatch size.
* saved bytes per sample: the exact bytes of the tensors autograd saves for the
  layer's backward, caught with ``torch.autograd.graph.saved_tensors_hooks``,
  counted once per storage, parameters and buffers excluded (they are counted
  as parameter bytes), divided by the microbatch size.
* parameter bytes: ``sum(p.numel() * p.element_size())``.

:func:`profile_block` times one transformer block of a given shape on one TP rank (``pipetwin profile
--blocks``: a device calibration's ``block_timings`` entries).
"""
from __future__ import annotations

import gc
import statistics
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from executor.memory import SavedBytes, storage_keys, tensor_bytes
from executor.models import build_layers, loss_fn, make_batch
from executor.modelspec import parse_spec
from executor.timing import Clock
from planner.profile import Layer, ModelProfile

__all__ = ["profile_model", "profile_block", "tp_block", "DTYPES", "saved_tensor_bytes", "layer_param_bytes", "single_thread"]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one intra-op torch thread, restoring the previous setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def layer_param_bytes(layer: nn.Module) -> int:
    """Bytes of the layer's parameters."""
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def saved_tensor_bytes(layer: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """Run ``layer(x)`` and return (output, bytes of distinct storages saved for backward, params excluded)."""
    exclude = storage_keys([*layer.parameters(), *layer.buffers()])
    with SavedBytes(exclude).counting() as rec:
        out = layer(x)
    return out, rec.nbytes


def _grad_like(out) -> Tensor:
    g = torch.Generator().manual_seed(1234)
    if not out.is_floating_point():
        return None
    return torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)


def _check_run(who: str, repeats: int, warmup: int, device: str) -> None:
    """ValueError unless ``repeats >= 1``, ``warmup >= 0`` and ``device`` is cpu or a cuda torch can use."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"{who} needs repeats >= 1 and warmup >= 0")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this machine has no GPU that torch can use; use --device cpu")


def profile_model(spec: str, microbatch_size: int = 1, repeats: int = 5, warmup: int = 2, seed: int = 0,
                  name: str | None = None, device: str = "cpu") -> ModelProfile:
    """Measure every chain layer of ``spec`` (see the module docstring) into a ModelProfile.

    ``device``: "cpu" (one thread) or "cuda" (the current GPU; times from CUDA events).
    """
    _check_run("profile_model", repeats, warmup, device)
    dev = torch.device(device)
    clock = Clock(dev)
    ms = parse_spec(spec)
    with single_thread():
        layers = build_layers(spec, seed)
        for layer in layers:
            layer.to(dev)
        x, target = make_batch(spec, microbatch_size, 0, seed)
        x, target = x.to(dev), target.to(dev)
        loss = loss_fn(spec)
        inputs: list[Tensor] = []
        with torch.no_grad():
            h = x
            for layer in layers:
                inputs.append(h.detach())
                h = layer(h)
        result = []
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            fwd, bwd, marks = [], [], []
            xi = inputs[i].detach().requires_grad_(i > 0 and inputs[i].is_floating_point())
            out, saved = saved_tensor_bytes(layer, xi)  # an untimed pass: the hooks cost time
            act = tensor_bytes(out)
            del out, xi
            gc_was = gc.isenabled()
            gc.disable()
            try:
                for r in range(warmup + repeats):
                    xi = inputs[i].detach()
                    if i > 0 and xi.is_floating_point():
                        xi.requires_grad_(True)
                    for p in layer.parameters():
                        p.grad = None
                    t0 = clock.mark()
                    out = layer(xi)
                    root = loss(out, target) if last else out
                    t1 = clock.mark()
                    grad = None if last else _grad_like(out)
                    t2 = clock.mark()
                    if isinstance(root, Tensor) and root.requires_grad:
                        torch.autograd.backward(root, grad)
                    t3 = clock.mark()
                    if r >= warmup:
                        marks.append((t0, t1, t2, t3))
                    del out, root, grad, xi
                if clock.cuda:
                    torch.cuda.synchronize(dev)
                for t0, t1, t2, t3 in marks:
                    fwd.append(clock.seconds(t0, t1))
                    bwd.append(clock.seconds(t2, t3))
            finally:
                if gc_was:
                    gc.enable()
            for p in layer.parameters():
                p.grad = None
            result.append(Layer(
                name=f"{i}:{_layer_name(layer)}",
                forward_s=statistics.median(fwd),
                backward_s=statistics.median(bwd),
                activation_bytes=act / microbatch_size,
                saved_bytes=saved / microbatch_size,
                param_bytes=float(layer_param_bytes(layer)),
            ))
    label = torch.cuda.get_device_name(dev) if clock.cuda else "cpu"
    return ModelProfile(name=name or ms.name, layers=tuple(result), microbatch_size=microbatch_size, device=label)


def _layer_name(layer: nn.Module) -> str:
    if isinstance(layer, nn.Sequential):
        return "+".join(type(m).__name__ for m in layer)
    return type(layer).__name__


#: ``--dtype`` names -> torch dtypes for :func:`profile_block`.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tp_block(hidden: int, heads: int, tensor_parallel: int = 1, sequence_parallel: bool = False, rank: int = 0,
             seed: int = 0, *, family: str = "gpt", kv_heads: int = 0, ffn: int = 0) -> nn.Module:
    """The zoo's block of ``family`` (``"gpt"``: :class:`executor.layers.GPTBlock`; ``"llama"``:
    :class:`executor.layers.LlamaBlock` with ``kv_heads`` key/value heads (0: ``heads``) and SwiGLU width ``ffn``
    (0: 4·hidden)), weights from ``seed``, for ``tensor_parallel`` > 1 sliced to TP rank ``rank``'s shard as the
    executor slices it, its collectives left out (``TPContext.compute_only``): what :func:`profile_block` times."""
    from executor.layers import GPTBlock, LlamaBlock
    from executor.tensor_parallel import TPContext, parallelize

    torch.manual_seed(seed)
    if family == "llama":
        block = LlamaBlock(hidden, heads, kv_heads or heads, ffn or 4 * hidden)
    elif family == "gpt":
        block = GPTBlock(hidden, heads)
    else:
        raise ValueError(f"no zoo block of family {family!r}; choose gpt or llama")
    if tensor_parallel > 1:
        ctx = TPContext(None, rank, tensor_parallel, sequence=sequence_parallel, compute_only=True)
        block = parallelize([block], ctx)[0]
    return block


def profile_block(hidden: int, heads: int, seq: int, microbatch_size: int = 1, tensor_parallel: int = 1,
                  sequence_parallel: bool = False, *, family: str = "gpt", kv_heads: int = 0, ffn: int = 0,
                  dtype: str = "float32", device: str = "cpu", repeats: int = 5, warmup: int = 2,
                  seed: int = 0) -> tuple[float, float]:
    """(forward, backward) seconds of one zoo transformer block (:func:`tp_block`: ``gpt`` or ``llama`` with
    ``kv_heads`` and ``ffn``) on one tensor-parallel rank, for one microbatch: the median over ``repeats`` runs
    after ``warmup`` runs.

    The block is the executor's: built whole from ``seed``, then, for ``tensor_parallel`` T > 1, sliced to TP
    rank 0's shard by :func:`executor.tensor_parallel.parallelize` (its heads — llama: its key/value groups —,
    its 1/T of the MLP columns; under ``sequence_parallel`` its input is 1/T of the sequence) with the TP
    collectives left out (``TPContext.compute_only``): the interpreters add them on the links, so the times are
    the rank's compute, as a device calibration's ``block_timings`` entries are.

    What is timed is what the efficiency model reads (``BlockTiming.forward_s``, ``backward_s``; the layer's
    ``forward_s`` and ``backward_s`` in ``planner.analytic``): the forward with autograd recording, its input
    requiring a gradient, as a training forward without recomputation runs and as a recomputing backward
    re-runs it (``planner.recompute`` adds ``forward_s`` to the backward); the backward alone, from the
    forward's last mark to its own, autograd's gradient of the block's output with respect to its parameters
    and its input (the block sits inside a pipeline stage), no recomputation inside it. Full recomputation's
    first forward runs without autograd, which the model charges the same ``forward_s``: on one CPU thread a
    no-grad forward of a hidden-256, seq-128 gpt block is about 8% faster. On the CPU one thread and
    ``perf_counter``; on a GPU CUDA events around the kernels, read after a synchronize.
    """
    _check_run("profile_block", repeats, warmup, device)
    t = tensor_parallel
    split = {"heads": heads} if family != "llama" else {"heads": heads, "kv_heads": kv_heads or heads,
                                                        "ffn": ffn or 4 * hidden}
    if sequence_parallel:
        split["seq"] = seq
    if any(v % t for v in split.values()):
        raise ValueError(f"tensor parallelism {t} must divide " + " and ".join(f"{k}={v}" for k, v in split.items()))
    dev = torch.device(device)
    clock = Clock(dev)
    with single_thread():
        block = tp_block(hidden, heads, t, sequence_parallel, seed=seed, family=family, kv_heads=kv_heads,
                         ffn=ffn).to(device=dev, dtype=DTYPES[dtype])
        tokens = seq // t if sequence_parallel else seq
        g = torch.Generator().manual_seed(seed + 1)
        x0 = torch.randn(microbatch_size, tokens, hidden, generator=g).to(device=dev, dtype=DTYPES[dtype])
        grad = torch.randn(x0.shape, generator=g).to(device=dev, dtype=DTYPES[dtype])
        marks = []
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for r in range(warmup + repeats):
                x = x0.detach().requires_grad_(True)
                for p in block.parameters():
                    p.grad = None
                t0 = clock.mark()
                out = block(x)
                t1 = clock.mark()
                torch.autograd.backward(out, grad)
                t2 = clock.mark()
                if r >= warmup:
                    marks.append((t0, t1, t2))
                del out, x
            if clock.cuda:
                torch.cuda.synchronize(dev)
        finally:
            if gc_was:
                gc.enable()
    fwd = statistics.median(clock.seconds(a, b) for a, b, _ in marks)
    bwd = statistics.median(clock.seconds(b, c) for _, b, c in marks)
    return fwd, bwd
