"""Tensor parallelism for the zoo's ``gpt`` and ``llama`` models: Megatron's column/row-parallel layers, all-reduces.

Every TP rank of a stage replica runs the same actions on its shard of the
stage. In each transformer block (Megatron-LM, Shoeybi et al. 2019):

* attention: the QKV projection is column-parallel (TP rank t computes the
  query, key and value of heads ``[t·H/T, (t+1)·H/T)``), attention runs on
  those heads only, and the output projection is row-parallel (rank t holds
  the columns of its heads);
* MLP: fc1 (hidden → 4·hidden) is column-parallel, GELU runs on the rank's
  columns, fc2 is row-parallel;
* ``f`` before each column-parallel layer: identity in forward, all-reduce
  (sum) of the input gradient in backward; ``g`` after each row-parallel
  layer: all-reduce (sum) of the partial outputs in forward, identity in
  backward. So a block does two all-reduces in forward and two in backward,
  in the replica's TP process group. Row-parallel biases are added once,
  after the reduction.

The ``llama`` block is split the same way, without biases: its QKV rows are grouped by key/value head
(:class:`executor.models.GroupedQueryAttention`), so rank t takes the contiguous rows of KV groups
``[t·G/T, (t+1)·G/T)`` — their query heads, key heads and value heads together, so grouped-query attention
runs on the rank alone; the SwiGLU's gate and up matrices are column-parallel (rank t: columns
``[t·F/T, (t+1)·F/T)`` of each), the product runs on the rank's columns, and down is row-parallel.

Layer norms (RMSNorms), the embedding and the LM head are replicated on every TP rank
(the embedding and head are not vocabulary-parallel): their inputs and
output gradients are the same on every rank after the reductions above, so
their gradients agree without a reduction of their own and the ranks' copies
stay equal.

Sequence parallelism (Korthikanti et al. 2022; ``Plan.sequence_parallel``): between the
tensor-parallel regions each rank keeps only its 1/T of the sequence. ``f``
becomes an all-gather along the sequence (backward: reduce-scatter) and ``g``
a reduce-scatter (backward: all-gather); the embedding's output is split
along the sequence (backward: all-gather) and the head gathers it back
(backward: the rank's own part, as every rank computes the same loss). Stage
boundaries then carry 1/T of the sequence, TP rank t to TP rank t. The block
norms and the row-parallel biases see only their rank's tokens, so their
gradients are summed over the TP group once per optimizer step, before it
(as Megatron does), by :func:`reduce_sequence_parallel_grads`. Weights are built whole from the seed (as the single-process
reference builds them) and sliced, so a TP run starts from the reference's
weights; :func:`unshard` puts a parameter's shards back together for
checkpoints and the final weights.

``PIPETWIN_TP_FAULT`` (tests use it) skips the forward (``g``: ``forward``)
or backward (``f``: ``backward``) reductions, or sequence parallelism's
per-step sum of the norms' and biases' gradients (``sequence-grads``), to
show that parity checks catch a missing reduction.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from executor.collectives import all_gather_dim, all_reduce, reduce_scatter_dim
from executor.errors import ExecutorError
from executor.models import (GPTBlock, GPTEmbedding, GPTHead, GroupedQueryAttention, LlamaBlock, LlamaEmbedding,
                             LlamaHead, SwiGLU, parse_spec)
from executor.recompute import attention_core

TP_FAULT_ENV = "PIPETWIN_TP_FAULT"


@dataclass(frozen=True)
class TPContext:
    """One worker's place in its stage replica's tensor-parallel group.

    Attributes:
        group: the process group of the replica's T workers.
        rank: this worker's TP rank t (0..T-1).
        size: T.
        staged: collectives go through host copies (gloo on a GPU).
        skip: "forward" / "backward" skips that direction's reductions (fault injection; "" normally).
        sequence: sequence parallelism (see the module docstring).
        compute_only: no collectives at all (``group`` unused): a reduction returns the rank's own partial,
            a gather repeats the rank's part ``size`` times, a reduce-scatter keeps the rank's part, so the
            shapes and the rank's compute are a real TP rank's while nothing is communicated (the block
            profiler times a TP-sliced block's compute on its own so; the interpreters add the collectives).
    """

    group: object
    rank: int
    size: int
    staged: bool = False
    skip: str = ""
    sequence: bool = False
    compute_only: bool = False


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split over T ranks: along ``dim``, in ``blocks`` equal blocks (QKV: 3), each split T ways."""

    dim: int
    blocks: int = 1


def _all_reduce(t: Tensor, tp: TPContext) -> Tensor:
    if not tp.compute_only:
        all_reduce(t, tp.group, tp.staged)
    return t


class _CopyToTP(torch.autograd.Function):
    """``f``: identity forward; the input gradient is summed over the TP group in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPContext) -> Tensor:
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        tp = ctx.tp
        if tp.skip == "backward":
            return g, None
        return _all_reduce(g.contiguous().clone(), tp), None


class _ReduceFromTP(torch.autograd.Function):
    """``g``: the partial outputs are summed over the TP group in forward; identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPContext) -> Tensor:
        y = x.contiguous().clone()
        if tp.skip == "forward":
            return y
        return _all_reduce(y, tp)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None


