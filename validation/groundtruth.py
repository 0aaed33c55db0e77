"""Ground truth on real GPUs: vTrain's published A100 runs expressed as pipetwin plans, predicted and scored.

Each row of ``ground_truth_single.csv`` (2–8 A100s) and ``ground_truth_multi.csv`` (64–512)
is a Megatron-DeepSpeed GPT run: TP × DP × PP, micro and global batch, full activation
recomputation, 1F1B. pipetwin expresses it as its own plan and predicts it:

* **Model**: ``planner.analytic.transformer_profile`` per TP rank (vocabulary 50,257 padded as
  Megatron pads it, to a multiple of 128·T), timed by the fitted kernel-level efficiency model
  (``planner.efficiency``) at the row's microbatch size.
* **Per-shape tier**: the calibration also holds a table of block times keyed by the block's GEMM shape
  (``planner.efficiency.BlockTiming``: hidden, heads, sequence, TP degree, microbatch), fitted on the
  calibration rows (``validation.shape_table``: the smooth model's block times scaled by one factor per
  shape, shrunk towards 1); a row whose shape is listed takes the table's block times, the others the
  smooth model, and each row says which (``block_timing``). Adopted by the calibration rows' own
  cross-validation (``validation.groundtruth_cv``), never by a scored row.
* **Cluster**: ``hier:8@nvswitch:1.5e+11,N@ib:1e+11,kind=a100-80gb`` — 8 A100s per node on
  NVLink at ~150 GB/s, one 800 Gbit/s link per node. The 80 GB part: the 175B rows keep
  2.7B parameters × 16 bytes per GPU, more than a 40 GB A100 holds.
* **Placement**: Megatron's rank order (TP fastest, then DP, then PP; rank r on device ``d{r}``,
  node r // 8). Layers: Megatron's even split of the L blocks over the P stages, the embedding
  on the first, the final norm and head on the last.
* **Iteration** (1F1B with flush): stage s's forward F_s (its layers plus their TP collectives on
  the real links: every one Megatron issues, ``planner.tpcollectives``, the cross entropy's three included) and
  backward B_s (the recomputed forward of its blocks, with their TP collectives, plus the backward and its TP
  collectives); p2p c_s between stage s and s + 1
  (every DP replica's and TP rank's activation at once, on the links they share);
  ``pipe = Σ(F_s + B_s) + (m − 1)·max(F_s + B_s) + 2·Σ c_s`` (warm-up, steady state, drain);
  stage s's last backward ends ``Σ_{j<s}(B_j + c_j)`` before the pipe ends; then its DP gradient
  all-reduce (fp32 or fp16 gradients, whichever the fit on the calibration rows prefers; all DP
  groups of the stage at once, ring or hierarchical as the simulator chooses) and its Adam step; plus the fitted per-iteration overhead. This is the
  **closed form**; where the simulator can run a row within the time budget it runs the same
  plan (``sim``, symmetry reductions on) and its figure is the prediction — each row says which.
  The command simulates every row whose estimated simulation time fits the per-row budget
  (``SIMULATE_BUDGET_S``): TP ranks and replicas folded by ``sim.fold`` — one worker per stage, or
  every TP rank of one replica per stage where the TP group spans servers (its ring crosses them, so
  its ranks differ) — so a TP ring on identical links is one flow per stage replica simulated; the
  summary's ``simulated_workers`` counts what the traces say was walked. The others take the closed
  form and their ``why_closed_form`` says so; the two agree to rounding on small cases (tests).
  Megatron's full recomputation re-runs the blocks only, so the simulated profile carries it folded
  into each block's backward (its forward time and its forward's TP all-reduces).

The calibration rule (fixed before any row was scored, never changed by looking at errors):
a row is a **calibration row** iff the SHA-256 of its canonical config string
(:func:`canonical_config`), read as a big-endian integer, is 0 mod 5 — a fixed, seeded ~20%
split over both files. The efficiency model is fitted on calibration rows only and every
other row is scored; a calibration row is never scored.

One module, longer than most, because the rule, the rows, their plans, the closed form and the
scoring are one argument read top to bottom; the per-shape tier's fit lives in ``validation.shape_table``,
the report in ``validation.groundtruth_report`` and the extra published table in
``validation.groundtruth_published``.
"""
from __future__ import annotations

import csv
import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from planner.analytic import (BYTES_PER_PARAM, MEGATRON_VOCAB_MULTIPLE, TransformerConfig, block_key, block_work,
                              embedding_work, head_work, transformer_profile)
from planner.efficiency import (DEFAULT_PARAMS, BlockKey, BlockTiming, DeviceCalibration, EfficiencyParams, Work, fit,
                                optimizer_step_s, work_time_s)
from planner.plan import Plan, StagePlan
from planner.profile import ModelProfile
from planner.recompute import backward_tp_collectives, layer_extra_forward_s, recomputed_tp_collectives
from planner.tpcollectives import NCCL_COLLECTIVE, collectives_time_s
from topologies.devices import device_kind
from topologies.errors import InputError
from topologies.presets import load_topology
from topologies.topology import Topology
from validation.shape_table import SHAPE_MIN_ROWS, SHAPE_PRIOR_ROWS, SHAPE_TABLE, fit_shape_table, predict_row_s

#: A row is a calibration row iff sha256(canonical config) mod CALIBRATION_MODULUS == 0.
CALIBRATION_MODULUS = 5
#: The rule, in words, as reports and calibration files record it.
CALIBRATION_RULE = ("calibration iff int(sha256(canonical config string), 16) % 5 == 0 "
                    "(canonical: file|gpus|global|micro|hidden|heads|layers|seq|tp|dp|pp)")
