"""Link-load pricing: the bytes every (src, dst) pair sends per batch, routed hop by hop, and the busiest
link's time as a lower bound on the batch (``planner.costmodel``'s shared-link term).

Every microbatch's activation (replica i mod r_s of stage s to replica i mod r_{s+1} of stage s + 1) and
gradient, every TP ring, every DP all-reduce (the simulator's ring or hierarchical collective,
``allreduce_flows``) and ZeRO's rings add their bytes to the directed links they cross; ``link_bound``
turns the loads into the seconds ``costmodel.evaluate`` charges (the busier direction plus
``CostOptions.link_serial_*`` of the other) and names the binding link. Split from the cost model,
which reads only ``link_bound`` and ``server_groups``; ``CostOptions`` is its type.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from planner.plan import Plan
from planner.profile import ModelProfile
from planner.program import FAMILY
from planner.recompute import tp_collectives_run
from planner.sharding import collective_bytes

if TYPE_CHECKING:
    from planner.costmodel import CostOptions


def allreduce_flows(topology, devices: list[str], nbytes: float, algorithm: str = "auto") -> dict[tuple[str, str], float]:
    """Bytes each (src, dst) device pair sends during one all-reduce of ``nbytes`` among ``devices``.

    The same collectives the simulator runs (``sim.collectives``): a ring over the replicas
    (grouped by server) carries 2(n − 1)/n·S on every neighbour pair; the hierarchical one
    (default when the replicas span several servers and some server holds more than one)
    reduces inside each server (2(g − 1)/g·S per intra-server neighbour pair), runs g rings
    across the k servers (2(k − 1)/(g·k)·S per pair) and broadcasts inside; uneven groups
    send S to and from their leader around a ring of leaders.
    """
    out: dict[tuple[str, str], float] = {}
    n = len(devices)
    if n < 2 or nbytes <= 0:
        return out

    def add(a: str, b: str, x: float) -> None:
        if a != b and x > 0:
            out[(a, b)] = out.get((a, b), 0.0) + x

    def ring(ds: list[str], total: float) -> None:
        m = len(ds)
        for i in range(m):
            add(ds[i], ds[(i + 1) % m], 2 * (m - 1) / m * total)

    groups = server_groups(topology, devices)
    spread = len(groups) > 1 and max(len(g) for g in groups) > 1
    if not (algorithm == "hierarchical" or (algorithm == "auto" and spread)) or len(groups) == 1:
        ring([d for g in groups for d in g], nbytes)
        return out
    k, sizes = len(groups), {len(g) for g in groups}
    if len(sizes) == 1:
        g = sizes.pop()
        if g == 1:
            ring([grp[0] for grp in groups], nbytes)
            return out
        for grp in groups:
            for i in range(g):
                add(grp[i], grp[(i + 1) % g], 2 * (g - 1) * nbytes / g)
        for j in range(g):
            for c in range(k):
                add(groups[c][j], groups[(c + 1) % k][j], 2 * (k - 1) * nbytes / (g * k))
        return out
    for grp in groups:
        for m in grp[1:]:
            add(m, grp[0], nbytes)
            add(grp[0], m, nbytes)
    ring([grp[0] for grp in groups], nbytes)
    return out


def server_groups(topology, devices: list[str]) -> list[list[str]]:
    """``devices`` grouped by the topology's innermost domain (servers), groups in first-appearance order."""
    try:
        where = topology.server_index()
    except Exception:  # a topology without a hierarchy: every device its own group
        where = {}
    groups: dict[int, list[str]] = {}
    for d in devices:
        groups.setdefault(where.get(d, -1 - len(groups)), []).append(d)
    return list(groups.values())


