"""Tensor parallelism for the zoo's ``gpt`` and ``llama`` models: Megatron's column/row- and vocabulary-parallel layers.

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

The embedding and the LM head are vocabulary-parallel (Megatron's ``VocabParallelEmbedding`` and
vocabulary-parallel cross entropy). The vocabulary V is padded to Vp, a multiple of 128·T, as
``planner.analytic.load_model`` pads it (:func:`vocab_padded`), and TP rank t holds rows
``[t·Vp/T, (t+1)·Vp/T)`` of the token embedding and of the head (the padding rows start at zero).
The embedding looks up the ids in the rank's range, zeros the others, and sums the partial
embeddings over the TP group (forward; the ids need no gradient). The head computes the logits of
its slice only (column-parallel: ``f`` before it), and the loss is taken without gathering them
(:class:`_VocabParallelCrossEntropy`: a max all-reduce, a sum-of-exponentials all-reduce and a
target-logit all-reduce; its backward is local). Padding logits are left out of the softmax, so
any T trains the V-word model the single-process reference trains (Megatron keeps them in its
softmax); their rows get no gradient and stay zero. The zoo's GPT head is its own matrix (not tied
to the embedding), in the reference as here, so there is no tie to keep. Layer norms (RMSNorms) and
GPT's position embedding are replicated: their inputs and output gradients are the same on every
rank after the reductions above, so their gradients agree without a reduction of their own.

Sequence parallelism (Korthikanti et al. 2022; ``Plan.sequence_parallel``): between the
tensor-parallel regions each rank keeps only its 1/T of the sequence. ``f``
becomes an all-gather along the sequence (backward: reduce-scatter) and ``g``
a reduce-scatter (backward: all-gather). As in Megatron-LM, a column-parallel layer keeps only the rank's
part of its input for backward and all-gathers it again there for its weight gradient
(:class:`_GatheredLinear`), so a block's backward all-gathers four times and reduce-scatters twice. The llama embedding's partial sums are reduce-scattered
along the sequence; GPT's are all-reduced, the positions added, and the sum split along the sequence
(backward: all-gather), as Megatron does where there are position embeddings. The head's norm runs
on the rank's tokens and its vocabulary-parallel matrix gathers them (backward: all-gather again, reduce-scatter).
Stage boundaries then carry 1/T of the sequence, TP rank t to TP rank t. The block norms, the
head's norm and the row-parallel biases see only their rank's tokens, so their gradients are
summed over the TP group once per optimizer step, before it (as Megatron does), by
:func:`reduce_sequence_parallel_grads`. Weights are built whole from the seed (as the single-process
reference builds them) and sliced, so a TP run starts from the reference's
weights; :func:`unshard` puts a parameter's shards back together for
checkpoints and the final weights.

``PIPETWIN_TP_FAULT`` (tests use it) skips the blocks' forward (``g``: ``forward``)
or backward (``f``: ``backward``) reductions, sequence parallelism's
per-step sum of the norms' and biases' gradients (``sequence-grads``), the vocabulary-parallel
embedding's sum (``embedding``), the head's input-gradient sum (``head``) or the cross entropy's
three reductions (``cross-entropy``), to show that parity checks catch a missing reduction.

Why one module of ~560 lines: the column- and row-parallel linears, the vocabulary-parallel embedding,
head and cross entropy, sequence parallelism's scatters and gathers, the fault hooks that the parity
tests break, and the gather of shards back into the single-process layout are one rank-local
contract: each piece's backward is the other pieces' forward reduction, and the parity tests hold
them to the reference together.
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
from planner.closedforms import padded_vocab, tp_vocab_multiple

TP_FAULT_ENV = "PIPETWIN_TP_FAULT"
#: What ``PIPETWIN_TP_FAULT`` may skip (see the module docstring).
TP_FAULTS = ("forward", "backward", "sequence-grads", "embedding", "head", "cross-entropy")


@dataclass(frozen=True)
class TPContext:
    """One worker's place in its stage replica's tensor-parallel group.

    Attributes:
        group: the process group of the replica's T workers.
        rank: this worker's TP rank t (0..T-1).
        size: T.
        staged: collectives go through host copies (gloo on a GPU).
        skip: the reductions to skip, one of :data:`TP_FAULTS` (fault injection; "" normally).
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
    """How a parameter is split over T ranks: along ``dim``, in ``blocks`` equal blocks (QKV: 3), each split T ways.

    ``padded`` > 0 (the vocabulary): the whole parameter, ``length`` long along ``dim``, is padded with zeros to
    ``padded`` before it is split, and cut back to ``length`` when it is put back together.
    """

    dim: int
    blocks: int = 1
    length: int = 0
    padded: int = 0


