"""All-reduce among a stage's replicas as phases of concurrent flows on the link model.

A collective is a list of phases; a phase is a set of (src, dst, bytes) flows
started together, and the next phase starts when every flow of the previous
one is delivered. Its cost is whatever the network makes of those flows.

- ring: 2(n − 1) phases of n flows of S/n bytes, replica i to replica i + 1.
- ring all-gather or reduce-scatter (``ring_pass_phases``; ZeRO's collectives): n − 1
  phases of n flows of S/n.
- fused ring (``fused_ring_phases``): the ring's 2(n − 1) phases as one phase of n
  flows of 2(n − 1)/n·S bytes, plus the 2(n − 1) − 1 route latencies the later
  phases would add (``Collective``'s ``tail_s``). On links nothing else uses it
  costs what the ring costs, to the rounding of a float; under contention each
  neighbour pair drains at its own fair rate instead of waiting for the slowest
  pair at every phase. It takes one flow event per pair instead of 2(n − 1): the
  simulator's default for the tensor-parallel all-reduces inside compute actions.
- hierarchical, replicas spread evenly over g-device groups (servers) of the
  topology's innermost level: reduce inside each server (a ring reduce-scatter,
  g − 1 phases of S/g), ring across servers (g parallel rings, one per shard,
  2(k − 1) phases of S/(g·k)), broadcast inside (a ring all-gather, g − 1 phases
  of S/g). Uneven groups: every member sends S to its server's leader, a ring
  across the leaders, the leader sends S back to every member.

How long the phases take is the topology's ``collectives`` mode (``priced``): ``ideal`` runs them as they are,
``nccl`` prices an all-reduce by NCCL's own model (``topologies.ncclcost``: the protocol NCCL would pick for the size, the
fraction of link bandwidth it reaches, its latency). Both interpreters call ``priced`` on the same phases, so the
closed form and the simulator agree on links nothing else uses.
"""
from __future__ import annotations

from typing import Any, Callable

from sim.network import Network
from topologies.topology import Topology

Phase = list[tuple[str, str, float]]


def server_groups(topology: Topology, devices: list[str]) -> list[list[str]]:
    """``devices`` grouped by the topology's innermost domain, groups in first-appearance order."""
    where = {d: i for i, dom in enumerate(topology.domains(0)) for d in dom}
    groups: dict[int, list[str]] = {}
    for d in devices:
        groups.setdefault(where.get(d, -1 - len(groups)), []).append(d)
    return list(groups.values())


def ring_phases(devices: list[str], nbytes: float) -> list[Phase]:
    n = len(devices)
    if n < 2:
        return []
    chunk = nbytes / n
    step = [(devices[i], devices[(i + 1) % n], chunk) for i in range(n)]
    return [step] * (2 * (n - 1))


def ring_pass_phases(devices: list[str], nbytes: float) -> list[Phase]:
    """A ring all-gather or reduce-scatter of an ``nbytes`` tensor: n − 1 phases of n flows of nbytes/n
    (half of :func:`ring_phases`'s all-reduce)."""
    n = len(devices)
    if n < 2 or nbytes <= 0:
        return []
    chunk = nbytes / n
    return [[(devices[i], devices[(i + 1) % n], chunk) for i in range(n)]] * (n - 1)


def fused_ring_phases(devices: list[str], nbytes: float, route_latency_s: float,
                      steps: int | None = None) -> tuple[list[Phase], float]:
    """(phases, tail seconds) of a ring of ``steps`` steps run as one phase (see the module docstring): an
    all-reduce's 2(n − 1) by default, n − 1 for an all-gather or a reduce-scatter."""
    n = len(devices)
    if n < 2:
        return [], 0.0
    k = 2 * (n - 1) if steps is None else steps
    share = k / n * nbytes
    return [[(devices[i], devices[(i + 1) % n], share) for i in range(n)]], (k - 1) * route_latency_s


def hierarchical_phases(groups: list[list[str]], nbytes: float) -> list[Phase]:
    k = len(groups)
    sizes = {len(g) for g in groups}
    if k == 1:
        return ring_phases(groups[0], nbytes)
    if len(sizes) == 1:
        g = sizes.pop()
        if g == 1:
            return ring_phases([grp[0] for grp in groups], nbytes)
        inside = [(grp[i], grp[(i + 1) % g], nbytes / g) for grp in groups for i in range(g)]
        across = [(groups[c][j], groups[(c + 1) % k][j], nbytes / (g * k)) for j in range(g) for c in range(k)]
        return [inside] * (g - 1) + [across] * (2 * (k - 1)) + [inside] * (g - 1)
    leaders = [grp[0] for grp in groups]
    reduce = [(m, grp[0], nbytes) for grp in groups for m in grp[1:]]
    bcast = [(grp[0], m, nbytes) for grp in groups for m in grp[1:]]
    return ([reduce] if reduce else []) + ring_phases(leaders, nbytes) + ([bcast] if bcast else [])


def allreduce_phases(topology: Topology, devices: list[str], nbytes: float, algorithm: str) -> tuple[list[Phase], str]:
    """The phases of an all-reduce of ``nbytes`` among ``devices`` and the algorithm chosen."""
    groups = server_groups(topology, devices)
    spread = len(groups) > 1 and max(len(g) for g in groups) > 1
    if algorithm == "hierarchical" or (algorithm == "auto" and spread):
        return hierarchical_phases(groups, nbytes), "hierarchical"
    return ring_phases([d for g in groups for d in g], nbytes), "ring"


