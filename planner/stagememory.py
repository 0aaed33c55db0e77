"""A stage's device memory, counted once: the byte accounting the cost model and the simulator both read.

``planner.costmodel`` (and through it the partition search, ``pipetwin plan`` and ``whatif``) and
``sim.memory`` (``pipetwin simulate``) charge a stage's bytes from here, so that a plan is weighed the same
wherever it is costed:

- static state: weights × the versions a stage keeps, gradients, optimizer state, sharded over the stage's
  replicas by ZeRO (:func:`static_bytes`, over ``planner.sharding.zero_state_bytes``);
- per microbatch in flight, what the stage keeps for backward (``planner.recompute.kept_bytes`` for the mode)
  and, off the last stage, its output, kept as the root of the backward (:func:`stage_bytes`);
- the transient a recomputed backward rebuilds (one layer at a time; a split backward's whole stage);
- ZeRO-3's gathered units while a pass runs (:func:`fsdp_units`, :func:`fsdp_transients`);
- receive buffers and outgoing gradients, which depend on where each RECV and SEND sits in a worker's
  action list: :func:`memory_levels` replays that list.

The closed form (:func:`peak_stage_bytes`) and the replay (:func:`memory_levels`) read the same per-stage
figures.

The replay (``memory_levels``) follows the executor's own bookkeeping (``executor.runtime``) on a
worker's action list. What a worker holds depends only on the order of its actions, not
on their timing, so the level at the start and end of every action is computed
up front and the simulator only stamps times on it. Held between actions:

- weights: every live weight version of every stage the worker holds. A version
  lives from the STEP that makes it (version 0: from the start) until its last
  use on this worker (a compute action tagged with it, or the STEP that reads
  it); the newest is never dropped. A STEP that is the last use of the version
  it reads updates it in place; otherwise it writes into the one dropped version
  a stage keeps for reuse (the executor's spare) or into a new copy;
- optimizer state: ``optimizer_state_factor`` × parameters per stage, from the start;
- with ZeRO (``SimParams.zero_stage`` 1 to 3): the weights, gradients and optimizer state of
  ``planner.sharding.zero_state_bytes`` over the stage's replicas instead (the cost model's figures);
  at stage 3, while a replicated stage's F/B/BI/BW runs, its gathered units too
  (``planner.sharding.fsdp_transient_bytes``, counted at the action's start);
- gradients: one buffer of the stage's parameter bytes per open round, from the
  round's first backward (B or BW; its ALLREDUCE when no backward contributed)
  until its STEP (flush schedules and 2BW: round = batch; PipeDream: a
  replica's k-th minibatch is round k);
- activations: from a forward's start until its backward (BW when split) ends,
  the bytes the stage keeps for backward (``StageBytes.saved``: the received
  input excluded, it is a receive buffer) plus the stage's output, which the
  executor keeps as the root of the backward (``StageBytes.output``; see
  :func:`stage_bytes` for how they come from a profile). With recomputation
  (``planner.recompute``) the stage keeps less, and a B holds what one layer
  rebuilds (``StageBytes.rebuilt``) while it runs; so do a split backward's BI and
  its BW, each of which rebuilds layer by layer and frees what it rebuilt before it
  ends (``executor.recompute``: the BW rebuilds again, nothing rebuilt is held between
  the two; ``tests/test_recompute_split_memory.py`` measures it);
- outgoing gradients: an input gradient from the end of the B/BI that makes it
  until its SEND hands it to the transport;
- receive buffers: receives are posted ``recv_lookahead`` ahead, each into a
  pooled buffer of its payload's size, and the pool never frees: it holds the
  most buffers of each size ever in use at once. A buffer is in use from its
  post until its payload is consumed: a gradient by its B (by the BW after its
  BI), an activation by the backward of its microbatch (the forward keeps it).

Not counted, here as in the executor: transients inside one action (autograd's
fresh gradients before they are accumulated, an all-reduce's flat copy), a
message once the transport has it, the data set's inputs and targets until a
forward takes them, the loss scalar.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from planner.profile import ModelProfile
from planner.program import Action, Kind, Program
from planner.recompute import kept_bytes, layer_kept_bytes, rebuilt_bytes
from planner.sharding import collective_bytes, fsdp_collectives, fsdp_transient_bytes, zero_state_bytes

_F, _B, _BI, _BW = Kind.F, Kind.B, Kind.BI, Kind.BW
_SEND, _RECV, _ALLREDUCE, _STEP = Kind.SEND, Kind.RECV, Kind.ALLREDUCE, Kind.STEP
_COMPUTE = (_F, _B, _BI, _BW)

#: receives the executor posts ahead on gloo (``PIPETWIN_RECV_LOOKAHEAD``; NCCL posts 1)
RECV_LOOKAHEAD = 8


class StageBytes(NamedTuple):
    """What one stage weighs: parameter bytes, and per microbatch in flight the bytes kept for backward
    (the received input excluded) and the output kept until backward (0 on the last stage); with
    recomputation, what a B (a BI, a BW) holds beyond that while it runs (``rebuilt``)."""

    params: float
    saved: float
    output: float = 0.0
    rebuilt: float = 0.0


def static_bytes(param_bytes: float, versions: int, replicas: int, zero_stage: int,
                 optimizer_state_factor: float) -> float:
    """Weights × ``versions``, gradients and optimizer state of a stage holding ``param_bytes``, sharded over its
    ``replicas`` by ZeRO ``zero_stage`` (``planner.sharding.zero_state_bytes``; one version when sharded)."""
    if zero_stage == 0:
        return param_bytes * (versions + 1.0 + optimizer_state_factor)
    return zero_state_bytes(float(param_bytes), int(replicas), zero_stage, optimizer_state_factor).total_bytes


def peak_stage_bytes(static, kept_bytes_, rebuilt_bytes_, held, mb: int = 1):
    """The closed form of a stage's peak bytes per device: its ``static`` bytes (:func:`static_bytes`), ``held``
    microbatches of what it keeps for backward, and what one layer's backward rebuilds (the byte figures per
    sample × ``mb``); elementwise over numpy arrays (the partition search's tables)."""
    return static + (held * kept_bytes_ + rebuilt_bytes_) * mb


def transfer_bytes(held, inflight, input_bytes: float, input_kept: float, output_bytes: float, receives: int,
                   lookahead: int = RECV_LOOKAHEAD, kept: float = 0.0, rebuilt: float = 0.0,
                   split: bool = False) -> float:
    """What a stage holds for its boundaries at its peak, beyond ``held`` microbatches of its kept bytes (which
    count the received input as kept, ``input_kept`` of it): per microbatch held, its output (the root of the
    backward, ``output_bytes``; 0 on the last stage) in place of that input, which sits in a receive buffer; and
    the receive pool, per buffer size the most buffers ever in use at once, which is at most
    min(receives, ``lookahead`` + payloads received and not yet consumed): per microbatch held its input
    (``input_bytes``; 0 on the first stage), and the gradients that wait for their backward, one for a full
    backward, one more per microbatch a split backward holds awaiting its BW beyond the 1F1B ``inflight``
    count. Where the input and the output are the same size they share one pool (one lookahead).

    ``receives``: the RECVs of each kind (activations, gradients) a replica runs. Exact where the pool fills by
    the time the stage holds ``held`` and a stage holds them again after (1F1B, 2BW, GPipe, PipeDream, ZB-H1);
    an upper bound elsewhere (ZB-H2: its gradients pile up in the drain, when fewer activations are held).
    The input gradient a backward makes waits for its SEND: a split backward's BI makes it while the stage still
    holds the microbatch (until its BW), a full B after freeing the microbatch (``kept`` − ``input_kept`` +
    output); either adds to the peak only beyond the ``rebuilt`` bytes a backward holds while it runs (those are
    gone by its end)."""
    acts_in = held if input_bytes else 0
    grads_in = held - inflight + 1 if output_bytes else 0
    classes: dict[float, list] = {}
    for size, waiting in ((input_bytes, acts_in), (output_bytes, grads_in)):
        if size:
            c = classes.setdefault(size, [0, 0])
            c[0] += receives
            c[1] += waiting
    pool = sum(min(r, lookahead + u) * size for size, (r, u) in classes.items())
    outgoing = input_bytes if split else max(0.0, input_bytes - (kept - input_kept + output_bytes))
    return held * (output_bytes - input_kept) + pool + max(0.0, outgoing - rebuilt)


def chunks_transfer_bytes(depth, chunks: list[tuple[float, float, float, float]], receives: int,
                          lookahead: int = RECV_LOOKAHEAD, rebuilt: float = 0.0, split: bool = False,
                          mean: bool = False) -> float:
    """:func:`transfer_bytes` for a device holding several stages (``chunks``: per stage, its input bytes, the
    part of them its kept bytes count, its output bytes and its kept bytes, per microbatch) and ``depth``
    chunk-microbatches in flight, which the cost model charges at the heaviest chunk's kept bytes (``mean``: at
    their mean): the same at the heaviest (mean) chunk's kept bytes with its output in place of its input, less
    that; the pool per buffer size, each at most min(receives, lookahead + the ``depth`` inputs + the gradients
    waiting: one, or with a split backward one per chunk-microbatch held awaiting its BW, ``depth`` + 1). An upper
    bound: which chunks the depth holds, and whether the pool's sizes fill at once, the closed form does not
    say; exact on the interleaved and V families where every cut sends the same bytes."""
    kept = [c[3] for c in chunks]
    moved = [c[3] - c[1] + c[2] for c in chunks]
    if mean:
        more = depth * (sum(moved) - sum(kept)) / len(chunks)
    else:
        more = depth * (max(moved) - max(kept))
    classes: dict[float, list] = {}
    for inp, _, out, _ in chunks:
        for size, kind in ((inp, 0), (out, 1)):
            if size:
                c = classes.setdefault(size, [0, False, False])
                c[0] += receives
                c[1 + kind] = True
    grads = depth + 1 if split else 1
    pool = sum(min(r, lookahead + (depth if a else 0) + (grads if g else 0)) * size
               for size, (r, a, g) in classes.items())
    outgoing = max((inp if split else max(0.0, inp - m)) for (inp, _, _, _), m in zip(chunks, moved))
    return more + pool + max(0.0, outgoing - rebuilt)


def round_function(program: Program) -> Callable[[int, int], int]:
    """``round_of(stage, mb)``: the optimizer round a backward's gradient joins (``Program.round_of``, the rule
    the executor counts rounds by)."""
    return program.round_of


def stage_bytes(profile: ModelProfile, layers: list[tuple[int, int]], microbatch_size: int,
                recompute: str = "none") -> list[StageBytes]:
    """Per stage: parameter bytes, and per microbatch the bytes kept for backward and the output kept until then.

    A stage after the first gets its input in a receive buffer, which ``sim.memory`` counts as such;
    its first layer's kept bytes are taken to include that input (up to the input's size), as a layer
    that keeps its input for backward does (linear, convolution, normalisation, emulated layers).
    The last stage's output is the loss, a scalar, and is not counted. ``recompute``: what the stage
    keeps and rebuilds (``planner.recompute``).
    """
    out = []
    last = len(layers) - 1
    for s, (a, b) in enumerate(layers):
        saved = kept_bytes(profile, a, b, recompute)
        if s > 0:
            saved -= min(layer_kept_bytes(profile, a, recompute), profile.layers[a - 1].activation_bytes)
        output = profile.layers[b].activation_bytes if s < last else 0.0
        k = microbatch_size
        out.append(StageBytes(profile.param_bytes(a, b), saved * k, output * k, rebuilt_bytes(profile, a, b, recompute) * k))
    return out


def fsdp_units(profile: ModelProfile, layers: list[tuple[int, int]]) -> list[tuple[float, ...]]:
    """Per stage, its ZeRO-3 units' gathered 16-bit bytes, one per layer in forward order (0: a layer without
    parameters, which gathers nothing)."""
    return [tuple(collective_bytes(l.param_bytes) for l in profile.layers[a:b + 1]) for a, b in layers]


def fsdp_transients(units: list[tuple[float, ...]], overlap: bool) -> dict[str, list[float]]:
    """Per compute kind (F, B, BI, BW), per stage: the bytes a ZeRO-3 pass holds beyond the sharded state."""
    return {k: [fsdp_transient_bytes(u if k == "F" else u[::-1], *fsdp_collectives(k), overlap) for u in units]
            for k in ("F", "B", "BI", "BW")}  # a backward walks its units last to first


def fsdp_gathered_bytes(units: tuple[float, ...], kinds: tuple[str, ...], overlap: bool) -> float:
    """The most one ZeRO-3 pass of a stage holds beyond its sharded state over the pass ``kinds`` it runs,
    as :func:`memory_levels` counts it at a pass's start."""
    per = fsdp_transients([units], overlap)
    return max(per[k][0] for k in kinds)


class _Pool:
    """Pooled receive buffers: per size, how many are in use and how many were ever allocated."""

    __slots__ = ("in_use", "allocated", "nbytes")

    def __init__(self) -> None:
        self.in_use: dict[float, int] = {}
        self.allocated: dict[float, int] = {}
        self.nbytes = 0.0

    def acquire(self, size: float) -> None:
        n = self.in_use.get(size, 0) + 1
        self.in_use[size] = n
        if n > self.allocated.get(size, 0):
            self.allocated[size] = n
            self.nbytes += size

    def release(self, size: float) -> None:
        self.in_use[size] -= 1


def memory_levels(actions: list[Action], stages: dict[int, StageBytes], optimizer_state_factor: float,
                  round_of: Callable[[int, int], int] | None = None, recv_lookahead: int = RECV_LOOKAHEAD,
                  zero_stage: int = 0, replicas: dict[int, int] | None = None,
                  transients: dict[str, list[float]] | None = None,
                  ) -> tuple[float, list[tuple[float, float]]]:
    """(bytes at the start, [(level after the action starts, level after it ends)] per action).

    ``stages``: the stages this worker holds. ``round_of(stage, mb)``: the optimizer round a
    backward's gradient goes to (default: one round for the whole run). ``zero_stage``: the training
    state sharded over each stage's ``replicas`` (``planner.sharding.zero_state_bytes``, as the cost
    model counts it; 0: unsharded); ``transients`` (stage 3, :func:`fsdp_transients`): what a pass of a
    replicated stage holds while it runs.
    """
    state = {s: zero_state_bytes(b.params, (replicas or {}).get(s, 1), zero_stage, optimizer_state_factor)
             for s, b in stages.items()}
    grads = {s: x.gradients_bytes for s, x in state.items()}
    weights = {s: x.weights_bytes for s, x in state.items()}
    round_of = round_of or (lambda stage, mb: 0)
    gathered = {}
    if zero_stage == 3 and transients is not None:
        gathered = {k: {s: v[s] for s in stages if (replicas or {}).get(s, 1) > 1} for k, v in transients.items()}
    # version lifetimes, as the executor plans them: the last use of each (stage, version)
    last: dict[tuple[int, int], int] = {}
    newest: dict[int, int] = {}
    grad_sends: dict[tuple[int, int], float] = {}   # (stage, mb) -> bytes of the input gradient it sends
    recv_sizes: list[float] = []
    for i, a in enumerate(actions):
        k = a.kind
        if k in _COMPUTE:
            last[(a.stage, a.version)] = i
        elif k is _STEP:
            last[(a.stage, a.version - 1)] = i
            newest[a.stage] = max(newest.get(a.stage, 0), a.version)
        elif k is _SEND and a.grad:
            grad_sends[(a.stage, a.mb)] = float(a.nbytes)
        elif k is _RECV:
            recv_sizes.append(float(a.nbytes))
    frees: dict[int, list[tuple[int, int]]] = {}
    for (s, v), i in last.items():
        if v != newest.get(s, 0):
            frees.setdefault(i, []).append((s, v))

    versions = {s: {0} for s in stages}
    spare = dict.fromkeys(stages, 0)
    rounds: dict[int, set[int]] = {s: set() for s in stages}
    entries: dict[tuple[int, int], list] = {}   # (stage, mb) -> [bytes, buffer sizes it holds]
    inbox: dict[tuple[int, int, bool], float] = {}
    outbox: dict[tuple[int, int], float] = {}
    pool = _Pool()
    posted = 0

    def post(upto: int) -> None:
        nonlocal posted
        upto = min(upto, len(recv_sizes))
        while posted < upto:
            pool.acquire(recv_sizes[posted])
            posted += 1

    post(recv_lookahead)
    fixed = sum(x.weights_bytes + x.optimizer_bytes for x in state.values())
    held = fixed  # weights, optimizer state, gradients, activations, outgoing gradients; the pool apart
    initial = held + pool.nbytes
    out: list[tuple[float, float]] = []
    n_recv = 0
    for i, a in enumerate(actions):
        k, s, mb = a.kind, a.stage, a.mb
        if k is _F:
            sb = stages[s]
            ent = entries[(s, mb)] = [sb.saved + sb.output, []]
            buf = inbox.pop((s, mb, False), None)
            if buf is not None:
                ent[1].append(buf)
            held += ent[0]
            start = held + pool.nbytes
            if gathered:
                start += gathered["F"].get(s, 0.0)
        else:
            start = held + pool.nbytes
            if k in _COMPUTE:  # a backward's rebuild, held while it runs (F is handled above)
                start += stages[s].rebuilt
            if gathered and k in _COMPUTE:
                start += gathered[k._value_].get(s, 0.0)
            if k is _B or k is _BW:
                r = round_of(s, mb)
                if r not in rounds[s]:
                    rounds[s].add(r)
                    held += grads[s]
                    if gathered.get(k._value_, {}).get(s):  # ZeRO-3: the pass reduce-scatters into the shard
                        start += grads[s]
                ent = entries.pop((s, mb), None)
                if ent is not None:
                    held -= ent[0]
                    for buf in ent[1]:
                        pool.release(buf)
                if k is _B:
                    buf = inbox.pop((s, mb, True), None)
                    if buf is not None:
                        pool.release(buf)
            if (k is _B or k is _BI) and (s, mb) in grad_sends:
                size = outbox[(s, mb)] = grad_sends[(s, mb)]
                held += size
            if k is _BI:
                buf = inbox.pop((s, mb, True), None)
                ent = entries.get((s, mb))
                if buf is not None:
                    if ent is not None:
                        ent[1].append(buf)  # kept for the BW
                    else:
                        pool.release(buf)
            elif k is _SEND:
                if a.grad:
                    held -= outbox.pop((s, mb), 0.0)
            elif k is _RECV:
                post(n_recv + 1)
                inbox[(s, mb, a.grad)] = recv_sizes[n_recv]
                n_recv += 1
                post(n_recv + recv_lookahead)
            elif k is _ALLREDUCE:
                if mb not in rounds[s]:
                    rounds[s].add(mb)
                    held += grads[s]
            elif k is _STEP:
                old = a.version - 1
                if last.get((s, old)) == i:  # in place: version old becomes the new one
                    versions[s].discard(old)
                elif spare[s]:
                    spare[s] = 0
                else:
                    held += weights[s]
                versions[s].add(a.version)
                if mb in rounds[s]:
                    rounds[s].discard(mb)
                    held -= grads[s]
        for fs, fv in frees.get(i, ()):
            if fv in versions[fs]:
                versions[fs].discard(fv)
                if spare[fs]:
                    held -= weights[fs]
                else:
                    spare[fs] = 1
        out.append((start, held + pool.nbytes))
    return initial, out


def memory_marks(actions: list[Action], stages: dict[int, StageBytes], optimizer_state_factor: float,
                 round_of: Callable[[int, int], int] | None = None, recv_lookahead: int = RECV_LOOKAHEAD,
                 zero_stage: int = 0, replicas: dict[int, int] | None = None,
                 transients: dict[str, list[float]] | None = None,
                 ) -> tuple[float, list[tuple[float | None, float | None]] | None]:
    """(bytes at time 0, [(new level at the action's start, new level at its end)] per action).

    The samples a worker's memory track needs, starting from the first value at time 0: an
    entry is None where the level does not change. Marks are None when nothing ever changes
    (no parameters, saved activations, outputs or payloads).
    """
    if not any(any(b) for b in stages.values()) and not any(a.nbytes for a in actions):
        return 0.0, None
    initial, levels = memory_levels(actions, stages, optimizer_state_factor, round_of, recv_lookahead, zero_stage,
                                    replicas, transients)
    marks = []
    cur = initial
    for m0, m1 in levels:
        if m0 != cur:
            cur = ms = m0
        else:
            ms = None
        if m1 != cur:
            cur = me = m1
        else:
            me = None
        marks.append((ms, me))
    return initial, marks