def _all_reduce(t: Tensor, tp: TPContext, op=dist.ReduceOp.SUM) -> Tensor:
    if not tp.compute_only:
        all_reduce(t, tp.group, tp.staged, op)
    return t


class _CopyToTP(torch.autograd.Function):
    """``f``: identity forward; the input gradient is summed over the TP group in backward (skipped when the fault
    names ``site``)."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPContext, site: str) -> Tensor:
        ctx.tp, ctx.site = tp, site
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        tp = ctx.tp
        if tp.skip == ctx.site:
            return g, None, None
        return _all_reduce(g.contiguous().clone(), tp), None, None


class _ReduceFromTP(torch.autograd.Function):
    """``g``: the partial outputs are summed over the TP group in forward (skipped when the fault names ``site``);
    identity backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPContext, site: str) -> Tensor:
        y = x.contiguous().clone()
        if tp.skip == site:
            return y
        return _all_reduce(y, tp)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None, None


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


class _ReduceScatterSeq(torch.autograd.Function):
    """The partial outputs summed over the TP group, this rank's part of the sequence kept; all-gather backward."""

    @staticmethod
    def forward(ctx, x: Tensor, tp: TPContext, site: str) -> Tensor:
        ctx.tp = tp
        if tp.skip == site:
            return _own(x, tp)
        return _reduce_scatter(x, tp)

    @staticmethod
    def backward(ctx, g: Tensor):
        return _gather(g, ctx.tp), None, None


class _GatheredLinear(torch.autograd.Function):
    """Sequence parallelism's column-parallel linear as Megatron-LM runs it: forward all-gathers the sequence and
    multiplies; only the rank's part of the input is kept for backward, which all-gathers it again for the weight
    gradient and reduce-scatters the input gradient (skipped, the rank's own part, when the fault names ``site``).
    So the gathered input, T times the kept one, is never held from forward to backward (Korthikanti et al. 2022,
    section 4.2.2: one more all-gather per column-parallel layer in backward, for 1/T of its input's memory)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, tp: TPContext, site: str) -> Tensor:
        ctx.tp, ctx.site, ctx.bias = tp, site, bias is not None
        ctx.save_for_backward(x, weight)
        return F.linear(_gather(x, tp), weight, bias)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight = ctx.saved_tensors
        tp = ctx.tp
        whole = _gather(x, tp)
        rows = g.reshape(-1, g.shape[-1])
        grad_w = rows.t() @ whole.reshape(-1, whole.shape[-1])
        grad_b = rows.sum(0) if ctx.bias else None
        grad_in = g @ weight
        grad_x = _own(grad_in, tp) if tp.skip == ctx.site else _reduce_scatter(grad_in, tp)
        return grad_x, grad_w, grad_b, None, None


def column_parallel_linear(x: Tensor, weight: Tensor, bias: Tensor | None, tp: TPContext,
                           site: str = "backward") -> Tensor:
    """A column-parallel layer of this rank's ``weight`` rows: ``f`` then the product (under sequence parallelism
    :class:`_GatheredLinear`: all-gather, product, and the input kept ungathered); ``site`` names its backward
    reduction for fault injection."""
    if tp.sequence:
        return _GatheredLinear.apply(x, weight, bias, tp, site)
    return F.linear(_CopyToTP.apply(x, tp, site), weight, bias)


class ColumnParallelLinear(nn.Linear):
    """An ``nn.Linear`` holding this rank's rows whose forward is :func:`column_parallel_linear` (the parameter names
    stay those of the layer it replaces)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPContext) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.tp = tp

    def forward(self, x: Tensor) -> Tensor:
        return column_parallel_linear(x, self.weight, self.bias, self.tp)


