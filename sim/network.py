"""Links with contention: a transfer follows its route and shares each link max-min fairly.

Every directed hop of the topology graph is a link of its own (links are full
duplex). A transfer is a flow over the finite-bandwidth links of its route: it
drains its bytes at the max-min fair rate the links allow, and is delivered the
route's latency after its last byte left. Links of infinite bandwidth impose no
limit, so a route of ideal links costs only its latency (zero on ``ideal:N``).

Rates are recomputed once per instant, after every event of that instant, and
only for the flows connected (through shared links, transitively) to a flow that
started or finished; a flow whose rate does not change keeps its completion
event. Everything is callback driven: a transfer is no SimPy process.

A folded run (``sim.fold``) gives a hop map: each hop of a route is replaced by its
orbit's canonical hop, where the flow counts as several (its weight): max-min fairness
with weighted flows, a link's fair share being what is left of it over the weights of the
flows not yet fixed there.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import simpy

from planner.trace import Event, Trace
from topologies.topology import Topology

_RECOMPUTE_PRIORITY = 2  # after every ordinary event of the same instant (simpy: URGENT 0, NORMAL 1)


class _Flow:
    """One transfer in progress."""

    __slots__ = ("src", "dst", "nbytes", "label", "start", "links", "weights", "latency", "remaining", "rate",
                 "t_last", "version", "done", "arg", "active", "mark")

    def __init__(self, src: str, dst: str, nbytes: float, label: Any, start: float, links: tuple[int, ...],
                 latency: float, done: Callable[[Any], None] | None, arg: Any, weights: tuple[int, ...] | None = None):
        self.src, self.dst, self.nbytes, self.label, self.start = src, dst, nbytes, label, start
        self.links, self.latency = links, latency
        self.weights = weights
        self.remaining = float(nbytes)
        self.rate = 0.0
        self.t_last = start
        self.version = 0
        self.done, self.arg = done, arg
        self.active = True
        self.mark = -1


class Network:
    """The links of one topology inside one SimPy environment.

    Attributes:
        log: delivered transfers as (src device, dst device, start_s, end_s, bytes, label).
    """

    def __init__(self, env: simpy.Environment, topology: Topology, hop_map: dict | None = None):
        self.env = env
        self.topology = topology
        self.hop_map = hop_map  # hop -> (canonical hop, weight) of a folded run (sim.fold), else None
        self._weights: dict[tuple[str, str], tuple[int, ...]] = {}
        self._link_id: dict[tuple[str, str], int] = {}
        self._cap: list[float] = []
        self._on_link: list[dict[_Flow, None]] = []
        self._paths: dict[tuple[str, str], tuple[tuple[int, ...], float]] = {}
        self._free: dict[tuple[str, str], bool] = {}
        self._dirty: dict[int, None] = {}
        self._pending = False
        self._gen = 0
        self.log: list[tuple[str, str, float, float, float, Any]] = []

    # --- routes --------------------------------------------------------------------
    def path(self, src: str, dst: str) -> tuple[tuple[int, ...], float]:
        """(ids of the finite-bandwidth links on the route src->dst, route latency)."""
        key = (src, dst)
        p = self._paths.get(key)
        if p is None:
            edges = self.topology.graph.edges
            ids, lat = [], 0.0
            weight: dict[int, int] = {}
            fold = self.hop_map
            for u, v in self.topology.route(src, dst):
                link = edges[u, v]["link"]
                lat += link.latency_s
                if math.isfinite(link.bandwidth_bytes_per_s):
                    hop, w = fold[(u, v)] if fold is not None else ((u, v), 1)
                    lid = self._link_id.get(hop)
                    if lid is None:
                        lid = self._link_id[hop] = len(self._cap)
                        self._cap.append(float(link.bandwidth_bytes_per_s))
                        self._on_link.append({})
                    if lid not in weight:
                        ids.append(lid)
                    weight[lid] = weight.get(lid, 0) + w
            p = self._paths[key] = (tuple(ids), lat)
            if fold is not None:
                self._weights[key] = tuple(weight[lid] for lid in ids)
        return p

    def free_route(self, src: str, dst: str) -> bool:
        """True when every hop of src->dst has infinite bandwidth and the route no latency.

        A transfer on such a route is delivered at once whatever its size (``transfer``
        returns True). Unlike ``path``, this registers no links.
        """
        key = (src, dst)
        free = self._free.get(key)
        if free is None:
            edges = self.topology.graph.edges
            lat, finite = 0.0, False
            for u, v in self.topology.route(src, dst):
                link = edges[u, v]["link"]
                lat += link.latency_s
                finite = finite or math.isfinite(link.bandwidth_bytes_per_s)
            free = self._free[key] = not finite and lat <= 0.0
        return free

    def finite_hops(self, src: str, dst: str) -> list[tuple[str, str]]:
        """The directed hops of the route src->dst that have a finite bandwidth."""
        edges = self.topology.graph.edges
        return [(u, v) for u, v in self.topology.route(src, dst)
                if math.isfinite(edges[u, v]["link"].bandwidth_bytes_per_s)]

    # --- transfers -----------------------------------------------------------------
    def transfer(self, src: str, dst: str, nbytes: float, done: Callable[[Any], None], arg: Any = None,
                 label: Any = None) -> bool:
        """Start moving ``nbytes`` from src to dst; ``done(arg)`` runs at delivery.

        Returns True when the transfer is delivered at once (free route): then
        ``done`` is not called and the caller goes on directly.
        """
        links, lat = self.path(src, dst)
        now = self.env.now
        if not links or nbytes <= 0:
            if lat <= 0.0:
                self.log.append((src, dst, now, now, nbytes, label))
                return True
            f = _Flow(src, dst, nbytes, label, now, (), lat, done, arg)
            self.env.timeout(lat, f).callbacks.append(self._deliver)
            return False
        weights = self._weights.get((src, dst)) if self.hop_map is not None else None
        f = _Flow(src, dst, nbytes, label, now, links, lat, done, arg, weights)
        dirty = self._dirty
        for j, lid in enumerate(links):
            self._on_link[lid][f] = 1 if weights is None else weights[j]
            dirty[lid] = None
        self._want_recompute()
        return False

    def _want_recompute(self) -> None:
        if not self._pending:
            self._pending = True
            ev = simpy.Event(self.env)
            ev._ok, ev._value = True, None
            ev.callbacks.append(self._recompute)
            self.env.schedule(ev, _RECOMPUTE_PRIORITY)

    def _recompute(self, _ev: simpy.Event) -> None:
        """Max-min fair rates (progressive filling) for the flows touching a changed link."""
        self._pending = False
        now = self.env.now
        on_link, cap = self._on_link, self._cap
        # the affected component: links reachable from the dirty links through shared flows
        comp: dict[_Flow, None] = {}
        seen: dict[int, None] = {}
        stack = list(self._dirty)
        self._dirty = {}
        while stack:
            lid = stack.pop()
            if lid in seen:
                continue
            seen[lid] = None
            for f in on_link[lid]:
                if f not in comp:
                    comp[f] = None
                    for l2 in f.links:
                        if l2 not in seen:
                            stack.append(l2)
        if not comp:
            return
        for f in comp:
            if f.rate > 0.0:
                f.remaining = max(0.0, f.remaining - f.rate * (now - f.t_last))
            f.t_last = now
        left = {lid: cap[lid] for lid in seen}
        weighted = self.hop_map is not None
        if weighted:
            count = {lid: sum(on_link[lid].values()) for lid in seen}
        else:
            count = {lid: len(on_link[lid]) for lid in seen}
        old = {f: f.rate for f in comp}
        self._gen += 1
        gen = self._gen
        unfixed = len(comp)
        while unfixed:
            best_l, best = -1, math.inf
            for lid, c in count.items():
                if c:
                    share = left[lid] / c
                    if share < best or (share == best and lid < best_l):
                        best_l, best = lid, share
            for f in on_link[best_l]:
                if f.mark != gen:
                    f.mark = gen
                    f.rate = best
                    unfixed -= 1
                    if weighted:
                        for lid, w in zip(f.links, f.weights):
                            left[lid] -= best * w
                            count[lid] -= w
                    else:
                        for lid in f.links:
                            left[lid] -= best
                            count[lid] -= 1
        timeout = self.env.timeout
        for f in comp:
            if f.rate != old[f] or f.version == 0:
                f.version += 1
                timeout(f.remaining / f.rate, (f, f.version)).callbacks.append(self._drained)

    def _drained(self, ev: simpy.Event) -> None:
        f, version = ev._value
        if version != f.version or not f.active:
            return
        f.active = False
        f.remaining = 0.0
        dirty = self._dirty
        for lid in f.links:
            del self._on_link[lid][f]
            dirty[lid] = None
        self._want_recompute()
        if f.latency > 0.0:
            self.env.timeout(f.latency, f).callbacks.append(self._deliver)
        else:
            self._finish(f)

    def _deliver(self, ev: simpy.Event) -> None:
        self._finish(ev._value)

    def _finish(self, f: _Flow) -> None:
        self.log.append((f.src, f.dst, f.start, self.env.now, f.nbytes, f.label))
        f.done(f.arg)


def link_events(topology: Topology, log: list[tuple[str, str, float, float, float, Any]],
                label: Callable[[Any], str] = str) -> list[Event]:
    """One event per hop of every logged transfer, on lanes named "u->v"."""
    out: list[Event] = []
    routes: dict[tuple[str, str], list[str]] = {}
    for src, dst, t0, t1, nbytes, lab in log:
        if nbytes <= 0:
            continue
        lanes = routes.get((src, dst))
        if lanes is None:
            lanes = routes[(src, dst)] = [f"{u}->{v}" for u, v in topology.route(src, dst)]
        text = label(lab)
        for lane in lanes:
            out.append(Event(lane, text, t0, t1, "", int(nbytes)))
    return out


def bytes_per_link(trace: Trace) -> dict[str, float]:
    """Bytes carried by each directed link (lanes "u->v" of a simulated trace)."""
    out: dict[str, float] = {}
    for e in trace.events:
        if isinstance(e.lane, str):
            out[e.lane] = out.get(e.lane, 0.0) + e.nbytes
    return dict(sorted(out.items()))
