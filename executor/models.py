"""Reference models as ordered chains of layers, named by a spec string.

A spec is ``kind:key=value,key=value`` (every parameter optional):

* ``mlp:layers=8,width=512`` — each layer ``Linear(width, width) + ReLU``, the
  last one ``Linear`` only; MSE loss to a random target.
* ``gpt:layers=4,hidden=256,heads=4,seq=128,vocab=512`` — layer 0 token +
  position embedding, then ``layers`` pre-LN transformer blocks (causal
  self-attention, MLP of 4 x hidden), then final LayerNorm + LM head;
  next-token cross-entropy. Inputs are int64 token ids (microbatch, seq).
* ``llama:layers=4,hidden=256,heads=4,kv_heads=2,ffn=512,seq=128,vocab=512`` —
  Llama-style: layer 0 a token embedding (no positions: rotary inside the
  attention), then ``layers`` pre-norm blocks (RMSNorm; causal grouped-query
  attention, ``kv_heads`` key/value heads shared by ``heads/kv_heads`` query
  heads each, rotary position embedding on queries and keys; RMSNorm; SwiGLU
  MLP of inner size ``ffn``), no biases anywhere, then final RMSNorm + an
  untied LM head; next-token cross-entropy, inputs as ``gpt``'s. ``kv_heads=0``
  means ``heads`` (multi-head) and ``ffn=0`` means 4 x hidden, as in
  :mod:`planner.analytic`'s ``llama:`` spec (the same string names both).
* ``cnn:blocks=4,channels=32,size=32,classes=10`` — stem conv-bn-relu, residual
  blocks (conv-bn-relu-conv-bn + skip, relu; one chain layer each), then
  global average pooling + linear head; cross-entropy. Inputs (mb, 3, size, size).
* ``uniform:layers=8,fwd=1e-3,bwd=2e-3,act=0,params=0`` — emulated accelerator
  layers (:mod:`executor.emulated`): forward waits ``fwd`` s and backward
  ``bwd`` s per microbatch while moving real tensors of ``act`` bytes per
  sample (``act/4`` float32 values, at least 1) and a real parameter of
  ``params`` bytes. MSE loss. Defaults as :func:`planner.profile.parse_uniform_spec`,
  whose optional ``saved=B`` (bytes kept for backward per sample) is honoured
  too: a layer keeps its input (``act``) and, when ``saved`` is larger, an
  extra tensor of the difference; a ``saved`` below ``act`` still keeps the input.
* ``package.module:function`` or ``path/to/file.py:function`` — a user model:
  ``function()`` returns an ``nn.Sequential`` or a list of modules (the chain).
  It is called with torch's global RNG seeded by ``seed`` (and restored after).
  The same module may define, next to it (``NAME`` is the function's name):

  - ``NAME_batch(microbatch_size, index, seed) -> (input, target)`` — the data;
  - otherwise ``NAME_input_shape``: a tuple (per sample, without the batch
    dimension) or a function of no arguments returning one; inputs are then
    standard normal float32 and the target standard normal of the model's
    output shape (found by one no-grad forward pass);
  - ``NAME_loss(output, target) -> scalar`` — the loss; default MSE (mean).

Weights are deterministic given ``seed``: each layer ``i`` is built from its own
seed, so :func:`build_stage` gives exactly the weights :func:`build_layers`
gives for the same layers without building the others. Microbatch ``index`` of
:func:`make_batch` is deterministic given ``seed`` and independent of the
microbatch size of other calls.

Why one module of ~630 lines: the spec grammar, the built-in models (mlp, resnet, uniform, gpt, llama)
and the user-model hook are the one place a spec string becomes layers, batches and a loss; the
runtime, the reference and the profiler read only ``build_stage``, ``make_batch`` and ``loss_fn``.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from executor.emulated import EmulatedLayer
from executor.recompute import attention_core
from planner.profile import ModelSpecError

__all__ = [
    "ModelSpecError", "build_layers", "build_stage", "input_shape", "make_batch", "loss_fn", "num_layers",
    "parse_spec", "ModelSpec", "KINDS", "BLOCK_ATTENTION",
]


# kind -> {key: (type, default)}
KINDS: dict[str, dict[str, tuple[type, object]]] = {
    "mlp": {"layers": (int, 8), "width": (int, 512)},
    "gpt": {"layers": (int, 4), "hidden": (int, 256), "heads": (int, 4), "seq": (int, 128), "vocab": (int, 512)},
    "llama": {"layers": (int, 4), "hidden": (int, 256), "heads": (int, 4), "kv_heads": (int, 0), "ffn": (int, 0),
              "seq": (int, 128), "vocab": (int, 512)},
    "cnn": {"blocks": (int, 4), "channels": (int, 32), "size": (int, 32), "classes": (int, 10)},
    "uniform": {"layers": (int, 8), "fwd": (float, 1e-3), "bwd": (float, None), "act": (float, 0.0),
                "params": (float, 0.0), "saved": (float, None)},
}
_MINIMUM = {"saved": 0.0, "layers": 1, "width": 1, "hidden": 1, "heads": 1, "seq": 1, "vocab": 2, "kv_heads": 0,
            "ffn": 0, "blocks": 0,
            "channels": 1, "size": 1, "classes": 2, "fwd": 0.0, "bwd": 0.0, "act": 0.0, "params": 0.0}
#: The attention kernel each transformer block of the zoo runs, as ``planner.analytic``'s ``attention=`` key names
#: it: the gpt block an explicit masked softmax (unfused), the llama block ``scaled_dot_product_attention`` (flash).
#: A spec may name it (one string for ``simulate`` and ``run``); naming the other kernel is refused.
BLOCK_ATTENTION = {"gpt": "unfused", "llama": "flash"}
_HELP = "known models: " + "; ".join(
    f"{k}:" + ",".join(f"{p}={d if d is not None else {'bwd': '2*fwd', 'saved': 'act'}[p]}" for p, (_, d) in v.items())
    for k, v in KINDS.items()
) + "; or package.module:function / path/to/file.py:function"


@dataclass(frozen=True)
class ModelSpec:
    """A parsed spec: ``kind`` is a built-in name or ``"user"``; ``params`` the resolved parameters.

    For a user model, ``params`` holds ``target`` (module path or file path) and ``function``.
    """

    kind: str
    params: tuple[tuple[str, object], ...]
    text: str

    def get(self, key: str):
        return dict(self.params)[key]

    @property
    def name(self) -> str:
        if self.kind == "user":
            return f"{self.get('target')}:{self.get('function')}"
        return self.kind + ":" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in self.params if v is not None)


@functools.lru_cache(maxsize=256)
def parse_spec(spec: str) -> ModelSpec:
    """Parse a model spec; raises :class:`ModelSpecError` naming the problem and the known models."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"empty model spec ({_HELP})")
    text = spec.strip()
    head, _, body = text.partition(":")
    head = head.strip()
    if head in KINDS:
        return _parse_builtin(head, body, text)
    if body and (head.endswith(".py") or "/" in head or "." in head):
        fn = body.strip()
        if not fn.isidentifier():
            raise ModelSpecError(f"model {text!r}: {fn!r} is not a function name (use module.path:function)")
        return ModelSpec("user", (("target", head), ("function", fn)), text)
    raise ModelSpecError(f"unknown model {text!r} ({_HELP})")


