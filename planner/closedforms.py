"""The closed forms analytic profiles are built from: bytes per parameter and training state, and a
transformer's parameters, FLOPs and saved-for-backward bytes on one tensor-parallel rank.

Units and conventions (per reference microbatch of one sample = one sequence
for a transformer, one 224×224 image for a CNN):

* time = FLOPs / (peak_flops × achievable_fraction) of the device kind
  (``topologies.devices.DEVICE_KINDS``); backward = 2 × forward FLOPs, except flash attention's
  core (``planner.transformer``), whose backward is 2.5 × its forward.
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
  ``34·s·h + 4·a·s`` (the kernels: ``planner.transformer``). The head saves ``4·s·h`` (layer-norm input
  and output) plus ``4·s·V`` (fp32 logits for the cross entropy); the
  embedding saves its dropout mask ``s·h`` bytes plus the token ids.
"""
from __future__ import annotations

from planner.profile import ModelSpecError
from planner.transformer import TransformerConfig
from topologies.devices import DeviceKind

__all__ = ["BYTES_PER_PARAM", "STATE_BYTES_PER_PARAM", "DEFAULT_DEVICE_KIND", "FLASH_BACKWARD_FACTOR",
           "MEGATRON_VOCAB_MULTIPLE", "padded_vocab", "tp_vocab_multiple", "check_tp", "block_param_split",
           "norm_params", "transformer_param_count", "attended_keys", "attention_flops", "block_flops",
           "block_backward_flops", "head_flops", "transformer_flops_per_token", "attention_saved_bytes",
           "block_saved_bytes", "state_bytes", "seconds"]

#: Bytes per parameter in an analytic profile's ``param_bytes`` (fp32 main gradient; see the module docstring).
BYTES_PER_PARAM = 4
#: Training-state bytes per parameter under mixed precision: bf16 weight + bf16 grad + fp32 master + optimizer.
STATE_BYTES_PER_PARAM: dict[str, int] = {"none": 8, "sgd": 12, "momentum": 12, "adam": 16}
#: Device kind an analytic profile is timed on when the spec names none.
DEFAULT_DEVICE_KIND = "a100-80gb"
#: A flash attention backward's FLOPs over its forward's: five s²-sized products (the scores QKᵀ
#: recomputed, dV, dP, dQ, dK) against two (Dao 2023, FlashAttention-2, section 3.1.2).
FLASH_BACKWARD_FACTOR = 2.5
#: Megatron pads the vocabulary to a multiple of this × the tensor-parallel degree
#: (``--make-vocab-size-divisible-by``, default 128); :func:`padded_vocab`.
MEGATRON_VOCAB_MULTIPLE = 128


