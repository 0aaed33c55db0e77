"""The closed form of a vTrain row: its link times on the real links, its stage costs, 1F1B with flush, and RowModel,
the row made ready for the fit's many repeated predictions.

**Iteration** (1F1B with flush): stage s's forward F_s (its layers plus their TP collectives on
the real links: every one Megatron issues, ``planner.tpcollectives``, the cross entropy's three included) and
backward B_s (the recomputed forward of its blocks, with their TP collectives, plus the backward and its TP
collectives); p2p c_s between stage s and s + 1
(every DP replica's and TP rank's activation at once, on the links they share);
``pipe = Σ(F_s + B_s) + (m − 1)·max(F_s + B_s) + 2·Σ c_s`` (warm-up, steady state, drain);
under DeepSpeed's synchronous sends (``P2P = "deepspeed"``, each TP rank sending 1/T of the activation) a stage's
outgoing sends are part of its own work, F_s + c_s and B_s + c_{s−1}, and the same form holds with no separate 2·Σ c_s;
stage s's last backward ends ``Σ_{j<s}(B_j + c_j)`` before the pipe ends; then its DP gradient
all-reduce (fp32 or fp16 gradients, whichever the fit on the calibration rows prefers; all DP
groups of the stage at once, ring or hierarchical as the simulator chooses) and its Adam step; plus the fitted
per-iteration overhead. It agrees with the simulated plan (``validation.groundtruth_plan.simulate_row``) to
rounding on small cases (tests).

The link timing (:func:`phases_time_s`) and the 1F1B form (:class:`StageCosts`, :func:`one_f_one_b_s`) also serve
the other published tables (``validation.groundtruth_published``, ``validation.groundtruth_titan``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from planner.closedforms import BYTES_PER_PARAM, MEGATRON_VOCAB_MULTIPLE
from planner.transformer_profile import block_work, embedding_work, head_work
from planner.efficiency import (DEFAULT_PARAMS, BlockKey, DeviceCalibration, EfficiencyParams, Work, optimizer_step_s,
                                work_time_s)
from planner.profile import ModelProfile
from planner.recompute import backward_tp_collectives, layer_extra_forward_s, recomputed_tp_collectives
from planner.tpcollectives import NCCL_COLLECTIVE, collectives_time_s
from topologies.devices import device_kind
from topologies.presets import load_topology
from topologies.topology import Topology
from validation.groundtruth_plan import (ROW_RECOMPUTE, VTRAIN_KIND, device_of, p2p_blocking, p2p_bytes_share,
                                         row_block_key, row_config, row_profile, stage_layer_ranges, topology_spec)
from validation.groundtruth_rows import Row

#: Gradient bytes per parameter the DP all-reduce may send: fp32 main gradients (Megatron) or fp16
#: (DeepSpeed's fp16 engine); the fit picks one on the calibration rows (``fit_calibration``).
GRADIENT_BYTES_CHOICES = (4, 2)


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
        p2p_s: per stage boundary s → s + 1, every replica's and TP rank's activation (its ``share``) at once.
        dp_allreduce_s: per gradient bytes per parameter (4: fp32, 2: fp16), per stage, the gradient
            all-reduce of all its DP groups at once.
        algorithm: the all-reduce algorithm (the simulator's choice).
    """

    tp_s: tuple[tuple[tuple[float, float], ...], ...]
    p2p_s: tuple[float, ...]
    dp_allreduce_s: dict[int, tuple[float, ...]]
    algorithm: str
    #: True iff a sender waits for its pipeline sends (``P2P = "deepspeed"``): ``stage_costs`` folds them into its work.
    blocking: bool = False