def reduce_from_tp(x: Tensor, tp: TPContext, site: str = "forward", sequence: bool | None = None) -> Tensor:
    """Out of a row-parallel layer: ``g`` (reduce-scatter along the sequence under sequence parallelism, or where
    ``sequence`` says); ``site`` names the reduction for fault injection."""
    split = tp.sequence if sequence is None else sequence
    return _ReduceScatterSeq.apply(x, tp, site) if split else _ReduceFromTP.apply(x, tp, site)


def shard(full: Tensor, spec: ShardSpec, rank: int, size: int) -> Tensor:
    """TP rank ``rank``'s piece of ``full`` (a copy; padded first where ``spec`` says)."""
    if spec.padded:
        shape = list(full.shape)
        shape[spec.dim] = spec.padded - full.shape[spec.dim]
        full = torch.cat([full, full.new_zeros(shape)], dim=spec.dim)
    blocks = full.chunk(spec.blocks, dim=spec.dim)
    return torch.cat([b.chunk(size, dim=spec.dim)[rank] for b in blocks], dim=spec.dim).clone()


def unshard(pieces: list[Tensor], spec: ShardSpec) -> Tensor:
    """The whole parameter from every TP rank's piece (rank order): the inverse of :func:`shard`."""
    per_rank = [p.chunk(spec.blocks, dim=spec.dim) for p in pieces]
    whole = torch.cat([torch.cat([r[b] for r in per_rank], dim=spec.dim) for b in range(spec.blocks)], dim=spec.dim)
    return whole.narrow(spec.dim, 0, spec.length) if spec.padded else whole


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
        qkv = column_parallel_linear(x, self.qkv.weight, self.qkv.bias, self.tp)
        b, t, _ = qkv.shape
        local = self.heads * self.head_dim
        q, k, v = qkv.split(local, dim=2)
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
        h = F.gelu(column_parallel_linear(x, fc1.weight, fc1.bias, self.tp))
        return reduce_from_tp(F.linear(h, fc2.weight), self.tp) + fc2.bias


