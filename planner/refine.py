"""The full-cost search: (partition, replication, placement) ranked by exactly the cost a plan reports.

The partition programme (``planner.partition``) minimises the bottleneck stage and does not see
the load replicas put on shared links (a server's NIC, a PCIe switch), which the cost model
(``planner.costmodel.evaluate``) charges afterwards; so its optimum need not be the cost model's.
This module searches with ``evaluate`` itself as the objective — compute, bubbles, point-to-point
on the route, the all-reduce on the real links and the load of every placed replica on every
shared link — over placed plans:

* ``exhaustive``: every partition into contiguous stages × every replication × every placement of
  the replicas on servers, when the cluster is small enough (``EXACT_PLANS``). Placements are
  enumerated up to the topology's symmetry (devices of a server are interchangeable; identical
  servers are interchangeable: ``server_symmetry`` checks it), and a (partition, replication) is
  skipped once its compute-only lower bound (the slowest stage's work / replicas, with the least
  bubble) is no better than the best plan found; both steps keep the optimum.
* ``local_search``: from the best plans the other searches found, best-improvement moves (shift a
  cut, move / add / drop / swap a replica's device, split or merge stages), each move costed by
  ``evaluate``, until no move improves or ``LOCAL_PLANS`` plans were costed. It never returns a
  plan worse than its seeds; it is not guaranteed to reach the optimum.
"""
from __future__ import annotations

import functools
import itertools
import math
import bisect
from dataclasses import dataclass, replace

from planner.costmodel import Candidate, CostOptions, bubble_factor, evaluate, per_object_cache, zero_refusal
from planner.plan import Plan, StagePlan
from planner.profile import ModelProfile

#: The exhaustive search runs when at most this many placed plans exist (after symmetry).
EXACT_PLANS = 20000
#: Plans the local search of one ``plan_model`` call costs at most (its seeds share them).
LOCAL_PLANS = 900


@dataclass(frozen=True)
class Shape:
    """A placed plan in the search's terms: layer bounds (stage s is layers bounds[s] .. bounds[s+1] − 1)
    and each stage's devices (its replicas, in replica order)."""

    bounds: tuple[int, ...]
    devices: tuple[tuple[str, ...], ...]

    def plan(self, base: dict) -> Plan:
        stages = tuple(StagePlan(self.bounds[s], self.bounds[s + 1] - 1, len(d), d) for s, d in enumerate(self.devices))
        return Plan(stages=stages, **base)

    @property
    def used(self) -> frozenset[str]:
        return frozenset(x for d in self.devices for x in d)


@functools.lru_cache(maxsize=65536)
def schedulable(family: str, microbatches: int, replicas: tuple[int, ...]) -> bool:
    """Whether the schedule generator takes this family, microbatch count and replication: ``validate_spec`` and the
    family's own requirement (``planner.schedules.REQUIRES``), e.g. replicas ≤ M except under PipeDream, 2BW
    M ≥ its in-flight depth. Asked of three batches: a plan trains for many, and 2BW's steady state (batch b + 2 on
    batch b's step) first appears at the third, where a replicated stage needs more microbatches than one batch does."""
    from planner.schedules import REQUIRES, ScheduleError, make_spec, validate_spec

    spec = make_spec(family, len(replicas), microbatches, replicas, batches=3)
    try:
        validate_spec(spec)
        if family in REQUIRES:
            REQUIRES[family](spec)
    except ScheduleError:
        return False
    return True


# --- symmetry ----------------------------------------------------------------------------------
def _route_signature(topology, a: str, b: str) -> tuple:
    edges = topology.graph.edges
    return tuple((edges[u, v]["link"].bandwidth_bytes_per_s, edges[u, v]["link"].latency_s) for u, v in topology.route(a, b))


def server_symmetry(topology, devices: tuple[str, ...]) -> list[list[str]] | None:
    """``devices`` grouped by server (placement order kept) when the cost model cannot tell apart two devices of
    a server, nor two servers: identical devices, servers of one size, every route between two devices of one
    server alike and every route between two servers alike (hop by hop: the same links' bandwidth and latency).
    None when that does not hold (or the topology records no servers). Computed once per topology and device
    tuple (the routes of every pair; the search asks it for every family and microbatch count); the answer is
    shared, not to be changed."""
    cache = per_object_cache(topology, "server_symmetry")
    devices = tuple(devices)
    if devices not in cache:
        cache[devices] = _server_symmetry(topology, devices)
    return cache[devices]


