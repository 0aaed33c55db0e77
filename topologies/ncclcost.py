"""NCCL's own cost model of a ring collective: which protocol it picks for a message size, its latency, and the
fraction of the links' bandwidth that protocol reaches.

A topology's ``collectives`` mode says how both interpreters (the closed forms of ``validation.groundtruth_closed_form`` and the
SimPy simulator) time an all-reduce (``sim.collectives.priced``):

* ``ideal`` — the link model alone: every ring step pays its route's latency and the flows run at the links' full
  bandwidth (what pipetwin did before this module; ``ideal:N`` topologies and every "ring closed form on ideal links"
  test live here);
* ``nccl`` — the same flows, but each at the fraction of the link bandwidth the protocol NCCL would pick reaches, the
  ring's ``2(n − 1)`` steps fused into one phase per segment of the collective, and the whole collective paying
  NCCL's modelled latency (never less than the fused phases' own route latencies) instead of one route latency per
  step.

The model, written here from NCCL's published tuning code (not copied): NCCL predicts, for each algorithm and
protocol, ``time = latency + bytes / algorithm bandwidth`` and runs the protocol of least predicted time. For the
ring, ``algorithm bandwidth = bus bandwidth · n / nsteps`` (``nsteps = 2(n − 1)`` for an all-reduce, ``n − 1``
for a reduce-scatter or all-gather), so ``bytes / algorithm bandwidth`` is exactly the ring closed form on links of
the bus bandwidth. Here the bus bandwidth of the Simple protocol is the topology's link bandwidth (the ring closed
form's bottleneck: ``bandwidth_s``, the collective's time on the links with latencies left out), and the other two
protocols reach the fractions of it NCCL's model gives them.

Every constant, from ``NVIDIA/nccl`` ``src/graph/tuning.cc`` (``ncclTopoTuneModel`` and ``ncclTopoGetAlgoTime``;
read at commit 01afd20a77b5804e0ecf1042509dd9d20ebf9e93, the NCCL 2.8–2.9 series of 2021, the era of vTrain's
Megatron-DeepSpeed runs on A100s):

* ``BASE_LATENCY_US`` — ``baseLat`` for the Ring algorithm: LL 3.6 µs, LL128 10.0 µs, Simple 8.4 µs (once per call).
* ``HOP_LATENCY_US`` — ``hwLat`` for the Ring algorithm, per ring step: NVLink LL 0.47, LL128 1.9, Simple 3.4 µs;
  PCI 1.0, 2.5, 5.7 µs; network (a step that crosses nodes) 2.7, 4.0, 9.6 µs.
  A ring of ``n`` ranks on ``N`` nodes has ``2(N − 1)`` network steps of its ``2(n − 1)`` (all-reduce;
  ``N − 1`` of ``n − 1`` for a reduce-scatter or all-gather), the others intra-node.
* ``LL_INTRA_MULTINODE`` — an LL intra-node step costs 1.8× its latency when the communicator spans nodes.
* ``SIMPLE_PLATEAU`` — a multi-node Simple ring all-reduce of at least ``n / 16 · 65536`` bytes costs 1.9× its
  latency ("plateau effect of ring").
* ``LL_FRACTION`` — LL sends 8-byte lines of 4 data bytes plus flags: its bus bandwidth is 1/4 of Simple's for an
  all-reduce or any multi-node ring, 1/3 for a single-node reduce-scatter or all-gather.
* ``LL128_FRACTION`` — LL128 (120 data bytes of every 128): 0.92 of Simple's bus bandwidth, 0.7 with fewer than 2
  ranks per node (sending and receiving through the same NIC).
* Simple reaches the full bus bandwidth (fraction 1).

What is left out, and why: the per-architecture bus-bandwidth caps (``min(busBw, 235)`` GB/s on sm80, LL128's
per-channel cap) need NCCL's channel count, which the topology does not know — the topology's link bandwidth stands
for the bus bandwidth instead (vTrain's ~150 GB/s NVLink is below the sm80 cap); the Tree and CollNet algorithms
(the interpreters keep their own algorithm, ring or hierarchical, and only the protocol, its bandwidth fraction and
the ring's latency come from NCCL); LL128's enablement rules (it is taken as available, as it is on NVLink A100s).
"""
from __future__ import annotations

from dataclasses import dataclass

#: How a topology's all-reduces may be timed (``Topology.collectives``).
COLLECTIVE_MODES = ("ideal", "nccl")