def row_links(row: Row, profile: ModelProfile, topology: Topology,
              gradient_bytes: tuple[int, ...] = GRADIENT_BYTES_CHOICES, p2p: str | None = None) -> Links:
    """The row's link times; every all-reduce priced by the topology's collectives mode as the simulator prices it
    (``sim.collectives.priced``: its phases, then the tail NCCL's latency adds); the pipeline sends as ``p2p`` (default
    ``P2P``) runs them."""
    from sim.collectives import allreduce_phases, priced

    ranges = stage_layer_ranges(row)
    tp, sends = [], []
    dp: dict[int, list[float]] = {g: [] for g in gradient_bytes}
    algorithm = "ring"
    kinds = (profile.layers[0], profile.layers[1], profile.layers[-1])  # embedding, a block, head
    for s, (a, b) in enumerate(ranges):
        group = [device_of(row, s, 0, t) for t in range(row.tp)]
        tp.append(tp_layer_s(topology, group, kinds, row.micro_batch, "none"))
        if s + 1 < row.pp:
            nbytes = profile.boundary_bytes(b) * row.micro_batch * p2p_bytes_share(row, p2p)
            flows = [(device_of(row, s, d, t), device_of(row, s + 1, d, t), nbytes)
                     for d in range(row.dp) for t in range(row.tp)]
            sends.append(phases_time_s(topology, [flows]))
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
    return Links(tuple(tp), tuple(sends), {g: tuple(v) for g, v in dp.items()}, algorithm, p2p_blocking(p2p))


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


def folded_sends(fs: list[float], bs: list[float], p2p: tuple[float, ...], blocking: bool
                 ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(forward, backward, p2p) per stage: as given, or, where a sender waits for its sends (``blocking``), each
    stage's forward with its send to s + 1 and its backward with its send to s − 1, and no separate sends."""
    if not blocking:
        return tuple(fs), tuple(bs), tuple(p2p)
    P = len(fs)
    f = tuple(fs[s] + (p2p[s] if s < P - 1 else 0.0) for s in range(P))
    b = tuple(bs[s] + (p2p[s - 1] if s > 0 else 0.0) for s in range(P))
    return f, b, (0.0,) * len(p2p)


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
    f, b, c = folded_sends(fs, bs, links.p2p_s, links.blocking)
    return StageCosts(f, b, c, links.dp_allreduce_s[gradient_bytes], tuple(steps))


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
        hf += p.loss_overhead_s  # as planner.transformer_profile adds it to the head's forward
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
        f, b, c = folded_sends(fs, bs, self.links.p2p_s, self.links.blocking)
        return StageCosts(f, b, c, self.links.dp_allreduce_s[gradient_bytes], tuple(steps))

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
    * ``p2p``: what the activation and gradient sends along the pipeline add (2·Σ c_s; with synchronous sends,
      also their share of every microbatch of the steady state);
    * ``dp_tail``: what the DP gradient all-reduce and the Adam step add after the pipe drains;
    * ``overhead``: the fitted per-iteration overhead.
    """
    p, g = cal.params, cal.gradient_bytes_per_param
    t = cal.block_timing(m.key)
    block = (t.forward_s, t.backward_s) if t else None
    c = m.stage_costs(p, g, block)
    no_p2p = replace(m, links=replace(m.links, p2p_s=(0.0,) * len(m.links.p2p_s)))
    no_tp = replace(no_p2p, links=replace(no_p2p.links, tp_s=tuple(((0.0, 0.0),) * 3 for _ in m.links.tp_s)))
    quiet, bare = no_p2p.stage_costs(p, g, block), no_tp.stage_costs(p, g, block)
    fb = [f + b for f, b in zip(quiet.forward_s, quiet.backward_s)]
    fb_bare = [f + b for f, b in zip(bare.forward_s, bare.backward_s)]
    s = max(range(len(fb)), key=fb.__getitem__)
    M = m.row.microbatches
    pipe = pipe_s(c, M)
    return {"compute": M * fb_bare[s], "tp_comm": M * (fb[s] - fb_bare[s]), "fill_drain": sum(fb) - fb[s],
            "p2p": pipe - pipe_s(quiet, M), "dp_tail": one_f_one_b_s(c, M) - pipe, "overhead": p.iteration_overhead_s}


def row_model(row: Row, topologies: dict[str, Topology] | None = None, collectives: str | None = None,
              p2p: str | None = None) -> RowModel:
    """Precompute ``row``'s link times and kernel inventories (the link times do not depend on the fit);
    ``collectives``: the topology's collectives mode (default ``COLLECTIVES``); ``p2p``: how the pipeline sends run
    (default ``P2P``)."""
    spec = topology_spec(row.gpus, collectives)
    topologies = {} if topologies is None else topologies
    topo = topologies.get(spec) or topologies.setdefault(spec, load_topology(spec))
    prof = row_profile(row, DEFAULT_PARAMS)
    links = row_links(row, prof, topo, p2p=p2p)
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