def _server_symmetry(topology, devices: tuple[str, ...]) -> list[list[str]] | None:
    try:
        where = {d: i for i, dom in enumerate(topology.domains(0)) for d in dom}
    except Exception:  # noqa: BLE001 - a topology without a hierarchy
        where = {}
    groups: dict[int, list[str]] = {}
    for d in devices:
        groups.setdefault(where.get(d, -1), []).append(d)
    if -1 in groups and len(groups) > 1:
        return None
    servers = list(groups.values())
    if len({len(g) for g in servers}) != 1:
        return None
    kinds = {(topology.device(d).kind, topology.device(d).speed, topology.device(d).memory_bytes) for d in devices}
    if len(kinds) != 1:
        return None
    inside, across = set(), set()
    for a in devices:
        for b in devices:
            if a != b:
                (inside if where.get(a) == where.get(b) else across).add(_route_signature(topology, a, b))
    if len(inside) > 1 or len(across) > 1:
        return None
    return servers


def _label_sequences(n: int, per_server: int, servers: int):
    """Server labels for n replica slots, each server used at most ``per_server`` times, up to renaming servers
    (a slot takes a used label or the next unused one): one sequence per placement class."""
    seq: list[int] = []
    counts = [0] * servers

    def rec(i: int, used: int):
        if i == n:
            yield tuple(seq)
            return
        for lab in range(min(used + 1, servers)):
            if counts[lab] < per_server:
                counts[lab] += 1
                seq.append(lab)
                yield from rec(i + 1, max(used, lab + 1))
                seq.pop()
                counts[lab] -= 1

    yield from rec(0, 0)


@functools.lru_cache(maxsize=4096)
def _count_labels(n: int, per_server: int, servers: int) -> int:
    """How many sequences ``_label_sequences`` yields, without enumerating them: Σ over the k servers used of
    n!·[xⁿ](Σ_{c=1..per_server} xᶜ/c!)ᵏ / k! (onto k labels, each at most per_server times, up to renaming).

    In integers: poly[i] holds i!·[xⁱ](…)ᵏ, the number of sequences of i slots onto k labels in order, so a
    step multiplies by C(i + c, c) (which c of the i + c slots take the new label); dividing by k! is exact.
    Cached: ``exhaustive_count`` asks for the same few (n, per_server, servers) on every plan_model call."""
    if n == 0:
        return 1
    poly = [1]
    total = 0
    for k in range(1, servers + 1):
        nxt = [0] * min(len(poly) + per_server, n + 1)
        for i, a in enumerate(poly):
            if a:
                for c in range(1, per_server + 1):
                    if i + c <= n:
                        nxt[i + c] += a * math.comb(i + c, c)
        poly = nxt
        if n < len(poly):
            total += poly[n] // math.factorial(k)
    return total


def _place(replicas: tuple[int, ...], labels: tuple[int, ...], servers: list[list[str]]) -> tuple[tuple[str, ...], ...]:
    nxt = [0] * len(servers)
    out, k = [], 0
    for r in replicas:
        devs = []
        for _ in range(r):
            s = labels[k]
            devs.append(servers[s][nxt[s]])
            nxt[s] += 1
            k += 1
        out.append(tuple(devs))
    return tuple(out)


def _compositions(total: int, parts: int):
    for cuts in itertools.combinations(range(1, total), parts - 1):
        b = (0,) + cuts + (total,)
        yield tuple(b[x + 1] - b[x] for x in range(parts))


# --- the exhaustive search -----------------------------------------------------------------------
def exhaustive_count(layers: int, servers: list[list[str]]) -> int:
    """Placed plans ``exhaustive`` would enumerate, before its lower-bound pruning."""
    G, g = len(servers), len(servers[0])
    D = G * g
    labels = [0] + [_count_labels(n, g, G) for n in range(1, D + 1)]
    total = 0
    for P in range(1, min(layers, D) + 1):
        parts = math.comb(layers - 1, P - 1)
        for N in range(P, D + 1):
            total += parts * math.comb(N - 1, P - 1) * labels[N]
            if total > 10 * EXACT_PLANS:
                return total
    return total


