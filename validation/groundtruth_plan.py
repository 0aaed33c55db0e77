"""A vTrain row as pipetwin expresses it: its model, cluster, Megatron's placement and plan, and that plan simulated.

* **Model**: ``planner.transformer_profile.transformer_profile`` per TP rank (vocabulary 50,257 padded as
  Megatron pads it, to a multiple of 128·T), timed by the fitted kernel-level efficiency model
  (``planner.efficiency``) at the row's microbatch size (:func:`row_profile`).
* **Cluster**: ``hier:8@nvswitch:1.5e+11,N@ib:1e+11,kind=a100-80gb`` — 8 A100s per node on
  NVLink at ~150 GB/s, one 800 Gbit/s link per node. The 80 GB part: the 175B rows keep
  2.7B parameters × 16 bytes per GPU, more than a 40 GB A100 holds (:func:`topology_spec`).
* **Placement**: Megatron's rank order (TP fastest, then DP, then PP; rank r on device ``d{r}``,
  node r // 8). Layers: Megatron's even split of the L blocks over the P stages, the embedding
  on the first, the final norm and head on the last (:func:`row_plan`).
* **Pipeline sends** (``P2P``): DeepSpeed's ``PipelineEngine``, which Megatron-DeepSpeed's pipeline runs through: each
  TP rank sends its 1/T slice of the stage's output (and of the gradient back), and the sender waits for delivery
  (chosen by ``validation.groundtruth_cv``'s ``adopt_p2p`` on the calibration rows; ``"posted"``, the whole activation
  from every TP rank and a sender that moves on, stays an option).
* **Simulation**: where the simulator can run a row within the time budget (``SIMULATE_BUDGET_S``) it runs
  this plan (``sim``, symmetry reductions on; TP ranks and replicas folded by ``sim.fold``) and its figure is
  the prediction (:func:`simulate_row`); the others take the closed form (``validation.groundtruth_closed_form``)
  and :func:`why_closed_form` says why. Megatron's full recomputation re-runs the blocks only, so the simulated
  profile carries it folded into each block's backward (its forward time and its forward's TP all-reduces).
"""
from __future__ import annotations

from dataclasses import replace

from planner.closedforms import BYTES_PER_PARAM, MEGATRON_VOCAB_MULTIPLE
from planner.transformer import TransformerConfig
from planner.transformer_profile import block_key, transformer_profile
from planner.efficiency import BlockKey, BlockTiming, EfficiencyParams, optimizer_step_s
from planner.plan import Plan, StagePlan
from planner.profile import ModelProfile
from topologies.devices import device_kind
from topologies.presets import load_topology
from topologies.topology import Topology
from validation.groundtruth_rows import Row

#: What every vTrain run shares (its README and the issue): A100s, 8 per node, vocabulary 50,257.
VTRAIN_KIND = "a100-80gb"
GPUS_PER_NODE = 8
NVLINK_BYTES_PER_S = 150e9
NODE_LINK_BYTES_PER_S = 800e9 / 8
VOCAB = 50257
#: How the rows' all-reduces are timed (``topologies.ncclcost``): "ideal" (latency + bytes / bandwidth on the links) or
#: "nccl" (NCCL's protocol choice, bandwidth fractions and latency). Chosen by the adoption rule of
#: ``validation.groundtruth_cv`` on the calibration rows alone (its docstring), never by a scored row.
COLLECTIVES = "ideal"
#: How the rows' pipeline sends run (``validation.groundtruth_cv``'s ``adopt_p2p`` chooses, on the calibration rows alone):
#: "posted" (every TP rank sends the whole activation and moves on) or "deepspeed" (DeepSpeed's ``PipelineEngine``: each TP
#: rank sends its 1/T slice of the activation and of its gradient, and waits until the send is delivered; the
#: all-gathers that rebuild the slices inside the TP group, three per microbatch on a middle stage, are not modelled).
P2P = "deepspeed"
P2P_MODES = ("posted", "deepspeed")
#: The recomputation every vTrain row runs (Megatron's full recomputation; ``planner.recompute`` says what it re-runs).
ROW_RECOMPUTE = "full"


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


def p2p_mode(p2p: str | None) -> str:
    mode = P2P if p2p is None else p2p
    if mode not in P2P_MODES:
        raise ValueError(f"p2p mode must be one of {', '.join(P2P_MODES)} (got {mode!r})")
    return mode


