"""A transformer's chain profile on one tensor-parallel rank: its kernels (the work the efficiency model times)
and the profile of embedding, blocks and head built from them or from the closed forms.

Any transformer (``planner.transformer``) **per tensor-parallel rank** (``transformer_profile(...,
tensor_parallel=T)``: FLOPs, weights and activations split as Megatron splits them, each layer's TP
collectives in its ``tp_collectives``, from ``planner.tpcollectives``), timed either at a fixed fraction of
peak (``planner.closedforms``) or by the fitted kernel-level efficiency model (``planner.efficiency``). Layers:
the embedding, each transformer block as one layer, and the final norm + output head.

The block's shape (:func:`block_key`, what a device calibration's per-shape table is keyed by) stays beside
the kernels and closed forms it replaces: the key must name exactly the fields those forms read.
"""
from __future__ import annotations

from planner.closedforms import (BYTES_PER_PARAM, DEFAULT_DEVICE_KIND, attended_keys, attention_flops,
                                 attention_saved_bytes, block_backward_flops, block_flops, block_param_split,
                                 block_saved_bytes, check_tp, head_flops, norm_params, padded_vocab, seconds)
from planner.efficiency import BlockKey, BlockTiming, EfficiencyParams, Gemm, Work, work_time_s
from planner.profile import Layer, ModelProfile, ModelSpecError
from planner.tpcollectives import tp_collectives
from planner.transformer import DEFAULT_ATTENTION, TransformerConfig
from topologies.devices import device_kind

__all__ = ["block_work", "block_key", "embedding_work", "head_work", "transformer_profile"]


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
    sharded, replicated = block_param_split(c)
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
                weight_elements=vp * h / t + norm_params(c))


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
    check_tp(c, t)
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
            return mb * seconds(flops, k), mb * seconds(back, k)
        return work_time_s(work, k, efficiency), work_time_s(work.backward(), k, efficiency)

    emb_flops = 2.0 * s * h
    ef, eb = times(emb_flops, embedding_work(c, mb, t, sequence_parallel, vocab_multiple))
    positions = 0 if c.llama else s * h
    layers = [Layer("embedding", ef, eb, boundary, (0.0 if c.llama else s * h * rep) + 8.0 * s,
                    BYTES_PER_PARAM * (vp * h / t + positions), recomputable=False, tp_collectives=comms[0])]
    sharded, replicated = block_param_split(c)
    bp = BYTES_PER_PARAM * (sharded / t + replicated)
    saved = block_saved_bytes(c, t, sequence_parallel)
    bwork, awork = block_work(c, mb, t, sequence_parallel)
    bf, bb = times(block_flops(c) / t, bwork, block_backward_flops(c) / t)
    if c.flash:  # selective recomputation has nothing to re-run: the kernel's backward already recomputes
        attn_s = 0.0
    elif efficiency is None:
        attn_s = mb * seconds(attention_flops(c) / t, k)
    else:
        attn_s = work_time_s(awork, k, efficiency, layer=False)
    if block_timing is not None:
        if block_timing.key != block_key(c, t, mb, sequence_parallel):
            raise ModelSpecError(f"block timing for shape {block_timing.key} given to a block of shape "
                                 f"{block_key(c, t, mb, sequence_parallel)}")
        attn_s *= block_timing.forward_s / bf
        bf, bb = block_timing.forward_s, block_timing.backward_s
    for i in range(c.layers):
        layers.append(Layer(f"block{i}", bf, bb, boundary, saved, bp, attention_saved_bytes=attention_saved_bytes(c, t),
                            attention_forward_s=attn_s, tp_collectives=comms[1 + i]))
    hf = head_flops(c, vp) / t
    hfw, hbw = times(hf, head_work(c, mb, t, sequence_parallel, vocab_multiple))
    if efficiency is not None:  # the loss's fixed per-microbatch work (planner.efficiency)
        hfw += efficiency.loss_overhead_s
    layers.append(Layer("ln_f+head", hfw, hbw, 4.0, 4.0 * s * h * rep + 4.0 * s * vp / t,
                        BYTES_PER_PARAM * (vp * h / t + norm_params(c)), recomputable=False,
                        tp_collectives=comms[-1]))
    return ModelProfile(name=name or c.spec(), layers=tuple(layers), microbatch_size=mb, device=k.name,
                        tensor_parallel=t, sequence_parallel=sequence_parallel)

