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

It also owns the one test both use of whether workers are exact images of one another
(``exact_copies``): the same device speed, and the same actions relabelled.
"""
from __future__ import annotations

from planner.program import Kind
from sim.collectives import dp_phases

_MB_KINDS = frozenset({Kind.F, Kind.B, Kind.BI, Kind.BW, Kind.SEND, Kind.RECV})  # ALLREDUCE/STEP count rounds


def exact_copies(run, wmap: dict[int, int], shift: dict[int, int]) -> str:
    """'' when every worker ``w`` of ``wmap`` is copied exactly by its image ``wmap[w]``, else why not.

    A copy runs on a device of the same speed, and its action list is ``w``'s with every peer mapped by
    ``wmap`` and every microbatch moved by ``shift[w]`` (the rounds of ALLREDUCE and STEP stay).
    ``sim.symmetry`` asks it of whole replica pipelines, ``sim.fold`` of each generator of its group.
    """
    p, topo, dev = run.p, run.topology, run.dev
    for w, img in wmap.items():
        if topo.device(dev[w]).speed != topo.device(dev[img]).speed:
            return f"workers {w} and {img} run on devices of different speeds"
    for w, img in wmap.items():
        a_list, b_list, dm = p[w], p[img], shift[w]
        if len(a_list) != len(b_list):
            return f"worker {img} runs {len(b_list)} actions, its preimage {w} {len(a_list)}"
        for a, b in zip(a_list, b_list):
            if (a.kind, a.stage, a.version, a.grad, a.nbytes) != (b.kind, b.stage, b.version, b.grad, b.nbytes):
                return f"worker {img} differs from worker {w} at {b}"
            want_mb = a.mb + dm if a.kind in _MB_KINDS else a.mb
            if b.mb != want_mb or (a.peer is not None and wmap.get(a.peer) != b.peer):
                return f"worker {img} is no relabelled copy of worker {w} at {b}"
    return ""


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
    for r in range(1, R):  # replica 0's workers onto replica r's, microbatches moved by r
        why = exact_copies(run, {ws[0]: ws[r] for ws in sw}, dict.fromkeys((ws[0] for ws in sw), r))
        if why:
            return 1, f"replica {r} is no copy of replica 0: {why}"
    edges = topo.graph.edges
    owner: dict[tuple[str, str], int] = {}   # finite p2p hop -> pipeline using it
    to0: list[dict[tuple[str, str], tuple[str, str]]] = [{} for _ in range(R)]
    for s, ws in enumerate(sw):
        ref = p[ws[0]]
        for r, w in enumerate(ws):
            for a, b in zip(p[w], ref):
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
            phases, _ = dp_phases(topo, [dev[w] for w in ws], nbytes, run.params.allreduce, run.params.zero_stage)
            for src, dst in dict.fromkeys((a, b) for ph in phases for a, b, _ in ph):
                for h in run.net.finite_hops(src, dst):
                    if h in owner:
                        return 1, f"stage {s}'s all-reduce shares link {h[0]}->{h[1]} with point-to-point traffic"
    return R, ""