PROTOCOLS = ("LL", "LL128", "Simple")
#: tuning.cc baseLat, Ring row (µs).
BASE_LATENCY_US = {"LL": 3.6, "LL128": 10.0, "Simple": 8.4}
#: tuning.cc hwLat, Ring column, per hardware class (µs per ring step).
HOP_LATENCY_US = {
    "nvlink": {"LL": 0.47, "LL128": 1.9, "Simple": 3.4},
    "pci": {"LL": 1.0, "LL128": 2.5, "Simple": 5.7},
    "net": {"LL": 2.7, "LL128": 4.0, "Simple": 9.6},
}
LL_INTRA_MULTINODE = 1.8
SIMPLE_PLATEAU = 1.9
SIMPLE_PLATEAU_BYTES_PER_RANK = 65536 / 16
LL_FRACTION = {"allreduce_or_multinode": 1 / 4, "single_node_pass": 1 / 3}
LL128_FRACTION = {"two_or_more_per_node": 0.92, "one_per_node": 0.7}
#: Link kinds whose intra-node ring steps NCCL times as NVLink (the others as PCI).
NVLINK_KINDS = ("nvlink", "nvswitch")
COLLECTIVES = ("allreduce", "reduce_scatter", "all_gather")


@dataclass(frozen=True)
class Choice:
    """What NCCL's model picks for one collective: the protocol, the fraction of the bus bandwidth it reaches,
    its latency in seconds, and the predicted time (latency + bandwidth time / fraction)."""

    protocol: str
    bandwidth_fraction: float
    latency_s: float
    time_s: float


def steps(collective: str, ranks: int, nodes: int) -> tuple[int, int]:
    """(ring steps, of which cross nodes) of ``collective`` over ``ranks`` ranks on ``nodes`` nodes."""
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; use one of {', '.join(COLLECTIVES)}")
    k = 2 if collective == "allreduce" else 1
    return k * (ranks - 1), k * (nodes - 1)


def bandwidth_fraction(protocol: str, collective: str, ranks: int, nodes: int) -> float:
    """The fraction of the Simple protocol's bus bandwidth ``protocol`` reaches (see the module docstring)."""
    if protocol == "Simple":
        return 1.0
    if protocol == "LL":
        multi = nodes > 1 or collective == "allreduce"
        return LL_FRACTION["allreduce_or_multinode" if multi else "single_node_pass"]
    if protocol == "LL128":
        return LL128_FRACTION["one_per_node" if ranks / nodes < 2 else "two_or_more_per_node"]
    raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")


def latency_s(protocol: str, collective: str, ranks: int, nodes: int, nbytes: float, intra: str = "nvlink") -> float:
    """NCCL's modelled latency of a ring ``collective`` of ``nbytes`` (the user buffer) over ``ranks`` ranks on
    ``nodes`` nodes, intra-node steps on ``intra`` hardware ("nvlink" or "pci")."""
    n_steps, n_inter = steps(collective, ranks, nodes)
    intra_lat = HOP_LATENCY_US[intra][protocol]
    if nodes > 1 and protocol == "LL":
        intra_lat *= LL_INTRA_MULTINODE
    lat = BASE_LATENCY_US[protocol] + (n_steps - n_inter) * intra_lat + n_inter * HOP_LATENCY_US["net"][protocol]
    if (protocol == "Simple" and nodes > 1 and collective == "allreduce"
            and nbytes >= ranks * SIMPLE_PLATEAU_BYTES_PER_RANK):
        lat *= SIMPLE_PLATEAU
    return lat * 1e-6


def choose(collective: str, ranks: int, nodes: int, nbytes: float, bandwidth_s: float,
           intra: str = "nvlink", protocols: tuple[str, ...] = PROTOCOLS) -> Choice:
    """The protocol NCCL's model predicts fastest for the collective, given ``bandwidth_s``: its time on the links
    at their full bandwidth with latencies left out (the ring closed form's bandwidth term). Ties go to the
    earlier protocol of ``protocols`` (NCCL's loop order)."""
    if ranks < 2 or nodes < 1 or nodes > ranks:
        raise ValueError(f"a ring needs 2+ ranks on 1..ranks nodes (got {ranks} ranks on {nodes} nodes)")
    if intra not in ("nvlink", "pci"):
        raise ValueError(f"intra must be 'nvlink' or 'pci' (got {intra!r})")
    best: Choice | None = None
    for p in protocols:
        f = bandwidth_fraction(p, collective, ranks, nodes)
        lat = latency_s(p, collective, ranks, nodes, nbytes, intra)
        t = lat + bandwidth_s / f
        if best is None or t < best.time_s:
            best = Choice(p, f, lat, t)
    assert best is not None
    return best


def ring_allreduce_s(ranks: int, nbytes: float, bus_bytes_per_s: float, nodes: int = 1, intra: str = "nvlink") -> Choice:
    """NCCL's predicted ring all-reduce of ``nbytes`` over ``ranks`` ranks on links of ``bus_bytes_per_s``:
    the ring closed form's bandwidth term ``2(n − 1)/n · S / B`` under :func:`choose`."""
    return choose("allreduce", ranks, nodes, nbytes, 2 * (ranks - 1) / ranks * nbytes / bus_bytes_per_s, intra)