def padded_vocab(vocab: int, tensor_parallel: int = 1, multiple: int = 1) -> int:
    """The vocabulary rounded up to a multiple of ``multiple × tensor_parallel`` (Megatron: multiple=128)."""
    q = max(1, multiple) * tensor_parallel
    return -(-vocab // q) * q


def tp_vocab_multiple(tensor_parallel: int) -> int:
    """The padding multiple (× T) of a model split over ``tensor_parallel`` ranks, the one rule ``planner.analytic.load_model``
    charges and ``executor.tensor_parallel`` shards by: Megatron's 128 when T > 1, none on one rank (the
    profile this module always gave, and the executor's untouched single-rank model)."""
    return MEGATRON_VOCAB_MULTIPLE if tensor_parallel > 1 else 1


def check_tp(c: TransformerConfig, t: int) -> None:
    """Raise ModelSpecError unless ``t`` tensor-parallel ranks can split ``c`` (heads, KV heads and the MLP)."""
    if not isinstance(t, int) or t < 1:
        raise ModelSpecError(f"tensor parallel degree must be a positive integer (got {t!r})")
    kv = c.kv_heads or c.heads
    if c.heads % t or kv % t or c.ffn_size % t:
        raise ModelSpecError(f"{c.spec()}: tensor parallelism {t} must divide heads={c.heads}, kv_heads={kv} and "
                             f"ffn={c.ffn_size} (Megatron splits heads and the MLP over the TP ranks); pick a divisor")


def block_param_split(c: TransformerConfig) -> tuple[int, int]:
    """(parameters split over the TP ranks, parameters every TP rank holds) of one block."""
    h, f, kv = c.hidden, c.ffn_size, c.kv_size
    if c.llama:  # QKV, output projection, gate/up/down; two RMSNorm weights
        return h * (h + 2 * kv) + h * h + 3 * h * f, 2 * h
    # QKV weight + bias, projection weight, fc1 weight + bias, fc2 weight | projection bias, fc2 bias, 2 LayerNorms
    return h * (h + 2 * kv) + (h + 2 * kv) + h * h + h * f + f + f * h, h + h + 4 * h


def _block_params(c: TransformerConfig) -> int:
    sharded, replicated = block_param_split(c)
    return sharded + replicated


def norm_params(c: TransformerConfig) -> int:
    """Parameters of one norm: RMSNorm's weight (Llama), LayerNorm's weight and bias (GPT, BERT)."""
    return c.hidden if c.llama else 2 * c.hidden


def transformer_param_count(c: TransformerConfig, tied: bool = True) -> int:
    """Parameters N: blocks + embeddings (+ final norm); the head's matrix counted once when ``tied``
    (a Llama head is never tied, so it always counts)."""
    h = c.hidden
    positions = 0 if c.llama else c.seq * h
    n = c.layers * _block_params(c) + c.vocab * h + positions + norm_params(c)
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


def block_flops(c: TransformerConfig, keys: int | None = None) -> float:
    """Forward FLOPs of one block for one sequence: QKV, scores and values, projection, MLP (``keys``: as
    :func:`attention_flops` takes it)."""
    s, h, f, kv = c.seq, c.hidden, c.ffn_size, c.kv_size
    mlp = (6.0 if c.llama else 4.0) * s * h * f
    return 2.0 * s * h * (h + 2 * kv) + 2.0 * s * h * h + mlp + attention_flops(c, keys)


def block_backward_flops(c: TransformerConfig) -> float:
    """Backward FLOPs of one block for one sequence: twice the forward's, flash attention's core 2.5 times its own."""
    core = FLASH_BACKWARD_FACTOR if c.flash else 2.0
    return 2.0 * (block_flops(c) - attention_flops(c)) + core * attention_flops(c)


def head_flops(c: TransformerConfig, vocab: int | None = None) -> float:
    """Forward FLOPs of the final norm and output head for one sequence (``vocab``: the padded vocabulary)."""
    s, h, v = c.seq, c.hidden, vocab or c.vocab
    return 2.0 * s * h * v + 5.0 * s * h + 5.0 * s * v  # logits + final norm + softmax/cross entropy


def transformer_flops_per_token(c: TransformerConfig) -> float:
    """Training FLOPs (forward + 2× backward) per token: the model's FLOPs, as MFU counts them (the whole
    s × s attention square, whatever the kernel skips; what flash attention's backward recomputes is not
    among them, as no recomputation is)."""
    fwd = c.layers * block_flops(c, keys=c.seq) + head_flops(c) + 2.0 * c.seq * c.hidden
    return 3.0 * fwd / c.seq


def attention_saved_bytes(c: TransformerConfig, t: int = 1) -> float:
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
    return replicated * rep + sharded / t + attention_saved_bytes(c, t) + _flash_saved_bytes(c, t)


def state_bytes(params: float, optimizer: str = "adam") -> float:
    """Training-state bytes (weights, gradients, master copy, optimizer) of ``params`` parameters."""
    try:
        return params * STATE_BYTES_PER_PARAM[optimizer]
    except KeyError:
        raise ModelSpecError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(STATE_BYTES_PER_PARAM)}") from None


def seconds(flops: float, kind: DeviceKind) -> float:
    """``flops`` at the device kind's achievable FLOP/s."""
    return flops / kind.achievable_flops

