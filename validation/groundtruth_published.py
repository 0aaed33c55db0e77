"""Extra ground truth: Korthikanti et al. 2022's Table 5 (22B–1T GPT on Selene, full vs selective recomputation).

Every row is TP 8 inside a DGX A100 80 GB node (NVLink 300 GB/s per GPU, eight 200 Gbit/s HDR
NICs per node: 200 GB/s per node), pipeline-parallel across nodes, some interleaved; "full" is full
recomputation of the blocks, "seqsel" is sequence parallelism plus selective recomputation (only the
attention core, ``Layer.attention_forward_s``, is re-run). Vocabulary 51,200 (already a multiple of
128·8). None of these rows is fitted on: they are predicted with the device calibration fitted on
vTrain's calibration rows — another cluster and another code base (Megatron-LM, not DeepSpeed), so
an out-of-sample check of the efficiency model, not a target.

The iteration is the closed form of ``validation.groundtruth_closed_form`` extended to interleaving with v
chunks per device: ``(m − 1)·max_s D_s + Σ_s D_s / v + 2·v·Σ c_s`` with D_s a device's forward +
backward of all its chunks per microbatch (Narayanan et al. 2021: the bubble shrinks by v, the p2p
count grows by v), then the Adam step. Too large to simulate on two cores (up to 512 GPUs, 512
microbatches, every TP rank a worker).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from planner.transformer import TransformerConfig
from planner.transformer_profile import transformer_profile
from planner.efficiency import DeviceCalibration, optimizer_step_s
from topologies.devices import device_kind
from topologies.presets import load_topology
from validation.groundtruth_closed_form import phases_time_s, tp_layer_s
from validation.groundtruth_rows import GroundTruthError

KORTHIKANTI_FILE = "korthikanti22_table5_via_calculon.csv"
SELENE_SPEC = "hier:8@nvswitch:3e+11,{nodes}@ib:2e+11,kind=a100-80gb"
VOCAB = 51200


@dataclass(frozen=True)
class PublishedRow:
    model: str
    hidden: int
    ffn: int
    heads: int
    layers: int
    seq: int
    gpus: int
    tp: int
    pp: int
    dp: int
    batch: int
    micro: int
    chunks: int
    recompute: str
    measured_s: float


def published_lines(path: str | Path) -> tuple[Path, list[tuple[int, dict[str, str]]]]:
    """A published CSV's data lines as (line number in the file, {column: cell}): ``#`` lines are its source
    notes, the first other line its header; a line with another number of cells than the header is refused,
    naming file:line."""
    p = Path(path)
    if not p.is_file():
        raise GroundTruthError(f"{p}: no such file")
    with p.open(encoding="utf-8-sig", newline="") as f:
        lines = [(i, l) for i, l in enumerate(f, 1) if l.strip() and not l.startswith("#")]
    if not lines:
        raise GroundTruthError(f"{p}: no header line; expected a CSV header after the '#' source lines")
    reader = csv.reader([l for _, l in lines])
    header = [h.strip() for h in next(reader)]
    out = []
    for (lineno, _), cells in zip(lines[1:], reader):
        if len(cells) != len(header):
            raise GroundTruthError(f"{p}:{lineno}: {len(cells)} cells where the header has {len(header)}")
        out.append((lineno, dict(zip(header, (c.strip() for c in cells)))))
    return p, out


def read_korthikanti(path: str | Path) -> list[PublishedRow]:
    p, lines = published_lines(path)
    rows = []
    for lineno, d in lines:
        try:
            rows.append(PublishedRow(d["model"], int(d["hidden"]), int(d["ffn"]), int(d["heads"]), int(d["layers"]),
                                     int(d["seq"]), int(d["num_gpus"]), int(d["tensor_parallel"]),
                                     int(d["pipeline_parallel"]), int(d["data_parallel"]), int(d["batch_size"]),
                                     int(d["microbatch_size"]), int(d["interleaving"]), d["recompute"],
                                     float(d["iteration_time_s"])))
        except (KeyError, ValueError) as e:
            raise GroundTruthError(f"{p}:{lineno}: bad field ({e})") from None
    return rows


def interleaved_pipe_s(per_device_s: list[float], microbatches: int, chunks: int, hop_s: float) -> float:
    """The pipeline of (interleaved) 1F1B with ``chunks`` per device: ``(m − 1)·max D + Σ D / v + 2·v·(P − 1)·hop``
    with D a device's forward + backward of all its chunks per microbatch (see the module docstring)."""
    P = len(per_device_s)
    return ((microbatches - 1) * max(per_device_s) + sum(per_device_s) / chunks
            + 2 * chunks * (P - 1) * hop_s)


def predict_published_s(r: PublishedRow, cal: DeviceCalibration) -> float:
    """The closed-form iteration seconds of one Table 5 row."""
    p = cal.params
    sp = r.recompute != "full"
    c = TransformerConfig(r.layers, r.hidden, r.heads, seq=r.seq, vocab=VOCAB, ffn=r.ffn)
    prof = transformer_profile(c, cal.kind.name, tensor_parallel=r.tp, sequence_parallel=sp, microbatch_size=r.micro,
                               efficiency=p, vocab_multiple=128)
    nodes = max(1, r.gpus // 8)
    topo = load_topology(SELENE_SPEC.format(nodes=nodes)) if nodes > 1 else load_topology("hier:8@nvswitch:3e+11,kind=a100-80gb")
    block, emb, head = prof.layers[1], prof.layers[0], prof.layers[-1]
    # every TP collective each layer issues (planner.tpcollectives), the backward's with what recomputation re-runs
    (ef, eb), (bf, bb), (hf, hb) = tp_layer_s(topo, [f"d{t}" for t in range(r.tp)], (emb, block, head), r.micro,
                                              r.recompute if r.recompute == "full" else "none")
    f_block = block.forward_s + bf
    extra = block.forward_s if r.recompute == "full" else block.attention_forward_s
    b_block = block.backward_s + bb + extra
    per_device = r.layers // r.pp
    m = r.batch // (r.micro * r.dp)
    d = [per_device * (f_block + b_block) for _ in range(r.pp)]
    d[0] += emb.forward_s + emb.backward_s + ef + eb
    d[-1] += head.forward_s + head.backward_s + hf + hb
    hop = 0.0
    if r.pp > 1:  # every TP rank of a node sends its activation to the next node at once
        nbytes = block.activation_bytes * r.micro
        hop = phases_time_s(topo, [[(f"d{t}", f"d{8 + t}", nbytes) for t in range(r.tp)]])
    pipe = interleaved_pipe_s(d, m, r.chunks, hop)
    params = (emb.param_bytes + per_device * block.param_bytes) / 4.0
    return pipe + optimizer_step_s(params, device_kind(cal.kind.name), p) + p.iteration_overhead_s


def score_korthikanti(path: str | Path, cal: DeviceCalibration) -> list[dict]:
    out = []
    for r in read_korthikanti(path):
        pred = predict_published_s(r, cal)
        out.append({"model": r.model, "gpus": r.gpus, "tp": r.tp, "pp": r.pp, "dp": r.dp, "chunks": r.chunks,
                    "micro_batch": r.micro, "global_batch": r.batch, "recompute": r.recompute,
                    "measured_s": r.measured_s, "predicted_s": round(pred, 4), "error": round(pred / r.measured_s - 1, 6),
                    "method": "closed-form"})
    return out