#: What every vTrain run shares (its README and the issue): A100s, 8 per node, vocabulary 50,257.
VTRAIN_KIND = "a100-80gb"
GPUS_PER_NODE = 8
NVLINK_BYTES_PER_S = 150e9
NODE_LINK_BYTES_PER_S = 800e9 / 8
VOCAB = 50257
#: Gradient bytes per parameter the DP all-reduce may send: fp32 main gradients (Megatron) or fp16
#: (DeepSpeed's fp16 engine); the fit picks one on the calibration rows (``fit_calibration``).
GRADIENT_BYTES_CHOICES = (4, 2)
FILES = {"single": "ground_truth_single.csv", "multi": "ground_truth_multi.csv"}
_COLUMNS = {"# GPUs": "gpus", "global batch": "global_batch", "micro batch": "micro_batch", "hidden size": "hidden",
            "attention heads": "heads", "# layers": "layers", "sequence length": "seq", "tensor parallelism": "tp",
            "data parallelism": "dp", "pipeline parallelism": "pp", "iteration time (ms)": "measured_ms"}


class GroundTruthError(InputError):
    """A ground-truth file that cannot be read; the message names file:line and what is wrong."""


def canonical_config(source: str, gpus: int, global_batch: int, micro_batch: int, hidden: int, heads: int,
                     layers: int, seq: int, tp: int, dp: int, pp: int) -> str:
    """The string a row's calibration membership is hashed from: its file stem and its configuration
    (never its measured time)."""
    return (f"{source}|gpus={gpus}|global={global_batch}|micro={micro_batch}|hidden={hidden}|heads={heads}"
            f"|layers={layers}|seq={seq}|tp={tp}|dp={dp}|pp={pp}")


def config_hash(canonical: str) -> int:
    """The SHA-256 of a canonical config string as a big-endian integer: what the calibration rule (and the
    calibration rows' cross-validation folds, ``validation.groundtruth_cv``) split rows by."""
    return int(hashlib.sha256(canonical.encode("utf-8")).hexdigest(), 16)


def is_calibration(canonical: str) -> bool:
    """True iff the row whose canonical config string is ``canonical`` belongs to the calibration set."""
    return config_hash(canonical) % CALIBRATION_MODULUS == 0


# ---------------------------------------------------------------------- rows
@dataclass(frozen=True)
class Row:
    """One measured run."""

    source: str  # "single" or "multi"
    line: int
    gpus: int
    global_batch: int
    micro_batch: int
    hidden: int
    heads: int
    layers: int
    seq: int
    tp: int
    dp: int
    pp: int
    measured_ms: float

    @property
    def canonical(self) -> str:
        return canonical_config(self.source, self.gpus, self.global_batch, self.micro_batch, self.hidden, self.heads,
                                self.layers, self.seq, self.tp, self.dp, self.pp)

    @property
    def calibration(self) -> bool:
        return is_calibration(self.canonical)

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def shape(self) -> str:
        return f"TP{self.tp}·DP{self.dp}·PP{self.pp}"

    @property
    def parallelism(self) -> str:
        """Which degrees exceed 1: "DP", "TP+PP", ...; "none" for one GPU."""
        used = [n for n, v in (("TP", self.tp), ("DP", self.dp), ("PP", self.pp)) if v > 1]
        return "+".join(used) or "none"

    @property
    def model(self) -> str:
        return f"h{self.hidden}·L{self.layers}·a{self.heads}·s{self.seq}"

    def config(self) -> dict:
        return {"source": self.source, "line": self.line, "gpus": self.gpus, "global_batch": self.global_batch,
                "micro_batch": self.micro_batch, "hidden": self.hidden, "heads": self.heads, "layers": self.layers,
                "seq": self.seq, "tp": self.tp, "dp": self.dp, "pp": self.pp}