def p2p_bytes_share(row: Row, p2p: str | None = None) -> float:
    """The share of a stage's boundary activation one TP rank sends: 1, or 1/T under ``"deepspeed"``."""
    return 1.0 / row.tp if p2p_mode(p2p) == "deepspeed" else 1.0


def p2p_blocking(p2p: str | None = None) -> bool:
    """True iff a sender waits until its pipeline send is delivered (``"deepspeed"``)."""
    return p2p_mode(p2p) == "deepspeed"


def row_plan(row: Row, collectives: str | None = None) -> Plan:
    """The row as a pipetwin plan: P stages of DP replicas, each a TP group of T devices (Megatron's rank
    order), full recomputation, 1F1B, global / micro microbatches per batch (the replicas take them
    round-robin, so each runs global / (micro · DP))."""
    stages = tuple(StagePlan(a, b, row.dp, tuple(device_of(row, s, d, t) for d in range(row.dp) for t in range(row.tp)))
                   for s, (a, b) in enumerate(stage_layer_ranges(row)))
    return Plan(model=row_config(row).spec(), stages=stages, schedule="1f1b", microbatch_size=row.micro_batch,
                microbatches=row.microbatches * row.dp, topology=topology_spec(row.gpus, collectives), tensor_parallel=row.tp,
                recompute=ROW_RECOMPUTE)


def row_block_key(row: Row) -> BlockKey:
    """The row's block shape as a calibration's per-shape table keys it."""
    return block_key(row_config(row), row.tp, row.micro_batch)


def row_profile(row: Row, params: EfficiencyParams, kind: str = VTRAIN_KIND,
                timing: BlockTiming | None = None) -> ModelProfile:
    return transformer_profile(row_config(row), kind, tensor_parallel=row.tp, microbatch_size=row.micro_batch,
                               efficiency=params, vocab_multiple=MEGATRON_VOCAB_MULTIPLE, block_timing=timing)


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
                   collectives: str | None = None, p2p: str | None = None) -> float:
    """The row's iteration seconds by pipetwin's SimPy simulator (``simulate_row``)."""
    return simulate_row(row, params, topologies, kind, gradient_bytes, timing, collectives, p2p)[0]


def simulate_row(row: Row, params: EfficiencyParams, topologies: dict[str, Topology] | None = None,
                 kind: str = VTRAIN_KIND, gradient_bytes: int = 4, timing: BlockTiming | None = None,
                 collectives: str | None = None, p2p: str | None = None) -> tuple[float, int]:
    """(iteration seconds, workers the simulator walked) of the row by pipetwin's SimPy simulator: the plan (with
    its recomputation, which the simulator times by ``planner.recompute``) lowered to its program, the Adam step as
    the slowest stage's, plus the fitted per-iteration overhead. The simulator all-reduces a stage's ``param_bytes``
    (4 per parameter); with ``gradient_bytes`` 2 the simulated profile's ``param_bytes`` are scaled to the
    gradient's size (its memory figures, unused here, then count 2 bytes per parameter). ``p2p`` (default ``P2P``):
    under ``"deepspeed"`` each layer's boundary activation is the TP rank's 1/T slice and a SEND holds its sender until
    delivered (``SimParams.overlap_comm`` off)."""
    from sim.engine import simulate_plan
    from sim.params import SimParams
    from planner.trace import makespan_s

    spec = topology_spec(row.gpus, collectives)
    topologies = {} if topologies is None else topologies
    topo = topologies.get(spec) or topologies.setdefault(spec, load_topology(spec))
    prof = row_profile(row, params, kind, timing)
    k = device_kind(kind)
    step = max(optimizer_step_s(prof.param_bytes(a, z) / BYTES_PER_PARAM, k, params) for a, z in stage_layer_ranges(row))
    share = p2p_bytes_share(row, p2p)
    prof = replace(prof, layers=tuple(replace(l, param_bytes=l.param_bytes * gradient_bytes / BYTES_PER_PARAM,
                                              activation_bytes=l.activation_bytes * share)
                                      for l in prof.layers))
    plan = row_plan(row, collectives)
    trace = simulate_plan(plan, prof, topo, SimParams(step_time_s=step, link_events=False,
                                                      overlap_comm=not p2p_blocking(p2p)))
    return makespan_s(trace) + params.iteration_overhead_s, trace.meta["workers_simulated"]
