"""check(program): the schedule invariants, and a dependency-only dry run that finds deadlocks.

Every failure raises ``ProgramError`` naming the first offending action and
showing the worker × step grid with that action marked.

Point-to-point semantics (shared with both interpreters): a SEND is posted
without waiting (like ``isend``) and its payload is held until matched; a RECV
blocks until the matching SEND has been posted and the payload has arrived; an
ALLREDUCE blocks until every replica of its stage has reached the same round.

Why one module of ~550 lines: the laws, the family conventions, the bounds it measures for an
imported program and the dry run read one program the same way and fail through one
``ProgramError`` grid; the measured bounds and ``declared_family_differs`` are the conventions
read back rather than asserted, so apart they would restate the same rules twice.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from planner.program import Action, Kind, Program, ScheduleError, inflight_limit, looped_warmup_extra
from planner.trace import Event, Trace
from topologies.errors import InputError


class ProgramError(InputError):
    """A program that breaks an invariant. ``worker``/``index`` locate the offending action."""

    def __init__(self, message: str, program: Program | None = None, worker: int | None = None, index: int | None = None):
        self.worker, self.index = worker, index
        self.action = program[worker][index] if program is not None and worker is not None and index is not None and 0 <= index < len(program[worker]) else None
        where = f"w{worker}[{index}] {self.action}: " if self.action is not None else ""
        self.grid = program.grid(mark=(worker, index) if worker is not None and index is not None else None) if program is not None else ""
        super().__init__(where + message)

    def __str__(self) -> str:
        return self.args[0] + ("\n" + self.grid if self.grid else "")


def check(program: Program) -> None:
    """Verify the laws always and a family's conventions when the program declares that family.

    Laws (every program): one F and one B, or one BI and one BW, per (stage, microbatch) on a
    worker holding the stage; dependency order and data flow; every send matched; the weight
    versions a backward reads (its forward's); every stage steps (each update point a worker owes — a
    batch, or PipeDream's round — has one STEP, after what it covers); no deadlock.
    Conventions (only what ``program.spec.traits`` declares): B only or BI/BW only, microbatch
    order per stage, in-flight bounds, the weight-gradient cap. A program of the ``custom``
    family (an imported one) declares none; :func:`measured_bounds` reports what it does.

    With tensor parallelism: the TP groups are consistent and TP rank 0's workers form a program
    that passes every check (TP ranks of a group run the same actions, so one rank's slice is
    the whole pipeline's behaviour; the TP collectives inside compute actions never block apart).
    ``_check_tensor_groups`` holds every rank's actions equal to rank 0's with each peer its own
    rank of the peer group, so rank t's slice is rank 0's with the workers renamed, and the laws
    do not depend on names: checking rank 0's slice checks them all.
    """
    if program.tensor_parallel > 1:
        _check_tensor_groups(program)
        check(program.tp_slice(0))
        return
    _check_structure(program)
    _check_local_order_and_dataflow(program)
    _check_matching(program)
    _check_update_points(program)
    _check_versions(program)
    _check_inflight(program)
    _run(program, UnitCosts(), None)  # no deadlock


# --- structure -------------------------------------------------------------------------
def _check_structure(p: Program) -> None:
    S = len(p.stage_workers)
    N = p.spec.total_microbatches
    backward = p.spec.traits.backward  # "full" (B only), "split" (BI + BW only) or "mixed" (either, per microbatch)
    split = backward == "split"
    seen: dict[tuple[Kind, int, int], tuple[int, int]] = {}
    for w in p.workers:
        held = set(p.stages_of(w))
        for idx, a in enumerate(p[w]):
            if a.stage < 0 or a.stage >= S:
                raise ProgramError(f"stage {a.stage} does not exist (stages 0..{S - 1})", p, w, idx)
            if a.stage not in held:
                raise ProgramError(f"worker {w} does not hold stage {a.stage}", p, w, idx)
            if not a.is_compute:
                continue
            if a.mb < 0 or a.mb >= N:
                raise ProgramError(f"microbatch {a.mb} is outside 0..{N - 1}", p, w, idx)
            if backward != "mixed" and ((a.kind is Kind.B and split) or (a.kind in (Kind.BI, Kind.BW) and not split)):
                raise ProgramError(f"{a.kind.value} does not belong to a {p.spec.family} program", p, w, idx)
            expect = p.worker_of(a.stage, a.mb)
            if expect != w:
                raise ProgramError(f"round robin puts microbatch {a.mb} of stage {a.stage} on worker {expect}", p, w, idx)
            key = (a.kind, a.stage, a.mb)
            if key in seen:
                raise ProgramError(f"duplicate: already at w{seen[key][0]}[{seen[key][1]}]", p, w, idx)
            seen[key] = (w, idx)
    for s in range(S):
        for i in range(N):
            if backward == "mixed":  # the law: one F and one B, or one BI and one BW
                full = (Kind.B, s, i) in seen
                if full and ((Kind.BI, s, i) in seen or (Kind.BW, s, i) in seen):
                    w, idx = seen[(Kind.B, s, i)]
                    raise ProgramError(f"microbatch {i} of stage {s} has both a full backward and a split one", p, w, idx)
                kinds = (Kind.F, Kind.B) if full else (Kind.F, Kind.BI, Kind.BW)
            else:
                kinds = (Kind.F, Kind.BI, Kind.BW) if split else (Kind.F, Kind.B)
            for k in kinds:
                if (k, s, i) not in seen:
                    w = p.worker_of(s, i)
                    raise ProgramError(f"missing {s}{k.value}{i}: every (stage, microbatch) needs one of each of {'/'.join(x.value for x in kinds)}", p, w, len(p[w]) - 1 if p[w] else None)


def _check_tensor_groups(p: Program) -> None:
    """Every stage has whole TP groups, a worker keeps one group and TP rank, and a group's ranks run the
    same actions, each talking to its own TP rank of the peer group."""
    T = p.tensor_parallel
    group: dict[int, tuple[int, ...]] = {}
    for s, ws in enumerate(p.stage_workers):
        if len(ws) % T:
            w = ws[0] if ws else None
            raise ProgramError(f"stage {s} has {len(ws)} workers, not whole groups of {T} tensor-parallel ranks", p, w, 0 if w is not None else None)
        for r in range(len(ws) // T):
            g = ws[r * T:(r + 1) * T]
            for w in g:
                if group.setdefault(w, g) != g:
                    raise ProgramError(f"worker {w} is in TP group {list(group[w])} and in {list(g)}", p, w, 0)
    for w in p.workers:
        if w not in group:
            raise ProgramError(f"worker {w} holds no stage", p, w, 0 if p[w] else None)
    for g in dict.fromkeys(group.values()):
        ref = p[g[0]]
        for t, w in enumerate(g[1:], 1):
            acts = p[w]
            for idx, (a, b) in enumerate(zip(acts, ref)):
                if b.peer is not None and b.peer not in group:
                    raise ProgramError(f"peer w{b.peer} holds no stage", p, g[0], idx)
                want = b if b.peer is None else Action(b.stage, b.kind, b.mb, b.version, group[b.peer][t], b.grad, b.nbytes)
                if a != want:
                    raise ProgramError(f"TP rank {t} of group {list(g)} runs {a} where rank 0 runs {b} (expected {want})", p, w, idx)
            if len(acts) != len(ref):
                raise ProgramError(f"TP rank {t} of group {list(g)} runs {len(acts)} actions, rank 0 {len(ref)}", p, w, min(len(acts), len(ref)) - 1 if acts else None)


# --- order and data flow on each worker --------------------------------------------------
def _check_local_order_and_dataflow(p: Program) -> None:
    S = len(p.stage_workers)
    for w in p.workers:
        have: set[tuple[str, int, int]] = set()  # ("act"|"grad"|"F"|"BI", stage, mb)
        last_mb: dict[tuple[Kind, int], int] = {}
        in_order = p.spec.traits.in_order  # a family's convention, not a law
        for idx, a in enumerate(p[w]):
            s, i = a.stage, a.mb
            if a.is_compute and in_order:
                prev = last_mb.get((a.kind, s), -1)
                if i <= prev:
                    raise ProgramError(f"{a.kind.value} of stage {s} out of microbatch order (after microbatch {prev})", p, w, idx)
                last_mb[(a.kind, s)] = i
            if a.kind is Kind.F:
                if s > 0 and ("act", s - 1, i) not in have:
                    raise ProgramError(f"forward before its input: stage {s - 1}'s activation of microbatch {i} has not arrived on w{w}", p, w, idx)
                have.add(("F", s, i))
                have.add(("act", s, i))
            elif a.kind in (Kind.B, Kind.BI):
                if ("F", s, i) not in have:
                    raise ProgramError(f"backward before its own forward {s}F{i}", p, w, idx)
                if s < S - 1 and ("grad", s + 1, i) not in have:
                    raise ProgramError(f"backward before its output gradient: stage {s + 1}'s gradient of microbatch {i} has not arrived on w{w}", p, w, idx)
                have.add(("BI", s, i))
                have.add(("grad", s, i))
            elif a.kind is Kind.BW:
                if ("BI", s, i) not in have:
                    raise ProgramError(f"weight gradient before input gradient {s}BI{i}", p, w, idx)
            elif a.kind is Kind.SEND:
                item = ("grad" if a.grad else "act", s, i)
                if item not in have:
                    raise ProgramError(f"sends {'gradient' if a.grad else 'activation'} of microbatch {i} before computing it", p, w, idx)
            elif a.kind is Kind.RECV:
                have.add(("grad" if a.grad else "act", s + 1 if a.grad else s - 1, i))


# --- send / receive matching ----------------------------------------------------------------
def _check_matching(p: Program) -> None:
    S = len(p.stage_workers)
    sends: dict[tuple, tuple[int, int]] = {}
    recvs: dict[tuple, tuple[int, int]] = {}
    for w in p.workers:
        for idx, a in enumerate(p[w]):
            if a.kind is Kind.SEND:
                dst_stage = a.stage - 1 if a.grad else a.stage + 1
                if not 0 <= dst_stage < S:
                    raise ProgramError(f"sends to stage {dst_stage}, which does not exist", p, w, idx)
                want = p.worker_of(dst_stage, a.mb)
                if a.peer != want:
                    raise ProgramError(f"sends to w{a.peer} but stage {dst_stage} microbatch {a.mb} runs on w{want}", p, w, idx)
                key = (w, a.peer, a.grad, a.stage, a.mb)
                if key in sends:
                    raise ProgramError("duplicate send", p, w, idx)
                sends[key] = (w, idx)
            elif a.kind is Kind.RECV:
                src_stage = a.stage + 1 if a.grad else a.stage - 1
                if not 0 <= src_stage < S:
                    raise ProgramError(f"receives from stage {src_stage}, which does not exist", p, w, idx)
                key = (a.peer, w, a.grad, src_stage, a.mb)
                if key in recvs:
                    raise ProgramError("duplicate receive", p, w, idx)
                recvs[key] = (w, idx)
    for key, (w, idx) in sends.items():
        if key not in recvs:
            raise ProgramError(f"send has no matching receive on w{key[1]}", p, w, idx)
    for key, (w, idx) in recvs.items():
        if key not in sends:
            raise ProgramError(f"receive has no matching send on w{key[0]}", p, w, idx)
    # all-reduce rounds: every replica of a stage runs the same rounds in the same order
    for s, ws in enumerate(p.stage_workers):
        seqs = {w: [a.mb for a in p[w] if a.kind is Kind.ALLREDUCE and a.stage == s] for w in ws}
        ref = seqs[ws[0]]
        for w in ws[1:]:
            if seqs[w] != ref:
                idx = next((j for j, a in enumerate(p[w]) if a.kind is Kind.ALLREDUCE and a.stage == s), len(p[w]) - 1)
                raise ProgramError(f"all-reduce rounds of stage {s} differ from replica w{ws[0]}'s {ref[:6]}...", p, w, idx)
        if len(ws) == 1 and ref:
            idx = next(j for j, a in enumerate(p[ws[0]]) if a.kind is Kind.ALLREDUCE)
            raise ProgramError(f"all-reduce on stage {s}, which has one replica", p, ws[0], idx)


# --- weight versions ------------------------------------------------------------------------
def _check_versions(p: Program) -> None:
    fam = p.spec.traits
    f_version: dict[tuple[int, int], int] = {}
    # forward versions first (vertical sync compares against stage 0)
    for w in p.workers:
        for a in p[w]:
            if a.kind is Kind.F:
                f_version[(a.stage, a.mb)] = a.version
    for w in p.workers:
        steps: dict[int, int] = {}
        inflight: dict[int, dict[int, int]] = {}  # stage -> mb -> version (F done, weight grad not done)
        for idx, a in enumerate(p[w]):
            s = a.stage
            cur = steps.get(s, 0)
            if a.kind is Kind.STEP:
                if a.version != cur + 1:
                    raise ProgramError(f"step produces version {a.version}, expected {cur + 1}", p, w, idx)
                steps[s] = a.version
                continue
            if not a.is_compute:
                continue
            if a.kind is Kind.F:
                if fam.versions == "batch":
                    want = p.spec.batch_of(a.mb)
                    if a.version != want or cur != want:
                        raise ProgramError(f"flush schedule: batch {want} must run on version {want} (tagged {a.version}, stage holds {cur})", p, w, idx)
                elif fam.versions == "stale":
                    want = max(0, p.spec.batch_of(a.mb) - 1)
                    if a.version != want:
                        raise ProgramError(f"2BW: batch {p.spec.batch_of(a.mb)} uses version {want}", p, w, idx)
                elif p.spec.vertical_sync:
                    want = f_version.get((0, a.mb), 0)
                    if a.version != want:
                        raise ProgramError(f"vertical sync: stage 0 used version {want} for minibatch {a.mb}", p, w, idx)
                elif a.version != cur:
                    raise ProgramError(f"PipeDream forward must use the latest version {cur}", p, w, idx)
                if a.version > cur:
                    raise ProgramError(f"uses version {a.version} before the stage has made it (has {cur})", p, w, idx)
                inflight.setdefault(s, {})[a.mb] = a.version
                live = set(inflight[s].values()) | {cur}
                if fam.weight_copies and len(live) > fam.weight_copies:
                    raise ProgramError(f"{fam.title} holds {len(live)} weight versions {sorted(live)}; at most {fam.weight_copies}", p, w, idx)
                stashed = set(inflight[s].values()) - {cur}
                if len(stashed) > len(inflight[s]):
                    raise ProgramError("more stashed versions than in-flight minibatches", p, w, idx)
            else:
                fv = f_version.get((s, a.mb))
                if a.version != fv:
                    raise ProgramError(f"backward uses version {a.version} but its forward used {fv} (weight stashing)", p, w, idx)
                if a.kind in (Kind.B, Kind.BW):
                    inflight.get(s, {}).pop(a.mb, None)


def _check_update_points(p: Program) -> None:
    """The law *every stage steps*: each update point a worker owes has exactly one STEP, after what it covers.

    A worker holding stage s owes it an update point (a round) for every gradient it computes or reduces:
    a batched family (flush families and 2BW, ``Family.batched``) round b for each batch b in which it
    runs a weight gradient (B or BW) of s; PipeDream's stream round k for its backward of minibatch
    k·R + r (replica r of R, one step per backward); and, in both, every round it all-reduces (a replica
    whose minibatches ran out joins the last rounds and still steps, or its weights leave its replicas').
    Each owed round's STEP comes after every backward of that round on the worker and, on a replicated
    stage, after the round's ALLREDUCE; a missing STEP would leave the stage's weights without that
    update, a duplicate or a STEP no round owes would update them twice or with no gradient.
    """
    for w in p.workers:
        owed: dict[tuple[int, int], int] = {}  # (stage, round) -> index of the last action that owes it
        for idx, a in enumerate(p[w]):
            if a.kind in (Kind.B, Kind.BW):
                owed[(a.stage, p.round_of(a.stage, a.mb))] = idx
            elif a.kind is Kind.ALLREDUCE:
                owed[(a.stage, a.mb)] = idx
        done: set[tuple[int, int]] = set()
        reduced: set[tuple[int, int]] = set()
        stepped: dict[tuple[int, int], int] = {}
        for idx, a in enumerate(p[w]):
            if a.kind in (Kind.B, Kind.BW):
                done.add((a.stage, a.mb))
            if a.kind not in (Kind.ALLREDUCE, Kind.STEP):
                continue
            s, k = a.stage, a.mb
            for i in _round_microbatches(p, s, k, w):
                if (s, i) not in done:
                    raise ProgramError(f"{a.kind.value} of round {k} before the backward of microbatch {i} it covers", p, w, idx)
            if a.kind is Kind.ALLREDUCE:
                reduced.add((s, k))
                continue
            if (s, k) not in owed:
                raise ProgramError(f"stage {s} steps for round {k} on w{w}, which computes and reduces no gradient "
                                   f"of that round: the step would update it with no gradient; remove it", p, w, idx)
            if len(p.stage_workers[s]) > 1 and (s, k) not in reduced:
                raise ProgramError(f"step of a replicated stage before its all-reduce {s}ALLREDUCE{k}", p, w, idx)
            if (s, k) in stepped:
                raise ProgramError(f"stage {s} steps twice for round {k} on w{w} (first at w{w}[{stepped[(s, k)]}]); "
                                   f"one step per update point", p, w, idx)
            stepped[(s, k)] = idx
        for (s, k), idx in sorted(owed.items(), key=lambda item: item[1]):
            if (s, k) not in stepped:
                what = f"batch {k} on w{w}" if p.spec.traits.batched else f"round {k} on w{w} (a stream steps after every backward)"
                raise ProgramError(f"stage {s} never steps for {what}: its weights would miss that update; "
                                   f"add {Action(s, Kind.STEP, k, version=k + 1)} after this action", p, w, idx)


def _round_microbatches(p: Program, stage: int, k: int, w: int) -> list[int]:
    """The microbatches of ``stage`` whose weight gradients update point ``k`` on worker ``w`` covers."""
    reps = p.stage_workers[stage]
    N = p.spec.total_microbatches
    if not p.spec.traits.batched:
        i = k * len(reps) + reps.index(w)
        return [i] if i < N else []
    lo = k * p.spec.microbatches
    # worker_of(stage, i) is reps0[i mod r] (round robin over TP rank 0's replicas): the microbatches w takes
    # are those ≡ its position there (mod r), one arithmetic range instead of a worker_of per microbatch
    reps0 = p.replica_workers(stage)
    if w not in reps0:
        return []
    r, j = len(reps0), reps0.index(w)
    return list(range(lo + (j - lo) % r, min(lo + p.spec.microbatches, N), r))


def inflight_bound(p: Program, stage: int) -> int:
    """The in-flight bound the family promises for one replica of ``stage``."""
    rule = p.spec.traits.inflight
    if rule == "batch":
        return math.ceil(p.spec.microbatches / len(p.stage_workers[stage]))
    if rule == "chunk":
        return p.spec.microbatches  # per chunk; Megatron's warm-up bound is checked by the dry run tests
    if rule == "none":
        return p.spec.total_microbatches
    a, b = p.spec.traits.inflight_scale
    return a * inflight_limit(p.spec, stage) + b


def open_cap(p: Program) -> int | None:
    """Microbatch-chunks a worker may hold awaiting their weight gradient under the family's convention (None: no cap)."""
    fam = p.spec.traits
    if fam.open_cap is None:
        return None
    cap = fam.open_cap_at(max(inflight_limit(p.spec, s) for s in range(len(p.stage_workers))))
    if fam.placement == "looped":  # interleaved zero bubble warms up (V − 1)·g: g the first group, P when P | M
        cap += looped_warmup_extra(p.spec.stages, p.spec.chunks, p.spec.microbatches, len(p.stage_workers[0]))
    return cap


def max_inflight(p: Program) -> dict[tuple[int, int], int]:
    """Peak microbatches in flight (forward done, input gradient not yet) per (worker, stage)."""
    out: dict[tuple[int, int], int] = {}
    for w in p.workers:
        cur: dict[int, int] = {}
        for a in p[w]:
            if a.kind is Kind.F:
                cur[a.stage] = cur.get(a.stage, 0) + 1
                out[(w, a.stage)] = max(out.get((w, a.stage), 0), cur[a.stage])
            elif a.kind in (Kind.B, Kind.BI):
                cur[a.stage] -= 1
    return out


def measured_bounds(p: Program) -> dict:
    """What a program does where a family would promise something: reported, never asserted.

    Keys: ``inflight`` (stage → peak microbatches with forward done and input gradient not),
    ``awaiting_weight_grad`` (worker → peak forward done and weight gradient not),
    ``in_microbatch_order`` (every stage runs each kind in increasing microbatch order),
    ``backward`` ("full", "split" or "mixed").
    """
    peak_stage: dict[int, int] = {}
    for (w, s), n in max_inflight(p).items():
        peak_stage[s] = max(peak_stage.get(s, 0), n)
    open_peak: dict[int, int] = {}
    ordered = True
    kinds: set[Kind] = set()
    for w in p.workers:
        cur = peak = 0
        last: dict[tuple[Kind, int], int] = {}
        for a in p[w]:
            if not a.is_compute:
                continue
            kinds.add(a.kind)
            ordered = ordered and a.mb > last.get((a.kind, a.stage), -1)
            last[(a.kind, a.stage)] = a.mb
            cur += a.kind is Kind.F
            cur -= a.kind in (Kind.B, Kind.BW)
            peak = max(peak, cur)
        open_peak[w] = peak
    backward = "mixed" if Kind.B in kinds and Kind.BI in kinds else "split" if Kind.BI in kinds else "full"
    return {"inflight": dict(sorted(peak_stage.items())), "awaiting_weight_grad": open_peak,
            "in_microbatch_order": ordered, "backward": backward}


def declared_family_differs(program: Program) -> str | None:
    """Where a program departs from what its declared family's generator writes for its spec; None when it
    is that program (compute order and placement) or declares ``custom``. Reported, never asserted.

    ``check`` holds a declared family's conventions only as bounds (in-flight, weight-gradient cap, order of
    microbatches), so an order that keeps a looser family's bounds passes under its name: a 1F1B file
    declared ``gpipe``, ZB-H1 declared ``zb-h2``, interleaved declared ``looped-bfs``. Such a file runs as
    written in both interpreters, but the cost model and the planner price the declared family's bubble and
    memory; the line this returns says so, and where the first difference is.
    """
    from planner.schedules import generate  # schedules imports check: the generator is read at call time

    fam = program.spec.traits
    if not fam.generated:
        return None
    ours = program.tp_slice(0) if program.tensor_parallel > 1 else program
    name = {w: i for i, w in enumerate(sorted(ours.workers))}  # TP rank 0's workers, renamed 0..n−1
    title = f"declared {program.spec.family}, but"
    tail = (f"the cost model prices {fam.title}'s bubble and memory while the simulator and executor run the order "
            f"as written; declare it \"custom\" if the order is your own")
    try:
        want = generate(program.spec, check_program=False)
    except ScheduleError as e:
        return f"{title} {fam.title} generates no program for its spec ({e.args[0]}); {tail}"
    if tuple(tuple(name.get(w, -1) for w in ws) for ws in ours.stage_workers) != want.stage_workers:
        return f"{title} its stages sit on other workers than {fam.title} places them ({list(want.stage_workers)}); {tail}"
    for w in sorted(ours.workers):
        mine = [(i, a) for i, a in enumerate(ours[w]) if a.is_compute]
        theirs = [a for a in want[name[w]] if a.is_compute]
        for (i, a), b in zip(mine, theirs):
            if (a.kind, a.stage, a.mb) != (b.kind, b.stage, b.mb):
                return f"{title} its order is not {fam.title}'s: w{w}[{i}] runs {a} where {fam.title} runs {b}; {tail}"
        if len(mine) != len(theirs):
            return f"{title} w{w} runs {len(mine)} compute actions where {fam.title} runs {len(theirs)}; {tail}"
    return None


def _check_inflight(p: Program) -> None:
    """In flight = forward done, input gradient not; a split family also caps forward-done, weight-gradient-not."""
    fam = p.spec.traits
    zb_cap = open_cap(p)
    bounds: dict[int, int] = {}  # per stage, asked once
    for w in p.workers:
        cur: dict[int, int] = {}
        open_w = 0
        for idx, a in enumerate(p[w]):
            if a.kind is Kind.F:
                cur[a.stage] = cur.get(a.stage, 0) + 1
                open_w += 1
                bound = bounds.get(a.stage)
                if bound is None:
                    bound = bounds[a.stage] = inflight_bound(p, a.stage)
                if cur[a.stage] > bound:
                    raise ProgramError(f"{cur[a.stage]} microbatches in flight on stage {a.stage}; {p.spec.family} allows {bound}", p, w, idx)
                if zb_cap is not None and open_w > zb_cap:
                    raise ProgramError(f"{open_w} microbatches await their weight gradient; {fam.title} allows {zb_cap}", p, w, idx)
            elif a.kind in (Kind.B, Kind.BI):
                cur[a.stage] -= 1
            if a.kind in (Kind.B, Kind.BW):
                open_w -= 1


# --- dry run --------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnitCosts:
    """Dry-run costs per action (interleaved chunks take 1/V of them)."""

    f: float = 1.0
    b: float = 2.0
    bi: float = 1.0
    bw: float = 1.0
    comm: float = 0.0
    allreduce: float = 0.0
    step: float = 0.0


def dry_run(program: Program, costs: UnitCosts = UnitCosts()) -> Trace:
    """Run the program on dependency-only semantics and return its trace; raise on deadlock."""
    trace = Trace(meta={"source": "dry-run", "family": program.spec.family, "microbatch_size": 1})
    ran: list[tuple[int, Action, float, float]] = []
    _run(program, costs, ran)
    trace.events.extend(_event(w, a, t, end) for w, a, t, end in ran)
    return trace


def _run(program: Program, costs: UnitCosts, ran: list | None) -> None:
    """The dry run: each action's (worker, action, start, end) appended to ``ran`` in the order they run (nothing
    kept when None: ``check`` only asks whether the program deadlocks); raise on deadlock."""
    p = program
    V = p.spec.chunks
    cost = {Kind.F: costs.f / V, Kind.B: costs.b / V, Kind.BI: costs.bi / V, Kind.BW: costs.bw / V,
            Kind.SEND: 0.0, Kind.RECV: 0.0, Kind.ALLREDUCE: costs.allreduce, Kind.STEP: costs.step}
    pos = {w: 0 for w in p.workers}
    clock = {w: 0.0 for w in p.workers}
    posted: dict[tuple, float] = {}  # (src, dst, grad, stage, mb) -> time the payload is available
    at_allreduce: dict[tuple[int, int], dict[int, float]] = {}
    remaining = sum(len(v) for v in p.actions.values())
    workers = p.workers
    SEND, RECV, ALLREDUCE, comm = Kind.SEND, Kind.RECV, Kind.ALLREDUCE, costs.comm
    while remaining:
        progressed = False
        for w in workers:
            acts = p[w]
            i, n, t_w = pos[w], len(acts), clock[w]
            while i < n:  # this worker's actions until one waits (position and clock kept in locals)
                a = acts[i]
                k = a.kind
                t = t_w
                if k is SEND:
                    posted[(w, a.peer, a.grad, a.stage, a.mb)] = t + comm
                    end = t
                elif k is RECV:
                    key = (a.peer, w, a.grad, a.stage + 1 if a.grad else a.stage - 1, a.mb)
                    if key not in posted:
                        break
                    t = max(t, posted[key])
                    end = t
                elif k is ALLREDUCE:
                    group = p.stage_workers[a.stage]
                    arrived = at_allreduce.setdefault((a.stage, a.mb), {})
                    arrived[w] = t
                    if len(arrived) < len(group):
                        break
                    t = max(arrived.values())
                    end = t + cost[k]
                else:
                    end = t + cost[k]
                if ran is not None:
                    ran.append((w, a, t, end))
                t_w = end
                i += 1
            if i != pos[w]:
                remaining -= i - pos[w]
                progressed = True
                pos[w], clock[w] = i, t_w
        if not progressed:
            blocked = [(w, pos[w]) for w in p.workers if pos[w] < len(p[w])]
            w0, i0 = blocked[0]
            waits = ", ".join(f"w{w} at {p[w][i]}" for w, i in blocked[:8])
            raise ProgramError(f"deadlock: no worker can proceed ({waits})", p, w0, i0)


def _event(w: int, a: Action, start: float, end: float) -> Event:
    return Event(w, str(a), start, end, a.kind.value, a.nbytes)
