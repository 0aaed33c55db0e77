"""ZeRO-3 (FSDP) in the simulator: a compute action of a replicated stage as a pass over its units.

A unit is one layer, in the pass's order, with its layer's TP all-reduces inside its compute. It gathers its
weights over the replica group before the pass that needs them and reduce-scatters its gradients after the pass
that makes them (``planner.sharding``'s rule: F and BI gather, BW reduces, B does both), each collective a ring on
the real links that waits for every replica to issue it and for the group's previous collective (one
communicator), contending with everything else on those links. With ``SimParams.fsdp_overlap`` the next unit's
gather is issued when a unit's compute starts (prefetch) and a reduce-scatter runs on under the next unit; the
action ends when its compute and its collectives are done. The stage's ALLREDUCE then moves nothing.

``sim.engine`` compiles a pass into units (:meth:`Zero3.units`) and walks them in its device process
(:meth:`Zero3.walk`); the collectives wait in this side's own table of pending groups and run on the run's network.
"""
from __future__ import annotations

import simpy

from planner.profile import ModelProfile
from planner.program import Kind
from planner.recompute import pass_recompute_s
from planner.sharding import collective_bytes, fsdp_collectives
from sim.collectives import Collective, Phase, ring_pass_phases
from sim.tensor import tp_segments

_KF, _KBI = Kind.F, Kind.BI