class TPGroupedQueryAttention(GroupedQueryAttention):
    """Llama attention on this rank's KV groups: column-parallel QKV (whole groups), row-parallel output projection."""

    shards = {"qkv.weight": ShardSpec(0), "proj.weight": ShardSpec(1)}

    def __init__(self, full: GroupedQueryAttention, tp: TPContext) -> None:
        super().__init__(full.proj.out_features, full.heads // tp.size, full.kv_heads // tp.size, full.head_dim)
        self.tp = tp
        self.recompute_core = full.recompute_core
        self.qkv = ColumnParallelLinear(self.qkv.in_features, self.qkv.out_features, False, tp)
        with torch.no_grad():
            self.qkv.weight.copy_(shard(full.qkv.weight, self.shards["qkv.weight"], tp.rank, tp.size))
            self.proj.weight.copy_(shard(full.proj.weight, self.shards["proj.weight"], tp.rank, tp.size))

    def forward(self, x: Tensor) -> Tensor:
        return reduce_from_tp(super().forward(x), self.tp)


class TPSwiGLU(SwiGLU):
    """The SwiGLU on this rank's F/T columns: column-parallel gate and up, row-parallel down."""

    shards = {"gate_up.weight": ShardSpec(0, 2), "down.weight": ShardSpec(1)}

    def __init__(self, full: SwiGLU, tp: TPContext) -> None:
        super().__init__(full.down.out_features, full.down.in_features // tp.size)
        self.tp = tp
        self.gate_up = ColumnParallelLinear(self.gate_up.in_features, self.gate_up.out_features, False, tp)
        with torch.no_grad():
            self.gate_up.weight.copy_(shard(full.gate_up.weight, self.shards["gate_up.weight"], tp.rank, tp.size))
            self.down.weight.copy_(shard(full.down.weight, self.shards["down.weight"], tp.rank, tp.size))

    def forward(self, x: Tensor) -> Tensor:
        return reduce_from_tp(super().forward(x), self.tp)


def vocab_padded(vocab: int, size: int) -> int:
    """The vocabulary ``size`` TP ranks split: ``vocab`` padded to a multiple of 128·size (Megatron's
    ``--make-vocab-size-divisible-by`` 128; unpadded at size 1), by ``planner.closedforms.tp_vocab_multiple``, the
    rule ``load_model`` charges the planner's and the simulator's layers by."""
    return padded_vocab(vocab, size, tp_vocab_multiple(size))


def vocab_slice(vocab: int, tp: TPContext) -> tuple[int, int, int]:
    """(first id, rows, real ids) of TP rank ``tp.rank``'s vocabulary slice: ids ``[first, first + rows)`` of the
    padded vocabulary, of which the first ``real ids`` are below ``vocab`` (the rest padding; maybe all)."""
    rows = vocab_padded(vocab, tp.size) // tp.size
    first = tp.rank * rows
    return first, rows, max(0, min(rows, vocab - first))


class _VocabRows(nn.Module):
    """This rank's rows (``weight``, (Vp/T, hidden)) of a (vocab, hidden) matrix, cut from the whole one."""

    def __init__(self, full: Tensor, tp: TPContext) -> None:
        super().__init__()
        vocab = full.shape[0]
        self.tp = tp
        self.vocab = vocab
        self.first, _, self.real = vocab_slice(vocab, tp)
        self.shards = {"weight": ShardSpec(0, length=vocab, padded=vocab_padded(vocab, tp.size))}
        self.weight = nn.Parameter(shard(full.detach(), self.shards["weight"], tp.rank, tp.size))


class VocabParallelEmbedding(_VocabRows):
    """The token embedding on this rank's vocabulary rows: ids outside them look up zeros, and the partial
    embeddings are summed over the TP group (reduce-scattered along the sequence when ``scatter``); backward:
    identity into the rank's rows (the ids take no gradient)."""

    def __init__(self, full: nn.Embedding, tp: TPContext, scatter: bool = False) -> None:
        super().__init__(full.weight, tp)
        self.scatter = scatter

    def forward(self, ids: Tensor) -> Tensor:
        local = ids - self.first
        outside = (local < 0) | (local >= self.weight.shape[0])
        partial = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(partial, self.tp, "embedding", self.scatter)


class VocabParallelHead(_VocabRows):
    """The LM head on this rank's vocabulary rows (column-parallel): the logits of its slice only, (..., Vp/T).
    The loss is :func:`vocab_parallel_cross_entropy` of them."""

    def __init__(self, full: nn.Linear, tp: TPContext) -> None:
        super().__init__(full.weight, tp)

    def forward(self, x: Tensor) -> Tensor:
        return column_parallel_linear(x, self.weight, None, self.tp, "head")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross entropy of logits split by vocabulary over the TP group, never gathered.

    Forward on (N, Vp/T) logits of which the first ``real`` columns are vocabulary (the rest padding, left out),
    and the N global target ids: the row maximum m (a max all-reduce), the sum of exp(z − m) (a sum all-reduce)
    and the target's logit (a sum all-reduce of each rank's, zero where the target is another rank's); the loss
    log Σ + m − z_target. Backward is local: (softmax − one-hot) of the rank's columns times the incoming
    gradient, zero on padding.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor, tp: TPContext, first: int, real: int) -> Tensor:
        skip = tp.skip == "cross-entropy"
        z = logits[:, :real]
        n = logits.shape[0]
        if real:
            peak = z.max(dim=1).values
        else:  # all padding: this rank adds nothing to the max or the sums
            peak = logits.new_full((n,), float("-inf"))
        if not skip:
            _all_reduce(peak, tp, dist.ReduceOp.MAX)
        exp = torch.exp(z - peak[:, None])
        total = exp.sum(dim=1)
        local = target - first
        mine = (local >= 0) & (local < real)
        index = local.masked_fill(~mine, 0)
        picked = (z.gather(1, index[:, None]).squeeze(1).masked_fill(~mine, 0.0) if real
                  else logits.new_zeros((n,)))
        if not skip:
            _all_reduce(total, tp)
            _all_reduce(picked, tp)
        ctx.save_for_backward(exp.div_(total[:, None]), index, mine)
        ctx.width = logits.shape[1]
        return total.log() + peak - picked

    @staticmethod
    def backward(ctx, g: Tensor):
        softmax, index, mine = ctx.saved_tensors
        grad = softmax.new_zeros((softmax.shape[0], ctx.width))
        grad[:, :softmax.shape[1]] = softmax
        rows = mine.nonzero().squeeze(1)
        grad[rows, index[rows]] -= 1.0
        return grad * g[:, None], None, None, None, None


def vocab_parallel_cross_entropy(logits: Tensor, target: Tensor, vocab: int, tp: TPContext) -> Tensor:
    """The mean next-token cross entropy (``executor.models``' gpt/llama loss) of this rank's logits (..., Vp/T)
    of a ``vocab``-word model and the targets (...,): every rank of the TP group gets the same loss."""
    first, _, real = vocab_slice(vocab, tp)
    width = logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits.reshape(-1, width), target.reshape(-1), tp, first, real).mean()