def exhaustive(prof: ModelProfile, topology, devices: tuple[str, ...], family: str, microbatches: int,
               options: CostOptions, base: dict, keep: int = 3) -> list[Candidate] | None:
    """The cost model's optimum over every placed plan (see the module docstring), best first (``keep`` of them);
    [] when nothing fits, None when the cluster is too large or not symmetric enough for it (``EXACT_PLANS``).

    ``prof`` is at the plan's microbatch size; ``base`` holds the Plan fields other than the stages.
    """
    servers = server_symmetry(topology, devices)
    L = len(prof)
    if servers is None or exhaustive_count(L, servers) > EXACT_PLANS:
        return None
    G, g = len(servers), len(servers[0])
    D = G * g
    M, mb = microbatches, base["microbatch_size"]
    speed = topology.device(devices[0]).speed
    work = [0.0]
    for l in prof.layers:
        work.append(work[-1] + l.forward_s + l.backward_s)
    fwd = [0.0]
    for l in prof.layers:
        fwd.append(fwd[-1] + l.forward_s)
    pairs = []
    for P in range(1, min(L, D) + 1):
        for cuts in itertools.combinations(range(1, L), P - 1):
            b = (0,) + cuts + (L,)
            w = [(work[b[s + 1]] - work[b[s]]) / speed for s in range(P)]
            f = min(bubble_factor(family, 1, fwd[b[s + 1]] - fwd[b[s]], work[b[s + 1]] - work[b[s]] - fwd[b[s + 1]] + fwd[b[s]])
                    for s in range(P))
            for N in range(P, D + 1):
                for reps in _compositions(N, P):
                    if not schedulable(family, M, reps):
                        continue
                    lb = max(w[s] / reps[s] for s in range(P)) * (M + (P - 1) * f) / (M * mb)
                    pairs.append((lb, N, b, reps))
    pairs.sort(key=lambda x: (x[0], x[1]))
    labels = {N: list(_label_sequences(N, g, G)) for N in range(1, D + 1)}
    found: list[Candidate] = []
    kept: list[float] = []  # the `keep` least times found, ascending
    quick = _stages_only(options)
    best = math.inf
    for lb, N, b, reps in pairs:
        if lb >= best * (1 - 1e-12):
            break  # every later pair's bound is as high: none can beat the best plan
        for k, lab in enumerate(labels[N]):
            plan = Shape(b, _place(reps, lab, servers)).plan(base)
            if options.zero_stage == 3 and zero_refusal(plan, 3):
                break  # the replication, not the placement, is what ZeRO-3 refuses
            if quick is not None and len(kept) == keep:
                # Most placements lose (98% on the what-if tests' clusters): cost them first without the link
                # bound, a lower bound on the full figure. One no faster than the keep-th best found cannot
                # enter the answer (a later equal time sorts after it), so its full cost is not needed.
                q = evaluate(plan, prof, topology, quick)
                if not q.fits:
                    if k == 0:
                        break
                    continue
                if q.time_per_sample_s >= kept[-1]:
                    continue
            c = evaluate(plan, prof, topology, options)
            if not c.fits:
                if k == 0:
                    break  # memory does not depend on the placement of identical devices
                continue
            found.append(c)
            bisect.insort(kept, c.time_per_sample_s)
            del kept[keep:]
            best = min(best, c.time_per_sample_s)
    found.sort(key=lambda x: x.time_per_sample_s)
    return found[:keep]


def _stages_only(options: CostOptions) -> CostOptions | None:
    """``options`` without the shared-link bound (None when it has none): ``evaluate`` under it gives the same
    stage costs, memory and fit, and a time per sample no higher than under ``options`` (the batch time is
    the larger of the stages' and the links'), for about two thirds of the work."""
    return replace(options, link_load=False) if options.link_load else None