def _parse_builtin(kind: str, body: str, text: str) -> ModelSpec:
    keys = KINDS[kind]
    values: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        if "=" not in part:
            raise ModelSpecError(f"model {text!r}: {part!r} is not key=value (keys for {kind}: {', '.join(keys)})")
        k, v = (s.strip() for s in part.split("=", 1))
        if k == "attention" and kind in BLOCK_ATTENTION:
            if v != BLOCK_ATTENTION[kind]:
                raise ModelSpecError(f"model {text!r}: the executor's {kind} block runs attention="
                                     f"{BLOCK_ATTENTION[kind]}, not attention={v}; drop the key (simulate and plan "
                                     f"cost any kernel)")
            continue
        if k not in keys:
            raise ModelSpecError(f"model {text!r}: unknown parameter {k!r} (keys for {kind}: {', '.join(keys)})")
        typ = keys[k][0]
        try:
            x = float(v)
            if typ is int:
                if not x.is_integer():
                    raise ValueError
                x = int(x)
        except ValueError:
            want = "an integer" if typ is int else "a number"
            raise ModelSpecError(f"model {text!r}: {k}={v!r} is not {want}") from None
        if not math.isfinite(x) or x < _MINIMUM[k]:
            raise ModelSpecError(f"model {text!r}: {k}={v} must be >= {_MINIMUM[k]}")
        values[k] = x
    for k, (typ, default) in keys.items():
        if k not in values:
            values[k] = default
    if kind == "uniform" and values["bwd"] is None:
        values["bwd"] = 2 * float(values["fwd"])
    if kind in ("gpt", "llama") and values["hidden"] % values["heads"]:
        raise ModelSpecError(f"model {text!r}: hidden={values['hidden']} must be a multiple of heads={values['heads']}")
    if kind == "llama":
        values["kv_heads"] = values["kv_heads"] or values["heads"]
        values["ffn"] = values["ffn"] or 4 * values["hidden"]
        if values["heads"] % values["kv_heads"]:
            raise ModelSpecError(f"model {text!r}: kv_heads={values['kv_heads']} must divide heads={values['heads']} "
                                 f"(each key/value head serves heads/kv_heads query heads)")
        if (values["hidden"] // values["heads"]) % 2:
            raise ModelSpecError(f"model {text!r}: the head size hidden/heads = {values['hidden'] // values['heads']} "
                                 f"must be even (rotary embedding turns pairs of features); change hidden or heads")
    return ModelSpec(kind, tuple((k, values[k]) for k in keys), text)


# --- layers of the built-in models -----------------------------------------------------
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


def _elems(nbytes: float) -> int:
    return max(1, int(nbytes // 4))


def _layer_seed(seed: int, i: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * (i + 1)) % (2**63 - 1)


def _build_one(ms: ModelSpec, i: int, seed: int) -> nn.Module:
    p = dict(ms.params)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_layer_seed(seed, i))
        if ms.kind == "mlp":
            lin = nn.Linear(p["width"], p["width"])
            return lin if i == p["layers"] - 1 else nn.Sequential(lin, nn.ReLU())
        if ms.kind == "gpt":
            if i == 0:
                return GPTEmbedding(p["vocab"], p["seq"], p["hidden"])
            if i <= p["layers"]:
                return GPTBlock(p["hidden"], p["heads"])
            return GPTHead(p["hidden"], p["vocab"])
        if ms.kind == "llama":
            if i == 0:
                return LlamaEmbedding(p["vocab"], p["hidden"])
            if i <= p["layers"]:
                return LlamaBlock(p["hidden"], p["heads"], p["kv_heads"], p["ffn"])
            return LlamaHead(p["hidden"], p["vocab"])
        if ms.kind == "cnn":
            c = p["channels"]
            if i == 0:
                return nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            if i <= p["blocks"]:
                return ResidualBlock(c)
            return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, p["classes"]))
        if ms.kind == "uniform":
            gen = torch.Generator().manual_seed(_layer_seed(seed, i))
            act = _elems(p["act"])
            extra = 0 if p["saved"] is None else max(0, int(p["saved"] // 4) - act)
            return EmulatedLayer(act, act, int(p["params"] // 4), p["fwd"], p["bwd"], generator=gen,
                                 extra_saved_elems=extra)
    raise AssertionError(ms.kind)


def num_layers(spec: str) -> int:
    """Number of chain layers of the model ``spec`` (builds nothing for built-in models)."""
    ms = parse_spec(spec)
    p = dict(ms.params)
    if ms.kind in ("mlp", "uniform"):
        return p["layers"]
    if ms.kind in ("gpt", "llama"):
        return p["layers"] + 2
    if ms.kind == "cnn":
        return p["blocks"] + 2
    return len(build_layers(spec))


def build_stage(spec: str, first: int, last: int, seed: int = 0) -> list[nn.Module]:
    """Layers ``first..last`` (inclusive) of the chain, with the weights :func:`build_layers` gives them."""
    n = num_layers(spec)
    if not (0 <= first <= last < n):
        raise ModelSpecError(f"model {spec!r} has layers 0..{n - 1}; cannot build {first}..{last}")
    ms = parse_spec(spec)
    if ms.kind == "user":
        return build_layers(spec, seed)[first : last + 1]
    return [_build_one(ms, i, seed) for i in range(first, last + 1)]


def build_layers(spec: str, seed: int = 0) -> list[nn.Module]:
    """The model as an ordered chain of layers; deterministic given ``seed``. Modules are in training mode."""
    ms = parse_spec(spec)
    if ms.kind == "user":
        return _user_layers(ms, seed)
    n = num_layers(spec)
    return [_build_one(ms, i, seed) for i in range(n)]


def input_shape(spec: str, microbatch_size: int) -> tuple[int, ...]:
    """Shape of one microbatch input tensor."""
    _check_mb(microbatch_size)
    ms = parse_spec(spec)
    p = dict(ms.params)
    if ms.kind == "mlp":
        return (microbatch_size, p["width"])
    if ms.kind in ("gpt", "llama"):
        return (microbatch_size, p["seq"])
    if ms.kind == "cnn":
        return (microbatch_size, 3, p["size"], p["size"])
    if ms.kind == "uniform":
        return (microbatch_size, _elems(p["act"]))
    return tuple(make_batch(spec, microbatch_size, 0)[0].shape)


def _check_mb(microbatch_size: int) -> None:
    if int(microbatch_size) != microbatch_size or microbatch_size < 1:
        raise ModelSpecError(f"microbatch size must be an integer >= 1, got {microbatch_size!r}")


def _generator(seed: int, index: int) -> torch.Generator:
    digest = hashlib.sha256(f"pipetwin-batch:{int(seed)}:{int(index)}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def make_batch(spec: str, microbatch_size: int, index: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(input, target)`` for microbatch ``index``; deterministic given (spec, size, index, seed)."""
    _check_mb(microbatch_size)
    ms = parse_spec(spec)
    p = dict(ms.params)
    g = _generator(seed, index)
    mb = microbatch_size
    if ms.kind == "mlp":
        return torch.randn(mb, p["width"], generator=g), torch.randn(mb, p["width"], generator=g)
    if ms.kind == "uniform":
        a = _elems(p["act"])
        return torch.randn(mb, a, generator=g), torch.randn(mb, a, generator=g)
    if ms.kind in ("gpt", "llama"):
        tokens = torch.randint(0, p["vocab"], (mb, p["seq"] + 1), generator=g, dtype=torch.int64)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if ms.kind == "cnn":
        x = torch.randn(mb, 3, p["size"], p["size"], generator=g)
        return x, torch.randint(0, p["classes"], (mb,), generator=g, dtype=torch.int64)
    return _user_batch(ms, mb, index, seed, g)


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return F.mse_loss(output, target)


def _gpt_ce(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def _ce(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target)


def loss_fn(spec: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss applied to the last layer's output and the target; a mean over the microbatch."""
    ms = parse_spec(spec)
    if ms.kind in ("mlp", "uniform"):
        return _mse
    if ms.kind in ("gpt", "llama"):
        return _gpt_ce
    if ms.kind == "cnn":
        return _ce
    return getattr(_user_module(ms), f"{ms.get('function')}_loss", _mse)


# --- user models -----------------------------------------------------------------------
def _user_module(ms: ModelSpec):
    return _import_target(ms.get("target"), ms.text)


@functools.lru_cache(maxsize=64)
def _import_target(target: str, text: str):
    if target.endswith(".py") or "/" in target:
        path = Path(target).expanduser().resolve()
        if not path.is_file():
            raise ModelSpecError(f"model {text!r}: no file {str(path)!r}")
        name = "pipetwin_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ModelSpecError(f"model {text!r}: cannot import {str(path)!r} as Python")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ModelSpecError(f"model {text!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ModelSpecError(f"model {text!r}: cannot import module {target!r} ({e}); "
                             f"check the name or use path/to/file.py:function") from None


def _user_function(ms: ModelSpec, suffix: str = ""):
    module = _user_module(ms)
    name = ms.get("function") + suffix
    return getattr(module, name, None)


def _user_layers(ms: ModelSpec, seed: int) -> list[nn.Module]:
    fn = _user_function(ms)
    if not callable(fn):
        raise ModelSpecError(f"model {ms.text!r}: {ms.get('target')} has no function {ms.get('function')!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = fn()
    if isinstance(model, nn.Sequential):
        layers = list(model.children())
    elif isinstance(model, (list, tuple)):
        layers = list(model)
    else:
        raise ModelSpecError(f"model {ms.text!r}: {ms.get('function')}() must return nn.Sequential or a list of "
                             f"modules, got {type(model).__name__}")
    if not layers or not all(isinstance(m, nn.Module) for m in layers):
        raise ModelSpecError(f"model {ms.text!r}: {ms.get('function')}() returned no layers or a non-module")
    return layers


def _user_batch(ms: ModelSpec, mb: int, index: int, seed: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    batch_fn = _user_function(ms, "_batch")
    if callable(batch_fn):
        out = batch_fn(mb, index, seed)
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
            raise ModelSpecError(f"model {ms.text!r}: {ms.get('function')}_batch must return (input, target) tensors")
        return out[0], out[1]
    shape = _user_function(ms, "_input_shape")
    if callable(shape):
        shape = shape()
    if shape is None:
        fn = ms.get("function")
        raise ModelSpecError(f"model {ms.text!r}: define {fn}_batch(microbatch_size, index, seed) or "
                             f"{fn}_input_shape (per-sample shape) next to {fn}")
    try:
        per_sample = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise ModelSpecError(f"model {ms.text!r}: {ms.get('function')}_input_shape must be a tuple of ints") from None
    x = torch.randn((mb, *per_sample), generator=g)
    out_shape = _user_output_shape(ms.text, per_sample)
    return x, torch.randn((mb, *out_shape), generator=g)


@functools.lru_cache(maxsize=32)
def _user_output_shape(spec: str, per_sample: tuple[int, ...]) -> tuple[int, ...]:
    """Per-sample output shape of a user model, found by one no-grad forward pass of a 1-sample input."""
    x = torch.zeros((1, *per_sample))
    with torch.no_grad():
        for layer in build_layers(spec):
            x = layer(x)
    return tuple(x.shape[1:])
