"""Analytic model profiles: per-layer costs from FLOPs, parameters and activation bytes, no profiling run.

A what-if needs a profile for a model nobody has run on a device nobody has.
This module builds one from closed forms:

* **GPT/BERT-style transformers** given (layers, hidden, heads, sequence,
  vocabulary[, ffn]), and **Llama-style** ones (RMSNorm, SwiGLU, grouped-query
  attention with ``kv_heads``, rotary positions, untied head; presets
  ``llama3-8b``, ``llama3-70b``, ``llama3-405b``). Layers: the embedding, each transformer block
  as one layer, and the final norm + output head. Any of them **per
  tensor-parallel rank** (``transformer_profile(..., tensor_parallel=T)``: FLOPs,
  weights and activations split as Megatron splits them, each layer's TP
  collectives in its ``tp_collectives``, from ``planner.tpcollectives``), and timed either at a fixed fraction of
  peak or by the fitted kernel-level efficiency model (``planner.efficiency``).
* **The CNNs of the PipeDream paper** (``vgg16``, ``resnet50``). Where
  PipeDream's measured ``graph.txt`` for that model is on disk (see
  :func:`pipedream_profiles_dir`) the name resolves to it; otherwise to a
  layer-by-layer FLOP count (``vgg16-analytic``, ``resnet50-analytic`` force
  the latter). Times in a graph.txt are scaled from the V100 to the requested
  kind by achievable FLOP/s, and its per-minibatch bytes become per-sample
  bytes using the batch size it was profiled at (``PIPEDREAM_BATCH``).

The module is longer than most because it holds the closed forms of three model
families (transformers per TP rank, CNNs, PipeDream's measured profiles) and the one
spec grammar that names them all; splitting them would split that grammar. The
transformer's block shape (:func:`block_key`, what a device calibration's per-shape
table is keyed by) stays beside the closed forms it replaces: the key must name exactly
the fields those forms read.

Units and conventions (per reference microbatch of one sample = one sequence
for a transformer, one 224×224 image for a CNN):

* time = FLOPs / (peak_flops × achievable_fraction) of the device kind
  (``topologies.devices.DEVICE_KINDS``); backward = 2 × forward FLOPs, except flash attention's
  core (below), whose backward is 2.5 × its forward.
* Transformer forward FLOPs per block per sequence (Narayanan et al., 2021):
  ``24·s·h² + 4·s²·h`` for ffn = 4h (generally ``8·s·h² + 4·s·h·ffn + 4·s²·h``);
  the head adds ``2·s·h·V``. So training FLOPs per token ≈ 6·N·(1 + s/6h).
* Parameters per block: ``4h² + 2h·ffn + 9h + ffn`` (= 12h² + 13h for ffn = 4h);
  embedding ``V·h + s·h`` (learned positions); the head holds a copy of the
  word embedding (tied weights live on both ends of a pipeline, as Megatron
  keeps them) plus the final layer norm. :func:`transformer_param_count`
  counts the tied matrix once.
* Bytes: mixed precision. A layer's ``param_bytes`` counts **4 bytes per
  parameter** (:data:`BYTES_PER_PARAM`): the size of the fp32 main gradient
  a data-parallel all-reduce sends (Megatron's default), and the unit the
  cost model (``planner.costmodel``) multiplies by weights 1× + gradients 1× +
  optimizer state (momentum 1×, Adam 2×). That yields the well-known training
  state per parameter (:data:`STATE_BYTES_PER_PARAM`): bf16 weight 2 + bf16
  gradient 2 + fp32 master copy 4 + optimizer (Adam m and v 8) = **16 bytes**
  with Adam, 12 with SGD + momentum (the cost model's "sgd"), 8 with none.
* Activation bytes at a block boundary per sample: ``s·h·2`` (one bf16 hidden
  state per token).
* Saved-for-backward bytes per block per sample, Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", eq. 1,
  16-bit activations, no tensor or sequence parallelism, no recomputation):
  ``s·h·(34 + 5·a·s/h)`` bytes with Megatron's unfused attention; with flash attention
  ``34·s·h + 4·a·s`` (below). The head saves ``4·s·h`` (layer-norm input
  and output) plus ``4·s·V`` (fp32 logits for the cross entropy); the
  embedding saves its dropout mask ``s·h`` bytes plus the token ids.
* **The attention kernel** (``TransformerConfig.attention``, spec key ``attention=``): ``"unfused"``
  is Megatron's core (what Korthikanti et al. count, and what vTrain's and Table 5's GPT runs ran):
  QKᵀ, a fused scale-mask-softmax and (GPT) dropout as their own kernels, the a·s² scores
  materialised — the softmax output (2·a·s² bytes) and for GPT the dropout mask and output (a·s²
  + 2·a·s²) kept for backward, 4·b·a·s² bytes (GPT + 5·b·a·s²) streamed in the forward.
  ``"flash"`` is a fused kernel (FlashAttention, torch's ``scaled_dot_product_attention``; Dao
  2023, "FlashAttention-2", section 3.1.2): the scores stay on chip, so nothing of size s² is kept
  or streamed; the backward keeps the output (the projection's input, already counted) and the
  fp32 log-sum-exp (``4·a·s`` bytes), and recomputes the scores inside its kernel: five s²-sized
  products (QKᵀ again, dV, dP, dQ, dK) against the forward's two, **2.5 ×** the forward's
  attention FLOPs (:data:`FLASH_BACKWARD_FACTOR`, the factor FlashAttention-2's own benchmarks
  count). The forward's FLOPs are the same for both. Selective recomputation (``planner.recompute``)
  drops the unfused core's s² bytes and re-runs it; a flash core has nothing to drop (its kernel
  already recomputes), so there selective is the same as none. Defaults
  (:data:`DEFAULT_ATTENTION`): ``llama`` flash (Llama models are trained with it: torchtitan,
  Megatron-Core with Transformer Engine), ``gpt`` and ``bert`` unfused (the published GPT runs
  pipetwin is validated on used Megatron's unfused core; give ``attention=flash`` for a GPT trained
  with it).
* CNN layers: conv FLOPs ``2·k²·Cin·Cout·Hout·Wout``; saved bytes ≈ the
  convolution input plus batch-norm input and ReLU output, 2 bytes each.

Spec strings (:func:`load_model`, used by every command)::

    gpt3-13b                        a preset (see PRESETS)
    gpt3-13b@h100                   ... timed on a device kind (default a100-80gb)
    gpt3-13b:seq=4096               a preset with overrides
    gpt:layers=40,hidden=5120,heads=40,seq=2048,vocab=50257[,ffn=20480]
    llama:layers=32,hidden=4096,heads=32,seq=8192,vocab=128256,ffn=14336,kv_heads=8
    gpt3-13b:attention=flash        the attention kernel: flash or unfused (default: llama flash, gpt/bert unfused)
    bert:layers=24,hidden=1024,heads=16,seq=512,vocab=30522
    vgg16, resnet50                 PipeDream graph.txt when present, else analytic
    vgg16-analytic, resnet50-analytic
    alexnet, gnmt, resnet101, ...   any PipeDream graph.txt by name (per sample where its batch is known)
    PATH.json | PATH graph.txt | uniform:...   as planner.profile.load_profile
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from planner.efficiency import BlockKey, BlockTiming, DeviceCalibration, EfficiencyParams, Gemm, Work, work_time_s
from planner.profile import Layer, ModelProfile, ModelSpecError, ProfileError, load_profile, read_pipedream_graph
from planner.tpcollectives import tp_collectives
from topologies.devices import DEVICE_KINDS, DeviceKind, device_kind
from topologies.topology import TopologyError

__all__ = [
    "TransformerConfig", "PRESETS", "CNNS", "STATE_BYTES_PER_PARAM", "BYTES_PER_PARAM", "DEFAULT_DEVICE_KIND",
    "transformer_profile", "transformer_param_count", "transformer_flops_per_token", "block_saved_bytes",
    "cnn_profile", "load_model", "split_device_suffix", "model_names", "state_bytes", "pipedream_profiles_dir",
    "ModelSpecError", "total_params", "min_memory_per_device_bytes", "on_device", "FAMILIES", "padded_vocab",
    "block_work", "embedding_work", "head_work", "MEGATRON_VOCAB_MULTIPLE", "tp_vocab_multiple", "block_key", "transformer_config",
    "ATTENTION_KERNELS", "DEFAULT_ATTENTION", "FLASH_BACKWARD_FACTOR", "attention_flops", "attended_keys",
]

#: Bytes per parameter in an analytic profile's ``param_bytes`` (fp32 main gradient; see the module docstring).
BYTES_PER_PARAM = 4
#: Training-state bytes per parameter under mixed precision: bf16 weight + bf16 grad + fp32 master + optimizer.
STATE_BYTES_PER_PARAM: dict[str, int] = {"none": 8, "sgd": 12, "momentum": 12, "adam": 16}
#: Device kind an analytic profile is timed on when the spec names none.
DEFAULT_DEVICE_KIND = "a100-80gb"
#: Reference device PipeDream's graph.txt times are scaled from (its clusters are V100s).
PIPEDREAM_REFERENCE_KIND = "v100"
#: Attention kernels a transformer may use (the module docstring says what each keeps and streams).
ATTENTION_KERNELS = ("unfused", "flash")
#: The kernel of each family when its config or spec names none.
DEFAULT_ATTENTION = {"gpt": "unfused", "bert": "unfused", "llama": "flash"}
#: A flash attention backward's FLOPs over its forward's: five s²-sized products (the scores QKᵀ
#: recomputed, dV, dP, dQ, dK) against two (Dao 2023, FlashAttention-2, section 3.1.2).
FLASH_BACKWARD_FACTOR = 2.5


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a GPT-, BERT- or Llama-style transformer.

    Attributes:
        layers: transformer blocks L.
        hidden: hidden size h.
        heads: attention heads a.
        seq: sequence length s (tokens per sample).
        vocab: vocabulary size V.
        ffn: feed-forward inner size (0 means 4h).
        family: "gpt" or "bert" (LayerNorm, GeLU MLP, learned positions, biases, dropout, tied
            embedding; same costs, the name only) or "llama" (RMSNorm, SwiGLU MLP of three
            matrices, rotary positions, no biases or dropout, untied output head).
        kv_heads: key/value heads of grouped-query attention (0 means ``heads``: multi-head).
        attention: the attention kernel, ``"unfused"`` (Megatron's: the a·s² scores materialised) or
            ``"flash"`` (fused: no s² tensor kept or streamed, scores recomputed in backward); empty
            means the family's default (:data:`DEFAULT_ATTENTION`: llama flash, gpt and bert unfused),
            and is filled in when the config is made.
    """

    layers: int
    hidden: int
    heads: int
    seq: int
    vocab: int
    ffn: int = 0
    family: str = "gpt"
    kv_heads: int = 0
    attention: str = ""

    def __post_init__(self) -> None:
        for key in ("layers", "hidden", "heads", "seq", "vocab"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelSpecError(f"{self.family}: {key} must be a positive integer (got {v!r})")
        if self.ffn < 0:
            raise ModelSpecError(f"{self.family}: ffn must be >= 0 (0 means 4×hidden)")
        if self.family not in FAMILIES:
            raise ModelSpecError(f"unknown transformer family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if self.hidden % self.heads:
            raise ModelSpecError(f"{self.family}: heads={self.heads} must divide hidden={self.hidden}")
        if self.kv_heads < 0 or (self.kv_heads and self.heads % self.kv_heads):
            raise ModelSpecError(f"{self.family}: kv_heads={self.kv_heads} must divide heads={self.heads} (0: as many as heads)")
        if not self.attention:
            object.__setattr__(self, "attention", DEFAULT_ATTENTION[self.family])
        elif self.attention not in ATTENTION_KERNELS:
            raise ModelSpecError(f"{self.family}: attention={self.attention!r} is not an attention kernel; "
                                 f"choose {' or '.join(ATTENTION_KERNELS)}")

    @property
    def ffn_size(self) -> int:
        return self.ffn or 4 * self.hidden

    @property
    def kv_size(self) -> int:
        """Width of the key (and of the value) projection: kv_heads × head dimension."""
        return (self.kv_heads or self.heads) * (self.hidden // self.heads)

    @property
    def llama(self) -> bool:
        return self.family == "llama"

    @property
    def flash(self) -> bool:
        """The attention core is a fused (flash) kernel."""
        return self.attention == "flash"

    @property
    def causal(self) -> bool:
        """Causal (decoder) attention: GPT and Llama; BERT attends both ways."""
        return self.family != "bert"

    def spec(self) -> str:
        """The spec string that rebuilds this config (the attention kernel named only when not the family's default)."""
        f = f",ffn={self.ffn}" if self.ffn else ""
        kv = f",kv_heads={self.kv_heads}" if self.kv_heads else ""
        at = f",attention={self.attention}" if self.attention != DEFAULT_ATTENTION[self.family] else ""
        return (f"{self.family}:layers={self.layers},hidden={self.hidden},heads={self.heads},seq={self.seq},"
                f"vocab={self.vocab}{f}{kv}{at}")


#: Transformer families: "gpt" and "bert" cost the same; "llama" is RMSNorm + SwiGLU + GQA + rotary, untied.
FAMILIES = ("gpt", "bert", "llama")

_GPT2 = dict(seq=1024, vocab=50257)
_GPT3 = dict(seq=2048, vocab=50257)
_BERT = dict(seq=512, vocab=30522, family="bert")
_LLAMA3 = dict(seq=8192, vocab=128256, family="llama", kv_heads=8)

#: Named transformers. GPT-3 shapes from Brown et al. 2020, Table 2.1 (13B with h = 5120,
#: 1.3B with 16 heads of 128 so that heads divide h). Llama 3 from Meta's model cards
#: (8B: 32 × 4096, 32 heads, 8 KV heads, SwiGLU 14336; 70B: 80 × 8192, 64 heads, 8 KV heads,
#: SwiGLU 28672; 405B: 126 × 16384, 128 heads, 8 KV heads, SwiGLU 53248; vocabulary 128,256;
#: sequence 8192).
PRESETS: dict[str, TransformerConfig] = {
    "gpt2-small": TransformerConfig(12, 768, 12, **_GPT2),
    "gpt2-medium": TransformerConfig(24, 1024, 16, **_GPT2),
    "gpt2-large": TransformerConfig(36, 1280, 20, **_GPT2),
    "gpt2-xl": TransformerConfig(48, 1600, 25, **_GPT2),
    "gpt3-125m": TransformerConfig(12, 768, 12, **_GPT3),
    "gpt3-350m": TransformerConfig(24, 1024, 16, **_GPT3),
    "gpt3-760m": TransformerConfig(24, 1536, 16, **_GPT3),
    "gpt3-1.3b": TransformerConfig(24, 2048, 16, **_GPT3),
    "gpt3-2.7b": TransformerConfig(32, 2560, 32, **_GPT3),
    "gpt3-6.7b": TransformerConfig(32, 4096, 32, **_GPT3),
    "gpt3-13b": TransformerConfig(40, 5120, 40, **_GPT3),
    "gpt3-175b": TransformerConfig(96, 12288, 96, **_GPT3),
    "bert-base": TransformerConfig(12, 768, 12, **_BERT),
    "bert-large": TransformerConfig(24, 1024, 16, **_BERT),
    "llama3-8b": TransformerConfig(32, 4096, 32, ffn=14336, **_LLAMA3),
    "llama3-70b": TransformerConfig(80, 8192, 64, ffn=28672, **_LLAMA3),
    "llama3-405b": TransformerConfig(126, 16384, 128, ffn=53248, **_LLAMA3),
}
_ALIASES = {"gpt2": "gpt2-small", "gpt3-xl": "gpt3-1.3b", "gpt3": "gpt3-175b", "llama3.1-8b": "llama3-8b",
            "llama3.1-70b": "llama3-70b",
            "llama3.1-405b": "llama3-405b"}
_SPEC_KEYS = ("layers", "hidden", "heads", "seq", "vocab", "ffn", "kv_heads", "attention")
#: Spec keys whose value is a word, not a number.
_WORD_KEYS = ("attention",)

#: CNNs with an analytic fallback (``NAME-analytic``).
CNNS = ("vgg16", "resnet50")
#: PipeDream profile name -> the batch size its graph.txt was profiled at (its README's table);
#: other names in the directory are read as they are (one "sample" = one profiled minibatch).
PIPEDREAM_BATCH: dict[str, int] = {"alexnet": 256, "vgg16": 128, "resnet18": 256, "resnet50": 128, "resnext50": 128,
                                   "resnet101": 64, "resnext101": 64, "densenet121": 64, "inception_v3": 128}
#: Megatron pads the vocabulary to a multiple of this × the tensor-parallel degree
#: (``--make-vocab-size-divisible-by``, default 128); :func:`padded_vocab`.
MEGATRON_VOCAB_MULTIPLE = 128


# ---------------------------------------------------------------------- closed forms
def padded_vocab(vocab: int, tensor_parallel: int = 1, multiple: int = 1) -> int:
    """The vocabulary rounded up to a multiple of ``multiple × tensor_parallel`` (Megatron: multiple=128)."""
    q = max(1, multiple) * tensor_parallel
    return -(-vocab // q) * q


def tp_vocab_multiple(tensor_parallel: int) -> int:
    """The padding multiple (× T) of a model split over ``tensor_parallel`` ranks, the one rule :func:`load_model`
    charges and ``executor.tensor_parallel`` shards by: Megatron's 128 when T > 1, none on one rank (the
    profile this module always gave, and the executor's untouched single-rank model)."""
    return MEGATRON_VOCAB_MULTIPLE if tensor_parallel > 1 else 1


def _check_tp(c: TransformerConfig, t: int) -> None:
    if not isinstance(t, int) or t < 1:
        raise ModelSpecError(f"tensor parallel degree must be a positive integer (got {t!r})")
    kv = c.kv_heads or c.heads
    if c.heads % t or kv % t or c.ffn_size % t:
        raise ModelSpecError(f"{c.spec()}: tensor parallelism {t} must divide heads={c.heads}, kv_heads={kv} and "
                             f"ffn={c.ffn_size} (Megatron splits heads and the MLP over the TP ranks); pick a divisor")


def _block_param_split(c: TransformerConfig) -> tuple[int, int]:
    """(parameters split over the TP ranks, parameters every TP rank holds) of one block."""
    h, f, kv = c.hidden, c.ffn_size, c.kv_size
    if c.llama:  # QKV, output projection, gate/up/down; two RMSNorm weights
        return h * (h + 2 * kv) + h * h + 3 * h * f, 2 * h
    # QKV weight + bias, projection weight, fc1 weight + bias, fc2 weight | projection bias, fc2 bias, 2 LayerNorms
    return h * (h + 2 * kv) + (h + 2 * kv) + h * h + h * f + f + f * h, h + h + 4 * h


def _block_params(c: TransformerConfig) -> int:
    sharded, replicated = _block_param_split(c)
    return sharded + replicated


def _norm_params(c: TransformerConfig) -> int:
    return c.hidden if c.llama else 2 * c.hidden


def transformer_param_count(c: TransformerConfig, tied: bool = True) -> int:
    """Parameters N: blocks + embeddings (+ final norm); the head's matrix counted once when ``tied``
    (a Llama head is never tied, so it always counts)."""
    h = c.hidden
    positions = 0 if c.llama else c.seq * h
    n = c.layers * _block_params(c) + c.vocab * h + positions + _norm_params(c)
    return n if (tied and not c.llama) else n + c.vocab * h


def attended_keys(c: TransformerConfig) -> int:
    """Keys one query is multiplied with, on average, by the attention kernel: an unfused core computes the
    whole s × s square and masks it afterwards (Megatron's scale-mask-softmax), and so does any kernel of a
    bidirectional (BERT) model; a causal flash kernel skips the blocks above the diagonal, s/2 on average."""
    return max(1, c.seq // 2) if (c.flash and c.causal) else c.seq


def attention_flops(c: TransformerConfig, keys: int | None = None) -> float:
    """Forward FLOPs of one block's attention core for one sequence: the scores QKᵀ and the values,
    ``4·s·k·h`` with k the keys a query meets (:func:`attended_keys`): ``4·s²·h`` unfused (every query against
    every key, as Narayanan et al. count it), half that for a causal flash kernel."""
    return 4.0 * c.seq * (attended_keys(c) if keys is None else keys) * c.hidden


def _block_flops(c: TransformerConfig, keys: int | None = None) -> float:
    """Forward FLOPs of one block for one sequence: QKV, scores and values, projection, MLP (``keys``: as
    :func:`attention_flops` takes it)."""
    s, h, f, kv = c.seq, c.hidden, c.ffn_size, c.kv_size
    mlp = (6.0 if c.llama else 4.0) * s * h * f
    return 2.0 * s * h * (h + 2 * kv) + 2.0 * s * h * h + mlp + attention_flops(c, keys)


def _block_backward_flops(c: TransformerConfig) -> float:
    """Backward FLOPs of one block for one sequence: twice the forward's, flash attention's core 2.5 times its own."""
    core = FLASH_BACKWARD_FACTOR if c.flash else 2.0
    return 2.0 * (_block_flops(c) - attention_flops(c)) + core * attention_flops(c)


def _head_flops(c: TransformerConfig, vocab: int | None = None) -> float:
    s, h, v = c.seq, c.hidden, vocab or c.vocab
    return 2.0 * s * h * v + 5.0 * s * h + 5.0 * s * v  # logits + final norm + softmax/cross entropy


def transformer_flops_per_token(c: TransformerConfig) -> float:
    """Training FLOPs (forward + 2× backward) per token: the model's FLOPs, as MFU counts them (the whole
    s × s attention square, whatever the kernel skips; what flash attention's backward recomputes is not
    among them, as no recomputation is)."""
    fwd = c.layers * _block_flops(c, keys=c.seq) + _head_flops(c) + 2.0 * c.seq * c.hidden
    return 3.0 * fwd / c.seq


def _attention_saved_bytes(c: TransformerConfig, t: int = 1) -> float:
    """Bytes per sample of the attention scores kept for backward, what selective recomputation drops: unfused,
    the softmax output (2·a·s²), and for GPT the dropout mask (a·s²) and dropout output (2·a·s²); split over
    the TP ranks. Flash attention keeps no scores: 0."""
    if c.flash:
        return 0.0
    return (2.0 if c.llama else 5.0) * c.heads * c.seq * c.seq / t


def _flash_saved_bytes(c: TransformerConfig, t: int = 1) -> float:
    """Bytes per sample a flash attention core keeps beyond its inputs and its output: the fp32 log-sum-exp of
    each query's scores, ``4·a·s`` split over the TP ranks (0 for the unfused core)."""
    return 4.0 * c.heads * c.seq / t if c.flash else 0.0


def block_saved_bytes(c: TransformerConfig, tensor_parallel: int = 1, sequence_parallel: bool = False) -> float:
    """Bytes saved for backward per block per sample on one TP rank (Korthikanti et al. 2022, eq. 1–3):
    GPT ``s·h·(10 + 24/T) + 5·a·s²/T`` (``s·h·34/T + 5·a·s²/T`` with sequence parallelism; no TP:
    ``s·h·(34 + 5·a·s/h)``). Llama by the same accounting: no dropout masks, SwiGLU keeps three ``s·f``
    tensors, grouped-query K and V are ``s·kv`` wide, the scores ``2·a·s²/T``. With flash attention
    (``c.attention``) the s² term is replaced by the log-sum-exp's ``4·a·s/T`` (GPT: ``34·s·h + 4·a·s``)."""
    s, h, f, kv, t = c.seq, c.hidden, c.ffn_size, c.kv_size, tensor_parallel
    rep = 1.0 / t if sequence_parallel else 1.0
    if c.llama:  # two norm inputs, the QKV input, the MLP input | Q, K, V, projection input, 3 MLP tensors
        replicated = 4 * s * h + 2 * s * h + 2 * s * h
        sharded = 2 * s * h + 4 * s * kv + 2 * s * h + 6 * s * f
    else:  # + the two dropout masks | fc1 output (GeLU input), fc2 input
        replicated = 4 * s * h + 2 * s * h + s * h + 2 * s * h + s * h
        sharded = 2 * s * h + 4 * s * kv + 2 * s * h + 4 * s * f
    return replicated * rep + sharded / t + _attention_saved_bytes(c, t) + _flash_saved_bytes(c, t)


def state_bytes(params: float, optimizer: str = "adam") -> float:
    """Training-state bytes (weights, gradients, master copy, optimizer) of ``params`` parameters."""
    try:
        return params * STATE_BYTES_PER_PARAM[optimizer]
    except KeyError:
        raise ModelSpecError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(STATE_BYTES_PER_PARAM)}") from None


def _seconds(flops: float, kind: DeviceKind) -> float:
    return flops / kind.achievable_flops


# ---------------------------------------------------------------------- kernel inventory (efficiency model)
def block_work(c: TransformerConfig, microbatch_size: int = 1, tensor_parallel: int = 1,
               sequence_parallel: bool = False) -> tuple[Work, Work]:
    """(the whole block's forward work, its attention-core part) on one TP rank for one microbatch.

    Streamed bytes of the memory-bound kernels (16-bit elements, N = b·s tokens, replicated widths
    split by T only with sequence parallelism): two norms 4·N·h each; GPT: two fused
    bias-dropout-adds 7·N·h each, Llama: two residual adds 6·N·h each; QKV layout copies
    4·N·(h + 2·kv)/T and the output's 4·N·h/T; Llama's rotary 4·N·(h + kv)/T; the MLP activation
    (bias-GeLU 4·N·f/T, SwiGLU's product 6·N·f/T). Kernels: 17 (GPT) or 16 (Llama) launches; the TP
    all-reduces are not work here (the interpreters add their time on the links).

    The attention core (``c.attention``): unfused, the products QKᵀ and PV with their s² scores written
    and read, the fused scale-mask-softmax 4·b·a·s²/T and (GPT) the attention dropout 5·b·a·s²/T, 4 (GPT 5)
    kernels; flash, one kernel whose two products stream only Q, K, V and the output (``Gemm.fused``) and
    write the fp32 log-sum-exp 4·b·a·s/T, its backward re-running QKᵀ (``Work.rerun``): 13 kernels a block.
    """
    b, s, h, f, kv, a, t = microbatch_size, c.seq, c.hidden, c.ffn_size, c.kv_size, c.heads, tensor_parallel
    n = b * s
    d = h // a
    rep = 1.0 / t if sequence_parallel else 1.0
    weight_gemms = (Gemm(n, (h + 2 * kv) // t, h), Gemm(n, h, h // t),
                    Gemm(n, (2 if c.llama else 1) * f // t, h), Gemm(n, h, f // t))
    heads_here = b * a // t
    keys = attended_keys(c)  # a causal flash kernel multiplies each query with s/2 keys on average
    attn_gemms = (Gemm(s, keys, d, heads_here, c.flash), Gemm(s, d, keys, heads_here, c.flash))
    scores = float(heads_here) * s * s
    if c.flash:
        attn = Work(attn_gemms, 4.0 * heads_here * s, 1, weight_gemms=0, rerun=attn_gemms[:1])
    else:
        attn = Work(attn_gemms, 4.0 * scores + (0.0 if c.llama else 5.0 * scores), 4 if c.llama else 5, weight_gemms=0)
    adds = (12.0 if c.llama else 14.0) * n * h
    stream = (8.0 * n * h + adds) * rep + 4.0 * n * (h + 2 * kv) / t + 4.0 * n * h / t
    stream += 4.0 * n * (h + kv) / t if c.llama else 0.0
    stream += (6.0 if c.llama else 4.0) * n * f / t
    kernels = (16 if c.llama else 17) - (4 if c.llama else 5) + attn.kernels
    sharded, replicated = _block_param_split(c)
    work = Work(weight_gemms + attn_gemms, stream + attn.memory_bytes, kernels, weight_gemms=len(weight_gemms),
                weight_elements=sharded / t + replicated, rerun=attn.rerun)
    return work, attn


def block_key(c: TransformerConfig, tensor_parallel: int = 1, microbatch_size: int = 1,
              sequence_parallel: bool = False) -> BlockKey:
    """The GEMM shape of one of ``c``'s blocks on a TP rank, as a device calibration's per-shape table
    (``planner.efficiency.BlockTiming``) keys it. The family names the attention kernel where it is not the
    family's default (``gpt+flash``, ``llama+unfused``), so the keys tables already hold keep their meaning."""
    fam = "llama" if c.llama else "gpt"  # "bert" costs as "gpt"
    if c.attention != DEFAULT_ATTENTION[fam]:
        fam = f"{fam}+{c.attention}"
    return (fam, c.hidden, c.heads, c.kv_heads or c.heads, c.ffn_size, c.seq, tensor_parallel,
            bool(sequence_parallel), microbatch_size)


def embedding_work(c: TransformerConfig, microbatch_size: int = 1, tensor_parallel: int = 1,
                   sequence_parallel: bool = False, vocab_multiple: int = 1) -> Work:
    """Forward work of the (vocabulary-parallel) embedding: the gather, GPT's position add and dropout."""
    n, h = microbatch_size * c.seq, c.hidden
    rep = 1.0 / tensor_parallel if sequence_parallel else 1.0
    stream = 4.0 * n * h + (0.0 if c.llama else 11.0 * n * h * rep)
    vp = padded_vocab(c.vocab, tensor_parallel, vocab_multiple)
    elems = vp * h / tensor_parallel + (0 if c.llama else c.seq * h)
    return Work((), stream, 1 if c.llama else 3, input_grad=False, weight_elements=elems)


def head_work(c: TransformerConfig, microbatch_size: int = 1, tensor_parallel: int = 1,
              sequence_parallel: bool = False, vocab_multiple: int = 1) -> Work:
    """Forward work of the final norm, the (column-parallel) logits GEMM and the vocabulary-parallel cross
    entropy (fp32 softmax over the rank's logits: about 20 bytes streamed per logit)."""
    n, h, t = microbatch_size * c.seq, c.hidden, tensor_parallel
    rep = 1.0 / t if sequence_parallel else 1.0
    vp = padded_vocab(c.vocab, t, vocab_multiple)
    logits = float(n) * vp / t
    return Work((Gemm(n, vp // t, h),), 4.0 * n * h * rep + 20.0 * logits, 8, weight_gemms=1,
                weight_elements=vp * h / t + _norm_params(c))


def transformer_profile(c: TransformerConfig, kind: str = DEFAULT_DEVICE_KIND, name: str | None = None, *,
                        tensor_parallel: int = 1, sequence_parallel: bool = False, microbatch_size: int = 1,
                        efficiency: EfficiencyParams | None = None, vocab_multiple: int = 1,
                        block_timing: BlockTiming | None = None) -> ModelProfile:
    """A chain profile of ``c`` on one tensor-parallel rank, timed on device ``kind``: embedding, L blocks,
    final norm + head.

    Megatron's split for TP degree T: the QKV and MLP-up GEMMs column-parallel and the projection and
    MLP-down row-parallel (FLOPs and weights / T), attention heads split, the embedding and the output
    head vocabulary-parallel (the vocabulary padded to a multiple of ``vocab_multiple × T``; 128 is
    Megatron's), norms, residual adds and row-parallel biases replicated (split by T only with
    ``sequence_parallel``). Each layer carries every TP collective it issues (``Layer.tp_collectives``:
    ``planner.tpcollectives.tp_collectives``, what Megatron and the executor issue; without sequence parallelism
    a block all-reduces ``s·h·2`` bytes per sample twice in forward and twice in backward, the embedding once in
    forward, the head three fp32 per-token statistics of its cross entropy in forward and its input gradient in
    backward).

    Times: ``efficiency`` given, each layer's kernels (:func:`block_work`) are timed by
    ``planner.efficiency.work_time_s`` at ``microbatch_size`` (the profile's reference microbatch);
    otherwise FLOPs / the kind's achievable FLOP/s, per sample (T = 1 then gives the profile this module
    always gave); the head's forward then also carries the fitted per-microbatch ``loss_overhead_s``.
    TP collective time is not in ``forward_s``/``backward_s``: the interpreters add it. A
    ``block_timing`` (a calibration's per-shape table entry for this block shape, :func:`block_key`) gives
    the blocks' forward and backward seconds instead of the smooth model (attention's share scaled with it).
    """
    k = device_kind(kind)
    t = tensor_parallel
    _check_tp(c, t)
    if microbatch_size < 1:
        raise ModelSpecError(f"microbatch_size must be >= 1 (got {microbatch_size})")
    s, h = c.seq, c.hidden
    vp = padded_vocab(c.vocab, t, vocab_multiple)
    rep = 1.0 / t if sequence_parallel else 1.0
    mb = microbatch_size
    comms = tp_collectives(c, t, sequence_parallel)  # every TP collective of each layer, as issued (all timed)
    boundary = s * h * 2.0 * rep

    def times(flops: float, work: Work, backward_flops: float | None = None) -> tuple[float, float]:
        if efficiency is None:
            back = 2 * flops if backward_flops is None else backward_flops
            return mb * _seconds(flops, k), mb * _seconds(back, k)
        return work_time_s(work, k, efficiency), work_time_s(work.backward(), k, efficiency)

    emb_flops = 2.0 * s * h
    ef, eb = times(emb_flops, embedding_work(c, mb, t, sequence_parallel, vocab_multiple))
    positions = 0 if c.llama else s * h
    layers = [Layer("embedding", ef, eb, boundary, (0.0 if c.llama else s * h * rep) + 8.0 * s,
                    BYTES_PER_PARAM * (vp * h / t + positions), recomputable=False, tp_collectives=comms[0])]
    sharded, replicated = _block_param_split(c)
    bp = BYTES_PER_PARAM * (sharded / t + replicated)
    saved = block_saved_bytes(c, t, sequence_parallel)
    bwork, awork = block_work(c, mb, t, sequence_parallel)
    bf, bb = times(_block_flops(c) / t, bwork, _block_backward_flops(c) / t)
    if c.flash:  # selective recomputation has nothing to re-run: the kernel's backward already recomputes
        attn_s = 0.0
    elif efficiency is None:
        attn_s = mb * _seconds(attention_flops(c) / t, k)
    else:
        attn_s = work_time_s(awork, k, efficiency, layer=False)
    if block_timing is not None:
        if block_timing.key != block_key(c, t, mb, sequence_parallel):
            raise ModelSpecError(f"block timing for shape {block_timing.key} given to a block of shape "
                                 f"{block_key(c, t, mb, sequence_parallel)}")
        attn_s *= block_timing.forward_s / bf
        bf, bb = block_timing.forward_s, block_timing.backward_s
    for i in range(c.layers):
        layers.append(Layer(f"block{i}", bf, bb, boundary, saved, bp, attention_saved_bytes=_attention_saved_bytes(c, t),
                            attention_forward_s=attn_s, tp_collectives=comms[1 + i]))
    hf = _head_flops(c, vp) / t
    hfw, hbw = times(hf, head_work(c, mb, t, sequence_parallel, vocab_multiple))
    if efficiency is not None:  # the loss's fixed per-microbatch work (planner.efficiency)
        hfw += efficiency.loss_overhead_s
    layers.append(Layer("ln_f+head", hfw, hbw, 4.0, 4.0 * s * h * rep + 4.0 * s * vp / t,
                        BYTES_PER_PARAM * (vp * h / t + _norm_params(c)), recomputable=False,
                        tp_collectives=comms[-1]))
    return ModelProfile(name=name or c.spec(), layers=tuple(layers), microbatch_size=mb, device=k.name,
                        tensor_parallel=t, sequence_parallel=sequence_parallel)


# ---------------------------------------------------------------------- CNNs
def _conv(cin: int, cout: int, k: int, hw_out: int) -> tuple[float, int, int]:
    """(forward FLOPs, params, output elements) of a k×k convolution with bias-free BN after it."""
    return 2.0 * k * k * cin * cout * hw_out * hw_out, k * k * cin * cout + 2 * cout, cout * hw_out * hw_out


def _vgg16_layers() -> list[tuple[str, float, int, float, float]]:
    """(name, fwd FLOPs, params, output elements, saved elements) per chain node of VGG-16 at 224²."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    out, cin, hw = [], 3, 224
    for i, c in enumerate(cfg):
        if c == "M":
            continue
        pooled = i + 1 < len(cfg) and cfg[i + 1] == "M"
        flops = 2.0 * 9 * cin * c * hw * hw
        params = 9 * cin * c + c
        saved = cin * hw * hw + c * hw * hw  # conv input + ReLU output
        hw_out = hw // 2 if pooled else hw
        out.append((f"conv{len(out)}{'+pool' if pooled else ''}", flops, params, c * hw_out * hw_out, saved))
        cin, hw = c, hw_out
    dims = [cin * hw * hw, 4096, 4096, 1000]
    for j in range(3):
        out.append((f"fc{j}", 2.0 * dims[j] * dims[j + 1], dims[j] * dims[j + 1] + dims[j + 1], dims[j + 1],
                    dims[j] + dims[j + 1]))
    return out


def _resnet50_layers() -> list[tuple[str, float, int, float, float]]:
    """Chain nodes of ResNet-50 v1.5 at 224²: stem, 16 bottleneck blocks, pool + fc."""
    f, p, o = _conv(3, 64, 7, 112)
    out = [("stem", f, p, 64 * 56 * 56, 3 * 224 * 224 + 3 * o)]
    cin, hw = 64, 56
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3))):
        for b in range(blocks):
            stride = 2 if (b == 0 and stage > 0) else 1
            hw_out = hw // stride
            parts = [_conv(cin, width, 1, hw), _conv(width, width, 3, hw_out), _conv(width, 4 * width, 1, hw_out)]
            if b == 0:
                parts.append(_conv(cin, 4 * width, 1, hw_out))
            flops = sum(x[0] for x in parts)
            params = sum(x[1] for x in parts)
            saved = cin * hw * hw + 3 * sum(x[2] for x in parts)  # conv inputs, BN inputs, ReLU outputs
            out.append((f"layer{stage + 1}.{b}", flops, params, 4 * width * hw_out * hw_out, saved))
            cin, hw = 4 * width, hw_out
    out.append(("pool+fc", 2.0 * cin * 1000 + cin * hw * hw, cin * 1000 + 1000, 1000, cin * hw * hw))
    return out


_CNN_BUILDERS = {"vgg16": _vgg16_layers, "resnet50": _resnet50_layers}


def cnn_profile(model: str, kind: str = DEFAULT_DEVICE_KIND) -> ModelProfile:
    """The analytic chain profile of a PipeDream-paper CNN (``vgg16``, ``resnet50``) on device ``kind``."""
    try:
        nodes = _CNN_BUILDERS[model]()
    except KeyError:
        raise ModelSpecError(f"no analytic CNN {model!r}; known: {', '.join(_CNN_BUILDERS)}") from None
    k = device_kind(kind)
    layers = tuple(Layer(n, _seconds(fl, k), 2 * _seconds(fl, k), 2.0 * act, 2.0 * saved, BYTES_PER_PARAM * params)
                   for n, fl, params, act, saved in nodes)
    return ModelProfile(name=f"{model}-analytic@{k.name}", layers=layers, microbatch_size=1, device=k.name)


def pipedream_profiles_dir() -> Path | None:
    """Where PipeDream's graph.txt profiles are: $PIPETWIN_PIPEDREAM_PROFILES, else shared/data beside the repo."""
    env = os.environ.get("PIPETWIN_PIPEDREAM_PROFILES")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data" / "pipedream_profiles")
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _pipedream(model: str, kind: str | None) -> ModelProfile | None:
    """PipeDream's measured profile for ``model`` (None if absent): per sample where its batch size is known,
    times rescaled from the V100 to ``kind`` by achievable FLOP/s."""
    d = pipedream_profiles_dir()
    if d is None or not (d / f"{model}.graph.txt").exists():
        return None
    raw = read_pipedream_graph(d / f"{model}.graph.txt", name=model)
    batch = PIPEDREAM_BATCH.get(model, 1)
    ref, target = device_kind(PIPEDREAM_REFERENCE_KIND), device_kind(kind or PIPEDREAM_REFERENCE_KIND)
    speed = ref.achievable_flops / target.achievable_flops
    # graph.txt bytes are per profiled minibatch; the ModelProfile convention is per sample
    layers = tuple(replace(l, forward_s=l.forward_s * speed, backward_s=l.backward_s * speed,
                           activation_bytes=l.activation_bytes / batch, saved_bytes=l.saved_bytes / batch)
                   for l in raw.layers)
    return replace(raw, name=f"{model}@{target.name}", layers=layers, microbatch_size=batch, device=target.name)


def _pipedream_names() -> list[str]:
    d = pipedream_profiles_dir()
    return sorted(p.name[: -len(".graph.txt")] for p in d.glob("*.graph.txt")) if d else []


# ---------------------------------------------------------------------- spec strings
def model_names() -> list[str]:
    """Every model name a spec may use."""
    extra = sorted(set(CNNS) | set(_pipedream_names()))
    return sorted(PRESETS) + sorted(_ALIASES) + extra + [f"{m}-analytic" for m in sorted(_CNN_BUILDERS)]


def split_device_suffix(spec: str) -> tuple[str, str | None]:
    """``gpt3-13b@h100`` -> (``gpt3-13b``, ``h100``); no known kind after the last ``@`` -> (spec, None)."""
    head, sep, tail = spec.rpartition("@")
    if not sep or not head:
        return spec, None
    try:
        return head, device_kind(tail).name
    except TopologyError:
        if "/" in tail or "." in tail:  # looks like a path, not a kind
            return spec, None
        raise ModelSpecError(f"model {spec!r}: unknown device kind {tail!r} after '@'; known: {', '.join(DEVICE_KINDS)}") from None


def _overrides(text: str, where: str) -> dict[str, int | str]:
    out: dict[str, int | str] = {}
    for part in filter(None, (x.strip() for x in text.split(","))):
        key, eq, val = part.partition("=")
        key = key.strip().lower()
        if not eq or key not in _SPEC_KEYS:
            raise ModelSpecError(f"{where}: {part!r} is not KEY=VALUE with KEY one of {', '.join(_SPEC_KEYS)}")
        if key in _WORD_KEYS:
            out[key] = val.strip().lower()
            if out[key] not in ATTENTION_KERNELS:
                raise ModelSpecError(f"{where}: attention={val.strip()!r} is not an attention kernel; "
                                     f"choose {' or '.join(ATTENTION_KERNELS)}")
            continue
        try:
            out[key] = int(float(val))
        except ValueError:
            raise ModelSpecError(f"{where}: {key}={val.strip()!r} is not a number") from None
        if out[key] != float(val):
            raise ModelSpecError(f"{where}: {key}={val.strip()!r} must be a whole number")
    return out


def _transformer(spec: str) -> TransformerConfig | None:
    head, _, rest = spec.partition(":")
    name = head.strip().lower()
    name = _ALIASES.get(name, name)
    if name in PRESETS:
        return replace(PRESETS[name], **_overrides(rest, name)) if rest else PRESETS[name]
    if name in FAMILIES:
        kw = _overrides(rest, name)
        missing = [k for k in _SPEC_KEYS[:5] if k not in kw]
        if missing:
            raise ModelSpecError(f"{name}: missing {', '.join(missing)}; write {name}:layers=L,hidden=H,heads=A,seq=S,vocab=V")
        return TransformerConfig(family=name, **kw)
    return None


def transformer_config(spec: str, tensor_parallel: int = 1) -> TransformerConfig | None:
    """The transformer a model spec names (a preset like ``gpt3-1.3b``, maybe with overrides, or
    ``gpt:layers=...``; a ``@kind`` suffix is ignored), checked to split over ``tensor_parallel`` ranks;
    None when the spec is not an analytic transformer."""
    cfg = _transformer(split_device_suffix(spec.strip())[0])
    if cfg is not None:
        _check_tp(cfg, tensor_parallel)
    return cfg


def load_model(spec: str, device_kind_name: str | None = None, *, calibration: DeviceCalibration | None = None,
               tensor_parallel: int = 1, sequence_parallel: bool = False, microbatch_size: int = 1) -> ModelProfile:
    """Any model spec (see the module docstring) as a ModelProfile.

    ``device_kind_name`` times an analytic model on that kind (a ``@kind``
    suffix in the spec does the same; the two must agree). Measured profiles
    (paths, ``uniform:``) are returned as they are.

    An analytic transformer is built per TP rank of ``tensor_parallel`` (the vocabulary then padded to
    a multiple of 128·T, as Megatron pads it). With a device ``calibration``
    (``planner.efficiency.load_device_calibration``: what every ``--device-calibration FILE`` reads) it
    is timed by the fitted efficiency model on the calibration's device kind at ``microbatch_size``
    (its reference microbatch; the model is not linear in it) instead of at a fixed fraction of peak;
    where the calibration's per-shape table lists the block's shape, its block times are the table's.
    CNNs and measured profiles ignore the calibration.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError("give a model: a name like gpt3-13b, gpt:layers=...,hidden=..., or a profile path")
    text, suffix = split_device_suffix(spec.strip())
    if suffix and device_kind_name and device_kind(device_kind_name).name != suffix:
        raise ModelSpecError(f"model {spec!r} names device {suffix} but --device-kind is {device_kind_name}; give one")
    kind = suffix or (device_kind(device_kind_name).name if device_kind_name else None)
    cfg = _transformer(text)
    if cfg is not None:
        base = text.partition(":")[0].strip().lower()
        name = text if ":" in text else _ALIASES.get(base, base)
        if calibration is not None:
            if kind and kind != calibration.kind.name:
                raise ModelSpecError(f"model {spec!r} is timed on {kind} but the device calibration is for "
                                     f"{calibration.kind.name}; give a calibration of that kind or drop the kind")
            kind = calibration.kind.name
        kind = kind or DEFAULT_DEVICE_KIND
        multiple = tp_vocab_multiple(tensor_parallel)
        mb = microbatch_size if calibration is not None else 1
        timing = (calibration.block_timing(block_key(cfg, tensor_parallel, mb, sequence_parallel))
                  if calibration is not None else None)
        return transformer_profile(cfg, kind, name=f"{name}@{device_kind(kind).name}", tensor_parallel=tensor_parallel,
                                   sequence_parallel=sequence_parallel, microbatch_size=mb,
                                   efficiency=calibration.params if calibration is not None else None,
                                   vocab_multiple=multiple, block_timing=timing)
    low = text.lower()
    measured = _pipedream(low, kind) if re.fullmatch(r"[a-z0-9_]+", low) else None
    if measured is not None:
        return measured
    if low in CNNS:
        return cnn_profile(low, kind or DEFAULT_DEVICE_KIND)
    if low.endswith("-analytic") and low[: -len("-analytic")] in _CNN_BUILDERS:
        return cnn_profile(low[: -len("-analytic")], kind or DEFAULT_DEVICE_KIND)
    if low.startswith("uniform") or Path(text).exists():
        return load_profile(text)
    raise ModelSpecError(f"unknown model {text!r}: not a profile file and not one of {', '.join(model_names())} "
                         f"(or gpt:/bert:/llama:layers=..,hidden=..,heads=..,seq=..,vocab=..[,ffn=..,kv_heads=..,"
                         f"attention=flash|unfused])")


def total_params(profile: ModelProfile) -> float:
    """Parameters stored across the chain (tied matrices counted on both ends), from param_bytes."""
    return sum(l.param_bytes for l in profile.layers) / BYTES_PER_PARAM


def min_memory_per_device_bytes(profile: ModelProfile, devices: int, optimizer: str = "adam",
                                microbatch_size: int = 1) -> float:
    """A lower bound on per-device memory for ``devices`` pipeline stages: training state split evenly,
    plus one microbatch's saved activations of the largest layer (no recomputation)."""
    st = state_bytes(total_params(profile), optimizer) / max(1, min(devices, len(profile)))
    act = max(l.saved_bytes for l in profile.layers) * microbatch_size
    return st + act


def on_device(profile: ModelProfile, kind: str) -> ModelProfile:
    """``profile`` timed on device ``kind``: times scaled by the ratio of achievable FLOP/s when the
    profile's own device is a catalogued kind; a profile from an uncatalogued device is returned as is."""
    target = device_kind(kind)
    try:
        source = device_kind(profile.device)
    except TopologyError:
        return profile
    if source.name == target.name:
        return profile
    k = source.achievable_flops / target.achievable_flops
    layers = tuple(replace(l, forward_s=l.forward_s * k, backward_s=l.backward_s * k,
                           attention_forward_s=l.attention_forward_s * k) for l in profile.layers)
    name, _, _ = profile.name.rpartition("@") if "@" in profile.name else (profile.name, "", "")
    return replace(profile, name=f"{name}@{target.name}", layers=layers, device=target.name)
