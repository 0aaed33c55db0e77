"""The SimPy interpreter of a program: every worker is a process that walks its action list.

- F/B/BI/BW take the stage's profile time at the run's microbatch size, divided
  by the device's speed, plus ``overhead_s`` (every action pays it); a B or BW
  after the first of its optimizer round on a worker also pays
  ``accumulate_s_per_byte`` per parameter byte of its stage (adding into the
  round's gradient, as the executor does);
- SEND starts a transfer on the link model and moves on (or waits for delivery
  when communication does not overlap); RECV waits until its payload is delivered
  (and ``recv_wake_s`` more when it had to wait: waking a blocked receiver;
  ``recv_ready_s`` when its payload was already there);
- ALLREDUCE waits until every replica of its stage (of the worker's TP rank) has
  arrived, then runs the collective on the links (``sim.collectives``); STEP
  takes ``step_time_s``. With ZeRO 1 or 2 (``SimParams.zero_stage``) that collective is a ring
  reduce-scatter then all-gather of the 16-bit tensors (``planner.sharding.collective_bytes``).

ZeRO-3 (FSDP): a compute action of a replicated stage walks its units (one per layer, each
gathering its weights and reduce-scattering its gradients over the replica group on the real
links); ``sim.zero3`` compiles and walks those passes. The stage's ALLREDUCE then moves nothing.

Tensor parallelism (``Program.tensor_parallel`` T > 1; the profile is per TP
rank): a compute action of a TP group runs its layers' TP all-reduces
(``Layer.tp_*``) inside it, each after its share of the compute, as a ring among
the group's T devices on the real links (waiting for every rank to get there),
contending with pipeline sends and data-parallel all-reduces. With sequence
parallelism each all-reduce is a reduce-scatter + all-gather pair: the same ring
phases. Recomputation (``planner.recompute``, the plan's mode) adds its re-run
forward (and, for full recomputation, that forward's TP all-reduces) to each B, and
to a split backward's passes what ``planner.recompute.pass_recompute_s`` says (as the
executor runs them: a checkpoint whole in its BI and again in its BW), and keeps what
that module says in memory.

Symmetry: identical replica pipelines are simulated once and copied (``sim.symmetry``); where
they share links, or with tensor parallelism, one worker per orbit of the TP ranks and
replicas is simulated on a quotient of the links (``sim.fold``). Either way the trace is
the one a run of every worker gives.

Compiling a worker's actions into plain tuples and the device process that runs them are
one hot loop, kept together and flat for speed (``benchmarks/bench_sim.py``'s goals), with
the symmetry bookkeeping that edits that loop's own state (which workers are simulated, how
many arrivals an all-reduce waits for, which flows a folded run starts); ``sim.symmetry`` and
``sim.fold`` decide what to fold, this module applies it, and ``sim.tracing`` writes the
finished run's records out for every worker (mirroring the link log back onto them).
"""
from __future__ import annotations

import gc
import random
from itertools import count, repeat
from operator import attrgetter
from dataclasses import asdict, replace
from typing import Callable

import simpy

from planner.program import FAMILY, Kind, Program, even_layers
from planner.profile import ModelProfile
from planner.recompute import pass_recompute_s, recompute_mode
from planner.trace import Event, Trace
from planner.sharding import weight_versions_refusal, zero3_refusal
from planner.tpcollectives import NCCL_COLLECTIVE, ring_steps
from sim.collectives import Collective, Phase, dp_phases, fused_ring_phases, priced, ring_pass_phases, ring_phases
from sim.memory import fsdp_transients, fsdp_units, memory_levels, memory_marks, round_function, stage_bytes
from sim.network import Network
from sim.params import SimError, SimParams
from sim.fold import fold
from sim.symmetry import symmetry
from sim.tensor import tp_segments
from sim.tracing import action_head, trace_of
from sim.zero3 import Zero3
from topologies.topology import Topology

_COMPUTE, _RECV, _SEND_FREE, _SEND, _ALLREDUCE, _TP, _FSDP = range(7)  # _COMPUTE (0) also stands for STEP
_KF, _KB, _KBI, _KBW = Kind.F, Kind.B, Kind.BI, Kind.BW
_KSEND, _KRECV, _KALLREDUCE = Kind.SEND, Kind.RECV, Kind.ALLREDUCE
_ARRIVED = True
_tnew = tuple.__new__  # _tnew(Event, (lane, action, start_s, end_s, kind, nbytes)) builds an Event without __new__'s call
_fields = attrgetter("kind", "stage", "mb", "version", "grad", "peer", "nbytes")