def vocab_parallel_loss(spec: str, tp: TPContext):
    """The loss of a tensor-parallel run of ``spec``, applied to the last stage's output (this rank's logits)."""
    vocab = parse_spec(spec).get("vocab")
    return lambda logits, target: vocab_parallel_cross_entropy(logits, target, vocab, tp)


#: The TP shard modules; each says how its parameters are split (``shards``).
_TP_MODULES = (TPAttention, TPMLP, TPGroupedQueryAttention, TPSwiGLU, _VocabRows)


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
    """The stage's gpt or llama layers with this rank's TP shards in place of every block's attention and MLP and
    of the embedding's and head's vocabulary matrices (in place); under sequence parallelism GPT's embedding
    output (positions added) is split along the sequence."""
    for layer in layers:
        if isinstance(layer, GPTBlock):
            layer.attn = TPAttention(layer.attn, tp)
            layer.mlp = TPMLP(layer.mlp, tp)
        elif isinstance(layer, LlamaBlock):
            layer.attn = TPGroupedQueryAttention(layer.attn, tp)
            layer.mlp = TPSwiGLU(layer.mlp, tp)
        elif isinstance(layer, GPTEmbedding):
            layer.tok = VocabParallelEmbedding(layer.tok, tp)
            if tp.sequence:
                layer.register_forward_hook(lambda mod, args, out: _ScatterSeq.apply(out, tp))
        elif isinstance(layer, LlamaEmbedding):
            layer.tok = VocabParallelEmbedding(layer.tok, tp, scatter=tp.sequence)
        elif isinstance(layer, (GPTHead, LlamaHead)):
            layer.lm = VocabParallelHead(layer.lm, tp)
    return layers


def sequence_parallel_params(module: nn.Module) -> set[str]:
    """Names of the parameters whose gradients are partial sums under sequence parallelism (block and head norms,
    row-parallel biases)."""
    local = {GPTBlock: ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn.proj.bias", "mlp.2.bias"),
             LlamaBlock: ("attn_norm.weight", "mlp_norm.weight"), GPTHead: ("ln.weight", "ln.bias"),
             LlamaHead: ("norm.weight",)}
    out = set()
    for name, sub in module.named_modules():
        out.update(f"{name}.{n}" if name else n for n in local.get(type(sub), ()))
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
    if value and value not in TP_FAULTS:
        raise ExecutorError(f"{TP_FAULT_ENV}={value!r}: use one of {', '.join(TP_FAULTS)} (or leave it unset)")
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
