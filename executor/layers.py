"""The built-in models' layers: gpt's (embedding, causal attention, pre-LN block, head), llama's (RMSNorm,
rotary positions, grouped-query attention, SwiGLU, block, head) and the cnn's residual block.

Plain ``nn.Module`` definitions; which layer a chain index is, and its seed, is :mod:`executor.models`'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from executor.recompute import attention_core


class GPTEmbedding(nn.Module):
    """Token + learned position embedding: (mb, seq) int64 -> (mb, seq, hidden)."""

    def __init__(self, vocab: int, seq: int, hidden: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(seq, hidden)
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.tok(ids) + self.pos(positions)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; ``recompute_core``: the attention core is recomputed in backward."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.recompute_core = False

    def forward(self, x: Tensor) -> Tensor:
        b, t, h = x.shape
        q, k, v = self.qkv(x).split(h, dim=2)
        shape = (b, t, self.heads, h // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        y = attention_core(q, k, v, self.recompute_core).transpose(1, 2).reshape(b, t, h)
        return self.proj(y)


class GPTBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)) with a 4x GELU MLP."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = CausalSelfAttention(hidden, heads)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPTHead(nn.Module):
    """Final LayerNorm + LM head: (mb, seq, hidden) -> logits (mb, seq, vocab)."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(hidden)
        self.lm = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm(self.ln(x))


#: Rotary base θ of Llama 3 (its model cards' ``rope_theta``).
ROPE_THETA = 500_000.0
#: RMSNorm epsilon of Llama 3.
RMS_EPS = 1e-5


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm as a fused kernel runs it (Megatron's, Transformer Engine's): forward in fp32 (float64 for float64
    runs), keeping for backward only the input, in its own dtype, and the fp32 reciprocal RMS per token."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf = x.to(dtype)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (xf * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        gy = g.to(rstd.dtype)
        grad_w = (gy * xhat).reshape(-1, x.shape[-1]).sum(0)
        gxhat = gy * weight.to(rstd.dtype)
        grad_x = rstd * (gxhat - xhat * (gxhat * xhat).mean(-1, keepdim=True))
        return grad_x.to(x.dtype), grad_w.to(weight.dtype), None


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale (``nn.RMSNorm``'s parameters and arithmetic) that keeps only its
    input and the reciprocal RMS for backward, as fused kernels do (:class:`_RMSNormFunction`), not eager torch's
    fp32 copies of the input."""

    def __init__(self, hidden: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _SwiGLUProduct(torch.autograd.Function):
    """``silu(gate) · up`` of the concatenated gate and up outputs, keeping only them (a fused SwiGLU: Megatron's
    ``bias_swiglu``): SiLU's output is recomputed in backward, not kept."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, g: Tensor):
        (gate_up,) = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        return torch.cat((g * up * sig * (1 + gate * (1 - sig)), g * silu), dim=-1)


class LlamaEmbedding(nn.Module):
    """Token embedding only: (mb, seq) int64 -> (mb, seq, hidden); positions enter the attention as rotations."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:
        return self.tok(ids)


def rotary_angles(seq: int, head_dim: int, theta: float = ROPE_THETA) -> Tensor:
    """Angles (seq, head_dim/2), float64: position p turns feature pair j by p·θ^(−2j/head_dim)."""
    pair = torch.arange(head_dim // 2, dtype=torch.float64)
    return torch.arange(seq, dtype=torch.float64)[:, None] * theta ** (-2.0 * pair / head_dim)[None, :]


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding of ``x`` (..., seq, d): feature j and feature j + d/2 form a pair, turned by its
    position's angle (``cos``/``sin`` of :func:`rotary_angles`, (seq, d/2))."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)


class _Rotation(torch.autograd.Function):
    """:func:`rotate` in the tables' precision, keeping nothing for backward: a rotation's gradient is the gradient
    turned back (the same rotation by minus the angle)."""

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.cos, ctx.sin = cos, sin  # the attention's cached tables, not activations of this microbatch
        return rotate(x.to(cos.dtype), cos, sin).to(x.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        return rotate(g.to(ctx.cos.dtype), ctx.cos, -ctx.sin).to(g.dtype), None, None


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax(q·kᵀ/√d)·v by ``scaled_dot_product_attention`` over (batch, heads, seq, d); ``k`` and ``v``
    may have fewer heads than ``q`` (grouped-query: kv head g serves query heads g·r .. g·r + r − 1, r = ratio)."""
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


class GroupedQueryAttention(nn.Module):
    """Causal grouped-query self-attention with rotary positions and no biases.

    The QKV projection's output rows are grouped by key/value head (Megatron's layout): for each of the
    ``kv_heads`` groups, its ``heads/kv_heads`` query heads, then its key head, then its value head. A
    contiguous run of rows is so a whole number of groups, which is what tensor parallelism gives each rank.
    ``recompute_core``: the attention core is recomputed in backward. Selective recomputation leaves it off
    (``fused_core``): SDPA's fused kernels keep no scores and recompute them in their own backward, so there is
    nothing to drop — ``planner.analytic``'s flash attention, which the llama family defaults to.
    """

    fused_core = True

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.head_dim = head_dim or hidden // heads
        self.qkv = nn.Linear(hidden, (heads + 2 * kv_heads) * self.head_dim, bias=False)
        self.proj = nn.Linear(heads * self.head_dim, hidden, bias=False)
        self.recompute_core = False
        self._tables: dict = {}

    def _cos_sin(self, seq: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The rotation table for ``seq`` positions on ``like``'s device: float64 for float64 runs, else float32."""
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (seq, like.device, dtype)
        if key not in self._tables:
            angle = rotary_angles(seq, self.head_dim)
            self._tables[key] = (angle.cos().to(like.device, dtype), angle.sin().to(like.device, dtype))
        return self._tables[key]

    def forward(self, x: Tensor) -> Tensor:
        mixed = self.qkv(x)
        b, t, _ = mixed.shape  # (a sequence-parallel rank's QKV gathers the whole sequence)
        d, g = self.head_dim, self.kv_heads
        r = self.heads // g
        qkv = mixed.view(b, t, g, r + 2, d)
        q = qkv[:, :, :, :r].reshape(b, t, g * r, d).transpose(1, 2)
        # V its own tensor: a view would keep the whole QKV output alive for the attention's backward
        k, v = qkv[:, :, :, r].transpose(1, 2), qkv[:, :, :, r + 1].contiguous().transpose(1, 2)
        cos, sin = self._cos_sin(t, x)
        q, k = _Rotation.apply(q, cos, sin), _Rotation.apply(k, cos, sin)
        y = attention_core(q, k, v, self.recompute_core, core=causal_attention)
        return self.proj(y.transpose(1, 2).reshape(b, t, g * r * d))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) · up(x))``, no biases; gate and up are one matrix (the gate's rows, then the up's)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(_SwiGLUProduct.apply(self.gate_up(x)))


class LlamaBlock(nn.Module):
    """Pre-norm Llama block: x + attn(rmsnorm(x)), then x + swiglu(rmsnorm(x))."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, ffn: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(hidden, eps=RMS_EPS)
        self.attn = GroupedQueryAttention(hidden, heads, kv_heads)
        self.mlp_norm = RMSNorm(hidden, eps=RMS_EPS)
        self.mlp = SwiGLU(hidden, ffn)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class LlamaHead(nn.Module):
    """Final RMSNorm + untied LM head: (mb, seq, hidden) -> logits (mb, seq, vocab)."""

    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps=RMS_EPS)
        self.lm = nn.Linear(hidden, vocab, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.lm(self.norm(x))


class ResidualBlock(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x))))))."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))
