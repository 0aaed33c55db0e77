"""Symmetry: when the replica pipelines of a run are exact copies of pipeline 0, so only it need be simulated.

When every stage has R replicas whose action lists are the same up to
relabelling, on devices of the same speed, and each replica pipeline's
point-to-point links are private to it, isomorphic to the first pipeline's and
used by no all-reduce, the R pipelines run identically. Then ``sim.engine``
simulates only pipeline 0 (all-reduces still run over every replica's links) and
copies its events to the other replicas: the trace is the one a full run gives.
Not used with tensor parallelism: a TP group's ranks share their server's links
with each other's point-to-point traffic on the clusters TP runs on, so their
copies would not be exact; ``sim.fold`` folds those runs (and replica pipelines
that share links) onto a quotient of the links instead.
"""
from __future__ import annotations

from planner.program import Kind
from sim.collectives import allreduce_phases


def symmetry(run) -> tuple[int, str]:
    """(R, "") when the R replica pipelines are exact copies of pipeline 0, else (1, why not)."""
    p, topo, dev = run.p, run.topology, run.dev
    sw = p.stage_workers
    R = len(sw[0])
    if p.tensor_parallel > 1:
        return 1, "tensor parallelism: sim.fold's case"
    if R == 1:
        return 1, "stages are not replicated"
    if run.params.jitter:
        return 1, "compute jitter differs between replicas"
    if any(len(ws) != R for ws in sw) or any(len(p.stages_of(w)) != 1 for w in p.workers):
        return 1, "stages have different replica counts"
    for ws in sw:
        speed = topo.device(dev[ws[0]]).speed
        if any(topo.device(dev[w]).speed != speed for w in ws):
            return 1, "replicas of a stage run on devices of different speeds"
    rank = {w: (s, r) for s, ws in enumerate(sw) for r, w in enumerate(ws)}
    edges = topo.graph.edges
    owner: dict[tuple[str, str], int] = {}   # finite p2p hop -> pipeline using it
    to0: list[dict[tuple[str, str], tuple[str, str]]] = [{} for _ in range(R)]
    for s, ws in enumerate(sw):
        ref = p[ws[0]]
        for r, w in enumerate(ws):
            acts = p[w]
            if len(acts) != len(ref):
                return 1, f"replica {r} of stage {s} runs {len(acts)} actions, replica 0 {len(ref)}"
            for a, b in zip(acts, ref):
                if (a.kind, a.stage, a.version, a.grad, a.nbytes) != (b.kind, b.stage, b.version, b.grad, b.nbytes):
                    return 1, f"replica {r} of stage {s} differs from replica 0 at {a}"
                if a.kind in (Kind.ALLREDUCE, Kind.STEP):
                    if a.mb != b.mb:
                        return 1, f"replica {r} of stage {s} differs from replica 0 at {a}"
                    continue
                if a.mb != b.mb + r or (a.peer is not None and rank[a.peer] != (rank[b.peer][0], r)):
                    return 1, f"replica {r} of stage {s} is no relabelled copy of replica 0 at {a}"
                if a.kind is not Kind.SEND:
                    continue
                hops_a, hops_b = topo.route(dev[w], dev[a.peer]), topo.route(dev[ws[0]], dev[b.peer])
                if [edges[h]["link"] for h in hops_a] != [edges[h]["link"] for h in hops_b]:
                    return 1, f"pipeline {r}'s link from stage {s} differs from pipeline 0's"
                for ha, hb in zip(hops_a, hops_b):
                    if edges[ha]["link"].bandwidth_bytes_per_s == float("inf"):
                        continue
                    if owner.setdefault(ha, r) != r:
                        return 1, f"pipelines {owner[ha]} and {r} share link {ha[0]}->{ha[1]}"
                    if to0[r].setdefault(ha, hb) != hb:
                        return 1, f"pipeline {r}'s links are not a copy of pipeline 0's"
    for r in range(R):
        if len(set(to0[r].values())) != len(to0[r]):
            return 1, f"pipeline {r}'s links are not a copy of pipeline 0's"
    if owner:
        for s, ws in enumerate(sw):
            nbytes = next((a.nbytes for a in p[ws[0]] if a.kind is Kind.ALLREDUCE), None)
            if nbytes is None:
                continue
            phases, _ = allreduce_phases(topo, [dev[w] for w in ws], nbytes, run.params.allreduce)
            for src, dst in dict.fromkeys((a, b) for ph in phases for a, b, _ in ph):
                for h in run.net.finite_hops(src, dst):
                    if h in owner:
                        return 1, f"stage {s}'s all-reduce shares link {h[0]}->{h[1]} with point-to-point traffic"
    return R, ""