def _gather(x: Tensor, tp: TPContext) -> Tensor:
    if tp.compute_only:
        return torch.cat([x.detach()] * tp.size, dim=1)
    return all_gather_dim(x, 1, tp.group, tp.size, tp.staged)


def _reduce_scatter(x: Tensor, tp: TPContext) -> Tensor:
    if tp.compute_only:
        return _own(x, tp)
    return reduce_scatter_dim(x, 1, tp.group, tp.size, tp.rank, tp.staged)


def _own(x: Tensor, tp: TPContext) -> Tensor:
    return x.chunk(tp.size, dim=1)[tp.rank].contiguous()


class _ScatterSeq(torch.autograd.Function):
    """This rank's part of the sequence in forward; the parts gathered back in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPContext) -> Tensor:
        ctx.tp = tp
        return _own(x, tp)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _gather(g, ctx.tp), None


class _GatherSeq(torch.autograd.Function):
    """The whole sequence from every rank's part in forward; in backward a reduce-scatter when the consumer is
    tensor-parallel (each rank's gradient is a partial sum), else the rank's own part (the gradients agree)."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPContext, partial: bool) -> Tensor:
        ctx.tp, ctx.partial = tp, partial
        return _gather(x, tp)

    @staticmethod
    def backward(ctx, g: Tensor):
        tp = ctx.tp
        if ctx.partial and tp.skip != "backward":
            return _reduce_scatter(g, tp), None, None
        return _own(g, tp), None, None


class _ReduceScatterSeq(torch.autograd.Function):
    """The partial outputs summed over the TP group, this rank's part of the sequence kept; all-gather backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPContext) -> Tensor:
        ctx.tp = tp
        if tp.skip == "forward":
            return _own(x, tp)
        return _reduce_scatter(x, tp)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _gather(g, ctx.tp), None


def copy_to_tp(x: Tensor, tp: TPContext) -> Tensor:
    """Into a column-parallel layer: ``f`` (all-gather of the sequence under sequence parallelism)."""
    return _GatherSeq.apply(x, tp, True) if tp.sequence else _CopyToTP.apply(x, tp)


def reduce_from_tp(x: Tensor, tp: TPContext) -> Tensor:
    """Out of a row-parallel layer: ``g`` (reduce-scatter along the sequence under sequence parallelism)."""
    return _ReduceScatterSeq.apply(x, tp) if tp.sequence else _ReduceFromTP.apply(x, tp)


def shard(full: Tensor, spec: ShardSpec, rank: int, size: int) -> Tensor:
    """TP rank ``rank``'s piece of ``full`` (a copy)."""
    blocks = full.chunk(spec.blocks, dim=spec.dim)
    return torch.cat([b.chunk(size, dim=spec.dim)[rank] for b in blocks], dim=spec.dim).clone()


def unshard(pieces: list[Tensor], spec: ShardSpec) -> Tensor:
    """The whole parameter from every TP rank's piece (rank order): the inverse of :func:`shard`."""
    per_rank = [p.chunk(spec.blocks, dim=spec.dim) for p in pieces]
    return torch.cat([torch.cat([r[b] for r in per_rank], dim=spec.dim) for b in range(spec.blocks)], dim=spec.dim)


class TPAttention(nn.Module):
    """Causal self-attention on this rank's heads: column-parallel QKV, row-parallel output projection."""

    shards = {"qkv.weight": ShardSpec(0, 3), "qkv.bias": ShardSpec(0, 3), "proj.weight": ShardSpec(1)}

    def __init__(self, full: nn.Module, tp: TPContext) -> None:
        super().__init__()
        hidden = full.proj.in_features
        self.tp = tp
        self.heads = full.heads // tp.size
        self.recompute_core = full.recompute_core
        self.head_dim = hidden // full.heads
        local = self.heads * self.head_dim
        self.qkv = nn.Linear(hidden, 3 * local)
        self.proj = nn.Linear(local, hidden)
        with torch.no_grad():
            self.qkv.weight.copy_(shard(full.qkv.weight, ShardSpec(0, 3), tp.rank, tp.size))
            self.qkv.bias.copy_(shard(full.qkv.bias, ShardSpec(0, 3), tp.rank, tp.size))
            self.proj.weight.copy_(shard(full.proj.weight, ShardSpec(1), tp.rank, tp.size))
            self.proj.bias.copy_(full.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = copy_to_tp(x, self.tp)
        b, t, _ = x.shape
        local = self.heads * self.head_dim
        q, k, v = self.qkv(x).split(local, dim=2)
        shape = (b, t, self.heads, self.head_dim)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = attention_core(q, k, v, self.recompute_core).transpose(1, 2).reshape(b, t, local)
        return reduce_from_tp(F.linear(y, self.proj.weight), self.tp) + self.proj.bias


class TPMLP(nn.Module):
    """The block's MLP on this rank's 4·hidden/T columns: column-parallel fc1 (``0``), row-parallel fc2 (``2``)."""

    shards = {"0.weight": ShardSpec(0), "0.bias": ShardSpec(0), "2.weight": ShardSpec(1)}

    def __init__(self, full: nn.Sequential, tp: TPContext) -> None:
        super().__init__()
        fc1, fc2 = full[0], full[2]
        self.tp = tp
        local = fc1.out_features // tp.size
        self.add_module("0", nn.Linear(fc1.in_features, local))
        self.add_module("2", nn.Linear(local, fc2.out_features))
        with torch.no_grad():
            self._modules["0"].weight.copy_(shard(fc1.weight, ShardSpec(0), tp.rank, tp.size))
            self._modules["0"].bias.copy_(shard(fc1.bias, ShardSpec(0), tp.rank, tp.size))
            self._modules["2"].weight.copy_(shard(fc2.weight, ShardSpec(1), tp.rank, tp.size))
            self._modules["2"].bias.copy_(fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        fc1, fc2 = self._modules["0"], self._modules["2"]
        h = F.gelu(fc1(copy_to_tp(x, self.tp)))
        return reduce_from_tp(F.linear(h, fc2.weight), self.tp) + fc2.bias


class TPGroupedQueryAttention(GroupedQueryAttention):
    """Llama attention on this rank's KV groups: column-parallel QKV (whole groups), row-parallel output projection."""

    shards = {"qkv.weight": ShardSpec(0), "proj.weight": ShardSpec(1)}

    def __init__(self, full: GroupedQueryAttention, tp: TPContext) -> None:
        super().__init__(full.proj.out_features, full.heads // tp.size, full.kv_heads // tp.size, full.head_dim)
        self.tp = tp
        self.recompute_core = full.recompute_core
        with torch.no_grad():
            self.qkv.weight.copy_(shard(full.qkv.weight, self.shards["qkv.weight"], tp.rank, tp.size))
            self.proj.weight.copy_(shard(full.proj.weight, self.shards["proj.weight"], tp.rank, tp.size))

    def forward(self, x: Tensor) -> Tensor:
        return reduce_from_tp(super().forward(copy_to_tp(x, self.tp)), self.tp)


class TPSwiGLU(SwiGLU):
    """The SwiGLU on this rank's F/T columns: column-parallel gate and up, row-parallel down."""

    shards = {"gate_up.weight": ShardSpec(0, 2), "down.weight": ShardSpec(1)}

    def __init__(self, full: SwiGLU, tp: TPContext) -> None:
        super().__init__(full.down.out_features, full.down.in_features // tp.size)
        self.tp = tp
        with torch.no_grad():
            self.gate_up.weight.copy_(shard(full.gate_up.weight, self.shards["gate_up.weight"], tp.rank, tp.size))
            self.down.weight.copy_(shard(full.down.weight, self.shards["down.weight"], tp.rank, tp.size))

    def forward(self, x: Tensor) -> Tensor:
        return reduce_from_tp(super().forward(copy_to_tp(x, self.tp)), self.tp)


#: The TP shard modules; each says how its parameters are split (``shards``).
_TP_MODULES = (TPAttention, TPMLP, TPGroupedQueryAttention, TPSwiGLU)


def check_model(spec: str, size: int, sequence: bool = False) -> None:
    """Raise ExecutorError unless ``spec`` is a gpt or llama model whose heads (llama: key/value heads and SwiGLU
    width; with ``sequence``, the sequence) split over ``size`` TP ranks."""
    ms = parse_spec(spec)
    if ms.kind not in ("gpt", "llama"):
        raise ExecutorError(f"tensor parallelism runs the zoo's gpt and llama models only (the plan's model is "
                            f"{spec!r}); use --tp 1, or a model like gpt:layers=4,hidden=64,heads=4,seq=16,vocab=128")
    heads = ms.get("heads")
    if heads % size:
        raise ExecutorError(f"--tp {size} must divide the model's {heads} attention heads; choose a divisor of {heads}")
    if ms.kind == "llama":
        kv, ffn = ms.get("kv_heads"), ms.get("ffn")
        if kv % size:
            raise ExecutorError(f"--tp {size} must divide the model's kv_heads={kv} (each rank takes whole key/value "
                                f"groups); choose a divisor of {kv}")
        if ffn % size:
            raise ExecutorError(f"--tp {size} must divide the model's ffn={ffn} (the SwiGLU's columns); choose a "
                                f"divisor of {ffn}")
    if sequence and ms.get("seq") % size:
        raise ExecutorError(f"sequence parallelism splits the sequence: --tp {size} must divide seq={ms.get('seq')}")


def parallelize(layers: list[nn.Module], tp: TPContext) -> list[nn.Module]:
    """The stage's gpt or llama layers with every block's attention and MLP replaced by this rank's TP shard (in
    place); under sequence parallelism the embedding's output is split along the sequence and the head's input
    gathered."""
    for layer in layers:
        if isinstance(layer, GPTBlock):
            layer.attn = TPAttention(layer.attn, tp)
            layer.mlp = TPMLP(layer.mlp, tp)
        elif isinstance(layer, LlamaBlock):
            layer.attn = TPGroupedQueryAttention(layer.attn, tp)
            layer.mlp = TPSwiGLU(layer.mlp, tp)
        elif tp.sequence and isinstance(layer, (GPTEmbedding, LlamaEmbedding)):
            layer.register_forward_hook(lambda mod, args, out: _ScatterSeq.apply(out, tp))
        elif tp.sequence and isinstance(layer, (GPTHead, LlamaHead)):
            layer.register_forward_pre_hook(lambda mod, args: (_GatherSeq.apply(args[0], tp, False),))
    return layers


def sequence_parallel_params(module: nn.Module) -> set[str]:
    """Names of the parameters whose gradients are partial sums under sequence parallelism (block norms and
    row-parallel biases)."""
    out = set()
    for name, sub in module.named_modules():
        if isinstance(sub, GPTBlock):
            for local in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn.proj.bias", "mlp.2.bias"):
                out.add(f"{name}.{local}")
        elif isinstance(sub, LlamaBlock):
            out.update((f"{name}.attn_norm.weight", f"{name}.mlp_norm.weight"))
    return out


def reduce_sequence_parallel_grads(grads, index: list[int], tp: TPContext) -> None:
    """Sum ``grads[j]`` for ``j`` in ``index`` over the TP group, in place (one flat all-reduce)."""
    if not index or tp.skip == "sequence-grads":
        return
    flat = torch.cat([grads[j].reshape(-1) for j in index])
    _all_reduce(flat, tp)
    off = 0
    for j in index:
        n = grads[j].numel()
        grads[j].copy_(flat[off:off + n].view_as(grads[j]))
        off += n


def shard_specs(module: nn.Module) -> dict[str, ShardSpec]:
    """Parameter name (as ``module.named_parameters`` gives it) -> its ShardSpec, for every sharded parameter."""
    out = {}
    for name, sub in module.named_modules():
        if isinstance(sub, _TP_MODULES):
            for local, spec in sub.shards.items():
                out[f"{name}.{local}" if name else local] = spec
    return out


def skip_from_env() -> str:
    """The all-reduce direction ``PIPETWIN_TP_FAULT`` asks to skip ("" when unset)."""
    value = os.environ.get(TP_FAULT_ENV, "")
    if value not in ("", "forward", "backward", "sequence-grads"):
        raise ExecutorError(f"{TP_FAULT_ENV}={value!r}: use forward, backward or sequence-grads (or leave it unset)")
    return value


def gather_weights(names: tuple[str, ...], params, specs: dict[str, ShardSpec], tp: TPContext) -> dict[str, Tensor] | None:
    """The stage's whole weights on TP rank 0 (None on the others): sharded parameters all-gathered and unsharded.

    A collective over the TP group: every rank of the group calls it with the same stage.
    """
    out = {}
    for n, p in zip(names, params):
        spec = specs.get(n)
        if spec is None:
            out[n] = p
            continue
        local = p.detach().to("cpu") if tp.staged else p.detach()
        pieces = [torch.empty_like(local) for _ in range(tp.size)]
        dist.all_gather(pieces, local.contiguous(), group=tp.group)
        out[n] = unshard(pieces, spec)
    return out if tp.rank == 0 else None
