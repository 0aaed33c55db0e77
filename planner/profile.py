"""ModelProfile: per-layer costs of a model, and its readers (PipeDream graph.txt, native JSON, synthetic).

A profile is a chain of layers (branches folded into chain nodes, as PipeDream
does). Each layer has forward and backward seconds for the reference
microbatch size on the reference device, output activation bytes per sample,
saved-for-backward bytes per sample, and parameter bytes. A profile read from a
branchy graph also keeps the DAG (``graph``) so the PipeDream-compatible planner
can plan over antichains.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, asdict, replace
from pathlib import Path

from planner.tpcollectives import TPCollective, allreduces
from topologies.errors import InputError
from topologies.files import output_path


class ProfileError(InputError):
    """A profile that cannot be read; the message names the line or field."""


class ModelSpecError(ProfileError):
    """A model spec that names no known model or has a bad field; the message lists what is accepted.

    One type for every package's model grammar (``planner.analytic`` and ``executor.models``).
    """


@dataclass(frozen=True)
class Layer:
    """One chain node of a model.

    Attributes:
        name: human-readable name.
        forward_s: forward seconds per reference microbatch.
        backward_s: backward seconds per reference microbatch.
        activation_bytes: output activation bytes per sample (what a stage boundary after this layer sends).
        saved_bytes: bytes kept for backward per sample (defaults to activation_bytes when unknown).
        param_bytes: parameter bytes.
        tp_allreduce_bytes, tp_forward_allreduces, tp_backward_allreduces: a shorthand for a hand-made layer
            whose TP collectives are whole all-reduces of one size: that many all-reduces of that many bytes per
            sample in forward and in backward. Given (and ``tp_collectives`` not), they fill
            ``tp_collectives``; nothing reads them after that.
        tp_collectives: every tensor-parallel collective one TP rank of this layer issues per microbatch
            (``planner.tpcollectives.TPCollective``: phase, kind, bytes per sample), in issue order; empty
            without tensor parallelism. The one list every interpreter times (see :attr:`tp_forward`,
            :attr:`tp_backward`; ``planner.transformer_profile`` fills it by ``planner.tpcollectives.tp_collectives``).
        attention_saved_bytes: the part of ``saved_bytes`` that selective recomputation discards (the
            attention scores, softmax and dropout outputs: Korthikanti et al.'s 5·a·s²/T per sample).
        attention_forward_s: forward seconds (per reference microbatch) of that part: what selective
            recomputation adds to the backward.
        recomputable: full recomputation checkpoints and re-runs this layer (Megatron: the transformer
            blocks; the embedding and the output head keep their activations); see ``planner.recompute``.
    """

    name: str
    forward_s: float
    backward_s: float
    activation_bytes: float
    saved_bytes: float
    param_bytes: float
    tp_allreduce_bytes: float = 0.0
    tp_forward_allreduces: int = 0
    tp_backward_allreduces: int = 0
    attention_saved_bytes: float = 0.0
    attention_forward_s: float = 0.0
    recomputable: bool = True
    tp_collectives: tuple[TPCollective, ...] = ()

    def __post_init__(self) -> None:
        if not self.tp_collectives and (self.tp_forward_allreduces or self.tp_backward_allreduces):
            object.__setattr__(self, "tp_collectives", allreduces(self.tp_allreduce_bytes, self.tp_forward_allreduces,
                                                                  self.tp_backward_allreduces))
        elif not isinstance(self.tp_collectives, tuple):
            object.__setattr__(self, "tp_collectives", tuple(self.tp_collectives))

    @property
    def tp_forward(self) -> tuple[TPCollective, ...]:
        """The TP collectives of one forward, in issue order."""
        return tuple(c for c in self.tp_collectives if c.phase == "forward")

    @property
    def tp_backward(self) -> tuple[TPCollective, ...]:
        """The TP collectives of one backward (not counting a recomputed forward's), in issue order."""
        return tuple(c for c in self.tp_collectives if c.phase == "backward")


@dataclass(frozen=True)
class ProfileGraph:
    """The DAG a branchy profile came from: node ids in chain order and edges (src, dst)."""

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]
    #: node ids in the order the file lists them (PipeDream's own node order); empty when unknown.
    file_order: tuple[str, ...] = field(default=(), compare=False, repr=False)
    #: per node (in ``nodes`` order) the file's (forward_ms, backward_ms), for exact PipeDream arithmetic; empty when unknown.
    raw_ms: tuple[tuple[float, float], ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True)
class ModelProfile:
    """A model as a chain of layers with costs at a reference microbatch size.

    Attributes:
        name: model name.
        layers: the chain, in execution order.
        microbatch_size: samples per reference microbatch the times were taken at.
        device: the reference device the times were taken on.
        graph: the DAG the chain was folded from (None for a true chain).
        tensor_parallel: the tensor-parallel degree T the costs are per rank for (1: no TP).
        sequence_parallel: Megatron sequence parallelism (norms and dropouts split over the TP ranks,
            each TP all-reduce run as reduce-scatter + all-gather).
    """

    name: str
    layers: tuple[Layer, ...]
    microbatch_size: int = 1
    device: str = "reference"
    graph: ProfileGraph | None = None
    tensor_parallel: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        if not self.layers:
            raise ProfileError(f"profile {self.name!r} has no layers")
        if self.microbatch_size < 1:
            raise ProfileError(f"profile {self.name!r}: microbatch_size must be >= 1")
        if self.tensor_parallel < 1:
            raise ProfileError(f"profile {self.name!r}: tensor_parallel must be >= 1")

    def __len__(self) -> int:
        return len(self.layers)

    # --- range sums, used by planners and interpreters -------------------------------
    def forward_s(self, first: int, last: int) -> float:
        """Forward seconds of layers first..last (inclusive) per reference microbatch."""
        return sum(l.forward_s for l in self.layers[first : last + 1])

    def backward_s(self, first: int, last: int) -> float:
        return sum(l.backward_s for l in self.layers[first : last + 1])

    def param_bytes(self, first: int, last: int) -> float:
        return sum(l.param_bytes for l in self.layers[first : last + 1])

    def saved_bytes(self, first: int, last: int) -> float:
        """Bytes per sample kept for backward by layers first..last."""
        return sum(l.saved_bytes for l in self.layers[first : last + 1])

    def boundary_bytes(self, last: int) -> float:
        """Activation bytes per sample crossing the cut after layer ``last``."""
        return self.layers[last].activation_bytes

    @property
    def total_s(self) -> float:
        return sum(l.forward_s + l.backward_s for l in self.layers)

    def scaled(self, microbatch_size: int) -> "ModelProfile":
        """The same model at another microbatch size (times scale linearly; bytes are per sample)."""
        k = microbatch_size / self.microbatch_size
        layers = tuple(replace(l, forward_s=l.forward_s * k, backward_s=l.backward_s * k,
                               attention_forward_s=l.attention_forward_s * k) for l in self.layers)
        return replace(self, layers=layers, microbatch_size=microbatch_size)

    # --- native JSON ----------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "microbatch_size": self.microbatch_size,
            "device": self.device,
            "layers": [_layer_dict(l) for l in self.layers],
        }
        if self.tensor_parallel != 1 or self.sequence_parallel:
            d["tensor_parallel"] = self.tensor_parallel
            d["sequence_parallel"] = self.sequence_parallel
        if self.graph is not None:
            d["graph"] = {"nodes": list(self.graph.nodes), "edges": [list(e) for e in self.graph.edges]}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelProfile":
        try:
            layers = tuple(
                Layer(
                    name=str(l["name"]),
                    forward_s=float(l["forward_s"]),
                    backward_s=float(l["backward_s"]),
                    activation_bytes=float(l["activation_bytes"]),
                    saved_bytes=float(l.get("saved_bytes", l["activation_bytes"])),
                    param_bytes=float(l["param_bytes"]),
                    **{k: conv(l[k]) for k, conv in _OPTIONAL_LAYER_FIELDS.items() if k in l},
                    tp_collectives=tuple(TPCollective(**c) for c in l.get("tp_collectives", ())),
                )
                for l in d["layers"]
            )
        except KeyError as e:
            raise ProfileError(f"profile JSON: a layer lacks the field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ProfileError(f"profile JSON: bad layer value ({e})") from None
        graph = None
        if d.get("graph"):
            g = d["graph"]
            graph = ProfileGraph(tuple(g["nodes"]), tuple(tuple(e) for e in g["edges"]))
        return cls(
            name=str(d.get("name", "model")),
            layers=layers,
            microbatch_size=int(d.get("microbatch_size", 1)),
            device=str(d.get("device", "reference")),
            graph=graph,
            tensor_parallel=int(d.get("tensor_parallel", 1)),
            sequence_parallel=bool(d.get("sequence_parallel", False)),
        )

    def save(self, path: str | Path) -> None:
        output_path(path).write_text(json.dumps(self.to_dict(), indent=1))


#: Layer fields that older profiles lack (each read with its type; absent means the default).
_OPTIONAL_LAYER_FIELDS = {"tp_allreduce_bytes": float, "tp_forward_allreduces": int, "tp_backward_allreduces": int,
                          "attention_saved_bytes": float, "attention_forward_s": float, "recomputable": bool}


_LAYER_DEFAULTS = {f.name: f.default for f in fields(Layer)}


def _layer_dict(layer: Layer) -> dict:
    """A layer as JSON, leaving out optional fields at their defaults (so old profiles print as before)."""
    d = asdict(layer)
    for k in _OPTIONAL_LAYER_FIELDS:
        if d[k] == _LAYER_DEFAULTS[k]:
            del d[k]
    if not d["tp_collectives"] or layer.tp_collectives == allreduces(
            layer.tp_allreduce_bytes, layer.tp_forward_allreduces, layer.tp_backward_allreduces):
        del d["tp_collectives"]  # none, or what the shorthand fields give back
    return d


def uniform_profile(
    layers: int, fwd: float, bwd: float, act: float = 0.0, params: float = 0.0, saved: float | None = None
) -> ModelProfile:
    """A synthetic chain of identical layers (times per layer per microbatch, bytes per sample)."""
    if layers < 1:
        raise ProfileError("uniform model needs layers >= 1")
    layer = lambda i: Layer(f"layer{i}", fwd, bwd, act, act if saved is None else saved, params)
    return ModelProfile(name=f"uniform{layers}", layers=tuple(layer(i) for i in range(layers)))


_UNIFORM_KEYS = {"layers": int, "fwd": float, "bwd": float, "act": float, "params": float, "saved": float}


def parse_uniform_spec(spec: str) -> ModelProfile:
    """Parse ``uniform:layers=L,fwd=S,bwd=S,act=B,params=B``."""
    body = spec.split(":", 1)[1] if ":" in spec else ""
    kwargs: dict = {}
    for part in filter(None, body.split(",")):
        if "=" not in part:
            raise ProfileError(f"uniform model: {part!r} is not key=value (keys: {', '.join(_UNIFORM_KEYS)})")
        k, v = part.split("=", 1)
        k = k.strip()
        if k not in _UNIFORM_KEYS:
            raise ProfileError(f"uniform model: unknown key {k!r} (keys: {', '.join(_UNIFORM_KEYS)})")
        try:
            kwargs[k] = _UNIFORM_KEYS[k](float(v)) if _UNIFORM_KEYS[k] is int else float(v)
        except ValueError:
            raise ProfileError(f"uniform model: {k}={v!r} is not a number") from None
    kwargs.setdefault("layers", 8)
    kwargs.setdefault("fwd", 1e-3)
    kwargs.setdefault("bwd", 2 * kwargs["fwd"])
    return uniform_profile(**kwargs)


# --- PipeDream graph.txt --------------------------------------------------------------
_NODE_RE = re.compile(r"^(\S+)\s+--\s+(.*?)\s+--\s+(forward_compute_time=.*?)(?:\s+--\s+stage_id=(\d+))?\s*$")
_FIELD_RE = re.compile(r"(\w+)=(\[[^\]]*\]|[^,]+)")


def _number(text: str, lineno: int, key: str) -> float:
    text = text.strip()
    try:
        if text.startswith("["):
            return float(sum(float(x) for x in re.split(r"[;,]", text.strip("[] ")) if x.strip()))
        return float(text)
    except ValueError:
        raise ProfileError(f"graph.txt line {lineno}: {key}={text!r} is not a number") from None


def read_pipedream_graph(path: str | Path, name: str | None = None) -> ModelProfile:
    """Read a PipeDream ``graph.txt`` profile into a chain ModelProfile (keeping its DAG).

    Nodes are ordered topologically (ties by file order); times are milliseconds
    per minibatch at the profiled batch size and become seconds. A source node
    whose description starts with ``Input`` (data loading) gets no compute time,
    as in PipeDream's optimizer (``graph.raw_ms`` keeps the file's figures). The chain's
    ``activation_bytes`` at position k is the sum of outputs of nodes at or before
    k that feed a node after k (what a cut there must send).
    """
    path = Path(path)
    if not path.exists():
        raise ProfileError(f"profile file {str(path)!r} does not exist")
    nodes: dict[str, dict] = {}
    order: list[str] = []
    edges: list[tuple[str, str]] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        if raw[0] in " \t":
            parts = [p.strip() for p in raw.strip().split("--")]
            if len(parts) != 2 or not all(parts):
                raise ProfileError(f"graph.txt line {lineno}: edge must be 'nodeX -- nodeY', got {raw.strip()!r}")
            edges.append((parts[0], parts[1]))
            continue
        m = _NODE_RE.match(raw.strip())
        if not m:
            raise ProfileError(
                f"graph.txt line {lineno}: expected 'nodeN -- desc -- forward_compute_time=F, backward_compute_time=B, "
                f"activation_size=A, parameter_size=P', got {raw.strip()[:80]!r}"
            )
        nid, desc, fields, _stage = m.groups()
        vals = {k: v for k, v in _FIELD_RE.findall(fields)}
        for key in ("forward_compute_time", "backward_compute_time", "activation_size", "parameter_size"):
            if key not in vals:
                raise ProfileError(f"graph.txt line {lineno}: missing {key}")
        fwd_ms = _number(vals["forward_compute_time"], lineno, "forward_compute_time")
        bwd_ms = _number(vals["backward_compute_time"], lineno, "backward_compute_time")
        nodes[nid] = {
            "desc": desc,
            "fwd_ms": fwd_ms,
            "bwd_ms": bwd_ms,
            "fwd": fwd_ms / 1e3,
            "bwd": bwd_ms / 1e3,
            "act": _number(vals["activation_size"], lineno, "activation_size"),
            "params": _number(vals["parameter_size"], lineno, "parameter_size"),
        }
        order.append(nid)
    if not nodes:
        raise ProfileError(f"graph.txt {str(path)!r} has no nodes")
    for a, b in edges:
        for n in (a, b):
            if n not in nodes:
                raise ProfileError(f"graph.txt: edge {a} -- {b} names unknown node {n!r}")
    topo = _topological(order, edges)
    pos = {n: i for i, n in enumerate(topo)}
    succ: dict[str, list[str]] = {n: [] for n in topo}
    for a, b in edges:
        succ[a].append(b)
    # bytes crossing the cut after position k
    last_use = {n: max((pos[s] for s in succ[n]), default=pos[n]) for n in topo}
    fed = {b for _a, b in edges}
    layers = []
    for k, n in enumerate(topo):
        crossing = sum(nodes[u]["act"] for u in topo[: k + 1] if last_use[u] > k)
        if k == len(topo) - 1:
            crossing = nodes[n]["act"]
        nd = nodes[n]
        # a source that loads data (PipeDream's "Input" node) is no compute: PipeDream's optimizer drops it
        free = nd["desc"].startswith("Input") and n not in fed
        fwd, bwd = (0.0, 0.0) if free else (nd["fwd"], nd["bwd"])
        layers.append(Layer(f"{n}:{nd['desc'][:40]}", fwd, bwd, crossing, nd["act"], nd["params"]))
    raw_ms = tuple((nodes[n]["fwd_ms"], nodes[n]["bwd_ms"]) for n in topo)
    graph = ProfileGraph(tuple(topo), tuple(edges), file_order=tuple(order), raw_ms=raw_ms)
    return ModelProfile(name=name or path.name.split(".")[0], layers=tuple(layers), microbatch_size=1, graph=graph)


def _topological(order: list[str], edges: list[tuple[str, str]]) -> list[str]:
    import heapq

    rank = {n: i for i, n in enumerate(order)}
    indeg = {n: 0 for n in order}
    succ: dict[str, list[str]] = {n: [] for n in order}
    for a, b in edges:
        succ[a].append(b)
        indeg[b] += 1
    ready = [(rank[n], n) for n in order if indeg[n] == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, n = heapq.heappop(ready)
        out.append(n)
        for s in succ[n]:
            indeg[s] -= 1
            if indeg[s] == 0:
                heapq.heappush(ready, (rank[s], s))
    if len(out) != len(order):
        raise ProfileError("graph.txt: the graph has a cycle; PipeDream profiles are DAGs")
    return out


def load_profile(source: str) -> ModelProfile:
    """Load a profile from a path (``.json`` native, otherwise PipeDream graph.txt) or a ``uniform:`` spec."""
    if source.startswith("uniform"):
        return parse_uniform_spec(source)
    p = Path(source)
    if not p.exists():
        raise ProfileError(f"profile {source!r} does not exist (give a .json profile, a graph.txt, or uniform:...)")
    if p.suffix == ".json":
        try:
            return ModelProfile.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile {source!r} is not valid JSON: {e}") from None
    return read_pipedream_graph(p)
