"""Schedule generators: every family's per-worker compute order, lowered into a checked Program.

``generate(spec)`` is the one path: order compute (this module's ``ORDERS``) →
``planner.passes.lower`` (add steps and all-reduces → assign weight versions →
insert communication → ``check``). The passes live in ``planner.passes`` and are
re-exported here, so ``from planner.schedules import add_steps`` keeps working.

Workers and placement come from the family's traits (planner.program.FAMILY and
``stage_workers``): stage s's replicas get consecutive worker ids (stage 0 first);
a looped family puts virtual stage c·P + d on worker d, a V-shaped one chunk c on
worker d going down the ranks when c is even and back up when it is odd.

A new family is its order function in ``ORDERS`` (and, if it needs more of a spec
than the shared checks, a line in ``REQUIRES``), its line in the registry, its golden
file and its tests; the passes, ``check`` and both interpreters read its traits.

Why one module of ~570 lines: it is the thirteen order functions, each a page or less, and the one
``generate`` path they share; a family added is a function here, not a new module.
"""
from __future__ import annotations

import heapq
import math
from typing import Callable

from planner.passes import add_communication, add_steps, add_versions, lower
from planner.program import (Action, Kind, Program, ScheduleError, ScheduleSpec, inflight_limit, interleaved_groups,
                             make_spec, stage_workers, validate_spec)

__all__ = ["generate", "lower", "ORDERS", "REQUIRES", "ScheduleError", "make_spec", "stage_workers", "inflight_limit",
           "interleaved_groups", "validate_spec", "add_steps", "add_versions", "add_communication"]


def _replica_mbs(r: int, replica: int, mbs: range) -> list[int]:
    """The microbatches of ``mbs`` (a range of step 1) that replica ``replica`` of ``r`` takes: i ≡ replica (mod r)."""
    return list(range(mbs.start + (replica - mbs.start) % r, mbs.stop, r))


def _one_f_one_b(mbs: list[int], limit: int) -> list[tuple[Kind, int]]:
    """Warm-up of limit − 1 forwards, then one forward and one backward, then drain."""
    w = min(limit - 1, len(mbs))
    out = [(Kind.F, i) for i in mbs[:w]]
    for j, i in enumerate(mbs):
        if w + j < len(mbs):
            out.append((Kind.F, mbs[w + j]))
        out.append((Kind.B, i))
    return out


# --- compute orders per family ----------------------------------------------------------
def _order_per_replica(spec: ScheduleSpec, body: Callable[[list[int], int], list[tuple[Kind, int]]], per_batch: bool) -> dict[int, list[Action]]:
    sw = stage_workers(spec)
    out: dict[int, list[Action]] = {}
    N = spec.total_microbatches
    for s, ws in enumerate(sw):
        lim = inflight_limit(spec, s)
        for rep, w in enumerate(ws):
            seq: list[tuple[Kind, int]] = []
            if per_batch:
                for b in range(spec.batches):
                    seq += body(_replica_mbs(len(ws), rep, range(b * spec.microbatches, (b + 1) * spec.microbatches)), lim)
            else:
                seq = body(_replica_mbs(len(ws), rep, range(N)), lim)
            out[w] = [Action(s, k, i) for k, i in seq]
    return out


def order_gpipe(spec: ScheduleSpec) -> dict[int, list[Action]]:
    return _order_per_replica(spec, lambda mbs, _lim: [(Kind.F, i) for i in mbs] + [(Kind.B, i) for i in mbs], per_batch=True)


def order_1f1b(spec: ScheduleSpec) -> dict[int, list[Action]]:
    return _order_per_replica(spec, _one_f_one_b, per_batch=True)