# --- local search ------------------------------------------------------------------------------------
def _neighbours(sh: Shape, L: int, devices: tuple[str, ...], servers: dict[str, int], step: int):
    b, ds = sh.bounds, sh.devices
    P = len(ds)
    free = [d for d in devices if d not in sh.used]
    # one free device per server is enough when devices of a server are alike; else every free device
    free_reps = list({servers.get(d, d): d for d in free}.values()) if servers else free
    for s in range(1, P):  # shift a cut
        for dl in (-step, -1, 1, step) if step > 1 else (-1, 1):
            nb = b[s] + dl
            if b[s - 1] < nb < b[s + 1]:
                yield Shape(b[:s] + (nb,) + b[s + 1:], ds)
    for a in range(P):
        if len(ds[a]) > 1:
            for x in range(P):  # move a's last replica to stage x
                if x != a:
                    nd = list(ds)
                    nd[a], nd[x] = ds[a][:-1], ds[x] + (ds[a][-1],)
                    yield Shape(b, tuple(nd))
            nd = list(ds)
            nd[a] = ds[a][:-1]  # drop a replica
            yield Shape(b, tuple(nd))
        for d in free_reps:  # add a replica on a free device
            nd = list(ds)
            nd[a] = ds[a] + (d,)
            yield Shape(b, tuple(nd))
            for i in range(len(ds[a])):  # or move one of a's replicas there
                if servers.get(ds[a][i], ds[a][i]) != servers.get(d, d):
                    nd = list(ds)
                    nd[a] = ds[a][:i] + (d,) + ds[a][i + 1:]
                    yield Shape(b, tuple(nd))
        for x in range(a + 1, P):  # swap a replica of a with one of x on another server
            for i, u in enumerate(ds[a]):
                for j, v in enumerate(ds[x]):
                    if servers.get(u, u) != servers.get(v, v):
                        nd = list(ds)
                        nd[a] = ds[a][:i] + (v,) + ds[a][i + 1:]
                        nd[x] = ds[x][:j] + (u,) + ds[x][j + 1:]
                        yield Shape(b, tuple(nd))
    for s in range(P - 1):  # merge two neighbouring stages
        yield Shape(b[:s + 1] + b[s + 2:], ds[:s] + (ds[s] + ds[s + 1],) + ds[s + 2:])
    for s in range(P):  # split a replicated stage in two: at any layer, the new stage on one device or half of them
        n, lo, hi = len(ds[s]), b[s], b[s + 1]
        if n > 1 and hi - lo > 1:
            cuts = range(lo + 1, hi) if hi - lo <= 25 else sorted({lo + 1 + (hi - lo - 2) * x // 23 for x in range(24)})
            for mid in cuts:
                for h in sorted({1, n // 2, n - 1}):
                    yield Shape(b[:s + 1] + (mid,) + b[s + 1:], ds[:s] + (ds[s][:h], ds[s][h:]) + ds[s + 1:])


def local_search(seeds: list[Candidate], prof: ModelProfile, topology, devices: tuple[str, ...], family: str,
                 microbatches: int, options: CostOptions, budget: int = LOCAL_PLANS) -> list[Candidate]:
    """Best-improvement moves from each seed (placed plans of one family and microbatch count), every move costed
    by ``evaluate``; returns the improved plans (empty when no move improved any seed). ``prof`` is at the
    seeds' microbatch size."""
    if not seeds:
        return []
    try:
        where = {d: i for i, dom in enumerate(topology.domains(0)) for d in dom}
    except Exception:  # noqa: BLE001 - a topology without a hierarchy
        where = {}
    sym = server_symmetry(topology, devices) is not None
    L = len(prof)
    step = max(1, L // 48)
    quick = _stages_only(options)  # as in exhaustive: most moves lose, and lose on the stages alone
    out = []
    seen: set[Shape] = set()
    for seed in seeds:
        p = seed.plan
        base = dict(model=p.model, schedule=p.schedule, microbatch_size=p.microbatch_size, microbatches=p.microbatches,
                    topology=p.topology)
        cur = Shape(tuple(s.first_layer for s in p.stages) + (L,), tuple(s.devices for s in p.stages))
        best, spent = seed, 0
        improved = False
        while spent < budget:
            step_best = None
            for nb in _neighbours(cur, L, devices, where if sym else {}, step):
                if nb in seen or not schedulable(family, microbatches, tuple(len(d) for d in nb.devices)):
                    continue
                if options.zero_stage == 3 and zero_refusal(nb.plan(base), 3):
                    continue
                seen.add(nb)
                spent += 1
                bar = (step_best or best).time_per_sample_s * (1 - 1e-12)
                plan = nb.plan(base)
                q = evaluate(plan, prof, topology, quick) if quick is not None else None
                if q is None or (q.fits and q.time_per_sample_s < bar):  # else the full figure cannot pass the bar
                    c = evaluate(plan, prof, topology, options)
                    if c.fits and c.time_per_sample_s < bar:
                        step_best, step_shape = c, nb
                if spent >= budget:
                    break
            if step_best is None:
                break
            best, cur, improved = step_best, step_shape, True
        if improved:
            out.append(best)
    return out