class Zero3:
    """ZeRO-3's side of one run (``sim.engine``'s): the units' tables, and each replica group's collectives in issue
    order, one communicator per group."""

    def __init__(self, run, profile: ModelProfile, layers: list[tuple[int, int]], k: float, microbatch_size: int,
                 recompute: str):
        self.run = run  # its env, network (which a folding replaces), TP join and folded phases
        self.overlap = run.params.fsdp_overlap
        bi, split = run.params.bi_fraction, run.params.split_factor
        #: per stage, per layer: (forward s, backward s, what recomputation adds to a B, BI and BW, gathered bytes)
        self.rows = [[(l.forward_s * k, l.backward_s * k,
                       {kind: pass_recompute_s(l, recompute, kind, bi, split) * k for kind in ("B", "BI", "BW")},
                       collective_bytes(l.param_bytes)) for l in profile.layers[a:b + 1]] for a, b in layers]
        self.tp = None if run.T == 1 else [  # per stage, per layer: its TP all-reduces (sim.tensor)
            [tp_segments(profile, x, x, k, microbatch_size, recompute, bi, split) for x in range(a, b + 1)]
            for a, b in layers]
        self.last: dict[tuple, simpy.Event] = {}  # (stage, TP rank) -> the group's last collective
        self.rings: dict[tuple, list[Phase]] = {}  # (stage, bytes, TP rank) -> its ring's phases
        #: (stage, TP rank, collective number) -> [arrivals, event]: its own table, apart from the run's DP and TP ones
        self.pending: dict[tuple[int, int, int], list] = {}

    def units(self, s: int, k: Kind, base: float, pk: str | None, seq: int, split: float,
              bi: float) -> tuple[tuple, int]:
        """((compute seconds, gather bytes, gather key, scatter bytes, scatter key) per unit in the pass's order,
        the worker's collective count after it). ``pk``: the pass as ``sim.engine`` runs it ("F", "B", "BI", "BW";
        "B" for stage 0's BW when its BI is free, None for that BI). The units' compute adds up to the action's
        ``base`` seconds (speed, splitting, recomputation and jitter included); keys number the worker's collectives
        in issue order (the rule of ``planner.sharding.fsdp_pass_s``), which every replica follows alike."""
        gathers, scatters = fsdp_collectives(k._value_)
        rows = self.rows[s] if k is _KF else self.rows[s][::-1]
        raw = []
        for f, b, x, nbytes in rows:
            if k is _KF:
                c = f
            elif pk == "B":
                c = b + x["B"]
            elif pk is None:
                c = 0.0
            else:
                c = b * split * (bi if k is _KBI else 1.0 - bi) + x[pk]
            raw.append(c)
        total = sum(raw)
        scale = base / total if total > 0 else 0.0
        units = []
        order = []  # issue order: gather 0, then per unit j: gather j + 1, scatter j
        g = [nbytes if gathers else 0.0 for *_, nbytes in rows]
        r = [nbytes if scatters else 0.0 for *_, nbytes in rows]
        keys_g, keys_r = [None] * len(rows), [None] * len(rows)
        if rows and g[0] > 0:
            order.append(("g", 0))
        for j in range(len(rows)):
            if j + 1 < len(rows) and g[j + 1] > 0:
                order.append(("g", j + 1))
            if r[j] > 0:
                order.append(("r", j))
        if not self.overlap:  # each unit: its gather, its compute, its scatter
            order = [(t, j) for j in range(len(rows)) for t in ("g", "r") if (g if t == "g" else r)[j] > 0]
        for t, j in order:
            (keys_g if t == "g" else keys_r)[j] = seq
            seq += 1
        tp = self.tp[s] if self.tp is not None else None
        if tp is not None and k is not _KF:
            tp = tp[::-1]
        for j in range(len(rows)):
            c = raw[j] * scale
            pieces, tail = (), c
            seg = None if tp is None or pk is None else tp[j][pk]
            if seg is not None and seg[0]:  # the layer's TP all-reduces inside the unit, each after its share
                f = c / seg[1] if seg[1] > 0 else 0.0
                pieces = tuple((d * f, n, q) for d, n, q in seg[0])
                tail = (seg[1] - sum(p[0] for p in seg[0])) * f
            units.append((c, g[j], keys_g[j], r[j], keys_r[j], pieces, tail))
        return tuple(units), seq

    def issue(self, stage: int, tp: int, arrivals: int, key: int, nbytes: float, what: str) -> simpy.Event:
        """Join collective ``key`` of the replica group of (``stage``, ``tp``); the last to join queues it behind the
        group's previous collective. Returns the event it succeeds at."""
        run, pending, gk = self.run, self.pending, (stage, tp, key)
        st = pending.get(gk)
        if st is None:
            st = pending[gk] = [0, run.env.event()]
        st[0] += 1
        ev = st[1]
        if st[0] == arrivals:
            del pending[gk]
            phases = self._phases(stage, nbytes, tp)
            prev = self.last.get((stage, tp))
            self.last[(stage, tp)] = ev
            label = f"{stage}{what}{key}"

            def go(_ev=None):
                if Collective(run.net, phases, _succeed, ev, label).start():
                    ev.succeed()

            if prev is None or prev.processed:
                go()
            else:
                prev.callbacks.append(go)
        return ev

    def walk(self, units: tuple, y: tuple, text: str):
        """The device process through one ZeRO-3 pass (:meth:`units`), a unit's TP all-reduces inside its compute."""
        stage, tp, arrivals, acc, tp_key, i, tp_arrivals = y
        timeout, issue, overlap, tp_join = self.run.env.timeout, self.issue, self.overlap, self.run.tp_join
        n = len(units)
        ready = [None] * n
        last = None
        if overlap and n and units[0][2] is not None:
            ready[0] = issue(stage, tp, arrivals, units[0][2], units[0][1], "AG")
        for j, (c, gb, gkey, rb, rkey, pieces, tail) in enumerate(units):
            if not overlap and gkey is not None:
                ready[j] = issue(stage, tp, arrivals, gkey, gb, "AG")
            ev = ready[j]
            if ev is not None and not ev.processed:
                yield ev
            if overlap and j + 1 < n and units[j + 1][2] is not None:
                ready[j + 1] = last = issue(stage, tp, arrivals, units[j + 1][2], units[j + 1][1], "AG")
            for q, (d, nbytes, coll) in enumerate(pieces):
                if d > 0.0:
                    yield timeout(d)
                tev = tp_join((tp_key, i, j, q), tp_key, i, nbytes, text, tp_arrivals, coll)
                if tev is not None:
                    yield tev
            if tail > 0.0:
                yield timeout(tail)
            if rkey is not None:
                last = issue(stage, tp, arrivals, rkey, rb, "RS")
                if not overlap and not last.processed:
                    yield last
        if acc > 0.0:
            yield timeout(acc)
        if last is not None and not last.processed:
            yield last

    def _phases(self, stage: int, nbytes: float, tp_rank: int) -> list[Phase]:
        """A ring all-gather or reduce-scatter of ``nbytes`` over one stage's replicas (of TP rank ``tp_rank``)."""
        key = (stage, nbytes, tp_rank)
        ph = self.rings.get(key)
        if ph is None:
            run = self.run
            devs = [run.dev[w] for w in run.p.replica_workers(stage, tp_rank)]
            self.rings[key] = ph = run.folded(ring_pass_phases(devs, nbytes))
        return ph


def _succeed(ev: simpy.Event) -> None:
    ev.succeed()