def order_pipedream(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """1F1B-RR over the minibatch stream: no flush (steps are added per backward by ``add_steps``)."""
    return _order_per_replica(spec, _one_f_one_b, per_batch=False)


def order_2bw(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """1F1B over all batches' microbatches with no flush between batches."""
    return _order_per_replica(spec, _one_f_one_b, per_batch=False)


def order_interleaved(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """Megatron's interleaved 1F1B for any M: forwards cycle the chunks within groups of about P microbatches.

    Device d runs (V − 1)·g + 2(P − 1 − d) forwards of warm-up (g: the first group's
    size; P when P divides M, as Megatron), then one forward and one backward,
    then the drain; backwards cycle the chunks in reverse. With R replicas, replica r
    of every device runs this schedule over its own microbatches (mb mod R = r), as
    Megatron's data-parallel ranks each run their pipeline.
    """
    P, V, M, R = spec.stages, spec.chunks, spec.microbatches, spec.replicas[0]
    out: dict[int, list[Action]] = {d * R + r: [] for d in range(P) for r in range(R)}
    for r in range(R):
        for b in range(spec.batches):
            mbs = [i for i in range(b * M, (b + 1) * M) if i % R == r]
            n, groups = len(mbs), interleaved_groups(P, len(mbs))
            order = _chunk_cycle(V, mbs, groups)
            total = n * V
            for d in range(P):
                warm = total if n == P else min((P - d - 1) * 2 + (V - 1) * groups[0], total)
                fwd = [Action(c * P + d, Kind.F, i) for c, i in order]
                bwd = [Action((V - 1 - c) * P + d, Kind.B, i) for c, i in order]
                seq = fwd[:warm]
                for k in range(total - warm):
                    seq += [fwd[warm + k], bwd[k]]
                out[d * R + r] += seq + bwd[total - warm:]
    return out


def _chunk_cycle(V: int, mbs: list[int], groups: list[int]) -> list[tuple[int, int]]:
    """The interleaved forward order, (chunk, microbatch) of the k-th forward: each group of ``mbs`` (sizes
    ``groups``) through chunk 0, then chunk 1, …, chunk V − 1; the backwards run it with the chunks reversed."""
    out: list[tuple[int, int]] = []
    start = 0
    for g in groups:
        out += [(c, mbs[start + j]) for c in range(V) for j in range(g)]
        start += g
    return out


def order_zb_h1(spec: ScheduleSpec, cost: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> dict[int, list[Action]]:
    """ZB-H1: backward split into BI (input gradient) and BW (weight gradient), at 1F1B's memory.

    List scheduling (``_list_schedule``) admits a forward while fewer than the
    stage's 1F1B in-flight limit (P − s) await their BI and fewer than 1F1B's
    peak (stage 0's limit) await their BW — so no stage holds more than 1F1B's
    peak memory. Later stages thus defer their BWs into the drain. With
    tF = tBI = tBW this reaches makespan 3M + P − 1: a third of 1F1B's bubble.
    """
    limit = [inflight_limit(spec, s) for s in range(spec.stages)]
    peak = max(limit)
    return _list_schedule(spec, lambda w, s, open_n, waiting: waiting < limit[s] and open_n < peak, cost)
def order_zb_h2(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """ZB-H2: ZB-H1's list scheduling with twice the warm-up, for no bubble at twice the memory.

    A forward is admitted while fewer than 2·(P − s) − 1 microbatches await their BI
    on the stage and fewer than 2P − 1 their BW on the worker (replication scales both
    as 1F1B's limit does). Stage s then starts its first backward the moment the
    gradient arrives, and with tF = tBI = tBW one batch follows another with no idle
    time: M·(tF + tBI + tBW) per batch once M ≥ 2P − 1.
    """
    limit = [inflight_limit(spec, s) for s in range(spec.stages)]
    peak = max(limit)
    return _list_schedule(spec, lambda w, s, open_n, waiting: waiting < 2 * limit[s] - 1 and open_n < 2 * peak - 1)



def order_zb_v(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """ZB-V: two half stages per rank in a V (rank r holds r and 2P − 1 − r), split backwards.

    A forward is admitted while the rank holds fewer than 2P half-stage microbatches
    awaiting their BW (1F1B's peak, P whole ones). Rank 0 holds the last stage too, so
    backwards start as soon as a microbatch has crossed the V and every rank stays busy
    after its first input: makespan 3M + (P − 1)/2 at tF = tBI = tBW = 1, M ≥ 2P.
    """
    peak = inflight_limit(spec, 0)  # 2P: the V's 1F1B limit over its 2P virtual stages
    return _list_schedule(spec, lambda w, s, open_n, waiting: open_n < peak)



def order_looped_bfs(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """Looped BFS (Lamy-Poirier's breadth-first schedule, torch's ScheduleLoopedBFS): chunk by chunk, a batch at a time.

    Device d runs every microbatch's forward of its first chunk, then of its next, ...;
    then the backwards, last chunk first and each chunk's microbatches in reverse (the
    one that finished its forward last starts back first). GPipe's bubble spread over
    V chunks at GPipe's memory: a whole batch in flight on every chunk.
    """
    P, V, M, R = spec.stages, spec.chunks, spec.microbatches, spec.replicas[0]
    out: dict[int, list[Action]] = {d * R + r: [] for d in range(P) for r in range(R)}
    for r in range(R):
        for b in range(spec.batches):
            mbs = [i for i in range(b * M, (b + 1) * M) if i % R == r]
            for d in range(P):
                out[d * R + r] += [Action(c * P + d, Kind.F, i) for c in range(V) for i in mbs]
                out[d * R + r] += [Action(c * P + d, Kind.B, i) for c in reversed(range(V)) for i in reversed(mbs)]
    return out



def order_v_half(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """V-Half (Qi et al., Pipeline Parallelism with Controllable Memory): the V at half of 1F1B's activation memory.

    The V-shape building block (``_v_block``) with one idle slot between the forwards of
    the upward leg, repeated every microbatch (``_v_repeat``). Its lifespans hold
    ⌊(P + 2)/2⌋ whole microbatches per rank (2·⌊(P + 2)/2⌋ half-stage chunks: half of
    1F1B's P plus at most one), and at tF = tBI = tBW = 1 the makespan is
    3M + (3P − 4)/2 once M ≥ P and P ≥ 3: a bubble of (3P − 4)/2, under half of 1F1B's 3(P − 1).
    """
    return _v_repeat(spec, up_offset=2)


def order_v_min(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """V-Min (Qi et al.): the V-shape building block at its shortest lifespans, a third of 1F1B's activation memory.

    Every action of the block as early as its dependency and the rank's free slots allow
    (``_v_block`` with no gap): ⌊(P + 4)/3⌋ whole microbatches per rank (2·⌊(P + 4)/3⌋
    half-stage chunks); at tF = tBI = tBW = 1 the bubble is 2P − 5/2 once M ≥ P (2P − 3/2
    when 3 divides P and P > 3), about two thirds of 1F1B's 3(P − 1).
    """
    return _v_repeat(spec, up_offset=1)


def _v_block(P: int, up_offset: int) -> dict[tuple[Kind, int], int]:
    """One microbatch's V-shape building block: the slot of each of its 6P chunk actions (F, BI, BW of 2P stages).

    A slot is one chunk action at unit cost (tF/2 = tBI/2 = tBW/2), and the block repeats
    every 6 slots (one microbatch's three actions on each of a rank's two chunks), so
    the six actions of one rank must fall on six different slots mod 6. Each action takes
    the first such slot at or after its dependency: the forward chain down the ranks and
    back up (``up_offset`` slots apart on the way up), the input-gradient chain back
    the other way, each weight gradient right after its input gradient. How far apart the
    forwards are sets each chunk's lifespan (forward to weight gradient), and the
    lifespans over 6 are the microbatches a rank holds: that is the memory control.
    """
    rank = lambda s: s if s < P else 2 * P - 1 - s
    taken: list[set[int]] = [set() for _ in range(P)]
    slot: dict[tuple[Kind, int], int] = {}

    def place(kind: Kind, s: int, earliest: int) -> int:
        x = earliest
        while x % 6 in taken[rank(s)]:
            x += 1
        taken[rank(s)].add(x % 6)
        slot[(kind, s)] = x
        return x

    x = place(Kind.F, 0, 0)
    for s in range(1, 2 * P):
        x = place(Kind.F, s, x + (up_offset if s > P else 1))
    for s in reversed(range(2 * P)):
        x = place(Kind.BI, s, x + 1)
    for s in range(2 * P):
        place(Kind.BW, s, slot[(Kind.BI, s)] + 1)
    return slot


def _v_repeat(spec: ScheduleSpec, up_offset: int) -> dict[int, list[Action]]:
    """The building block repeated every 6 slots, one flushed batch after another, then squeezed.

    Each rank keeps the block's order of forwards and input gradients; its weight
    gradients fill what would be idle slots (deferred, oldest first), and a forward waits
    while the rank holds as many microbatch-chunks awaiting their weight gradient as the
    repeated block's own order ever does (its peak: the lifespans' count). So the memory
    is the block's, and the fill only takes bubble away. No deadlock: when a forward is
    held back, the block's order did weight gradients before it that are now pending.
    """
    P, M = spec.stages, spec.microbatches
    S = 2 * P
    sw = stage_workers(spec)
    worker = [sw[s][0] for s in range(S)]
    block = _v_block(P, up_offset)
    out: dict[int, list[Action]] = {w: [] for w in sorted(set(worker))}
    for b in range(spec.batches):
        mbs = range(b * M, (b + 1) * M)
        timed: dict[int, list[tuple[int, Kind, int, int]]] = {w: [] for w in out}
        for (kind, s), x in block.items():
            timed[worker[s]] += [(x + 6 * j, kind, s, i) for j, i in enumerate(mbs)]
        seq: dict[int, list[tuple[Kind, int, int]]] = {}
        cap: dict[int, int] = {}
        for w, evs in timed.items():
            evs.sort()
            level = peak = 0
            for _, kind, _, _ in evs:
                level += 1 if kind is Kind.F else -1 if kind is Kind.BW else 0
                peak = max(peak, level)
            cap[w] = peak
            seq[w] = [(kind, s, i) for _, kind, s, i in evs if kind is not Kind.BW]
        pos = {w: 0 for w in out}
        pending: dict[int, list[tuple[int, int]]] = {w: [] for w in out}
        holding = {w: 0 for w in out}
        done: dict[tuple[Kind, int, int], int] = {}
        remaining = 3 * S * len(mbs)
        now = 0
        while remaining:
            moved = False
            for w in out:
                choice = None
                if pos[w] < len(seq[w]):
                    kind, s, i = seq[w][pos[w]]
                    if kind is Kind.F:
                        ready = (s == 0 or done.get((Kind.F, s - 1, i), now + 1) <= now) and holding[w] < cap[w]
                    else:
                        ready = done.get((Kind.F, s, i) if s == S - 1 else (Kind.BI, s + 1, i), now + 1) <= now
                    if ready:
                        choice = (kind, s, i)
                        pos[w] += 1
                if choice is None and pending[w]:
                    choice = (Kind.BW, *pending[w].pop(0))
                if choice is None:
                    continue
                kind, s, i = choice
                out[w].append(Action(s, kind, i))
                done[choice] = now + 1
                remaining -= 1
                moved = True
                if kind is Kind.F:
                    holding[w] += 1
                elif kind is Kind.BI:
                    pending[w].append((s, i))
                else:
                    holding[w] -= 1
            if not moved:  # every action lasts one slot: nothing runs on, so nothing will become ready
                raise ScheduleError(f"{spec.family}: the repeated V block stalled at P={P}, M={M} (a bug: please report it)")
            now += 1
    return out


def order_interleaved_zb(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """Interleaved zero bubble (Qi et al.'s ZB-H1 on a looped placement; torch's ScheduleInterleavedZeroBubble).

    Interleaved 1F1B's chunk cycling (forwards cycle the V chunks group by group, backwards
    the chunks in reverse) with the backward split: device d warms up with (V − 1)·g + P − 1 − d
    forwards (g: the first group's size, P when P divides M) — half interleaved 1F1B's
    2(P − 1 − d) beyond the chunks, since a BI is only half a backward — then runs F, BI
    and, once d steady steps have passed, the oldest pending BW; the drain runs BI and BW,
    then the BWs left. The d-step lag of the weight gradients is what fills device d's
    wait for its first gradient, so at tF = tBI = tBW only the fill of one chunk forward per
    device is left: makespan 3M + (P − 1)/V for M ≥ P (the groups of ``interleaved_groups``).
    Every device then holds the same (V − 1)·g + P chunk-microbatches awaiting their BW:
    1F1B's peak (P whole microbatches) when P divides M. Replicas as in interleaved 1F1B.
    """
    P, V, M, R = spec.stages, spec.chunks, spec.microbatches, spec.replicas[0]
    out: dict[int, list[Action]] = {d * R + r: [] for d in range(P) for r in range(R)}
    for r in range(R):
        for b in range(spec.batches):
            mbs = [i for i in range(b * M, (b + 1) * M) if i % R == r]
            groups = interleaved_groups(P, len(mbs))
            cycle = _chunk_cycle(V, mbs, groups)
            total = len(cycle)
            for d in range(P):
                fwd = [Action(c * P + d, Kind.F, i) for c, i in cycle]
                bi = [Action((V - 1 - c) * P + d, Kind.BI, i) for c, i in cycle]
                warm = min((V - 1) * groups[0] + P - 1 - d, total)
                seq, waiting = fwd[:warm], []
                for k in range(total):
                    if warm + k < total:
                        seq.append(fwd[warm + k])
                    seq.append(bi[k])
                    waiting.append(bi[k])
                    if k >= d:  # device d's weight gradients lag d steps
                        seq.append(_weight_grad(waiting.pop(0)))
                out[d * R + r] += seq + [_weight_grad(a) for a in waiting]
    return out




def _weight_grad(a: Action) -> Action:
    return Action(a.stage, Kind.BW, a.mb)


def order_dualpipe_v(spec: ScheduleSpec) -> dict[int, list[Action]]:
    """DualPipeV (DeepSeek's DualPipe folded into a V; torch's ScheduleDualPipeV): full B mixed with BI/BW.

    Rank r holds the down stage r and the up stage 2P − 1 − r; k = P − 1 − r ranks lie
    between it and the V's tip. One batch of M ≥ 2P microbatches runs in eight phases:

    1. 2k forwards of the down stage (the fill that reaches the tip);
    2. r + 1 forward pairs, down then up;
    3. k times: BI of the up stage, the oldest pending BW, a forward of the up stage;
    4. M − 2P + r + 1 times the two F&B pairs DualPipe overlaps: forward down with full
       backward up, forward up with full backward down (pipetwin runs each pair in order,
       as torch's runtime does without an overlap callback);
    5. k times: full backward up, then the pair forward up + full backward down;
    6. r + 1 backward pairs, up then down: full B for the first half, then BI (the
       switch falls between the up and the down backward when r is even);
    7. k times: the oldest pending BW, then BI of the down stage;
    8. the r + 1 BWs still pending.

    The split backwards of phases 3 and 6-8 are the zero-bubble part: their weight
    gradients fill the fill and the drain. A rank holds at most 2P + 1 chunk-microbatches
    awaiting their weight gradient (DeepSeek's PP + 1 over 2P chunks: 1F1B's peak and one
    chunk). At tF = tBI = tBW the makespan is ZB-V's, 3M + (P − 1)/2.
    """
    P, M = spec.stages, spec.microbatches
    out: dict[int, list[Action]] = {r: [] for r in range(P)}
    for b in range(spec.batches):
        for r in range(P):
            out[r] += _dualpipe_v_rank(r, P, M, b * M)
    return out


def _dualpipe_v_rank(r: int, P: int, M: int, first_mb: int) -> list[Action]:
    down, up, k = r, 2 * P - 1 - r, P - 1 - r
    nxt = {(Kind.F, down): 0, (Kind.F, up): 0, (Kind.B, down): 0, (Kind.B, up): 0}  # next microbatch per (pass, stage)
    pending: list[Action] = []  # BIs awaiting their BW, oldest first
    seq: list[Action] = []

    def run(kind: Kind, stage: int) -> None:
        key = (Kind.F if kind is Kind.F else Kind.B, stage)
        a = Action(stage, kind, first_mb + nxt[key])
        nxt[key] += 1
        seq.append(a)
        if kind is Kind.BI:
            pending.append(a)

    def weight_grad() -> None:
        if pending:
            seq.append(_weight_grad(pending.pop(0)))

    for _ in range(2 * k):
        run(Kind.F, down)
    for _ in range(r + 1):
        run(Kind.F, down), run(Kind.F, up)
    for _ in range(k):
        run(Kind.BI, up), weight_grad(), run(Kind.F, up)
    for _ in range(M - 2 * P + r + 1):
        run(Kind.F, down), run(Kind.B, up), run(Kind.F, up), run(Kind.B, down)
    for _ in range(k):
        run(Kind.B, up), run(Kind.F, up), run(Kind.B, down)
    half = (r + 1) // 2
    for i in range(r + 1):
        run(Kind.BI if i > half or (i == half and r % 2) else Kind.B, up)
        run(Kind.BI if i >= half else Kind.B, down)
    for _ in range(k):
        weight_grad(), run(Kind.BI, down)
    while pending:
        weight_grad()
    return seq


def _requires_dualpipe_v(spec: ScheduleSpec) -> None:
    if spec.microbatches < 2 * spec.stages:
        raise ScheduleError(f"DualPipeV needs at least as many microbatches per batch as stages (2P = {2 * spec.stages}) "
                            f"to fill both legs of the V; got {spec.microbatches}: use --microbatches {2 * spec.stages} "
                            f"or more, or zb-v")


# --- list scheduling: the zero-bubble families --------------------------------------------
def _list_schedule(spec: ScheduleSpec, admits: Callable[[int, int, int, int], bool],
                   cost: tuple[float, float, float] = (1.0, 1.0, 1.0), entry_cap: int | None = None) -> dict[int, list[Action]]:
    """Greedy list scheduling of split backwards at unit costs, one flushed batch after another.

    At every instant each idle worker takes, in this order of preference: a ready
    forward that ``admits(worker, stage, open, waiting)`` lets in (``open``: microbatch-chunks
    on the worker whose forward is done and weight gradient is not; ``waiting``: those of
    the stage whose forward is done and input gradient is not), the ready input
    gradient (BI) of the oldest microbatch, then a pending weight gradient (BW) to
    fill what would be a bubble. ``entry_cap`` also limits the microbatches in the
    pipe (stage 0's forward started, some weight gradient not yet done) when a new one
    would enter: what keeps a tight memory budget free of deadlock, since every
    microbatch already inside may always move on.
    Among ready forwards and BIs the later stage goes first, so microbatches already
    in the pipe drain before new ones enter. Each stage runs each kind in microbatch
    order. Costs are per full stage; a chunk costs 1/V of them, as in the dry run.
    """
    sw = stage_workers(spec)
    S, V = len(sw), spec.chunks
    out: dict[int, list[Action]] = {w: [] for ws in sw for w in ws}
    dur = {Kind.F: cost[0] / V, Kind.BI: cost[1] / V, Kind.BW: cost[2] / V}
    eps = 1e-9
    for b in range(spec.batches):
        mbs = range(b * spec.microbatches, (b + 1) * spec.microbatches)
        todo_f = {(s, w): [i for i in mbs if sw[s][i % len(sw[s])] == w] for s in range(S) for w in sw[s]}
        todo_bi = {k: list(v) for k, v in todo_f.items()}
        stages_of = {w: sorted((s for s in range(S) if w in sw[s]), reverse=True) for w in out}
        done: dict[tuple[Kind, int, int], float] = {}
        pending_bw: dict[int, list[tuple[int, int]]] = {w: [] for w in out}
        open_n = {w: 0 for w in out}
        in_pipe: dict[int, int] = {}  # microbatch -> weight gradients still to do
        free_at = {w: 0.0 for w in out}
        ends: list[float] = []
        remaining = 3 * sum(len(v) for v in todo_f.values())
        now = 0.0
        while remaining:
            for w in sorted(out, key=lambda w: (free_at[w], w)):
                if free_at[w] > now + eps:
                    continue
                choice = None
                for s in stages_of[w]:
                    q = todo_f[(s, w)]
                    if (q and (s > 0 or entry_cap is None or len(in_pipe) < entry_cap)
                            and (s == 0 or done.get((Kind.F, s - 1, q[0]), math.inf) <= now + eps)
                            and admits(w, s, open_n[w], len(todo_bi[(s, w)]) - len(q))):
                        choice = (Kind.F, (s, q[0]))
                        break
                if choice is None:
                    ready = [(todo_bi[(s, w)][0], -s, s) for s in stages_of[w] if todo_bi[(s, w)]
                             and _bi_input_done(s, todo_bi[(s, w)][0], S, done, now)]
                    if ready:
                        i, _, s = min(ready)
                        choice = (Kind.BI, (s, i))
                if choice is None and pending_bw[w]:
                    choice = (Kind.BW, pending_bw[w][0])
                if choice is None:
                    continue
                kind, (s, i) = choice
                end = now + dur[kind]
                out[w].append(Action(s, kind, i))
                done[(kind, s, i)] = end
                free_at[w] = end
                heapq.heappush(ends, end)
                remaining -= 1
                if kind is Kind.F:
                    todo_f[(s, w)].pop(0)
                    open_n[w] += 1
                    if s == 0:
                        in_pipe[i] = S
                elif kind is Kind.BI:
                    todo_bi[(s, w)].pop(0)
                    pending_bw[w].append((s, i))
                else:
                    pending_bw[w].pop(0)
                    open_n[w] -= 1
                    in_pipe[i] -= 1
                    if not in_pipe[i]:
                        del in_pipe[i]
            while ends and ends[0] <= now + eps:
                heapq.heappop(ends)
            if remaining:
                if not ends:
                    raise ScheduleError(f"{spec.family}: list scheduling made no progress at P={spec.stages}, "
                                        f"M={spec.microbatches} (its admission rule starves the pipeline)")
                now = heapq.heappop(ends)
    return out


def _bi_input_done(s: int, i: int, S: int, done: dict, now: float) -> bool:
    key = (Kind.F, s, i) if s == S - 1 else (Kind.BI, s + 1, i)
    return done.get(key, math.inf) <= now + 1e-9


def _requires_2bw(spec: ScheduleSpec) -> None:
    need = max(inflight_limit(spec, s) for s in range(spec.stages))
    if spec.microbatches < need:
        raise ScheduleError(f"2BW needs microbatches per batch >= the pipeline's in-flight depth ({need}) to keep two weight versions; got {spec.microbatches}")
    # batch b + 2 runs on the version batch b's step makes: a replica's warm-up (L − 1 forwards) reaches that far
    # ahead, so every batch in between must give each replica at least L − 1 microbatches (⌊M / R⌋ is the fewest)
    for s, R in enumerate(spec.replicas):
        lim = inflight_limit(spec, s)
        if spec.batches >= 3 and spec.microbatches // R < lim - 1:
            raise ScheduleError(f"2BW over {spec.batches} batches: stage {s}'s {R} replicas get {spec.microbatches // R} "
                                f"microbatches of a batch each, fewer than its in-flight depth less one ({lim - 1}), so a "
                                f"batch would start before the step it runs on; use --microbatches {R * (lim - 1)} or more")


#: Each family's compute order (its line in planner.program.FAMILY says what it promises).
ORDERS: dict[str, Callable[[ScheduleSpec], dict[int, list[Action]]]] = {
    "gpipe": order_gpipe,
    "1f1b": order_1f1b,
    "interleaved": order_interleaved,
    "pipedream": order_pipedream,
    "2bw": order_2bw,
    "zb-h1": order_zb_h1,
    "zb-h2": order_zb_h2,
    "zb-v": order_zb_v,
    "looped-bfs": order_looped_bfs,
    "v-half": order_v_half,
    "v-min": order_v_min,
    "interleaved-zb": order_interleaved_zb,
    "dualpipe-v": order_dualpipe_v,
}

#: What a family needs of a spec beyond planner.program.validate_spec; raises ScheduleError saying what to change.
REQUIRES: dict[str, Callable[[ScheduleSpec], None]] = {
    "2bw": _requires_2bw,
    "dualpipe-v": _requires_dualpipe_v,
}


def generate(
    spec: ScheduleSpec,
    act_bytes: Callable[[int], int] | None = None,
    allreduce_bytes: Callable[[int], int] | None = None,
    check_program: bool = True,
) -> Program:
    """The one path from a spec to a checked program."""
    validate_spec(spec)
    if spec.family in REQUIRES:
        REQUIRES[spec.family](spec)
    return lower(spec, stage_workers(spec), ORDERS[spec.family](spec), act_bytes, allreduce_bytes, check_program)