def _pair_bytes(plan: Plan, prof: ModelProfile, topology, options: CostOptions,
                rings: dict | None = None, ring_bits: dict | None = None) -> tuple[dict, dict]:
    """Bytes per batch each (src, dst) device pair sends, and a bitmask of the stages whose traffic it is (bit s:
    stage s), in first-send order (see ``link_loads``). ``rings`` (when given) collects the ZeRO collectives' share
    of those bytes per pair, ``ring_bits`` the bitmask of the stages whose ZeRO rings they are."""
    M, mb = plan.microbatches, plan.microbatch_size
    sent: dict[tuple[str, str], float] = {}
    mask: dict[tuple[str, str], int] = {}

    def add(a: str, b: str, x: float, s: int) -> None:
        if a == b or x <= 0:
            return
        k = (a, b)
        sent[k] = sent.get(k, 0.0) + x
        mask[k] = mask.get(k, 0) | 1 << s

    st = plan.stages
    T = plan.tensor_parallel
    for s in range(len(st) - 1):
        nbytes = prof.boundary_bytes(st[s].last_layer) * mb
        if nbytes <= 0:
            continue
        here, there = 1 << s, 1 << (s + 1)
        for t in range(T):  # TP rank t sends to TP rank t
            a_devs, b_devs = st[s].devices[t::T], st[s + 1].devices[t::T]
            ra, rb = len(a_devs), len(b_devs)
            period = ra * rb // math.gcd(ra, rb)
            for i in range(min(M, period)):  # microbatch i, i + period, ... take the same pair of replicas
                a, b = a_devs[i % ra], b_devs[i % rb]
                if a == b:
                    continue
                x = ((M - 1 - i) // period + 1) * nbytes  # add() inlined: this loop runs per microbatch
                k = (a, b)
                sent[k] = sent.get(k, 0.0) + x
                mask[k] = mask.get(k, 0) | here
                k = (b, a)
                sent[k] = sent.get(k, 0.0) + x
                mask[k] = mask.get(k, 0) | there
    for s, stage in enumerate(st):
        r = stage.replicas
        if T > 1:  # every microbatch of a replica runs its TP collectives as rings over its tensor group
            per_mb = sum(c.ring_allreduces * c.nbytes * mb  # in all-reduces' ring bytes: an all-gather is half one
                         for l in prof.layers[stage.first_layer:stage.last_layer + 1]
                         for c in tp_collectives_run(l, options.recompute, FAMILY[plan.schedule].backward == "split"))
            for rep in range(r):
                group = stage.tensor_group(rep, T)
                n_mb = len(range(rep, M, r))
                for j in range(T):
                    add(group[j], group[(j + 1) % T], 2 * (T - 1) / T * per_mb * n_mb, s)
        if r < 2:
            continue
        rounds = 1 if FAMILY[plan.schedule].batched else math.ceil(M / r)
        params = prof.param_bytes(*stage.layers)
        if options.zero_stage:  # ZeRO's rings of 16-bit tensors: per step (1, 2), or every pass of every microbatch (3)
            # stage 3: three ring passes per microbatch (F, B or BI gather; B or BW reduce-scatter), half an all-reduce each
            nbytes = collective_bytes(params) * (1.5 * M / r if options.zero_stage == 3 else 1.0) * rounds
            for t in range(T):
                for (a, b), x in allreduce_flows(topology, list(stage.devices[t::T]), nbytes, "ring").items():
                    add(a, b, x, s)
                    if rings is not None:
                        rings[(a, b)] = rings.get((a, b), 0.0) + x
                        ring_bits[(a, b)] = ring_bits.get((a, b), 0) | 1 << s
            continue
        for t in range(T):
            for (a, b), x in allreduce_flows(topology, list(stage.devices[t::T]), params,
                                             options.allreduce).items():
                add(a, b, x * rounds, s)
    return sent, mask


def _loads(sent: dict, mask: dict, topology) -> dict[tuple[str, str], list]:
    """Bytes per batch on every directed finite-bandwidth link, its bandwidth and the bitmask of the stages whose
    traffic crosses it: link -> [bytes, bandwidth, stages]."""
    out: dict[tuple[str, str], list] = {}
    for k, x in sent.items():
        bits = mask[k]
        for hop, bw in topology.bandwidth_hops(*k):
            cur = out.get(hop)
            if cur is None:
                out[hop] = [x, bw, bits]
            else:
                cur[0] += x
                cur[2] |= bits
    return out


def _stage_set(bits: int) -> set[int]:
    return {s for s in range(bits.bit_length()) if bits >> s & 1}


def link_loads(plan: Plan, prof: ModelProfile, topology, options: CostOptions | None = None) -> dict[tuple[str, str], tuple[float, set[int]]]:
    """Bytes per batch on every directed finite-bandwidth link, and the stages whose traffic crosses it.

    ``prof`` is at the plan's microbatch size. Microbatch i goes from replica i mod r_s of
    stage s to replica i mod r_{s+1} of stage s + 1 (its activation) and back (its
    gradient), each on its own direction of every hop of ``topology.route``; each stage
    all-reduces its parameter bytes once per batch (flush schedules, 2BW) or once per
    round of r minibatches (PipeDream: ⌈M / r⌉ per batch of M).
    """
    if options is None:
        from planner.costmodel import CostOptions

        options = CostOptions()
    return {hop: (x, _stage_set(bits)) for hop, (x, _bw, bits) in _loads(*_pair_bytes(plan, prof, topology, options),
                                                                         topology).items()}


def link_bound_s(loads: dict[tuple[str, str], tuple[float, set[int]]], topology) -> tuple[float, str | None]:
    """The link-load lower bound on seconds per batch: max over directed links of bytes / bandwidth, and that link."""
    return _bound({hop: (x, topology.link(*hop).bandwidth_bytes_per_s, 0) for hop, (x, _ss) in loads.items()})


def _bound(loads: dict[tuple[str, str], list]) -> tuple[float, str | None]:
    best, name = 0.0, None
    for (u, v), (x, bw, _bits) in loads.items():
        t = x / bw
        if t > best:
            best, name = t, f"{u}->{v}"
    return best, name


def link_bound(plan: Plan, prof: ModelProfile, topology, options: CostOptions) -> tuple[float, float, str | None, frozenset[int]]:
    """(the link-load lower bound, the link time per batch the plan is charged, the binding link "u->v",
    the stages whose traffic crosses it).

    The charged time adds, on each link, ``link_serial_*`` of the opposite direction's
    seconds (less ZeRO's ring collectives') to the busier direction's (see ``CostOptions``); the binding link is the one
    with the largest charged time.
    """
    return link_bound_by_stage(plan, prof, topology, options)[0]


def link_bound_by_stage(plan: Plan, prof: ModelProfile, topology, options: CostOptions
                        ) -> tuple[tuple[float, float, str | None, frozenset[int]], list[float]]:
    """(:func:`link_bound`, per stage the charged seconds per batch of the busiest link its ZeRO rings cross: 0 for
    a stage without them). A ZeRO-3 ring runs inside the passes, so every byte that shares its links (the pipeline's
    sends, the TP rings, other stages' rings) delays the compute waiting on it: ``costmodel.evaluate`` charges a
    ZeRO-3 stage at least its link's time per microbatch, the pipeline's fill and drain included. Only links whose
    ZeRO rings are one stage's count: where several stages' rings share a link, each fills the others' bubbles and
    the plain bound (:func:`link_bound`) charges it."""
    S = len(plan.stages)
    if not options.link_load:
        return (0.0, 0.0, None, frozenset()), [0.0] * S
    rings: dict = {}
    ring_bits: dict = {}
    loads = _loads(*_pair_bytes(plan, prof, topology, options, rings, ring_bits), topology)
    ring_loads = _loads(rings, ring_bits, topology) if rings else {}
    bound, _ = _bound(loads)
    phi = options.link_serial_async if FAMILY[plan.schedule].stream else options.link_serial_flush
    best, name, bits = 0.0, None, 0
    per_stage = [0.0] * S
    for (u, v), (x, bw, ss) in loads.items():
        back = loads.get((v, u))
        t_uv = x / bw
        t_vu = back[0] / back[1] if back else 0.0
        if t_uv < t_vu or (t_uv == t_vu and (v, u) < (u, v)):
            continue  # the busier direction names the link
        # a ring collective sends and receives at once: ZeRO's rings take no turns with the other direction
        t = t_uv + phi * max(0.0, t_vu - (ring_loads[(v, u)][0] / back[1] if (v, u) in ring_loads else 0.0))
        if t > best:
            best, name, bits = t, f"{u}->{v}", ss | (back[2] if back else 0)
        zbits = (ring_loads[(u, v)][2] if (u, v) in ring_loads else 0) | (ring_loads[(v, u)][2] if (v, u) in ring_loads else 0)
        if zbits and zbits & (zbits - 1) == 0:  # one stage's rings: the link idles in that stage's fill and drain
            s = zbits.bit_length() - 1
            per_stage[s] = max(per_stage[s], t)
    return (bound, max(best, bound), name, frozenset(_stage_set(bits))), per_stage
