"""Transformer shapes: the GPT-, BERT- and Llama-style config, its named presets and their aliases.

* **GPT/BERT-style transformers** given (layers, hidden, heads, sequence, vocabulary[, ffn]), and
  **Llama-style** ones (RMSNorm, SwiGLU, grouped-query attention with ``kv_heads``, rotary positions,
  untied head; presets ``llama3-8b``, ``llama3-70b``, ``llama3-405b``).
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
  attention FLOPs (``planner.closedforms.FLASH_BACKWARD_FACTOR``, the factor FlashAttention-2's own
  benchmarks count). The forward's FLOPs are the same for both. Selective recomputation (``planner.recompute``)
  drops the unfused core's s² bytes and re-runs it; a flash core has nothing to drop (its kernel
  already recomputes), so there selective is the same as none. Defaults
  (:data:`DEFAULT_ATTENTION`): ``llama`` flash (Llama models are trained with it: torchtitan,
  Megatron-Core with Transformer Engine), ``gpt`` and ``bert`` unfused (the published GPT runs
  pipetwin is validated on used Megatron's unfused core; give ``attention=flash`` for a GPT trained
  with it).

What a shape costs is in ``planner.closedforms`` (parameters, FLOPs, saved bytes) and
``planner.transformer_profile`` (kernels, the chain profile); the spec strings that name a shape are
``planner.analytic``'s.
"""
from __future__ import annotations

from dataclasses import dataclass

from planner.profile import ModelSpecError

__all__ = ["TransformerConfig", "FAMILIES", "PRESETS", "ALIASES", "ATTENTION_KERNELS", "DEFAULT_ATTENTION"]

#: Attention kernels a transformer may use (the module docstring says what each keeps and streams).
ATTENTION_KERNELS = ("unfused", "flash")
#: The kernel of each family when its config or spec names none.
DEFAULT_ATTENTION = {"gpt": "unfused", "bert": "unfused", "llama": "flash"}


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
#: Other names of presets.
ALIASES = {"gpt2": "gpt2-small", "gpt3-xl": "gpt3-1.3b", "gpt3": "gpt3-175b", "llama3.1-8b": "llama3-8b",
           "llama3.1-70b": "llama3-70b",
           "llama3.1-405b": "llama3-405b"}