Progress = Callable[[int, int], None]


def simulate(program: Program, profile: ModelProfile, topology: Topology, devices: dict[int, str], *,
             microbatch_size: int = 1, params: SimParams = SimParams(), progress: Progress | None = None,
             stage_layers: list[tuple[int, int]] | None = None, check_program: bool = True,
             recompute: str = "none") -> Trace:
    """Predict how ``program`` runs on ``topology`` and return its trace.

    Args:
        program: the per-worker action lists (checked first unless ``check_program`` is False).
        profile: per-layer costs; stage times scale by microbatch_size / profile.microbatch_size.
        topology: devices and links.
        devices: worker → topology device name.
        microbatch_size: samples per microbatch.
        params: the model's knobs (``SimParams``).
        progress: called now and then as ``progress(actions_done, actions_total)``.
        stage_layers: (first, last) layer of every stage; default: the program's own ``stage_layers``, else
            the profile's layers split evenly over the program's stages.
        check_program: run ``planner.check.check`` first.
        recompute: activation recomputation, "none", "selective" or "full" (``planner.recompute``).

    Returns:
        A Trace: worker lanes, link lanes "u->v", memory samples; meta says what ran.
    """
    if check_program:
        from planner.check import check

        check(program)
    if microbatch_size < 1:
        raise SimError(f"microbatch_size must be >= 1 (got {microbatch_size})")
    layers = _stage_layers(program, profile, stage_layers)
    _check_devices(program, topology, devices)
    _check_tensor_parallel(program, profile)
    recompute = _mode(recompute)
    collecting = gc.isenabled()
    gc.disable()  # the run allocates many small objects that live until the trace is written; cycles there are none
    try:
        return _Run(program, profile, topology, devices, microbatch_size, params, layers, recompute).run(progress)
    finally:
        if collecting:
            gc.enable()


def simulate_plan(plan, profile: ModelProfile, topology: Topology, params: SimParams = SimParams(),
                  progress: Progress | None = None) -> Trace:
    """Lower ``plan`` (``planner.lowering``) and simulate its program on ``topology``."""
    from planner.lowering import plan_to_program, worker_devices

    if plan.num_layers > len(profile):
        raise SimError(f"the plan covers {plan.num_layers} layers but the profile {profile.name!r} has "
                       f"{len(profile)}; re-plan for this model")
    if plan.sequence_parallel != profile.sequence_parallel:
        raise SimError(f"the plan {'uses' if plan.sequence_parallel else 'does not use'} sequence parallelism but the "
                       f"profile {profile.name!r} is built {'without' if plan.sequence_parallel else 'with'} it; build "
                       "the profile as the plan runs")
    if plan.zero_stage and not params.zero_stage:  # a sharded plan is simulated sharded
        params = replace(params, zero_stage=plan.zero_stage)
    program = plan_to_program(plan, profile)
    trace = simulate(program, profile, topology, worker_devices(plan, program), microbatch_size=plan.microbatch_size,
                     params=params, progress=progress, stage_layers=[s.layers for s in plan.stages],
                     check_program=False, recompute=plan.recompute)
    trace.meta["plan_model"] = plan.model
    return trace


def workers_simulated(plan, profile: ModelProfile, topology: Topology, params: SimParams = SimParams()) -> int:
    """How many workers a simulation of ``plan`` walks (after ``sim.symmetry`` or ``sim.fold``), without running it."""
    from planner.lowering import plan_to_program, worker_devices

    program = plan_to_program(plan, profile)
    run = _Run(program, profile, topology, worker_devices(plan, program), plan.microbatch_size, params,
               _stage_layers(program, profile, [s.layers for s in plan.stages]), _mode(plan.recompute))
    return len(run.workers)


def zero_replicas(program: Program, params: SimParams) -> dict[int, int] | None:
    """Each stage's replica count, the degree ``params.zero_stage`` shards its state over (None without ZeRO);
    refuses a schedule that keeps more than one weight version (ZeRO shards one), and a shape ZeRO-3 is not
    timed for (``planner.sharding.zero3_refusal``)."""
    if not params.zero_stage:
        return None
    fam = FAMILY[program.spec.family]
    if fam.weight_copies != 1:
        raise SimError(weight_versions_refusal(params.zero_stage, program.spec.family, fam.weight_copies or None))
    reps = {s: program.replica_count(s) for s in range(len(program.stage_workers))}
    if params.zero_stage == 3:
        why = zero3_refusal(fam.multi_stage, program.spec.microbatches, reps.values(), fam.batched)
        if why:
            raise SimError(why)
    return reps