def dp_phases(topology: Topology, devices: list[str], nbytes: float, algorithm: str,
              zero_stage: int = 0) -> tuple[list[Phase], str]:
    """The phases a stage's data-parallel collectives run on, for a stage of ``nbytes`` parameter bytes (a
    profile's) over ``devices``: the all-reduce (ZeRO 0); a ring reduce-scatter then all-gather of the 16-bit
    tensor (1, 2); one ring pass of it (3: each unit's gathers and reduce-scatters take that ring's pairs)."""
    from planner.sharding import collective_bytes

    if zero_stage == 0:
        return allreduce_phases(topology, devices, nbytes, algorithm)
    one = ring_pass_phases(devices, collective_bytes(nbytes))
    if zero_stage < 3:
        return one * 2, "ring reduce-scatter + all-gather"
    return one, "ring all-gathers + reduce-scatters"


def fuse(phases: list[Phase]) -> list[Phase]:
    """Consecutive repeats of one phase object as one phase of the flows' bytes times the repeats (a ring's
    2(n − 1) steps become one phase; a hierarchical all-reduce's three segments three)."""
    out: list[Phase] = []
    i = 0
    while i < len(phases):
        j = i
        while j + 1 < len(phases) and phases[j + 1] is phases[i]:
            j += 1
        k = j - i + 1
        out.append(phases[i] if k == 1 else [(a, b, x * k) for a, b, x in phases[i]])
        i = j + 1
    return out


def phase_cost_s(topology: Topology, phase: Phase) -> tuple[float, float]:
    """(the slowest flow's route latency, the most loaded link's bytes over its bandwidth) of one phase on links
    nothing else uses: what the phase costs is their sum (``validation.groundtruth_closed_form.phases_time_s``)."""
    edges = topology.graph.edges
    load: dict[tuple[str, str], float] = {}
    lat = 0.0
    for src, dst, nbytes in phase:
        route_lat = 0.0
        for hop in topology.route(src, dst):
            route_lat += edges[hop]["link"].latency_s
            load[hop] = load.get(hop, 0.0) + nbytes
        lat = max(lat, route_lat)
    bw = max((x / edges[hop]["link"].bandwidth_bytes_per_s for hop, x in load.items()), default=0.0)
    return lat, bw


def priced(topology: Topology, devices: list[str], phases: list[Phase], nbytes: float,
           collective: str = "allreduce") -> tuple[list[Phase], float]:
    """(phases, tail seconds) of a ``collective`` of ``nbytes`` among ``devices`` built as ``phases``, under the
    topology's ``collectives`` mode. ``ideal``: the phases as they are, no tail. ``nccl``: the repeats fused
    (``fuse``), every flow's bytes divided by the bandwidth fraction of the protocol NCCL's model picks
    (``Topology.nccl_choice`` on the phases' bandwidth time), and a tail that brings the fused phases' own route
    latencies up to NCCL's modelled latency."""
    mode = getattr(topology, "collectives", "ideal")
    if mode == "ideal" or not phases or len(devices) < 2 or nbytes <= 0:
        return phases, 0.0
    fused = fuse(phases)
    costs = [phase_cost_s(topology, ph) for ph in fused]
    choice = topology.nccl_choice(devices, nbytes, sum(b for _, b in costs), collective)
    f = choice.bandwidth_fraction
    scaled = fused if f == 1.0 else [[(a, b, x / f) for a, b, x in ph] for ph in fused]
    return scaled, max(0.0, choice.latency_s - sum(l for l, _ in costs))


class Collective:
    """Runs phases one after another on a network, then waits ``tail_s``; ``done(arg)`` at the end (unless it
    finished at once)."""

    __slots__ = ("net", "phases", "done", "arg", "label", "k", "waiting", "tail_s")

    def __init__(self, net: Network, phases: list[Phase], done: Callable[[Any], None], arg: Any, label: Any,
                 tail_s: float = 0.0):
        self.net, self.phases, self.done, self.arg, self.label = net, phases, done, arg, label
        self.k = 0
        self.waiting = 0
        self.tail_s = tail_s

    def start(self) -> bool:
        """Start; True when the whole collective completed at once (``done`` is then not called)."""
        if self._advance():
            if self.tail_s <= 0.0:
                return True
            self._finish()
        return False

    def _finish(self) -> None:
        if self.tail_s > 0.0:
            self.net.env.timeout(self.tail_s).callbacks.append(lambda _ev: self.done(self.arg))
        else:
            self.done(self.arg)

    def _advance(self) -> bool:
        transfer, label, flow_done = self.net.transfer, self.label, self._flow_done
        while self.k < len(self.phases):
            phase = self.phases[self.k]
            self.k += 1
            pending = 0
            for src, dst, nbytes in phase:
                if not transfer(src, dst, nbytes, flow_done, None, label):
                    pending += 1
            if pending:
                self.waiting = pending
                return False
        return True

    def _flow_done(self, _arg: Any) -> None:
        self.waiting -= 1
        if self.waiting == 0 and self._advance():
            self._finish()