def read_rows(path: Path, source: str) -> list[Row]:
    """The rows of one vTrain CSV (UTF-8 with or without BOM); a malformed line raises GroundTruthError naming it."""
    if not path.is_file():
        raise GroundTruthError(f"{path}: no such file; give --data the folder holding {', '.join(FILES.values())}")
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise GroundTruthError(f"{path}:1: the file is empty; expected a header with {', '.join(_COLUMNS)}") from None
        missing = [c for c in _COLUMNS if c not in header]
        if missing:
            raise GroundTruthError(f"{path}:1: the header lacks {', '.join(repr(m) for m in missing)}")
        index = {_COLUMNS[c]: header.index(c) for c in _COLUMNS}
        rows = []
        for lineno, cells in enumerate(reader, 2):
            if not cells or not any(c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise GroundTruthError(f"{path}:{lineno}: {len(cells)} fields, the header has {len(header)}")
            vals: dict = {}
            for key, i in index.items():
                text = cells[i].strip()
                try:
                    v = float(text)
                except ValueError:
                    raise GroundTruthError(f"{path}:{lineno}: {key}={text!r} is not a number") from None
                if key != "measured_ms":
                    if v != int(v) or v < 1:
                        raise GroundTruthError(f"{path}:{lineno}: {key}={text!r} must be a positive whole number")
                    v = int(v)
                elif not (v > 0 and math.isfinite(v)):
                    raise GroundTruthError(f"{path}:{lineno}: iteration time {text!r} must be a positive number of ms")
                vals[key] = v
            rows.append(Row(source, lineno, **vals))
    return rows


def load_rows(data: str | Path) -> list[Row]:
    """Both vTrain files from the folder ``data``, single-node rows first."""
    d = Path(data)
    if not d.is_dir():
        raise GroundTruthError(f"{d}: not a folder; give --data the folder holding {', '.join(FILES.values())}")
    return [r for source, name in FILES.items() for r in read_rows(d / name, source)]


def why_not_expressible(row: Row) -> str | None:
    """None when pipetwin can express ``row`` as a plan, else why not."""
    if row.tp * row.dp * row.pp != row.gpus:
        return f"TP·DP·PP = {row.tp * row.dp * row.pp} is not the {row.gpus} GPUs"
    if row.global_batch % (row.micro_batch * row.dp):
        return f"global batch {row.global_batch} is not a multiple of micro {row.micro_batch} × DP {row.dp}"
    if row.heads % row.tp or row.hidden % row.heads:
        return f"TP {row.tp} does not divide the {row.heads} heads (or heads do not divide hidden {row.hidden})"
    if row.layers < row.pp:
        return f"{row.layers} layers cannot fill {row.pp} pipeline stages"
    return None


# ---------------------------------------------------------------------- the plan
def row_config(row: Row) -> TransformerConfig:
    return TransformerConfig(row.layers, row.hidden, row.heads, seq=row.seq, vocab=VOCAB)


def topology_spec(gpus: int, collectives: str | None = None) -> str:
    """The row's cluster as a topology spec; ``collectives`` (default ``COLLECTIVES``) how its all-reduces are timed."""
    nodes = -(-gpus // GPUS_PER_NODE)
    inter = f",{nodes}@ib:{NODE_LINK_BYTES_PER_S:g}" if nodes > 1 else ""
    mode = COLLECTIVES if collectives is None else collectives
    tail = "" if mode == "ideal" else f",collectives={mode}"
    return f"hier:{GPUS_PER_NODE}@nvswitch:{NVLINK_BYTES_PER_S:g}{inter},kind={VTRAIN_KIND}{tail}"


def device_of(row: Row, pp: int, dp: int, tp: int) -> str:
    """Megatron's rank order: TP fastest, then DP, then PP; rank r on device d{r}."""
    return f"d{(pp * row.dp + dp) * row.tp + tp}"


def stage_layer_ranges(row: Row) -> list[tuple[int, int]]:
    """(first, last) chain index per stage: Megatron's even split of the blocks (a remainder goes to the
    first stages), the embedding (index 0) on the first stage and the head (index L + 1) on the last."""
    base, extra = divmod(row.layers, row.pp)
    out, first = [], 1
    for s in range(row.pp):
        n = base + (1 if s < extra else 0)
        out.append((0 if s == 0 else first, first + n - 1 + (1 if s == row.pp - 1 else 0)))
        first += n
    return out


#: How the rows' all-reduces are timed (``topologies.ncclcost``): "ideal" (latency + bytes / bandwidth on the links) or
#: "nccl" (NCCL's protocol choice, bandwidth fractions and latency). Chosen by the adoption rule of
#: ``validation.groundtruth_cv`` on the calibration rows alone (its docstring), never by a scored row.
COLLECTIVES = "ideal"
#: The recomputation every vTrain row runs (Megatron's full recomputation; ``planner.recompute`` says what it re-runs).
ROW_RECOMPUTE = "full"


def row_plan(row: Row, collectives: str | None = None) -> Plan:
    """The row as a pipetwin plan: P stages of DP replicas, each a TP group of T devices (Megatron's rank
    order), full recomputation, 1F1B, global / micro microbatches per batch (the replicas take them
    round-robin, so each runs global / (micro · DP))."""
    stages = tuple(StagePlan(a, b, row.dp, tuple(device_of(row, s, d, t) for d in range(row.dp) for t in range(row.tp)))
                   for s, (a, b) in enumerate(stage_layer_ranges(row)))
    return Plan(model=row_config(row).spec(), stages=stages, schedule="1f1b", microbatch_size=row.micro_batch,
                microbatches=row.microbatches * row.dp, topology=topology_spec(row.gpus, collectives), tensor_parallel=row.tp,
                recompute=ROW_RECOMPUTE)


# ---------------------------------------------------------------------- links
def phases_time_s(topology: Topology, phases: list[list[tuple[str, str, float]]]) -> float:
    """Time of collective phases on the real links, each phase's flows started together: per phase, the
    slowest flow's route latency plus its most loaded link's bytes over that link's bandwidth (the
    max-min fair share of equal flows). A phase object repeated in ``phases`` is timed once."""
    edges = topology.graph.edges
    links: dict[tuple[str, str], tuple[float, float]] = {}
    memo: dict[int, float] = {}
    total = 0.0
    for phase in phases:
        t_phase = memo.get(id(phase))
        if t_phase is None:
            load: dict[tuple[str, str], float] = {}
            routes = []
            for src, dst, nbytes in phase:
                hops = topology.route(src, dst)
                routes.append(hops)
                for hop in hops:
                    load[hop] = load.get(hop, 0.0) + nbytes
                    if hop not in links:
                        link = edges[hop]["link"]
                        links[hop] = (link.bandwidth_bytes_per_s, link.latency_s)
            t_phase = 0.0
            for hops in routes:
                t = 0.0
                lat = 0.0
                for hop in hops:
                    bw, l = links[hop]
                    lat += l
                    t = max(t, load[hop] / bw)
                t_phase = max(t_phase, lat + t)
            memo[id(phase)] = t_phase
        total += t_phase
    return total


def _ring(devices: list[str], nbytes: float) -> list[list[tuple[str, str, float]]]:
    from sim.collectives import ring_phases

    return ring_phases(devices, nbytes)


def tp_layer_s(topology: Topology, group: list[str], layers, microbatch: int,
               recompute: str = "none") -> tuple[tuple[float, float], ...]:
    """Per layer of ``layers``: (forward, backward) seconds of its TP collectives (``Layer.tp_collectives``, every
    one as issued; the backward's with what ``recompute`` re-runs), each a ring of its kind over ``group`` priced
    as the simulator prices it (``sim.collectives.priced``: an all-gather or a reduce-scatter half an
    all-reduce's ring; then the tail NCCL's latency adds)."""
    from sim.collectives import priced, ring_pass_phases, ring_phases

    seen: dict[tuple[str, float], float] = {}

    def price(kind: str, nbytes: float) -> float:
        t = seen.get((kind, nbytes))
        if t is None:
            ring = ring_phases if kind == "all-reduce" else ring_pass_phases
            ph, tail = priced(topology, group, ring(group, nbytes), nbytes, NCCL_COLLECTIVE[kind])
            t = seen[(kind, nbytes)] = phases_time_s(topology, ph) + tail
        return t

    if len(group) < 2:
        return tuple((0.0, 0.0) for _ in layers)
    return tuple((collectives_time_s(l.tp_forward, microbatch, price),
                  collectives_time_s(backward_tp_collectives(l, recompute), microbatch, price)) for l in layers)


def _merged(groups: list[list[list[tuple[str, str, float]]]]) -> list[list[tuple[str, str, float]]]:
    """Phases of several same-shaped collectives run at once: phase k holds every group's phase k
    (phases that repeat in every group stay one object, so ``phases_time_s`` times them once)."""
    n = max((len(g) for g in groups), default=0)
    made: dict[tuple[int, ...], list] = {}
    out = []
    for k in range(n):
        key = tuple(id(g[k]) if k < len(g) else 0 for g in groups)
        if key not in made:
            made[key] = [f for g in groups if k < len(g) for f in g[k]]
        out.append(made[key])
    return out


@dataclass(frozen=True)
class Links:
    """A row's communication times (independent of the efficiency parameters).

    Attributes:
        tp_s: per stage, for the embedding, a block and the head: (forward, backward) seconds of one microbatch's
            TP collectives (every one the layer issues, ``planner.tpcollectives``; a re-run forward's are the
            forward's), rings over the TP group of replica 0, the other groups on private links.
        p2p_s: per stage boundary s → s + 1, every replica's and TP rank's activation at once.
        dp_allreduce_s: per gradient bytes per parameter (4: fp32, 2: fp16), per stage, the gradient
            all-reduce of all its DP groups at once.
        algorithm: the all-reduce algorithm (the simulator's choice).
    """

    tp_s: tuple[tuple[tuple[float, float], ...], ...]
    p2p_s: tuple[float, ...]
    dp_allreduce_s: dict[int, tuple[float, ...]]
    algorithm: str


def row_links(row: Row, profile: ModelProfile, topology: Topology,
              gradient_bytes: tuple[int, ...] = GRADIENT_BYTES_CHOICES) -> Links:
    """The row's link times; every all-reduce priced by the topology's collectives mode as the simulator prices it
    (``sim.collectives.priced``: its phases, then the tail NCCL's latency adds)."""
    from sim.collectives import allreduce_phases, priced

    ranges = stage_layer_ranges(row)
    tp, p2p = [], []
    dp: dict[int, list[float]] = {g: [] for g in gradient_bytes}
    algorithm = "ring"
    kinds = (profile.layers[0], profile.layers[1], profile.layers[-1])  # embedding, a block, head
    for s, (a, b) in enumerate(ranges):
        group = [device_of(row, s, 0, t) for t in range(row.tp)]
        tp.append(tp_layer_s(topology, group, kinds, row.micro_batch, "none"))
        if s + 1 < row.pp:
            nbytes = profile.boundary_bytes(b) * row.micro_batch
            flows = [(device_of(row, s, d, t), device_of(row, s + 1, d, t), nbytes)
                     for d in range(row.dp) for t in range(row.tp)]
            p2p.append(phases_time_s(topology, [flows]))
        for g in gradient_bytes:
            grad = profile.param_bytes(a, b) / BYTES_PER_PARAM * g
            if row.dp > 1:
                groups, tail = [], 0.0
                for t in range(row.tp):
                    devs = [device_of(row, s, d, t) for d in range(row.dp)]
                    ph, algorithm = allreduce_phases(topology, devs, grad, "auto")
                    ph, tail_t = priced(topology, devs, ph, grad)
                    groups.append(ph)
                    tail = max(tail, tail_t)
                dp[g].append(phases_time_s(topology, _merged(groups)) + tail)
            else:
                dp[g].append(0.0)
    return Links(tuple(tp), tuple(p2p), {g: tuple(v) for g, v in dp.items()}, algorithm)


# ---------------------------------------------------------------------- the closed form
@dataclass(frozen=True)
class StageCosts:
    """Per stage: forward and backward seconds per microbatch (TP collectives and recomputation in),
    p2p seconds to the next stage, DP all-reduce and optimizer step seconds."""

    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]
    p2p_s: tuple[float, ...]
    allreduce_s: tuple[float, ...]
    step_s: tuple[float, ...]


def pipe_s(c: StageCosts, microbatches: int) -> float:
    """1F1B's pipeline until its drain ends: every stage's forward + backward of one microbatch, the others at
    the slowest stage, and the sends both ways (what :func:`one_f_one_b_s` adds each stage's all-reduce to)."""
    fb = [f + b for f, b in zip(c.forward_s, c.backward_s)]
    return sum(fb) + (microbatches - 1) * max(fb) + 2.0 * sum(c.p2p_s)


def one_f_one_b_s(c: StageCosts, microbatches: int) -> float:
    """1F1B with flush: warm-up, steady state at the slowest stage, drain, then each stage's all-reduce
    and step after its last backward (see the module docstring)."""
    fb = [f + b for f, b in zip(c.forward_s, c.backward_s)]
    pipe = pipe_s(c, microbatches)
    end, back = 0.0, 0.0
    for s in range(len(fb)):
        end = max(end, pipe - back + c.allreduce_s[s] + c.step_s[s])
        back += c.backward_s[s] + (c.p2p_s[s] if s < len(c.p2p_s) else 0.0)
    return end


def stage_costs_from_profile(row: Row, profile: ModelProfile, links: Links, kind_name: str,
                             params: EfficiencyParams, gradient_bytes: int = 4) -> StageCosts:
    """Stage costs from a per-rank profile (timed at the row's microbatch) with the row's recomputation, as
    ``planner.recompute`` adds it to each layer's backward."""
    kind = device_kind(kind_name)
    fs, bs, steps = [], [], []
    last = len(profile.layers) - 1
    for s, (a, b) in enumerate(stage_layer_ranges(row)):
        f = bwd = 0.0
        nparams = 0.0
        for i in range(a, b + 1):  # the row's blocks are one shape: links.tp_s times the embedding, a block, the head
            layer = profile.layers[i]
            tf, tb = links.tp_s[s][0 if i == 0 else 2 if i == last else 1]
            rerun = tf if recomputed_tp_collectives(layer, ROW_RECOMPUTE) else 0.0  # the re-run forward's collectives
            f += layer.forward_s + tf
            bwd += layer.backward_s + layer_extra_forward_s(layer, ROW_RECOMPUTE) + tb + rerun
            nparams += layer.param_bytes / BYTES_PER_PARAM
        fs.append(f)
        bs.append(bwd)
        steps.append(optimizer_step_s(nparams, kind, params))
    return StageCosts(tuple(fs), tuple(bs), links.p2p_s, links.dp_allreduce_s[gradient_bytes], tuple(steps))


def row_block_key(row: Row) -> BlockKey:
    """The row's block shape as a calibration's per-shape table keys it."""
    return block_key(row_config(row), row.tp, row.micro_batch)


def row_profile(row: Row, params: EfficiencyParams, kind: str = VTRAIN_KIND,
                timing: BlockTiming | None = None) -> ModelProfile:
    return transformer_profile(row_config(row), kind, tensor_parallel=row.tp, microbatch_size=row.micro_batch,
                               efficiency=params, vocab_multiple=MEGATRON_VOCAB_MULTIPLE, block_timing=timing)


@dataclass
class RowModel:
    """A row made ready for fast repeated prediction: its kernel inventories and link times, computed once."""

    row: Row
    links: Links
    works: tuple[Work, Work, Work]  # embedding, block, head (forward)
    params_per_stage: tuple[float, ...]
    blocks_per_stage: tuple[int, ...]
    #: per (embedding, block, head): the share of its forward the row's recomputation re-runs in its backward
    #: and whether that re-runs the forward's TP collectives (``planner.recompute`` on the row's profile layers)
    rerun: tuple[float, float, float]
    rerun_tp: tuple[bool, bool, bool]
    kind: str = VTRAIN_KIND
    _bwd: tuple[Work, Work, Work] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._bwd = tuple(w.backward() for w in self.works)

    @property
    def key(self) -> BlockKey:
        return row_block_key(self.row)

    def smooth_block_s(self, p: EfficiencyParams) -> tuple[float, float]:
        """A block's forward and backward seconds by the smooth model."""
        k = device_kind(self.kind)
        return work_time_s(self.works[1], k, p), work_time_s(self._bwd[1], k, p)

    def stage_costs(self, p: EfficiencyParams, gradient_bytes: int = 4,
                    block: tuple[float, float] | None = None) -> StageCosts:
        """Stage costs; ``block``: a block's (forward, backward) seconds instead of the smooth model's."""
        k = device_kind(self.kind)
        (ef, bf, hf), (eb, bb, hb) = ([work_time_s(w, k, p) for w in ws] for ws in (self.works, self._bwd))
        if block is not None:
            bf, bb = block
        hf += p.loss_overhead_s  # as planner.analytic adds it to the head's forward
        tp = self.links.tp_s
        P = self.row.pp
        fs, bs, steps = [], [], []
        (re, rb, rh), (xe, xb, xh) = self.rerun, self.rerun_tp
        for s in range(P):
            n = self.blocks_per_stage[s]
            (tef, teb), (tbf, tbb), (thf, thb) = tp[s]
            f = n * (bf + tbf)
            b = n * (bb + rb * bf + tbb + (tbf if xb else 0.0))
            if s == 0:
                f += ef + tef
                b += eb + re * ef + teb + (tef if xe else 0.0)
            if s == P - 1:
                f += hf + thf
                b += hb + rh * hf + thb + (thf if xh else 0.0)
            fs.append(f)
            bs.append(b)
            steps.append(optimizer_step_s(self.params_per_stage[s], k, p))
        return StageCosts(tuple(fs), tuple(bs), self.links.p2p_s, self.links.dp_allreduce_s[gradient_bytes],
                          tuple(steps))

    def predict_s(self, p: EfficiencyParams, gradient_bytes: int = 4, block: tuple[float, float] | None = None) -> float:
        return (one_f_one_b_s(self.stage_costs(p, gradient_bytes, block), self.row.microbatches)
                + p.iteration_overhead_s)


#: The closed form's terms, in the order they add up (``closed_form_terms_s``).
TERMS = ("compute", "tp_comm", "fill_drain", "p2p", "dp_tail", "overhead")


def closed_form_terms_s(m: RowModel, cal: DeviceCalibration) -> dict[str, float]:
    """The closed form's seconds under ``cal`` split into terms that add up to it (``TERMS``), so a row's
    error can be read against what the model thinks the time is made of:

    * ``compute``: m microbatches of the slowest stage's forward + backward (recomputation included),
      TP collectives left out;
    * ``tp_comm``: those microbatches' TP collectives on the slowest stage;
    * ``fill_drain``: the pipeline bubble, the other stages' forward + backward of one microbatch;
    * ``p2p``: the activation and gradient sends along the pipeline (2·Σ c_s);
    * ``dp_tail``: what the DP gradient all-reduce and the Adam step add after the pipe drains;
    * ``overhead``: the fitted per-iteration overhead.
    """
    p, g = cal.params, cal.gradient_bytes_per_param
    t = cal.block_timing(m.key)
    block = (t.forward_s, t.backward_s) if t else None
    c = m.stage_costs(p, g, block)
    no_tp = replace(m, links=replace(m.links, tp_s=tuple(((0.0, 0.0),) * 3 for _ in m.links.tp_s)))
    bare = no_tp.stage_costs(p, g, block)
    fb = [f + b for f, b in zip(c.forward_s, c.backward_s)]
    fb_bare = [f + b for f, b in zip(bare.forward_s, bare.backward_s)]
    s = max(range(len(fb)), key=fb.__getitem__)
    M = m.row.microbatches
    pipe = pipe_s(c, M)
    return {"compute": M * fb_bare[s], "tp_comm": M * (fb[s] - fb_bare[s]), "fill_drain": sum(fb) - fb[s],
            "p2p": 2.0 * sum(c.p2p_s), "dp_tail": one_f_one_b_s(c, M) - pipe, "overhead": p.iteration_overhead_s}


def row_model(row: Row, topologies: dict[str, Topology] | None = None, collectives: str | None = None) -> RowModel:
    """Precompute ``row``'s link times and kernel inventories (the link times do not depend on the fit);
    ``collectives``: the topology's collectives mode (default ``COLLECTIVES``)."""
    spec = topology_spec(row.gpus, collectives)
    topologies = {} if topologies is None else topologies
    topo = topologies.get(spec) or topologies.setdefault(spec, load_topology(spec))
    prof = row_profile(row, DEFAULT_PARAMS)
    links = row_links(row, prof, topo)
    c, b, t = row_config(row), row.micro_batch, row.tp
    works = (embedding_work(c, b, t, False, MEGATRON_VOCAB_MULTIPLE), block_work(c, b, t)[0],
             head_work(c, b, t, False, MEGATRON_VOCAB_MULTIPLE))
    ranges = stage_layer_ranges(row)
    params = tuple(prof.param_bytes(a, z) / BYTES_PER_PARAM for a, z in ranges)
    blocks = tuple(sum(1 for i in range(a, z + 1) if 1 <= i <= row.layers) for a, z in ranges)
    kinds = (prof.layers[0], prof.layers[1], prof.layers[-1])  # embedding, a block, head
    rerun = tuple(layer_extra_forward_s(l, ROW_RECOMPUTE) / l.forward_s if l.forward_s else 0.0 for l in kinds)
    rerun_tp = tuple(bool(recomputed_tp_collectives(l, ROW_RECOMPUTE)) for l in kinds)
    return RowModel(row, links, works, params, blocks, rerun, rerun_tp)


# ---------------------------------------------------------------------- the simulator
#: Simulate a row only when its estimated simulation time (:func:`simulation_cost_s`) is at most this on one
#: core: the 2-core, 2-minute budget of the whole command. The other rows take the closed form, and say why.
SIMULATE_BUDGET_S = 1.0
#: Seconds per compute action of the program generated and checked (every DP replica, TP rank 0's slice:
#: lowering, ``planner.check``, the trace's copies) and per event the folded simulation walks (a compute
#: action or a TP all-reduce of a simulated worker); measured on this 2-core machine.
LOWERING_S_PER_ACTION = 1e-4
SIMULATION_S_PER_EVENT = 1e-4


def simulated_workers(row: Row) -> int:
    """Workers the simulator walks for ``row``: one per stage (``sim.fold`` folds the TP ranks and the
    replicas), every TP rank of one replica where the TP group spans servers (its ring crosses them, so
    its ranks differ). ``tests/test_groundtruth.py`` holds this to ``sim.engine.workers_simulated``."""
    return row.pp * (row.tp if row.tp > GPUS_PER_NODE else 1)


def simulation_cost_s(row: Row) -> float:
    """Estimated single-core seconds to simulate ``row`` (see ``SIMULATE_BUDGET_S``)."""
    blocks = -(-row.layers // row.pp)
    per_mb = 2 + (6 * blocks + 3 if row.tp > 1 else 0)  # F and B, with 2 + 4 TP all-reduces per block (recomputed)
    events = simulated_workers(row) * row.microbatches * per_mb
    actions = row.gpus // row.tp * 2 * row.microbatches
    return LOWERING_S_PER_ACTION * actions + SIMULATION_S_PER_EVENT * events


def why_closed_form(row: Row) -> str:
    """'' when the command simulates ``row``, else why the closed form stands in."""
    cost = simulation_cost_s(row)
    if cost <= SIMULATE_BUDGET_S:
        return ""
    return (f"simulation estimated at {cost:.1f} s ({simulated_workers(row)} workers simulated × "
            f"{row.microbatches} microbatches), over the {SIMULATE_BUDGET_S:g} s per-row budget")


def simulate_row_s(row: Row, params: EfficiencyParams, topologies: dict[str, Topology] | None = None,
                   kind: str = VTRAIN_KIND, gradient_bytes: int = 4, timing: BlockTiming | None = None,
                   collectives: str | None = None) -> float:
    """The row's iteration seconds by pipetwin's SimPy simulator (``simulate_row``)."""
    return simulate_row(row, params, topologies, kind, gradient_bytes, timing, collectives)[0]


def simulate_row(row: Row, params: EfficiencyParams, topologies: dict[str, Topology] | None = None,
                 kind: str = VTRAIN_KIND, gradient_bytes: int = 4, timing: BlockTiming | None = None,
                 collectives: str | None = None) -> tuple[float, int]:
    """(iteration seconds, workers the simulator walked) of the row by pipetwin's SimPy simulator: the plan (with
    its recomputation, which the simulator times by ``planner.recompute``) lowered to its program, the Adam step as
    the slowest stage's, plus the fitted per-iteration overhead. The simulator all-reduces a stage's ``param_bytes``
    (4 per parameter); with ``gradient_bytes`` 2 the simulated profile's ``param_bytes`` are scaled to the
    gradient's size (its memory figures, unused here, then count 2 bytes per parameter)."""
    from sim.engine import simulate_plan
    from sim.params import SimParams
    from planner.trace import makespan_s

    spec = topology_spec(row.gpus, collectives)
    topologies = {} if topologies is None else topologies
    topo = topologies.get(spec) or topologies.setdefault(spec, load_topology(spec))
    prof = row_profile(row, params, kind, timing)
    k = device_kind(kind)
    step = max(optimizer_step_s(prof.param_bytes(a, z) / BYTES_PER_PARAM, k, params) for a, z in stage_layer_ranges(row))
    prof = replace(prof, layers=tuple(replace(l, param_bytes=l.param_bytes * gradient_bytes / BYTES_PER_PARAM)
                                      for l in prof.layers))
    plan = row_plan(row, collectives)
    trace = simulate_plan(plan, prof, topo, SimParams(step_time_s=step, link_events=False))
    return makespan_s(trace) + params.iteration_overhead_s, trace.meta["workers_simulated"]


# ---------------------------------------------------------------------- scoring
@dataclass(frozen=True)
class Scored:
    row: Row
    predicted_ms: float
    method: str  # "simulated" or "closed-form"
    closed_form_ms: float
    why_closed_form: str = ""  # why the closed form replaced simulation ("" when simulated)
    block_timing: str = "smooth"  # "shape-table": the calibration's per-shape block time; "smooth": the 7 parameters
    terms_ms: dict[str, float] = field(default_factory=dict, compare=False)  # the closed form split (``closed_form_terms_s``)
    workers_simulated: int = 0  # workers the simulator walked (the trace's own count; 0 under the closed form)

    @property
    def error(self) -> float:
        return self.predicted_ms / self.row.measured_ms - 1.0

    def to_dict(self) -> dict:
        d = self.row.config()
        d.update(measured_ms=self.row.measured_ms, predicted_ms=round(self.predicted_ms, 4), error=round(self.error, 6),
                 calibration=self.row.calibration, method=self.method, closed_form_ms=round(self.closed_form_ms, 4),
                 why_closed_form=self.why_closed_form, block_timing=self.block_timing,
                 workers_simulated=self.workers_simulated, shape=self.row.shape, parallelism=self.row.parallelism,
                 closed_form_terms_ms={k: round(v, 4) for k, v in self.terms_ms.items()})
        return d


@dataclass(frozen=True)
class GroundTruth:
    scored: tuple[Scored, ...]
    skipped: tuple[tuple[Row, str], ...]
    calibration: DeviceCalibration
    seconds: float
    collectives: str = "ideal"  # how the all-reduces were timed (``COLLECTIVES``, ``topologies.ncclcost``)

    def rows(self, calibration: bool | None = None, source: str | None = None) -> list[Scored]:
        return [s for s in self.scored if (calibration is None or s.row.calibration == calibration)
                and (source is None or s.row.source == source)]

    def summary(self) -> dict:
        test = self.rows(calibration=False)
        mape = lambda xs: (sum(abs(x.error) for x in xs) / len(xs)) if xs else float("nan")
        sim = [s for s in self.scored if s.method == "simulated"]
        worst = max(test, key=lambda s: abs(s.error), default=None)
        hits, groups = best_pick(test)
        return {
            "mape_single": mape(self.rows(False, "single")),
            "mape_multi": mape(self.rows(False, "multi")),
            "max_abs_error": abs(worst.error) if worst else float("nan"),
            "n_scored": len(test),
            "n_calibration": len(self.rows(calibration=True)),
            "n_skipped": len(self.skipped),
            "n_simulated": len(sim),
            "n_closed_form": len(self.scored) - len(sim),
            "simulated_workers": simulated_workers_summary(sim),
            "n_shape_table": sum(1 for s in test if s.block_timing == "shape-table"),
            "max_sim_vs_closed_form": max((abs(s.predicted_ms / s.closed_form_ms - 1) for s in sim), default=0.0),
            "best_in_top3": hits,
            "best_groups": groups,
            "calibration_rms": self.calibration.rms_relative_error,
            "collectives": self.collectives,
            "seconds": self.seconds,
        }


def simulated_workers_summary(sim: list[Scored]) -> dict:
    """What the simulator walked on the simulated rows, from each trace's own count: rows where it walked one
    worker per stage (TP ranks and replicas folded), rows where it walked every TP rank of one replica per stage
    (a TP group spanning servers, whose ranks ``sim.fold`` cannot fold), rows of any other count, and the range of
    workers walked against the GPUs the rows stand for."""
    one = sum(1 for s in sim if s.workers_simulated == s.row.pp)
    tp = sum(1 for s in sim if s.workers_simulated != s.row.pp and s.workers_simulated == s.row.pp * s.row.tp)
    walked = [s.workers_simulated for s in sim]
    return {"one_per_stage": one, "every_tp_rank_per_stage": tp, "other": len(sim) - one - tp,
            "min": min(walked, default=0), "max": max(walked, default=0),
            "max_gpus": max((s.row.gpus for s in sim), default=0)}


def simulated_workers_sentence(sim: dict) -> str:
    """The summary's ``simulated_workers`` as words: what the simulator walked on the simulated rows."""
    parts = [f"one worker per stage on {sim['one_per_stage']}"]
    if sim["every_tp_rank_per_stage"]:
        parts.append(f"every TP rank of one replica per stage on {sim['every_tp_rank_per_stage']} "
                     "(their TP group spans servers, so its ranks are not folded)")
    if sim["other"]:
        parts.append(f"another count on {sim['other']}")
    return (f"TP ranks and replicas folded by sim.fold: {'; '.join(parts)}; {sim['min']}–{sim['max']} workers "
            f"walked per row, for rows of up to {sim['max_gpus']} GPUs")


def best_pick(scored: list[Scored]) -> tuple[int, int]:
    """(groups whose measured-fastest row is among the three predicted fastest, groups): a group is the
    scored rows of one model, GPU count and global batch (the same work done differently) with 2+ rows."""
    groups: dict[tuple, list[Scored]] = {}
    for s in scored:
        groups.setdefault((s.row.source, s.row.model, s.row.gpus, s.row.global_batch), []).append(s)
    hits = n = 0
    for members in groups.values():
        if len(members) < 2:
            continue
        n += 1
        best = min(members, key=lambda s: s.row.measured_ms)
        top = sorted(members, key=lambda s: s.predicted_ms)[:3]
        hits += best in top
    return hits, n


def fit_calibration(models: list[RowModel], kind: str = VTRAIN_KIND, shape_table: bool | None = None) -> DeviceCalibration:
    """Fit the efficiency parameters on the calibration rows' closed-form predictions, once per gradient
    width the DP all-reduce might send (fp32 4 bytes per parameter, Megatron's main gradients; fp16 2,
    DeepSpeed's fp16 engine), keeping the width whose fit leaves the smaller rms error on those rows.
    With ``shape_table`` (default ``SHAPE_TABLE``) the per-shape block times are then fitted on the same
    rows with the smooth parameters held (``validation.shape_table.fit_shape_table``)."""
    cal = [m for m in models if m.row.calibration]
    if not cal:
        raise GroundTruthError("no calibration rows: the rule picked none of the given rows; give more rows")
    measured = [m.row.measured_ms / 1e3 for m in cal]
    best = None
    for g in GRADIENT_BYTES_CHOICES:
        res = fit(lambda p, g=g: [m.predict_s(p, g) for m in cal], measured)
        if best is None or res.rms_relative_error < best[1].rms_relative_error:
            best = (g, res)
    g, res = best
    rms = res.rms_relative_error
    table: tuple[BlockTiming, ...] = ()
    if SHAPE_TABLE if shape_table is None else shape_table:
        table = fit_shape_table(cal, res.params, g)
        cal_of = DeviceCalibration(kind, res.params, block_timings=table)
        r = [predict_row_s(m, cal_of) / (m.row.measured_ms / 1e3) - 1.0 for m in cal]
        rms = math.sqrt(sum(x * x for x in r) / len(r))
    return DeviceCalibration(kind, res.params, fitted_on="vTrain ground_truth_single/multi.csv calibration rows",
                             rule=CALIBRATION_RULE, n_rows=len(cal), rms_relative_error=rms,
                             gradient_bytes_per_param=g, block_timings=table)


def run(data: str | Path, calibration: DeviceCalibration | None = None, simulate: bool = True,
        collectives: str | None = None) -> GroundTruth:
    """Load, express, fit (unless ``calibration`` is given), predict and score every row; ``collectives``: how the
    all-reduces are timed (default ``COLLECTIVES``, the mode the adoption rule chose)."""
    t0 = time.perf_counter()
    rows = load_rows(data)
    skipped, models = [], []
    topologies: dict[str, Topology] = {}
    for r in rows:
        why = why_not_expressible(r)
        if why:
            skipped.append((r, why))
        else:
            models.append(row_model(r, topologies, collectives))
    cal = calibration or fit_calibration(models)
    p, g = cal.params, cal.gradient_bytes_per_param
    out = []
    for m in models:
        timing = cal.block_timing(m.key)
        tier = "shape-table" if timing else "smooth"
        closed = predict_row_s(m, cal) * 1e3
        terms = {k: v * 1e3 for k, v in closed_form_terms_s(m, cal).items()}
        why = why_closed_form(m.row) if simulate else "--no-simulate"
        if not why:
            sim_s, walked = simulate_row(m.row, p, topologies, gradient_bytes=g, timing=timing, collectives=collectives)
            out.append(Scored(m.row, sim_s * 1e3, "simulated", closed, block_timing=tier, terms_ms=terms,
                              workers_simulated=walked))
        else:
            out.append(Scored(m.row, closed, "closed-form", closed, why, block_timing=tier, terms_ms=terms))
    return GroundTruth(tuple(out), tuple(skipped), cal, time.perf_counter() - t0,
                       COLLECTIVES if collectives is None else collectives)