def _transients(program: Program, profile: ModelProfile, layers, params: SimParams):
    """ZeRO-3's per-pass gathered bytes (``sim.memory.fsdp_transients``), None below stage 3."""
    if params.zero_stage != 3:
        return None
    return fsdp_transients(fsdp_units(profile, layers), params.fsdp_overlap)


def peak_memory(program: Program, profile: ModelProfile, *, microbatch_size: int = 1, params: SimParams = SimParams(),
                stage_layers: list[tuple[int, int]] | None = None, recompute: str = "none") -> dict[int, float]:
    """Per worker, the peak bytes a simulation of ``program`` reports, without simulating it.

    What a worker holds depends only on the order of its actions (``sim.memory``), so this is exact
    and takes one pass over the action lists: no SimPy, no links. Arguments as :func:`simulate`.
    """
    layers = _stage_layers(program, profile, stage_layers)
    weights = stage_bytes(profile, layers, microbatch_size, _mode(recompute))
    round_of = round_function(program)
    transients = _transients(program, profile, layers, params)
    out = {}
    for w in program.workers:
        initial, levels = memory_levels(program[w], {s: weights[s] for s in program.stages_of(w)},
                                        params.optimizer_state_factor, round_of, params.recv_lookahead,
                                        params.zero_stage, zero_replicas(program, params), transients)
        out[w] = max(initial, max((max(pair) for pair in levels), default=initial))
    return out


# --- input checks -------------------------------------------------------------------------
def _mode(recompute) -> str:
    try:
        return recompute_mode(recompute)
    except ValueError as e:
        raise SimError(str(e)) from None


def _check_tensor_parallel(program: Program, profile: ModelProfile) -> None:
    T, pt = program.tensor_parallel, profile.tensor_parallel
    if T != pt:
        raise SimError(f"the program runs tensor parallelism {T} but the profile {profile.name!r} is per rank of "
                       f"tensor parallelism {pt}; build the profile for {T} (planner.analytic's tensor_parallel={T})")


def _stage_layers(program: Program, profile: ModelProfile, given) -> list[tuple[int, int]]:
    S = len(program.stage_workers)
    if given is None and program.stage_layers is not None:
        given = program.stage_layers  # the program's own (a plan's program names them)
    if given is None:
        L = len(profile)
        if S > L:
            raise SimError(f"the program has {S} stages but the profile {profile.name!r} has only {L} layers; "
                           "give stage_layers or a deeper profile")
        return list(even_layers(L, S))
    given = [tuple(x) for x in given]
    if len(given) != S:
        raise SimError(f"stage_layers names {len(given)} stages but the program has {S}")
    for s, (a, b) in enumerate(given):
        if not 0 <= a <= b < len(profile):
            raise SimError(f"stage {s} covers layers {a}..{b} but the profile {profile.name!r} has layers "
                           f"0..{len(profile) - 1}; re-plan for this model")
    return given


def _check_devices(program: Program, topology: Topology, devices: dict[int, str]) -> None:
    owner: dict[str, int] = {}
    for w in program.workers:
        d = devices.get(w)
        if d is None:
            raise SimError(f"worker {w} has no device; give every worker a device of topology {topology.name!r}")
        if not topology.has_device(d):
            some = ", ".join(topology.devices[:4]) + (", ..." if len(topology.devices) > 4 else "")
            raise SimError(f"worker {w}'s device {d!r} is not in topology {topology.name!r} ({some}); "
                           "place the plan on this topology's devices")
        if d in owner:
            raise SimError(f"workers {owner[d]} and {w} both sit on device {d!r}; give each worker its own device")
        owner[d] = w


