"""Extra ground truth: torchtitan's Llama 3.1 8B/70B/405B on H100 (FSDP, TP, PP, CP), tokens/s per GPU and memory.

The rows (``torchtitan_llama3_h100_202412.csv``, 18 of them, transcribed from torchtitan's
``benchmarks/llama3_h100_202412_torchtitan.md``) are predicted by a closed form. Look 1 used the device
calibration fitted on vTrain's A100 rows, carried over by the transfer rule below, and fitted on none of
these rows; everything below was written down, and committed, before its first predicted-against-measured
figure was printed. Look 2 fits an H100 calibration on two of the rows by the rule after it.

**H100 calibration (look 2, the rule; written and committed before any look-2 figure was computed).**
Look 1 (tokens/s MAPE 114.8%, every row too fast; memory 11.4%) and its diagnostic (the GEMM fraction
that would reproduce the plain FSDP 8B rows, 0.42 of peak) were seen before this rule was written.

* Calibration rows, by rule (not by line): the Llama 3.1 8B rows whose techniques are FSDP alone — no
  TP, PP or CP (all 1), no torch.compile, Float8 or AsyncTP. In this file: Table 1's and Table 3's plain
  FSDP rows (8 and 128 GPUs), 2 rows. Every other row is scored; none of the calibration rows is.
* Fitted: ``gemm_efficiency`` alone, by ``planner.efficiency.fit`` (scipy least squares on the relative
  error of the predicted step time, i.e. of tokens/s per GPU), starting from and bounded as the vTrain fit.
  Why only it: these rows are compute-bound (8B, 8192 tokens × 2 per GPU, selective recomputation), so
  the GEMM fraction moves them and the other parameters barely do; and the two rows differ only in the
  FSDP degree, which the closed form times by link bandwidths, not by a fitted parameter — two rows that
  identify one number.
* Kept: the six other parameters (``memory_efficiency`` as a fraction of the new peak bandwidth, the
  host-side times, the overlap exponent, the loss overhead) as the A100 (vTrain) fit gives them, by look
  1's transfer rule below. The per-shape block table is dropped (it holds A100 seconds of GPT shapes);
  gradients 4 bytes per parameter (torchtitan reduce-scatters in fp32).
* Memory has no fitted parameter, so its predictions are look 1's; the scored figure is over the same 16
  rows as tokens/s.
* The fit is saved as a device calibration for ``h100-96gb-hbm2e`` (``pipetwin groundtruth
  --save-calibration-h100 FILE``), which ``plan``/``simulate``/``whatif --device-calibration FILE`` take
  for devices of that kind. No fitted value is changed after the scored figures are printed.

**Calibration transfer A100 → H100 (look 1's rule).** The seven fitted parameters are used unchanged:
``gemm_efficiency`` and ``memory_efficiency`` are fractions of the device's peak, so on the
Grand Teton part (``h100-96gb-hbm2e``: bf16 peak 912 TFLOP/s — the midpoint of SXM's 989 and NVL's 835,
as the benchmark's footnote places it between them — and 2.4 TB/s of HBM2e) achieved FLOP/s scale
by the peak ratio 912/312 and achieved bandwidth by 2.4/2.039; the host-side times (per launch, per
layer, per iteration, per microbatch at the loss) and the overlap exponent transfer as they are. The
calibration's per-shape block table holds GPT shapes only (vTrain's), so no Llama block is in it:
the smooth model times every block.

**Rows as plans.** Model: ``llama3-8b``/``70b``/``405b`` (vocabulary 128,256 unpadded), sequence
8192 where the file leaves it blank (torchtitan's Llama 3 training configs). Mesh: torchtitan's order,
TP innermost, then CP, then FSDP, then PP; a group lies in one host iff stride × size ≤ 8. Links per
GPU: NVLink 450 GB/s (the catalogue's H100) inside a host, 50 GB/s (400 Gb/s RDMA) across hosts;
every collective is a ring timed by bytes per rank / that bandwidth (``planner.sharding``), no
latency. Microbatches: one of ``local_batch`` sequences without PP; with PP torchtitan's default,
PP-degree microbatches of ``local_batch / PP``; interleaved 1F1B with 2 stages per rank; layers
split as evenly as possible, the first stages taking the extra ones.

**Time of one block on one rank** (tokens n = microbatch × seq / CP):

* dense part: ``planner.transformer_profile.block_work`` (TP split, sequence parallel when TP > 1) without its
  attention core, timed by ``planner.efficiency``;
* attention: causal flash attention (SDPA): the forward's QKᵀ and PV over seq/CP queries and on
  average seq/2 keys, the backward 5 such GEMMs (2.5×), at the fitted GEMM fraction of peak, no
  s² bytes streamed;
* CP (ring attention): each forward passes K and V round the CP ring ((CP − 1) steps of
  2·n·kv/TP·2 bytes), the backward twice that (K, V and their gradients); the ring overlaps the
  attention: that part takes the longer of the two;
* TP with sequence parallelism: two all-gather + reduce-scatter pairs per block and pass
  (2 all-reduces' bytes of n·h·2) and one in the embedding's forward and the head's backward;
  added to compute, except with AsyncTP: overlapped with the block's compute (the longer of the two);
* activation checkpointing: ``full`` re-runs the block's forward (with its TP collectives) in the
  backward; ``selective`` is torchtitan's per-op policy for these configs: every second weight matmul
  of a block (wk, wo, w3 of wq, wk, wv, wo, w1, w3, w2) and all memory-bound kernels re-run, flash
  attention saved;
* Float8 (``nn.Linear`` of the blocks; not the output head): their GEMMs on the fp8 tensor cores at
  twice the bf16 peak, the same fitted fraction; dynamic casts stream 3 bytes per element cast
  (read 16-bit, write 8-bit): forward the input and weight, backward the output gradient and the
  input and weight again;
* torch.compile: **not modelled** — eager kernels (so compile rows should come out slower than
  measured: Table 1 shows compile alone at +16%).

**FSDP** (ZeRO-3 over the FSDP × CP ranks, as torchtitan shards over ``dp_shard_cp``): each block, the
embedding and the head are units; a unit's bf16 weights are all-gathered before its forward and again
before its backward and its gradients reduce-scattered in fp32 (torchtitan's reduce dtype); a pass over
the units is timed by the planner's rule, ``planner.sharding.fsdp_pass_s`` (one communicator, collectives
in issue order, unit j + 1's gather prefetched when unit j's compute starts, the first gather exposed,
a reduce-scatter issued when its unit's compute ends; the forward runs embedding → head, the backward
head → embedding).
With PP the weights stay gathered for the step (one all-gather, exposed before the pipeline) and the
gradients accumulate unsharded in fp32 and are reduce-scattered once after the last backward.

**Step**: without PP, the sum over units and passes, then the fused Adam step over the rank's shard
and the fitted per-iteration overhead; with PP, ``validation.groundtruth_closed_form.one_f_one_b_s`` (1F1B) or
the interleaved form of ``validation.groundtruth_published`` over the stages' per-microbatch costs
(p2p: a rank's sequence-parallel slice of the boundary activation over RDMA). Tokens/s per GPU =
local batch × seq / (step × TP × PP × CP), as torchtitan counts them.

**Memory per GPU** (GiB = 2³⁰ bytes; torchtitan reports the caching allocator's maximum *reserved*,
which also holds fragmentation this does not model): the sharded state (16 bytes per parameter of
the rank's stage over FSDP × CP, ``planner.sharding``); FSDP's gathered units — without PP two units
at once (the current and the prefetched one; bf16 weight, bf16 gradient and its fp32 copy), with PP the
stage's bf16 weights and fp32 gradients; the saved activations of the in-flight microbatches (full AC:
each block's input; selective: its input and the saved matmul outputs wq, wv, w1, w2, the attention
output and its log-sum-exp), in flight: 1 without PP, min(m, PP − r) on 1F1B's rank r, on interleaved
rank r min(m·v, (v − 1)·PP + 2·(PP − 1 − r) + 1) chunk-microbatches; one block's rebuilt activations
in its backward (``planner.closedforms.block_saved_bytes`` of the presets' flash attention: its fp32 log-sum-exp
in place of s² scores, which flash attention never stores); on the last stage the loss's logits, 10 bytes each (bf16 logits, their fp32 copy and its
gradient). The maximum over ranks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from planner.analytic import ModelSpecError, transformer_config
from planner.closedforms import BYTES_PER_PARAM, FLASH_BACKWARD_FACTOR, block_saved_bytes
from planner.transformer import PRESETS, TransformerConfig
from planner.transformer_profile import block_work, embedding_work, head_work, transformer_profile
from planner.efficiency import DeviceCalibration, EfficiencyParams, Gemm, Work, fit, optimizer_step_s, work_time_s
from planner.sharding import fsdp_pass_s, ring_bytes_per_rank, ring_time_s, sharded_state, sharding_traffic
from topologies.devices import DeviceKind, device_kind
from validation.groundtruth_closed_form import StageCosts, one_f_one_b_s
from validation.groundtruth_published import interleaved_pipe_s, published_lines
from validation.groundtruth_rows import GroundTruthError

TORCHTITAN_FILE = "torchtitan_llama3_h100_202412.csv"
TITAN_KIND = "h100-96gb-hbm2e"
GPUS_PER_HOST = 8
NVLINK_BYTES_PER_S = 450e9
RDMA_BYTES_PER_S = 400e9 / 8
#: torchtitan's Llama 3 training configs (the file leaves seq_len blank for Tables 1, 3, 4 and 5).
DEFAULT_SEQ = 8192
#: Stages per rank of torchtitan's looped (interleaved) schedules.
INTERLEAVED_STAGES_PER_RANK = 2
MODELS = {"Llama3.1-8B": "llama3-8b", "Llama3.1-70B": "llama3-70b", "Llama3.1-405B": "llama3-405b"}
#: The technique words the file's ``techniques`` column may join with '+', and what the closed form does with each.
TECHNIQUES = {"FSDP": "modelled", "2D": "modelled", "3D": "modelled", "4D": "modelled", "CP": "modelled",
              "Float8": "modelled", "AsyncTP": "modelled", "compile": "not modelled (eager kernels)"}
SCHEDULES = {"": 1, "1F1B": 1, "Interleaved 1F1B": INTERLEAVED_STAGES_PER_RANK}
CHECKPOINTING = ("selective", "full")
#: Bytes held per logit at the loss: bf16 logits, their fp32 copy and its gradient.
LOSS_BYTES_PER_LOGIT = 10.0
#: Bytes streamed per element a Float8 cast converts (read 16-bit, write 8-bit).
FLOAT8_CAST_BYTES = 3.0
GIB = 2.0 ** 30


@dataclass(frozen=True)
class TitanRow:
    """One row of the torchtitan file."""

    line: int
    table: int
    model: str
    gpus: int
    fsdp: int
    tp: int
    pp: int
    cp: int
    seq: int
    seq_given: bool
    local_batch: int
    activation_ckpt: str
    techniques: tuple[str, ...]
    schedule: str
    tps_per_gpu: float
    memory_gib: float

    @property
    def config(self) -> TransformerConfig:
        return replace(PRESETS[MODELS[self.model]], seq=self.seq)

    @property
    def chunks(self) -> int:
        return SCHEDULES[self.schedule]

    @property
    def microbatches(self) -> int:
        return self.pp if self.pp > 1 else 1

    @property
    def micro(self) -> int:
        return self.local_batch // self.microbatches

    def has(self, technique: str) -> bool:
        return technique in self.techniques


def read_torchtitan(path) -> list[TitanRow]:
    """The rows of the torchtitan CSV; a malformed line raises GroundTruthError naming file:line and what to fix."""
    p, lines = published_lines(path)
    rows = []
    for lineno, d in lines:
        where = f"{p}:{lineno}"
        try:
            ints = {k: int(d[k]) for k in ("table", "gpus", "fsdp", "tp", "pp", "cp", "local_batch")}
            seq = int(d["seq_len"]) if d["seq_len"] else DEFAULT_SEQ
            row = TitanRow(lineno, ints["table"], d["model"], ints["gpus"], ints["fsdp"], ints["tp"], ints["pp"],
                           ints["cp"], seq, bool(d["seq_len"]), ints["local_batch"], d["activation_ckpt"],
                           tuple(d["techniques"].split("+")), d["schedule"], float(d["tps_per_gpu"]),
                           float(d["memory_gib"]))
        except (KeyError, ValueError) as e:
            raise GroundTruthError(f"{where}: bad field ({e}); expected the columns of {TORCHTITAN_FILE}") from None
        if row.model not in MODELS:
            raise GroundTruthError(f"{where}: unknown model {row.model!r}; known: {', '.join(MODELS)}")
        unknown = [t for t in row.techniques if t not in TECHNIQUES]
        if unknown:
            raise GroundTruthError(f"{where}: unknown technique {unknown[0]!r}; known: {', '.join(TECHNIQUES)}")
        if row.schedule not in SCHEDULES:
            raise GroundTruthError(f"{where}: unknown schedule {row.schedule!r}; known: 1F1B, Interleaved 1F1B or blank")
        if row.activation_ckpt not in CHECKPOINTING:
            raise GroundTruthError(f"{where}: activation_ckpt must be one of {', '.join(CHECKPOINTING)}")
        if min(row.fsdp, row.tp, row.pp, row.cp) < 1 or row.fsdp * row.tp * row.pp * row.cp != row.gpus:
            raise GroundTruthError(f"{where}: fsdp × tp × pp × cp must equal gpus ({row.gpus}), each at least 1")
        if row.local_batch < 1 or row.seq < 1 or row.tps_per_gpu <= 0 or row.memory_gib <= 0:
            raise GroundTruthError(f"{where}: local_batch, seq_len (or blank), tps_per_gpu and memory_gib must be "
                                   f"positive")
        try:
            transformer_config(MODELS[row.model], row.tp)
        except ModelSpecError as e:
            raise GroundTruthError(f"{where}: {e}") from None
        if row.pp * row.chunks > row.config.layers:
            raise GroundTruthError(f"{where}: {row.pp * row.chunks} pipeline stages (pp × stages per rank) but "
                                   f"{row.model} has {row.config.layers} blocks; give pp of at most "
                                   f"{row.config.layers // row.chunks}")
        if row.local_batch % row.microbatches or row.seq % row.cp:
            raise GroundTruthError(f"{where}: local_batch must split into {row.microbatches} microbatches and "
                                   f"seq_len into {row.cp} CP shards")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- links
def group_bandwidth(stride: int, size: int) -> float:
    """Per-GPU bandwidth of a ring over ``size`` ranks ``stride`` apart: NVLink inside a host, RDMA across."""
    return NVLINK_BYTES_PER_S if stride * size <= GPUS_PER_HOST else RDMA_BYTES_PER_S


def _allreduce_s(nbytes: float, ranks: int, bw: float) -> float:
    """A ring all-reduce (or an all-gather + reduce-scatter pair) of an ``nbytes`` tensor."""
    return 2.0 * ring_time_s(ring_bytes_per_rank(nbytes, ranks), bw, ranks)


# ---------------------------------------------------------------------- compute
@dataclass(frozen=True)
class UnitCost:
    """One FSDP unit's seconds per microbatch (forward, backward with recomputation) and its parameters on one
    rank, and its activation bytes per microbatch (kept between passes, rebuilt in its backward); ``terms``:
    its forward + backward seconds split into ``TERMS`` (they add up to them)."""

    forward_s: float
    backward_s: float
    params: float
    kept_bytes: float
    rebuilt_bytes: float
    terms: tuple[tuple[str, float], ...] = ()


#: What a predicted step is made of (``TitanPrediction.terms``): kernels of the dense part (GEMMs and
#: memory-bound), attention (flash, or the CP ring where it is longer), recomputation, the TP collectives
#: left exposed, FSDP's collectives left exposed, the pipeline's fill, drain, p2p and last reduce-scatter and
#: step, and the rest (the optimizer step without PP, the per-iteration overhead).
TERMS = ("dense", "attention", "recompute", "tp", "fsdp", "pipeline", "other")


def _float8(work: Work, kind: DeviceKind, p: EfficiencyParams, backward: bool, layer: bool = True) -> float:
    """Seconds of a weight-GEMM work on the fp8 tensor cores with its dynamic casts."""
    fast = replace(kind, peak_flops=2.0 * kind.peak_flops)
    cast = sum(g.m * g.k + g.k * g.n + (g.m * g.n if backward else 0) for g in work.gemms) * FLOAT8_CAST_BYTES
    return work_time_s(replace(work, memory_bytes=work.memory_bytes + cast), fast, p, layer)


def block_cost(r: TitanRow, p: EfficiencyParams, params: float) -> UnitCost:
    """One transformer block on one rank for one microbatch (see the module docstring)."""
    kind = device_kind(TITAN_KIND)
    c, t, sp = r.config, r.tp, r.tp > 1
    sq = r.seq // r.cp
    local = replace(c, seq=sq)
    n = r.micro * sq
    whole, attn = block_work(local, r.micro, t, sp)
    nw = len(whole.gemms) - len(attn.gemms)
    dense = Work(whole.gemms[:nw], whole.memory_bytes - attn.memory_bytes, whole.kernels - attn.kernels,
                 weight_gemms=nw, weight_elements=whole.weight_elements)
    h, f, kv, a = c.hidden, c.ffn_size, c.kv_size, c.heads
    redo = Work((Gemm(n, kv // t, h), Gemm(n, h, h // t), Gemm(n, f // t, h)), dense.memory_bytes,
                dense.kernels - nw + 3, weight_gemms=3)
    if r.has("Float8"):
        dense_f, dense_b = _float8(dense, kind, p, False), _float8(dense.backward(), kind, p, True)
        redo_s = _float8(redo, kind, p, False, layer=False)
    else:
        dense_f, dense_b = work_time_s(dense, kind, p), work_time_s(dense.backward(), kind, p)
        redo_s = work_time_s(redo, kind, p, layer=False)
    flash_f = 4.0 * r.micro * sq * (r.seq / 2) * h / t / (kind.peak_flops * p.gemm_efficiency)
    kv_bytes = 2.0 * n * kv / t * 2.0
    ring_f = (r.cp - 1) * kv_bytes / group_bandwidth(r.tp, r.cp)
    attn_f, attn_b = max(flash_f, ring_f), max(FLASH_BACKWARD_FACTOR * flash_f, 2.0 * ring_f)
    tp_pass = 2.0 * _allreduce_s(n * h * 2.0, t, group_bandwidth(1, t)) if t > 1 else 0.0
    join = max if r.has("AsyncTP") else (lambda x, y: x + y)
    fwd = join(dense_f + attn_f, tp_pass)
    if r.activation_ckpt == "full":
        bwd = join(dense_b + attn_b + dense_f + attn_f, 2.0 * tp_pass)
    else:
        bwd = join(dense_b + attn_b + redo_s, tp_pass)
    rep = 1.0 / t if sp else 1.0
    if r.activation_ckpt == "full":
        kept = 2.0 * n * h * rep
    else:  # input, wq, wv, attention output, its log-sum-exp, w1, w2
        kept = 2.0 * n * h * rep + 2.0 * n * (h + kv + h + f) / t + 4.0 * n * a / t + 2.0 * n * h * rep
    rebuilt = block_saved_bytes(local, t, sp) * r.micro  # the presets' flash attention: log-sum-exp, no s² scores
    rec = dense_f + attn_f if r.activation_ckpt == "full" else redo_s
    work = dense_f + dense_b + attn_f + attn_b + rec
    terms = (("dense", dense_f + dense_b), ("attention", attn_f + attn_b), ("recompute", rec),
             ("tp", fwd + bwd - work))
    return UnitCost(fwd, bwd, params, kept, rebuilt, terms)


def _ends_cost(r: TitanRow, p: EfficiencyParams, emb_params: float, head_params: float) -> tuple[UnitCost, UnitCost]:
    """The embedding and the final norm + output head (bf16: Float8 leaves the output layer alone)."""
    kind = device_kind(TITAN_KIND)
    local = replace(r.config, seq=r.seq // r.cp)
    t, sp, n = r.tp, r.tp > 1, r.micro * local.seq
    tp_one = _allreduce_s(n * local.hidden * 2.0, t, group_bandwidth(1, t)) if t > 1 else 0.0
    e = embedding_work(local, r.micro, t, sp)
    hd = head_work(local, r.micro, t, sp)
    ef, eb = work_time_s(e, kind, p), work_time_s(e.backward(), kind, p)
    hf, hb = work_time_s(hd, kind, p) + p.loss_overhead_s, work_time_s(hd.backward(), kind, p)
    emb = UnitCost(ef + tp_one, eb, emb_params, 0.0, 0.0, (("dense", ef + eb), ("tp", tp_one)))
    logits = LOSS_BYTES_PER_LOGIT * n * local.vocab / t
    head = UnitCost(hf, hb + tp_one, head_params, 0.0, logits, (("dense", hf + hb), ("tp", tp_one)))
    return emb, head


def _terms(units: list[UnitCost], times: float = 1.0) -> dict[str, float]:
    out = dict.fromkeys(TERMS, 0.0)
    for u in units:
        for k, v in u.terms:
            out[k] += v * times
    return out


def stage_blocks(r: TitanRow) -> list[int]:
    """Blocks per pipeline stage (PP × chunks stages), as even as possible, the first stages taking the extra."""
    stages = r.pp * r.chunks
    q, extra = divmod(r.config.layers, stages)
    return [q + (1 if s < extra else 0) for s in range(stages)]


@dataclass(frozen=True)
class TitanPrediction:
    step_s: float
    tps_per_gpu: float
    memory_bytes: float
    terms: dict | None = None  # step seconds by TERMS (they add up to step_s)

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GIB


def _fsdp_s(params: float, r: TitanRow, gathers: int) -> tuple[float, float]:
    """(all-gather seconds, reduce-scatter seconds) of a unit of ``params`` per step over the FSDP × CP ranks."""
    ranks = r.fsdp * r.cp
    traffic = sharding_traffic(params, ranks, 3, gradient_bytes=4, weight_gathers=gathers)
    bw = group_bandwidth(r.tp, ranks)
    return ring_time_s(traffic.allgather_bytes, bw, ranks), ring_time_s(traffic.reduce_scatter_bytes, bw, ranks)


def predict_titan(r: TitanRow, cal: DeviceCalibration) -> TitanPrediction:
    """Step seconds, tokens/s per GPU and peak memory per GPU of one row (the module docstring's closed form)."""
    p = cal.params
    kind = device_kind(TITAN_KIND)
    prof = transformer_profile(replace(r.config, seq=r.seq // r.cp), TITAN_KIND, tensor_parallel=r.tp,
                               sequence_parallel=r.tp > 1)
    per = [l.param_bytes / BYTES_PER_PARAM for l in prof.layers]  # parameters on one TP rank
    block = block_cost(r, p, per[1])
    emb, head = _ends_cost(r, p, per[0], per[-1])
    blocks = stage_blocks(r)
    S, P, v, m = len(blocks), r.pp, r.chunks, r.microbatches
    units = [[block] * b for b in blocks]
    units[0].insert(0, emb)
    units[-1].append(head)
    shard = r.fsdp * r.cp
    if P == 1:
        us = units[0]
        ag, rs = zip(*(_fsdp_s(u.params, r, 2) for u in us))
        gather = [x / 2 for x in ag]  # one of its two all-gathers before each pass
        step = (fsdp_pass_s([u.forward_s for u in us], gather, [0.0] * len(us))
                + fsdp_pass_s([u.backward_s for u in us][::-1], gather[::-1], list(rs)[::-1]))
        params_rank = sum(u.params for u in units[0])
        terms = _terms(units[0])
        terms["other"] = optimizer_step_s(params_rank / shard, kind, p) + p.iteration_overhead_s
        terms["fsdp"] = step - sum(u.forward_s + u.backward_s for u in units[0])
        step += terms["other"]
        big = sorted((u.params for u in units[0]), reverse=True)[:2]
        held = sum(big) * (2 + 2 + 4)
        mem = (sharded_state(params_rank, shard, 3).total_bytes + held
               + sum(u.kept_bytes for u in units[0]) + block.rebuilt_bytes + head.rebuilt_bytes)
        return TitanPrediction(step, r.local_batch * r.seq / (step * r.tp * r.pp * r.cp), mem, terms)
    # pipeline: per rank (its v chunks), per microbatch
    rank_units = [[u for c in range(v) for u in units[c * P + k]] for k in range(P)]
    fwd = [sum(u.forward_s for u in us) for us in rank_units]
    bwd = [sum(u.backward_s for u in us) for us in rank_units]
    params = [sum(u.params for u in us) for us in rank_units]
    gathers, scatters = zip(*(_fsdp_s(x, r, 1) for x in params))
    steps = [optimizer_step_s(x / shard, kind, p) for x in params]
    n = r.micro * r.seq // r.cp
    hop = n * r.config.hidden * 2.0 / r.tp / RDMA_BYTES_PER_S  # a rank's slice of the boundary activation
    if v == 1:
        pipe = one_f_one_b_s(StageCosts(tuple(fwd), tuple(bwd), (hop,) * (P - 1), tuple(scatters), tuple(steps)), m)
    else:
        pipe = interleaved_pipe_s([f + b for f, b in zip(fwd, bwd)], m, v, hop) + max(
            s + o for s, o in zip(scatters, steps))
    step = max(gathers) + pipe + p.iteration_overhead_s
    slowest = max(range(P), key=lambda k: fwd[k] + bwd[k])
    terms = _terms(rank_units[slowest], m)
    terms.update(fsdp=max(gathers), other=p.iteration_overhead_s,
                 pipeline=pipe - m * (fwd[slowest] + bwd[slowest]))
    mems = []
    for k, us in enumerate(rank_units):
        if v == 1:
            inflight = min(m, P - k)
            kept = inflight * sum(u.kept_bytes for u in us)
        else:
            chunk_mbs = min(m * v, (v - 1) * P + 2 * (P - 1 - k) + 1)
            kept = chunk_mbs * sum(u.kept_bytes for u in us) / v
        loss = head.rebuilt_bytes if k == P - 1 else 0.0
        mems.append(sharded_state(params[k], shard, 3).total_bytes + params[k] * (2 + 4) + kept
                    + block.rebuilt_bytes + loss)
    return TitanPrediction(step, r.local_batch * r.seq / (step * r.tp * r.pp * r.cp), max(mems), terms)


# ---------------------------------------------------------------------- the H100 calibration (look 2)
#: The model of the calibration rows and the one technique they name (the module docstring's rule).
H100_CALIBRATION_MODEL = "Llama3.1-8B"
#: What the H100 fit fits; every other parameter is the A100 fit's.
H100_FITTED = ("gemm_efficiency",)
H100_CALIBRATION_RULE = (f"calibration iff model {H100_CALIBRATION_MODEL} with techniques FSDP alone (tp = pp = cp = 1; "
                         f"no torch.compile, Float8, AsyncTP); fitted: {', '.join(H100_FITTED)}, the other parameters "
                         f"the A100 (vTrain) fit's; every other row scored")


def is_h100_calibration_row(r: TitanRow) -> bool:
    """Whether a row is one of the H100 fit's calibration rows (never scored): the rule, not a line number."""
    return (r.model == H100_CALIBRATION_MODEL and r.techniques == ("FSDP",) and r.tp == 1 and r.pp == 1
            and r.cp == 1)


def measured_step_s(r: TitanRow) -> float:
    """The step seconds a row's tokens/s per GPU implies (the inverse of :func:`predict_titan`'s count)."""
    return r.local_batch * r.seq / (r.tps_per_gpu * r.tp * r.pp * r.cp)


def fit_h100(rows: list[TitanRow], a100: DeviceCalibration) -> DeviceCalibration:
    """The H100 calibration: ``H100_FITTED`` fitted by ``planner.efficiency.fit`` on the rows
    :func:`is_h100_calibration_row` picks (relative error of the step, i.e. of tokens/s per GPU), starting from
    ``a100``'s parameters and keeping the others; no block table (``a100``'s holds A100 seconds); fp32 gradients."""
    cal_rows = [r for r in rows if is_h100_calibration_row(r)]
    if not cal_rows:
        raise GroundTruthError(f"no H100 calibration row: the torchtitan file needs at least one {H100_CALIBRATION_MODEL} "
                               f"row whose techniques are FSDP alone")
    fixed = {f.name: getattr(a100.params, f.name) for f in fields(EfficiencyParams) if f.name not in H100_FITTED}
    shell = DeviceCalibration(TITAN_KIND, a100.params)
    res = fit(lambda p: [predict_titan(r, replace(shell, params=p)).step_s for r in cal_rows],
              [measured_step_s(r) for r in cal_rows], a100.params, fixed)
    lines = ", ".join(str(r.line) for r in cal_rows)
    return DeviceCalibration(TITAN_KIND, res.params, fitted_on=f"{TORCHTITAN_FILE} lines {lines} (tokens/s per GPU); "
                             f"other parameters from {a100.fitted_on or 'the given calibration'}",
                             rule=H100_CALIBRATION_RULE, n_rows=len(cal_rows),
                             rms_relative_error=res.rms_relative_error, gradient_bytes_per_param=4)


def score_torchtitan(rows, cal: DeviceCalibration) -> list[dict]:
    """Every row (a file's path or its :func:`read_torchtitan` rows) predicted and scored: tokens/s per GPU and
    memory, each with its relative error; ``calibration``: an H100 calibration row (:func:`titan_summary` leaves
    it out)."""
    out = []
    for r in (rows if isinstance(rows, list) else read_torchtitan(rows)):
        x = predict_titan(r, cal)
        not_modelled = [t for t in r.techniques if TECHNIQUES[t] != "modelled"]
        out.append({"line": r.line, "table": r.table, "model": r.model, "calibration": is_h100_calibration_row(r),
                    "gpus": r.gpus, "fsdp": r.fsdp, "tp": r.tp,
                    "pp": r.pp, "cp": r.cp, "seq": r.seq, "seq_assumed": not r.seq_given,
                    "local_batch": r.local_batch, "microbatches": r.microbatches, "activation_ckpt": r.activation_ckpt,
                    "techniques": "+".join(r.techniques), "schedule": r.schedule or "-",
                    "not_modelled": not_modelled, "measured_tps": r.tps_per_gpu,
                    "predicted_tps": round(x.tps_per_gpu, 2), "tps_error": round(x.tps_per_gpu / r.tps_per_gpu - 1, 6),
                    "measured_gib": r.memory_gib, "predicted_gib": round(x.memory_gib, 2),
                    "memory_error": round(x.memory_gib / r.memory_gib - 1, 6), "step_s": round(x.step_s, 4),
                    "step_terms_s": {k: round(v, 6) for k, v in x.terms.items()},
                    "method": "closed-form"})
    return out


def titan_summary(rows: list[dict]) -> dict:
    """MAPE of tokens/s and of memory over the scored rows (every row but the H100 calibration rows) and over those
    of them every technique of which is modelled (None where there is none)."""
    def mape(xs: list[dict], key: str) -> float | None:
        return sum(abs(x[key]) for x in xs) / len(xs) if xs else None

    scored = [x for x in rows if not x["calibration"]]
    clean = [x for x in scored if not x["not_modelled"]]
    return {"n_rows": len(scored), "n_calibration": len(rows) - len(scored), "mape_tps": mape(scored, "tps_error"),
            "mape_memory": mape(scored, "memory_error"), "n_all_modelled": len(clean),
            "mape_tps_all_modelled": mape(clean, "tps_error"), "mape_memory_all_modelled": mape(clean, "memory_error"),
            "rows": rows}