# --- one run --------------------------------------------------------------------------------
class _Run:
    def __init__(self, program: Program, profile: ModelProfile, topology: Topology, devices: dict[int, str],
                 microbatch_size: int, params: SimParams, layers: list[tuple[int, int]], recompute: str = "none"):
        self.p, self.topology, self.dev, self.params = program, topology, devices, params
        self.env = simpy.Environment()
        k = microbatch_size / profile.microbatch_size
        self.fwd = [profile.forward_s(a, b) * k for a, b in layers]
        self.bwd = [profile.backward_s(a, b) * k for a, b in layers]
        bi, split = params.bi_fraction, params.split_factor
        #: per stage, what recomputation adds to a B, a BI and a BW (planner.recompute.pass_recompute_s)
        self.extra = [{kind: sum(pass_recompute_s(l, recompute, kind, bi, split) for l in profile.layers[a:b + 1]) * k
                       for kind in ("B", "BI", "BW")} for a, b in layers]
        self.T = program.tensor_parallel
        self.tp = ([tp_segments(profile, a, b, k, microbatch_size, recompute, bi, split) for a, b in layers]
                   if self.T > 1 else None)
        self.stage_bytes = stage_bytes(profile, layers, microbatch_size, recompute)
        self.round_of = round_function(program)
        self.zero_replicas = zero_replicas(program, params)
        self.transients = _transients(program, profile, layers, params)
        self.zero3 = Zero3(self, profile, layers, k, microbatch_size, recompute) if params.zero_stage == 3 else None
        self.meta = {"source": "sim", "family": program.spec.family, "microbatch_size": microbatch_size,
                     "topology": topology.name, "params": asdict(params)}
        if recompute != "none":
            self.meta["recompute"] = recompute
        if self.T > 1:
            self.meta["tensor_parallel"] = self.T
        self.box: dict[tuple, object] = {}
        # pending collectives, one table per kind so that their keys never meet: DP all-reduces by (stage, round,
        # TP rank), kept after they start (the late replicas read their start time); TP all-reduces by (leader
        # worker, action index, piece[, unit piece]), removed when the last rank joins; ZeRO-3's in Zero3.pending
        self.dp_groups: dict[tuple[int, int, int], list] = {}
        self.tp_groups: dict[tuple, list] = {}
        self.phases: dict[tuple[int, float], list[Phase]] = {}
        self.rec: list[tuple[int, int, float, float]] = []
        self.mem: list[tuple[int, float, float]] = []
        self.algorithms: set[str] = set()
        if params.zero_stage == 3 and any(program.replica_count(s) > 1 for s in range(len(program.stage_workers))):
            self.algorithms.add("ring all-gathers + reduce-scatters")
        sw = program.stage_workers
        self.fold = None
        self.net = Network(self.env, topology)  # sim.symmetry reads its routes; a folding replaces it
        if not params.use_symmetry:
            self.replicas, reason = 1, "turned off (use_symmetry=False)"
        else:  # whole replica pipelines copied where their links are private, else a folding (sim.fold)
            self.replicas, reason = symmetry(self) if self.T == 1 else (1, "")
            if self.replicas == 1:
                self.fold, why = fold(self)
                reason = reason or why
        self.meta["symmetry"] = {"used": self.replicas > 1, "replicas": self.replicas}
        if self.fold is not None:
            f = self.fold
            self.net = Network(self.env, topology, f.hop_map)
            self.meta["symmetry"] = {"used": True, "replicas": f.group_size, "folded": True, "tp_folded": f.tp_folded,
                                     "replicas_simulated_per_stage": f.replica_stride}
            reason = ""
        if reason:
            self.meta["symmetry"]["reason"] = reason
        reps = {ws[0] for ws in sw} if self.fold is None else self.fold.reps
        self.workers = [w for w in program.workers if (self.replicas == 1 and self.fold is None) or w in reps]
        self.sim_devices = {devices[w] for w in self.workers}
        self.tp_rank = {w: program.tp_rank(w) for w in program.workers} if self.T > 1 else dict.fromkeys(program.workers, 0)
        if self.fold is not None:
            self.arrivals = [self.fold.replica_stride] * len(sw)
        else:
            self.arrivals = [1 if self.replicas > 1 else program.replica_count(s) for s in range(len(sw))]

    # --- compile each worker's actions into plain tuples ------------------------------
    def _ops(self, w: int, rng: random.Random) -> tuple[float, list[tuple]]:
        """(static bytes, one op per action).

        An op is ``(code, dur, mem_at_start, mem_at_end, text, kind, nbytes, x, y)``:
        the memory levels are None where the level does not change; text, kind and
        nbytes are the action's trace event fields; x and y depend on the code.
        """
        prm, dev = self.params, self.dev
        speed = self.topology.device(dev[w]).speed
        ovh, jit, bi, split = prm.overhead_s, prm.jitter, prm.bi_fraction, prm.split_factor
        bi0_free = prm.first_stage_bi_free
        step_dur = prm.step_time_s + ovh
        fwd, bwd, extra, tp = self.fwd, self.bwd, self.extra, self.tp
        tp_key = self.p.tp_group(w)[0] if tp is not None else None  # the group's rank 0 names its collectives
        tp_arrivals = 1 if self.fold is not None and self.fold.tp_folded else self.T
        acc_per_byte, round_of = prm.accumulate_s_per_byte, self.round_of
        rounds: dict[int, set[int]] = {}  # stage -> optimizer rounds a backward on this worker has started
        arrivals, free = self.arrivals, self.net.free_route
        tp_rank = self.tp_rank
        acts = self.p[w]
        stages = self.p.stages_of(w)
        static, marks = memory_marks(acts, {s: self.stage_bytes[s] for s in stages}, prm.optimizer_state_factor,
                                     self.round_of, prm.recv_lookahead, prm.zero_stage, self.zero_replicas,
                                     self.transients)
        zero3 = self.zero3
        seq = 0
        src = dev[w]
        to: dict[int, tuple[str, bool]] = {}       # peer -> (its device, free route?)
        heads: dict[tuple, tuple[str, str]] = {}   # (stage, kind, version, grad, peer) -> text around the mb
        ops = []
        append = ops.append
        for i, a, (ms, me) in zip(count(), acts, repeat((None, None)) if marks is None else marks):
            k, s, mb, v, g, peer, nb = _fields(a)
            hkey = (s, k, v, g, peer)
            head = heads.get(hkey)
            if head is None:
                head = heads[hkey] = action_head(s, k, v, g, peer)
            text = f"{head[0]}{mb}{head[1]}"
            kv = k._value_
            if k is _KF or k is _KB or k is _KBI or k is _KBW:
                # the pass as run: pk names its recomputation and TP terms (None: an empty BI)
                if k is _KF:
                    base, pk = fwd[s], "F"
                elif k is _KB or (s == 0 and bi0_free and k is _KBW):  # stage 0's free BI: its BW is a whole B
                    base, pk = bwd[s] + extra[s]["B"], "B"
                elif k is _KBI and s == 0 and bi0_free:
                    base, pk = 0.0, None
                else:
                    pk = "BI" if k is _KBI else "BW"
                    base = bwd[s] * split * (bi if k is _KBI else 1.0 - bi) + extra[s][pk]
                base /= speed
                if jit:
                    base *= max(0.0, 1.0 + jit * rng.gauss(0.0, 1.0))
                acc = 0.0
                if acc_per_byte and (k is _KB or k is _KBW):  # the executor adds into the round's gradient
                    seen = rounds.setdefault(s, set())
                    r = round_of(s, mb)
                    if r in seen:
                        acc = acc_per_byte * self.stage_bytes[s].params
                    else:
                        seen.add(r)
                seg = None if tp is None or pk is None else tp[s][pk]
                if zero3 is not None and self.zero_replicas[s] > 1:
                    units, seq = zero3.units(s, k, base, pk, seq, split, bi)
                    append((_FSDP, ovh, ms, me, text, kv, nb, units,
                            (s, tp_rank[w], arrivals[s], acc, tp_key, i, tp_arrivals)))
                elif seg is None or not seg[0]:
                    append((_COMPUTE, base + acc + ovh, ms, me, text, kv, nb, None, None))
                else:  # TP all-reduces inside: each after its share of the compute
                    pieces, raw = seg
                    f = base / raw if raw > 0 else 0.0
                    append((_TP, ovh, ms, me, text, kv, nb, tuple((d * f, n, q) for d, n, q in pieces),
                            (tp_key, i, (raw - sum(p[0] for p in pieces)) * f + acc, tp_arrivals)))
            elif k is _KSEND:
                dst = to.get(peer)
                if dst is None:
                    dst = to[peer] = (dev[peer], free(src, dev[peer]))
                if dst[1]:  # delivered at once; a transfer of no bytes leaves no trace on the links
                    append((_SEND_FREE, ovh, ms, me, text, kv, nb, (w, peer, g, s, mb),
                            (src, dst[0], nb, (w, i)) if nb > 0 else None))
                else:
                    append((_SEND, ovh, ms, me, text, kv, nb, (w, peer, g, s, mb), (src, dst[0], nb, (w, i))))
            elif k is _KRECV:
                append((_RECV, ovh, ms, me, text, kv, nb, (peer, w, g, s + 1 if g else s - 1, mb), None))
            elif k is _KALLREDUCE and zero3 is not None:  # stage 3: the passes reduce-scattered the gradients
                append((_COMPUTE, ovh, ms, me, text, kv, nb, None, None))
            elif k is _KALLREDUCE:
                t = tp_rank[w]
                append((_ALLREDUCE, ovh, ms, me, text, kv, nb, (s, mb, t), (arrivals[s], s, nb, t)))
            else:
                append((_COMPUTE, step_dur, ms, me, text, kv, nb, None, None))
        return static, ops

    # --- the device process -------------------------------------------------------------
    def _device(self, w: int, static: float, ops: list[tuple]):
        env, rec, mem, box, log = self.env, self.rec, self.mem, self.box, self.net.log
        timeout, transfer, new_event = env.timeout, self.net.transfer, env.event
        overlap = self.params.overlap_comm
        wake, ready = self.params.recv_wake_s, self.params.recv_ready_s
        groups = self.dp_groups
        mem.append((w, 0.0, static))
        for code, dur, ms, me, text, kind, nb, x, y in ops:
            t0 = env._now
            if ms is not None:
                mem.append((w, t0, ms))
            if dur > 0.0:
                yield timeout(dur)
            if code:
                if code == _RECV:
                    if box.pop(x, None) is None:
                        ev = box[x] = new_event()
                        yield ev
                        if wake > 0.0:  # the receiver was blocked: waking it
                            yield timeout(wake)
                    elif ready > 0.0:  # arrived before it was asked for: the host still copies it out
                        yield timeout(ready)
                elif code == _SEND_FREE:  # delivered at once: transfer() would only log it
                    if y is not None:
                        now = env._now
                        log.append((y[0], y[1], now, now, y[2], y[3]))
                    waiter = box.pop(x, None)
                    if waiter is None:
                        box[x] = _ARRIVED
                    else:
                        waiter.succeed()
                elif code == _SEND:
                    if overlap:
                        if transfer(y[0], y[1], y[2], self._deliver, x, y[3]):
                            self._deliver(x)
                    else:
                        ev = new_event()
                        if transfer(y[0], y[1], y[2], self._deliver_and_wake, (x, ev), y[3]):
                            self._deliver(x)
                        else:
                            yield ev
                elif code == _TP:
                    for j, (d, nbytes, coll) in enumerate(x):
                        if d > 0.0:
                            yield timeout(d)
                        ev = self.tp_join((y[0], y[1], j), y[0], y[1], nbytes, text, y[3], coll)
                        if ev is not None:
                            yield ev
                    if y[2] > 0.0:
                        yield timeout(y[2])
                elif code == _FSDP:
                    yield from self.zero3.walk(x, y, text)
                else:  # _ALLREDUCE
                    st = groups.get(x)
                    if st is None:
                        st = groups[x] = [0, new_event(), 0.0]
                    st[0] += 1
                    if st[0] == y[0]:
                        st[2] = env._now
                        phases, tail = self._phases(y[1], y[2], y[3])
                        coll = Collective(self.net, phases, _succeed, st[1], f"{y[1]}ALLREDUCE{x[1]}", tail)
                        if coll.start():
                            st[1].succeed()
                        else:
                            yield st[1]
                    else:
                        yield st[1]
                    t0 = st[2]
            rec.append(_tnew(Event, (w, text, t0, env._now, kind, nb)))
            if me is not None:
                mem.append((w, env._now, me))

    def tp_join(self, key: tuple, leader: int, i: int, nbytes: float, text: str, arrivals: int,
                kind: str = "all-reduce") -> simpy.Event | None:
        """Join the TP collective ``key`` (of ``kind``) of worker ``leader``'s group at its action ``i``; the last
        rank to join starts it. Returns the event to wait for, or None when it finished at once (free links)."""
        groups = self.tp_groups
        st = groups.get(key)
        if st is None:
            st = groups[key] = [0, self.env.event()]
        st[0] += 1
        if st[0] == arrivals:
            del groups[key]
            phases, tail = self._tp_phases(leader, nbytes, kind)
            label = text + "/TP" if self.fold is None else (leader, i, "/TP")  # a fold mirrors it
            if Collective(self.net, phases, _succeed, st[1], label, tail).start():
                st[1].succeed()  # for the ranks waiting too
                return None
        return st[1]

    def _deliver(self, key: tuple) -> None:
        waiter = self.box.get(key)
        if waiter is None:
            self.box[key] = _ARRIVED
        else:
            del self.box[key]
            waiter.succeed()

    def _deliver_and_wake(self, arg: tuple) -> None:
        key, ev = arg
        self._deliver(key)
        ev.succeed()

    def _phases(self, stage: int, nbytes: float, tp_rank: int = 0) -> tuple[list[Phase], float]:
        """(phases, tail seconds) of the data-parallel all-reduce of one stage's TP rank ``tp_rank`` among its
        replicas, priced by the topology's collectives mode (``sim.collectives.priced``; ZeRO's rings as built)."""
        key = (stage, nbytes, tp_rank)
        ph = self.phases.get(key)
        if ph is None:
            devs = [self.dev[w] for w in self.p.replica_workers(stage, tp_rank)]
            phases, algo = dp_phases(self.topology, devs, nbytes, self.params.allreduce, self.params.zero_stage)
            tail = 0.0
            if self.params.zero_stage == 0:
                phases, tail = priced(self.topology, devs, phases, nbytes)
            self.phases[key] = ph = (self.folded(phases), tail)
            self.algorithms.add(algo)
        return ph

    def _tp_phases(self, leader: int, nbytes: float, kind: str = "all-reduce") -> tuple[list[Phase], float]:
        """(phases, tail seconds) of a TP collective of ``kind`` (``planner.tpcollectives.KINDS``) among the group
        of worker ``leader``: a ring (an all-gather or a reduce-scatter half an all-reduce's steps), fused into one
        phase unless ``SimParams.tp_ring`` says "phases"."""
        key = ("tp", leader, nbytes, kind)
        ph = self.phases.get(key)
        if ph is None:
            devs = [self.dev[w] for w in self.p.tp_group(leader)]
            ring = ring_phases if kind == "all-reduce" else ring_pass_phases
            if self.topology.collectives != "ideal":  # NCCL's protocol, bandwidth fraction and latency
                ph = priced(self.topology, devs, ring(devs, nbytes), nbytes, NCCL_COLLECTIVE[kind])
            elif self.params.tp_ring == "phases":
                ph = (ring(devs, nbytes), 0.0)
            else:
                lat = max(self.net.path(devs[i], devs[(i + 1) % len(devs)])[1] for i in range(len(devs)))
                ph = fused_ring_phases(devs, nbytes, lat, ring_steps(kind, len(devs)))
            self.phases[key] = ph = (self.folded(ph[0]), ph[1])
        return ph

    def folded(self, phases: list[Phase]) -> list[Phase]:
        """A folded run starts only the flows whose source is a simulated device (``sim.fold``)."""
        if self.fold is None:
            return phases
        devs = self.sim_devices
        made: dict[int, Phase] = {}  # a ring repeats one phase object: filter it once, share the result
        out = []
        for ph in phases:
            kept = made.get(id(ph))
            if kept is None:
                kept = made[id(ph)] = [f for f in ph if f[0] in devs]
            out.append(kept)
        return out

    # --- run and write the trace -------------------------------------------------------
    def run(self, progress: Progress | None) -> Trace:
        rng = random.Random(self.params.seed)
        procs = {}
        total = 0
        for w in self.workers:
            static, ops = self._ops(w, rng)
            procs[w] = self.env.process(self._device(w, static, ops))
            total += len(ops)
        if progress is None:
            self.env.run()
        else:
            step, n = self.env.step, 0
            try:
                while True:
                    step()
                    n += 1
                    if not n & 4095:
                        progress(len(self.rec), total)
            except simpy.core.EmptySchedule:
                pass
            progress(len(self.rec), total)
        stuck = [w for w, pr in procs.items() if pr.is_alive]
        if stuck:
            done = {w: 0 for w in stuck}
            for e in self.rec:
                w = e[0]
                if w in done:
                    done[w] += 1
            waits = ", ".join(f"w{w} at {self.p[w][done[w]]}" for w in stuck[:6])
            raise SimError(f"deadlock: no worker can proceed ({waits}); run planner.check.check on the program")
        return trace_of(self)

def _succeed(ev: simpy.Event) -> None:
    ev.succeed()
